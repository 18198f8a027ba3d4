"""Bad input: settings, frames from the TUN and rows in the log that are not packets.

None of it may crash anything: a setting is refused in one line, a frame or a row
is counted, dropped and reported (at most a line a second), and traffic goes on.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import dpkt
import pytest

from lab.measure import ping
from tests.conftest import ROOT, CliBackend, LabHandle
from tests.peerside import agent_log, counted_warnings, lab_cli, owner_execute, wait_for
from tests.test_tunnel import logged_between, quiet_snapshot

PEER_A, PEER_B = "10.230.0.1", "10.230.0.2"
BASE_ENV = {"PATH": "/usr/bin:/bin", "PGVPN_NAME": "peer-a", "PGVPN_PEER": "peer-b",
            "TUN_IP": "10.230.0.1/24", "TUN_PEER": "10.230.0.2"}
BAD_FRAMES_LOG = "dropped frames read from pgvpn0 that are not IPv4/IPv6 packets"
BAD_ROWS_LOG = "skipped logged rows from peer-a that are not packets for this TUN"


@pytest.mark.parametrize(("env", "message"), [
    ({"TUN_IP": ""}, "missing setting: tun_ip ($TUN_IP)"),
    ({"PGVPN_PEER": "", "PGVPN_ROUTING": "peer"}, "routing 'peer' sends every packet to one "
                                                  "peer: set peer ($PGVPN_PEER)"),
    ({"TUN_IP": "10.230.0.999/24"}, "tun_ip = '10.230.0.999/24' (from $TUN_IP)"),
    ({"PGVPN_MTU": "10"}, "mtu = '10' (from $PGVPN_MTU): must be a whole number between 576 "
                              "and 65535"),
    ({"PGVPN_PROFILE": "fastest"}, "profile = 'fastest' (from $PGVPN_PROFILE): unknown"),
    ({"PGVPN_NAME": "peer_a"}, "use 1-57 characters: lower-case letters, digits or '-'"),
    ({"PGVPN_NAME": "agent"}, "'agent' is reserved"),
    ({"PGVPN_ALLOW_PLAINTEXT": "perhaps"}, "allow_plaintext = 'perhaps'"),
    ({"PGVPN_MAX_REPLAY_AGE": "-1"}, "max_replay_age = '-1'"),
])
def test_agent_config_errors_are_one_line_without_traceback(env: dict[str, str],
                                                            message: str) -> None:
    merged = {k: v for k, v in {**BASE_ENV, **env}.items() if v}
    done = subprocess.run([sys.executable, "-m", "pgvpn.cli", "run"], capture_output=True,
                          text=True, env=merged, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("pgvpn: error: ")
    assert message in done.stderr


def test_a_broken_config_file_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text("name: peer-a\npeer: [peer-b\n")
    done = subprocess.run([sys.executable, "-m", "pgvpn.cli", "run", "--config", str(config)],
                          capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"},
                          cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 2 and "is not valid YAML" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["up", "--mtu", "10"], "argument --mtu: '10': must be 576-65535"),
    (["up", "--profile", "fastest"], "invalid choice: 'fastest'"),
    (["bench", "--profile", "fastest,blog-v1"], "unknown profile fastest"),
    (["up", "--backend", "vmware"], "invalid choice: 'vmware'"),
])
def test_lab_setting_errors_are_clear(args: list[str], message: str) -> None:
    # a lab name of its own: nothing of any real lab is looked at
    env = {**os.environ, "PGVPN_LAB_NAME": "pgvpn-badinput"}
    done = subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=60, check=False)
    assert done.returncode == 2 and message in done.stderr
    assert "Traceback" not in done.stderr
    assert not Path("/var/tmp/pgvpn-badinput-lab").exists()


INJECT = """\
import socket
frames = [bytes(40), b"\\x45" + bytes(10), b"\\x45\\x00\\x00\\x54" + bytes(56),
          b"\\x60" + bytes(20), b"\\xff" * 100, b"\\x44" + bytes(39)]
s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
s.bind(("pgvpn0", 0))
for frame in frames:
    s.send(frame)
print(len(frames))
"""


def test_frames_that_are_not_packets_are_counted_and_dropped(any_lab: LabHandle) -> None:
    """A packet socket writes garbage into peer-a's TUN: its agent reads and drops it."""
    index = any_lab.tun_link("peer-a")["ifindex"]
    tun_a0, _, logged0 = quiet_snapshot(any_lab)
    reported0 = counted_warnings(agent_log(any_lab, "peer-a", 5000), BAD_FRAMES_LOG)
    sent = int(any_lab.exec("peer-a", "python3", "-c", INJECT).stdout)
    tun_a1, _, logged1 = quiet_snapshot(any_lab)
    read = tun_a1["tx"] - tun_a0["tx"]
    logged = logged_between(any_lab, logged0, logged1)["peer-a"]
    assert read - logged == sent  # none of them logged
    wait_for(lambda: counted_warnings(agent_log(any_lab, "peer-a", 5000), BAD_FRAMES_LOG)
             - reported0 == sent, "the agent to report the dropped frames")
    assert any_lab.tun_link("peer-a")["ifindex"] == index  # the same agent, still running
    assert ping(CliBackend(any_lab), "peer-a", PEER_B, count=2).received == 2


def icmp_echo(payload: bytes) -> bytes:
    """An echo request from peer-a to peer-b, checksums right, as its kernel would send."""
    echo = dpkt.icmp.ICMP(type=8, data=dpkt.icmp.ICMP.Echo(id=7, seq=1, data=payload))
    ip = dpkt.ip.IP(src=bytes([10, 230, 0, 1]), dst=bytes([10, 230, 0, 2]), p=1, ttl=64,
                    data=echo)
    ip.len = len(ip)
    return bytes(ip)


def bad_rows() -> dict[str, bytes]:
    good = icmp_echo(b"x" * 56)
    ipv6 = bytearray(b"\x60" + bytes(39) + bytes(8))
    ipv6[4:6] = (100).to_bytes(2, "big")  # claims 100 bytes of payload, has 8
    return {  # an empty row, or one over 65535 bytes, is refused (tests/test_bounds.py)
        "not IP": bytes(60),
        "truncated": good[:-10],
        "padded": good + bytes(4),
        "bad IPv6 length": bytes(ipv6),
        "larger than the MTU": icmp_echo(b"y" * 2972),  # a whole IPv4 packet of 3000 bytes
        "as large as a row may be": b"\x45" + os.urandom(65_534),
    }


def test_rows_that_are_not_packets_are_skipped_and_logged(any_lab: LabHandle) -> None:
    """The owner writes rows into peer-a's stream by hand; peer-b's agent must skip them."""
    quiet_snapshot(any_lab)
    index = any_lab.tun_link("peer-b")["ifindex"]
    reported0 = counted_warnings(agent_log(any_lab, "peer-b", 5000), BAD_ROWS_LOG)
    lab_cli(any_lab, "stop", "peer-a")  # so that nothing else writes peer-a's stream now
    try:
        rx0 = any_lab.tun_counters("peer-b")["rx"]
        last = int(any_lab.sql("SELECT max(seq) FROM pgvpn.packets WHERE sender = 'peer-a'"
                               )[0][0])
        rows = [*bad_rows().values(), icmp_echo(b"the one good packet")]
        for offset, data in enumerate(rows, 1):
            owner_execute(any_lab, "INSERT INTO pgvpn.packets (sender, seq, receiver, length, "
                          "data) VALUES ('peer-a', %s, 'peer-b', %s, %s)",
                          [last + offset, len(data), data])
        wait_for(lambda: any_lab.sql("SELECT last_seq FROM pgvpn.cursors WHERE receiver = "
                                     "'peer-b' AND sender = 'peer-a'")[0][0] == last + len(rows),
                 "peer-b to read past the rows")
        assert any_lab.tun_counters("peer-b")["rx"] - rx0 == 1  # the good one only
        wait_for(lambda: counted_warnings(agent_log(any_lab, "peer-b", 5000), BAD_ROWS_LOG)
                 - reported0 == len(rows) - 1, "the agent to report the skipped rows")
        assert any_lab.tun_link("peer-b")["ifindex"] == index  # the same agent, still running
    finally:
        lab_cli(any_lab, "start", "peer-a")
    assert ping(CliBackend(any_lab), "peer-a", PEER_B, count=2).received == 2
