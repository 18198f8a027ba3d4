"""Every transport profile carries real traffic, and every logged one logs each packet.

Integration tests run on both backends' session labs, one profile after another
(the profile fixture is module-scoped, so pytest groups the tests by profile and
restarts the agents once per profile): how a profile reaches the agents (a process's
environment, a container's) is the backend's business. The report tests are pure
unit tests.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lab.backends.base import ExecResult
from lab.measure import iperf, percentile, ping
from lab.plot import plot_throughput
from lab.report import build_report, render_markdown, rtt_pair, write_report
from pgvpn.transports import PROFILES, Profile
from tests.conftest import CliBackend, LabHandle
from tests.peerside import last_start

PEER_A, PEER_B = "10.230.0.1", "10.230.0.2"
LAB_MTU = 1500  # the session's lab runs with the default MTU
LOG_TIMEOUT = 60.0  # seconds for a slow profile to commit what its TUN handed it


@pytest.fixture(scope="module")
def profile_lab(any_lab: LabHandle) -> Iterator[LabHandle]:
    """The session's lab, handed back on the default profile whatever ran here."""
    yield any_lab
    any_lab.use_profile("batched")


@pytest.fixture(scope="module", params=list(PROFILES))
def lab_on(request: pytest.FixtureRequest, profile_lab: LabHandle
           ) -> tuple[LabHandle, Profile]:
    profile_lab.use_profile(request.param)
    return profile_lab, PROFILES[request.param]


def test_ping_both_ways(lab_on: tuple[LabHandle, Profile]) -> None:
    lab, profile = lab_on
    backend = CliBackend(lab)
    for host, target in (("peer-a", PEER_B), ("peer-b", PEER_A)):
        result = ping(backend, host, target, count=3, interval=0.2)
        assert result.received == 3, f"{profile.name}: {host} -> {target}: {result}"


# Each packet table's growth mark: the highest id, or for the partitioned log (no index
# on id) the sum of each sender's highest seq, read along its (sender, seq) index.
TABLE_MARK = {"pgvpn.packets": "SELECT coalesce(sum((SELECT max(seq) FROM pgvpn.packets "
                               "WHERE sender = name)), 0) FROM pgvpn.peers"}


def table_marks(lab: LabHandle) -> dict[str, int]:
    """A mark per table any profile logs to; it rises with every row logged there."""
    tables = sorted({p.log_table for p in PROFILES.values() if p.log_table})
    return {table: int(lab.sql(TABLE_MARK.get(table, f"SELECT coalesce(max(id), 0) "
                                                     f"FROM {table}"))[0][0])
            for table in tables}


def test_the_agents_run_the_chosen_profile(lab_on: tuple[LabHandle, Profile]) -> None:
    """`lab up --profile X` on a running lab restarts the agents with X, not just the
    lab's record of it: each agent's own start line says X, its TUN has X's MTU, and
    traffic grows X's table and no other (notify-only: none at all). Offload is on for
    the profiles that carry it, off for the blog's."""
    lab, profile = lab_on
    mtu = profile.default_mtu(LAB_MTU)
    for host in ("peer-a", "peer-b"):
        start = last_start(lab, host)
        assert (start["profile"], int(start["mtu"]), start["commit"]) == (
            profile.name, mtu, "synchronous"), start[0]
        # offload where the profile carries it; the blog's profiles keep a packet per row
        assert start["offload"] == ("on" if profile.carries_offload else
                                    f"off: profile {profile.name} logs one packet per row"
                                    ), start[0]
        assert lab.tun_link(host)["mtu"] == mtu, host
    before = table_marks(lab)
    # a reply arrives only after both packets crossed: each was logged, if the profile logs
    result = ping(CliBackend(lab), "peer-a", PEER_B, count=3, interval=0.2)
    assert result.received == 3, f"{profile.name}: {result}"
    grown = {table: mark - before[table] for table, mark in table_marks(lab).items()
             if mark != before[table]}
    assert set(grown) == ({profile.log_table} if profile.log_table else set()), grown
    assert all(added >= 6 for added in grown.values()), grown  # 3 requests, 3 replies


Snapshot = tuple[int, int, dict[str, int]]


def snapshot(lab: LabHandle, profile: Profile) -> Snapshot:
    """Packets each TUN handed to its agent, and rows per sender in the profile's log."""
    logged = lab.logged_by_sender(profile.log_table) if profile.log_table else {}
    return lab.tun_counters("peer-a")["tx"], lab.tun_counters("peer-b")["tx"], logged


def quiet_snapshot(lab: LabHandle, profile: Profile) -> Snapshot:
    """A snapshot taken when nothing is in flight (the kernel's IPv6 chatter included)."""
    previous = None
    deadline = time.monotonic() + LOG_TIMEOUT
    while time.monotonic() < deadline:
        current = snapshot(lab, profile)
        if current == previous:
            return current
        previous = current
        time.sleep(0.5)
    raise AssertionError(f"{profile.name}: the tunnel never went quiet")


def test_short_iperf3_and_every_packet_logged(lab_on: tuple[LabHandle, Profile]) -> None:
    lab, profile = lab_on
    tx_a0, tx_b0, logged0 = quiet_snapshot(lab, profile)

    result = iperf(CliBackend(lab), server="peer-b", address=PEER_B, client="peer-a",
                   duration=3)
    assert result.bytes_received > 1_000_000, f"{profile.name}: {result.receiver_mbps} Mbit/s"
    assert result.bytes_received >= 0.8 * result.bytes_sent, profile.name

    if not profile.logged:
        assert profile.log_table is None and profile.log_totals_query() is None
        return
    # Rows are committed a little after the TUN hands packets over: wait for the log
    # to catch up, then require exact equality, per sending peer.
    deadline = time.monotonic() + LOG_TIMEOUT
    while True:
        tx_a1, tx_b1, logged1 = snapshot(lab, profile)
        sent = {"peer-a": tx_a1 - tx_a0, "peer-b": tx_b1 - tx_b0}
        rows = {peer: logged1.get(peer, 0) - logged0.get(peer, 0) for peer in sent}
        if rows == sent or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert rows == sent, f"{profile.name}: rows logged {rows} != packets sent {sent}"
    assert sent["peer-a"] > 700 and sent["peer-b"] > 100, sent


# ------------------------------------------------------------------ pure unit tests

def fake_result(profile: str, mbps: float, *, logged: bool = True) -> dict[str, Any]:
    """What lab.bench.bench_profile returns, with made-up figures."""
    return {
        "profile": profile, "backend": "netns", "mtu": 65000 if "jumbo" in profile else 1500,
        "duration_s": 10.0, "receiver_mbps": mbps, "sender_mbps": mbps * 1.01,
        "retransmits": 3, "bytes_sent": 10**7, "bytes_received": 10**7,
        "underlay_mbps": 13000.0, "tunnel_to_underlay": mbps / 13000,
        "ceiling_mbps": 750.0, "tunnel_to_ceiling": round(mbps / 750, 4),
        "ceiling": {"table": "pgvpn_bench.ingest", "rows": 300000, "bytes": 450_000_000,
                    "batches": 1172, "row_bytes": 1500, "batch_rows": 256, "seconds": 5.0,
                    "mbps": 750.0},
        "times_blog_v1_published": round(mbps / 3.93, 1),
        "rtt_ms": {"min": 1.0, "avg": 2.5, "max": 4.0}, "ping_loss": 0,
        "rtt_idle_ms": {"p50": 2.25, "p99": 3.5, "samples": 100},
        "rtt_loaded_ms": {"p50": 21.0, "p99": 44.125, "samples": 85}, "ping_loss_loaded": 0,
        "packets_logged": 12345 if logged else 0, "bytes_logged": 2_000_000 if logged else 0,
        "logged": logged,
        "intervals": [{"t": 1.0, "mbps": mbps * 0.9}, {"t": 2.0, "mbps": mbps * 1.1},
                      {"t": 2.004, "mbps": 0.0}],
    }


def several_results() -> list[dict[str, Any]]:
    return [fake_result("blog-v1", 10.0), fake_result("blog-v2", 20.0),
            fake_result("notify-only", 60.0, logged=False), fake_result("batched", 300.0),
            {"profile": "batched-jumbo", "logged": True, "error": "iperf3 did not finish\n"
             "within 70s | see 'lab logs'"}]


def test_single_profile_report_keeps_its_fields_at_the_top() -> None:
    result = fake_result("batched", 300.0)
    report = build_report([result])
    assert {k: report[k] for k in result} == result
    assert report["results"][0]["profile"] == "batched" and report["failed"] == []
    assert report["results"][0]["times_blog_v1_measured"] is None
    markdown = render_markdown(report)
    assert ("| batched | yes | 1500 | - | 300.0 | n/a | 76.3x | 2.3% | 750.0 | 40.0% "
            "| 2.25 / 3.50 | 21.00 / 44.12 | 3 | 12345 | 2.0 |") in markdown
    # a result from before the ceiling was measured still renders
    del result["ceiling_mbps"], result["tunnel_to_ceiling"]
    assert "| 2.3% | n/a | n/a | 2.25 / 3.50 |" in render_markdown(build_report([result]))
    # one whose ceiling failed keeps its tunnel figures and says why
    result.update(ceiling_mbps=None, tunnel_to_ceiling=None, ceiling={"error": "pgvpn ceiling "
                  "on peer-a failed (exit 2): | table pgvpn_bench.ingest does not exist"})
    markdown = render_markdown(build_report([result]))
    assert "| 300.0 | n/a | 76.3x | 2.3% | n/a | n/a | 2.25 / 3.50 |" in markdown
    assert ("The ceiling was not measured with batched: pgvpn ceiling on peer-a failed "
            "(exit 2): | table pgvpn_bench.ingest does not exist") in markdown


def test_rtt_percentiles_are_measured_values() -> None:
    """Nearest rank: p99 of 100 samples is the 99th smallest, of 50 the largest; a reply
    line marked DUP! or a lost echo adds no sample."""
    samples = [float(n) for n in range(100, 0, -1)]
    assert (percentile(samples, 50), percentile(samples, 99)) == (50.0, 99.0)
    assert percentile(samples[:50], 99) == 100.0 and percentile([], 50) is None
    output = ("PING 10.230.0.2 (10.230.0.2) 56(84) bytes of data.\n"
              "64 bytes from 10.230.0.2: icmp_seq=1 ttl=64 time=4.21 ms\n"
              "64 bytes from 10.230.0.2: icmp_seq=1 ttl=64 time=9.99 ms (DUP!)\n"
              "64 bytes from fd00:230::2: icmp_seq=3 ttl=64 time=0.912 ms\n\n"
              "--- 10.230.0.2 ping statistics ---\n"
              "3 packets transmitted, 2 received, +1 duplicates, 33% packet loss\n")

    class Replies:
        def exec(self, host: str, argv: Any, *, timeout: float = 60) -> ExecResult:
            return ExecResult(0, output, "")

    result = ping(Replies(), "peer-a", "10.230.0.2", count=3)  # type: ignore[arg-type]
    assert result.samples_ms == (4.21, 0.912)
    assert result.percentiles() == {"p50": 0.912, "p99": 4.21, "samples": 2}
    # the report says what the percentiles leave out: lost echoes, or nothing measured
    loaded = {"rtt_loaded_ms": {"p50": 1.0, "p99": 2.5, "samples": 3}, "ping_loss_loaded": 2}
    assert rtt_pair(loaded, "rtt_loaded_ms") == "1.00 / 2.50 (2 lost)"
    assert rtt_pair({"rtt_loaded_ms": {"p50": None, "p99": None, "samples": 0},
                     "ping_loss_loaded": None}, "rtt_loaded_ms") == "n/a"


def test_several_profiles_side_by_side() -> None:
    report = build_report(several_results())
    assert report["profiles"] == list(PROFILES)
    assert report["failed"] == ["batched-jumbo"]
    assert (report["backend"], report["duration_s"]) == ("netns", 10.0)
    by_name = {r["profile"]: r for r in report["results"]}
    assert by_name["blog-v2"]["times_blog_v1_measured"] == 2.0
    assert by_name["notify-only"]["logged"] is False
    json.dumps(report)  # report.json must serialise

    markdown = render_markdown(report, chart="throughput.png")
    table = [line for line in markdown.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(PROFILES)  # the header, then one row per profile
    assert all(line.count("|") == table[0].count("|") for line in table)
    assert "| blog-v1 | yes | 1500 | 3.93 | 10.0 | 1.0x |" in markdown
    assert "| blog-v2 | yes | 1500 | ~39 (10x) | 20.0 | 2.0x |" in markdown
    assert "| notify-only | no | 1500 | ~390 (100x) | 60.0 | 6.0x |" in markdown
    assert "| batched-jumbo | yes | | - | **failed**: iperf3 did not finish within 70s / " \
        in markdown
    assert "batched is 30.0x the measured blog-v1 (target at least 25x: **met**)" in markdown
    assert "blog-v1 < blog-v2 < batched: **held**" in markdown
    assert "![per-second throughput of each profile](throughput.png)" in markdown


def test_expected_order_that_did_not_hold_is_said_so() -> None:
    report = build_report([fake_result("blog-v1", 10.0), fake_result("blog-v2", 9.5),
                           fake_result("batched", 200.0)])
    markdown = render_markdown(report)
    assert "**did not hold**" in markdown and "20.0x" in markdown and "**not met**" in markdown
    assert "blog-v1 and blog-v2 are within 10% of each other" in markdown


def test_report_files_and_chart_are_written(tmp_path: Path) -> None:
    report = build_report(several_results())
    write_report(report, tmp_path)
    png = (tmp_path / "throughput.png").read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    assert json.loads((tmp_path / "report.json").read_text())["failed"] == ["batched-jumbo"]
    assert "(throughput.png)" in (tmp_path / "report.md").read_text()


def test_plot_skips_a_report_without_any_measured_interval(tmp_path: Path) -> None:
    report = build_report([{"profile": "blog-v1", "logged": True, "error": "stalled"}])
    assert plot_throughput(report, tmp_path / "none.png") is False
    assert not (tmp_path / "none.png").exists()


def test_profiles_say_where_they_log() -> None:
    for profile in PROFILES.values():
        assert (profile.log_table is not None) == profile.logged, profile.name
        if profile.log_table:
            assert profile.log_table in profile.tables
    assert PROFILES["notify-only"].default_mtu(65000) < 8000 * 3 // 4  # fits a NOTIFY
    assert PROFILES["batched-jumbo"].default_mtu(1500) == 65000


def test_bench_runs_compare_offload_and_queue_control_in_one_report() -> None:
    """--offload both and --queue-control both: each profile without, then with; the
    blog's profiles carry no offload and run once per queue control setting."""
    from lab.bench import Run, bench_runs

    assert bench_runs(["batched"], "both", "both", 5) == [
        Run("batched", False, 0), Run("batched", True, 0), Run("batched", True, 5)]
    assert bench_runs(["blog-v1", "batched"], "on", "on", 9) == [
        Run("blog-v1", True, 9), Run("batched", True, 9)]
    assert bench_runs(["blog-v1"], "off", "both", 5) == [
        Run("blog-v1", False, 0), Run("blog-v1", False, 5)]
    without = dict(fake_result("batched", 400.0), offload=True, queue_target_ms=0,
                   run="batched")
    with_it = dict(fake_result("batched", 380.0), offload=True, queue_target_ms=5,
                   run="batched, queue control",
                   rtt_loaded_ms={"p50": 9.5, "p99": 30.0, "samples": 85})
    off = dict(fake_result("batched", 200.0), offload=False, queue_target_ms=0,
               run="batched, offload off")
    markdown = render_markdown(build_report([off, without, with_it]))
    assert ("batched, queue control (5 ms target): RTT under load p50 / p99 9.50 / 30.00 ms "
            "against 21.00 / 44.12 ms without; 380.0 Mbit/s, **95%** of the same run "
            "without (400.0 Mbit/s).") in markdown
    # offload's gain compares the runs without queue control only: one sentence
    assert markdown.count("batched with offload:") == 1 and "**2.00x**" in markdown
