"""Queue control at the uplink (issue 10, item 4): CoDel's dropping state with a clock
of the test's own, which packet it drops, the sparse-flows-first split on real packets,
and end to end on netns: every packet an uplink read is logged once unless the
queue control dropped it, and says so in its counter."""

from __future__ import annotations

import itertools
import math
import re

import dpkt
import pytest

from pgvpn.config import load_config
from pgvpn.errors import ConfigError
from pgvpn.queuecontrol import BULK_BYTES, CoDel, bulk_victim, flow_of, sparse_first
from tests.conftest import LabHandle
from tests.peerside import lab_cli, last_start
from tests.test_faults import assert_nothing_lost
from tests.test_tunnel import iperf_while, quiet_snapshot, stream_transfer

TARGET, INTERVAL = 0.005, 0.1
BULK, SMALL = b"x" * 1400, b"x" * 84


def test_codel_waits_a_whole_interval_above_target_before_its_first_drop() -> None:
    codel = CoDel(TARGET, INTERVAL)
    frames = [SMALL, BULK, SMALL]
    assert codel.choose(frames, 0.006, now=10.0) is None  # above target: the clock starts
    assert codel.choose(frames, 0.006, now=10.05) is None
    assert codel.choose(frames, 0.004, now=10.08) is None  # below once: starts again
    assert codel.choose(frames, 0.006, now=10.09) is None
    assert codel.choose(frames, 0.006, now=10.15) is None
    assert codel.choose(frames, 0.006, now=10.19) == 1  # 100 ms above: the bulk packet
    assert codel.drops == 1 and codel.dropping


def test_codel_drops_faster_while_the_wait_stays_high_and_stops_below_target() -> None:
    codel = CoDel(TARGET, INTERVAL)
    frames = [BULK, SMALL]
    codel.choose(frames, 0.01, now=0.0)
    assert codel.choose(frames, 0.01, now=0.1) == 0
    drops = [now for now in (x / 1000 for x in range(101, 500))
             if codel.choose(frames, 0.01, now=now) is not None]
    gaps = [b - a for a, b in itertools.pairwise([0.1, *drops])]
    # the control law: the n-th drop comes interval / sqrt(n - 1) after the one before
    # (this clock ticks in ms: a drop comes at the first tick after it is due)
    assert len(gaps) >= 4
    for n, gap in enumerate(gaps, 2):
        assert gap == pytest.approx(INTERVAL / math.sqrt(n - 1), abs=0.0015), (n, gaps)
    assert codel.choose(frames, 0.001, now=0.6) is None and not codel.dropping
    assert codel.drops == len(drops) + 1


def test_codel_never_drops_a_small_packet_nor_the_only_one() -> None:
    codel = CoDel(TARGET, INTERVAL)
    for now in (0.0, 0.2, 0.4, 0.6):
        assert codel.choose([SMALL] * 50, 1.0, now=now) is None
        assert codel.choose([BULK], 1.0, now=now + 0.1) is None
    assert codel.drops == 0
    assert bulk_victim([SMALL, b"y" * BULK_BYTES, BULK]) == 2
    assert bulk_victim([SMALL, b"y" * (BULK_BYTES - 1)]) is None


def test_codel_refuses_a_target_of_nothing() -> None:
    with pytest.raises(ValueError):
        CoDel(0.0)


def ipv4(sport: int, size: int, proto: int = 6) -> bytes:
    segment = (dpkt.tcp.TCP(sport=sport, dport=5201, data=b"d" * size) if proto == 6 else
               dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=sport, data=b"p" * size)))
    ip = dpkt.ip.IP(src=bytes([10, 230, 0, 1]), dst=bytes([10, 230, 0, 2]), p=proto,
                    data=segment)
    ip.len = len(ip)
    return bytes(ip)


def ipv6(sport: int, size: int) -> bytes:
    ip = dpkt.ip6.IP6(src=b"\xfd" + b"\0" * 14 + b"\1", dst=b"\xfd" + b"\0" * 14 + b"\2",
                      nxt=6, hlim=64, data=dpkt.tcp.TCP(sport=sport, dport=22, data=b"k" * size))
    ip.plen = len(ip.data)
    return bytes(ip)


def test_flows_are_told_apart_by_addresses_protocol_and_ports() -> None:
    assert flow_of(ipv4(1000, 10)) == flow_of(ipv4(1000, 1400))
    assert flow_of(ipv4(1000, 10)) != flow_of(ipv4(1001, 10))
    assert flow_of(ipv4(1000, 10)) != flow_of(ipv4(1000, 10, proto=1))
    assert flow_of(ipv6(1000, 10)) == flow_of(ipv6(1000, 900))
    assert flow_of(ipv6(1000, 10)) != flow_of(ipv6(2000, 10))


def test_sparse_flows_go_first_and_every_flow_keeps_its_order() -> None:
    bulk = [ipv4(1000, 1400), ipv4(1000, 1400), ipv4(1000, 200)]  # its small tail included
    echo, keys = ipv4(7, 56, proto=1), [ipv6(2000, 1), ipv6(2000, 2)]
    frames = [bulk[0], echo, keys[0], bulk[1], keys[1], bulk[2]]
    sparse, rest = sparse_first(frames, memoryview)
    assert sparse == [echo, *keys]
    assert rest == bulk  # the bulk flow's small segment stays behind its big ones
    assert sparse_first(bulk, memoryview) == ([], bulk)  # one flow: nothing to gain
    assert sparse_first([echo, *keys], memoryview) == ([], [echo, *keys])  # no bulk


@pytest.mark.parametrize("value", ["-1", "1001", "5ms", "0.5"])
def test_a_bad_queue_target_is_one_clear_error(value: str) -> None:
    env = {"PGVPN_NAME": "peer-a", "PGVPN_PEER": "peer-b", "TUN_IP": "10.230.0.1/24",
           "DATABASE_URL": "postgresql://h/db", "PGVPN_QUEUE_TARGET_MS": value}
    with pytest.raises(ConfigError, match="PGVPN_QUEUE_TARGET_MS"):
        load_config(environ=env)


QUEUE_DROPS = re.compile(r'^pgvpn_queue_drops_total\{peer="[^"]+"\} (\S+)$', re.MULTILINE)
SCRAPE = ("import urllib.request; print(urllib.request.urlopen("
          "'http://127.0.0.1:9108/metrics', timeout=5).read().decode())")


def queue_drops(lab: LabHandle, host: str) -> int:
    found = QUEUE_DROPS.search(lab.exec(host, "python3", "-c", SCRAPE).stdout)
    assert found, f"{host} exports no pgvpn_queue_drops_total"
    return int(float(found.group(1)))


def test_with_queue_control_every_packet_read_is_logged_or_counted_as_dropped(
        netns_lab: LabHandle) -> None:
    """An iperf3 stream and a byte-exact transfer with queue control on: each uplink's
    rows equal what it read from its TUN less what its CoDel dropped (counted in the
    metrics), each sender's numbering has no gap, no TUN received more than its peer
    logged for it, and the stream arrives whole. On netns only (CI's time): the setting
    reaches the agents through the topology file, which both backends read
    (test_topology)."""
    lab_cli(netns_lab, "up", "--queue-control", "on")
    try:
        for host in ("peer-a", "peer-b"):
            assert last_start(netns_lab, host)["queue_ms"] == "5"
        before = quiet_snapshot(netns_lab)
        drops0 = {host: queue_drops(netns_lab, host) for host in ("peer-a", "peer-b")}
        assert iperf_while(netns_lab, lambda: None, duration=4, after=0) is not None
        assert stream_transfer(netns_lab, 4_000_000)
        drops = {host: queue_drops(netns_lab, host) - drops0[host]
                 for host in ("peer-a", "peer-b")}
        assert_nothing_lost(netns_lab, before, drops)
    finally:
        lab_cli(netns_lab, "up", "--queue-control", "off")
    assert last_start(netns_lab, "peer-a")["queue_ms"] is None
