"""Integration: the lab controller's promises (status, exec, idempotence, cleanup)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ROOT, LabHandle, netns_ready

REQUIRED_FIELDS = {"underlay_mbps", "backend", "profile", "mtu", "duration_s", "receiver_mbps",
                   "sender_mbps", "retransmits", "rtt_ms", "packets_logged", "bytes_logged",
                   "intervals", "rtt_idle_ms", "rtt_loaded_ms", "ceiling_mbps",
                   "tunnel_to_ceiling", "ceiling", "offload", "wire_packets_logged", "run"}


def test_status_shows_hosts_addresses_health_and_the_log(netns_lab: LabHandle) -> None:
    status = netns_lab.status()
    assert status["backend"] == "netns" and status["mtu"] == 1500
    hosts = {h["name"]: h for h in status["hosts"]}
    assert set(hosts) == {"postgres", "peer-a", "peer-b"}
    assert all(h["running"] for h in hosts.values())
    assert hosts["peer-a"]["underlay"] == {"net-a": "10.231.1.11"}
    assert "10.230.0.1/24" in hosts["peer-a"]["tunnel"]
    assert "password" not in json.dumps(status).lower()


def test_status_counts_the_packets_logged(netns_lab: LabHandle) -> None:
    """`lab status` counts the log's rows: what the database holds, and more after a ping."""
    count = "SELECT count(*) FROM pgvpn.packets"
    before = netns_lab.sql(count)[0][0]
    shown = netns_lab.status()["log"]["packets"]
    assert before <= shown <= netns_lab.sql(count)[0][0]  # a packet may cross meanwhile
    assert netns_lab.exec("peer-a", "ping", "-c", "3", "-i", "0.2", "10.230.0.2").returncode == 0
    # 3 requests and 3 replies, each logged before it was delivered
    assert netns_lab.status()["log"]["packets"] >= shown + 6


def test_exec_passes_the_exit_code_through(netns_lab: LabHandle) -> None:
    assert netns_lab.exec("peer-a", "sh", "-c", "exit 7", check=False).returncode == 7
    assert netns_lab.exec("postgres", "true").returncode == 0
    unknown = netns_lab.cli("exec", "nowhere", "--", "true", check=False)
    assert unknown.returncode == 2 and "no host 'nowhere'" in unknown.stderr


def agent_sessions(lab: LabHandle) -> list[tuple[str, object, int]]:
    """The agents' database sessions: a restarted agent would have new ones."""
    return lab.sql("SELECT application_name, backend_start, pid FROM pg_stat_activity "
                   "WHERE application_name LIKE 'pgvpn peer-%%' ORDER BY 1", superuser=True)


def test_up_on_a_healthy_lab_changes_nothing(any_lab: LabHandle) -> None:
    before = agent_sessions(any_lab)
    assert len(before) >= 6  # control, uplink and downlink (which LISTENs) of two agents
    any_lab.cli("up")
    assert agent_sessions(any_lab) == before


def test_bench_json_on_stdout_and_reports_on_disk(any_lab: LabHandle, tmp_path: os.PathLike
                                                  ) -> None:
    out = os.path.join(tmp_path, "bench")
    logged_before, last_id = any_lab.sql("SELECT count(*), max(id) FROM pgvpn.packets")[0]
    done = any_lab.cli("bench", "--duration", "2", "--out", out, "--json", "-")
    report = json.loads(done.stdout)  # stdout holds the JSON and nothing else
    assert set(report) >= REQUIRED_FIELDS
    # the database's ceiling, from peer-a with its uplink's path, rows of the size peer-a's
    # rows had in the run: with offload (the default) its super-packets', above the MTU
    ceiling = report["ceiling"]
    sent = any_lab.sql("SELECT avg(length) FROM pgvpn.packets WHERE sender = 'peer-a' "
                       "AND id > %s", [last_id])[0][0]
    assert report["offload"] is True and report["mtu"] < ceiling["row_bytes"] <= 65535
    assert abs(ceiling["row_bytes"] - float(sent)) <= 0.02 * float(sent), (ceiling, sent)
    assert ceiling["rows"] * ceiling["row_bytes"] > 50_000_000
    assert report["ceiling_mbps"] == ceiling["mbps"] > 0
    assert report["tunnel_to_ceiling"] == round(report["receiver_mbps"] / ceiling["mbps"], 4)
    # ... into a scratch table dropped after the run, never into the log
    assert any_lab.sql("SELECT to_regnamespace('pgvpn_bench')")[0][0] is None
    added = any_lab.sql("SELECT count(*) FROM pgvpn.packets")[0][0] - logged_before
    assert added - report["packets_logged"] < min(1000, ceiling["rows"]), (added, report)
    assert report["backend"] == any_lab.backend
    assert report["receiver_mbps"] > 0 and report["underlay_mbps"] > report["receiver_mbps"]
    assert report["packets_logged"] > 100 and report["bytes_logged"] > 1_000_000
    # rows, and the packets on the wire they stand for: a super-packet is many
    assert report["wire_packets_logged"] > max(1000, report["packets_logged"])
    assert set(report["rtt_ms"]) == {"min", "avg", "max"}
    idle, loaded = report["rtt_idle_ms"], report["rtt_loaded_ms"]
    assert idle["samples"] >= 90 and loaded["samples"] >= 3  # 100 idle pings; 2 s of load
    assert 0 < idle["p50"] <= idle["p99"] and 0 < loaded["p50"] <= loaded["p99"]
    assert len(report["intervals"]) >= 2
    assert {"report.json", "report.md"} <= set(os.listdir(out))
    assert "| batched |" in Path(out, "report.md").read_text()


def lab_check(env: dict[str, str] | None = None) -> tuple[int, dict[str, str]]:
    """`lab check`'s exit code and what it says of each backend."""
    done = subprocess.run([sys.executable, "-m", "lab.cli", "check"], capture_output=True,
                          text=True, cwd=ROOT, check=False, env=env)
    assert re.search(r"^iperf3 *: ", done.stderr, re.MULTILINE), done.stderr
    said = dict(re.findall(r"^(\w+) +backend: (.*)$", done.stderr, re.MULTILINE))
    assert set(said) == {"netns", "docker"}, done.stderr
    return done.returncode, said


def test_check_diagnoses_the_host() -> None:
    """Its exit code says whether any backend can run: 0 with one ready, 1 with none."""
    code, said = lab_check()
    assert code == (0 if "ready" in said.values() else 1), (code, said)
    # no `ip` on the PATH, no Docker engine at that socket: nothing can run
    code, said = lab_check({**os.environ, "PATH": "/nonexistent",
                            "DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert code == 1 and "ready" not in said.values(), said


def namespaces(prefix: str) -> list[str]:
    listing = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True, text=True,
                             check=True).stdout
    return [n["name"] for n in json.loads(listing or "[]") if n["name"].startswith(prefix)]


def test_interrupted_first_up_rolls_back_and_down_is_safe_twice() -> None:
    if netns_ready():
        pytest.skip(f"namespace lab unavailable: {netns_ready()}")
    lab = LabHandle("netns", name="pgvpn-rollbk")
    lab.cli("down")
    process = subprocess.Popen([sys.executable, "-m", "lab.cli", "up", "--backend", "netns"],
                               env=lab.env, cwd=ROOT, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while len(namespaces("pgvpn-rollbk-")) < 3:  # interrupt it half-way
        assert time.monotonic() < deadline and process.poll() is None
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130, stderr
    assert "rolling back" in stderr
    assert namespaces("pgvpn-rollbk-") == []
    assert not lab.state_dir.exists()
    assert lab.leftovers() == []  # no postgres left running from its data directory
    for _ in range(2):
        assert "nothing to remove" in lab.cli("down").stderr


def test_a_multi_profile_bench_keeps_every_logged_packet(netns_lab: LabHandle,
                                                         tmp_path: Path) -> None:
    """The log is the product: a measurement never empties it, and still counts right.
    On netns only (CI's time): Docker's bench is test_bench_json_on_stdout_and_reports_on_
    disk's, and its agents switch profiles in test_profiles."""
    assert netns_lab.exec("peer-a", "ping", "-c", "3", "-i", "0.2", "10.230.0.2").returncode == 0
    netns_lab.wait_settled()
    rows = "SELECT sender, seq, md5(data) FROM pgvpn.packets WHERE id <= %s ORDER BY id"
    last_id = netns_lab.sql("SELECT max(id) FROM pgvpn.packets")[0][0]
    before = netns_lab.sql(rows, [last_id])
    cursor_query = "SELECT receiver, sender, last_seq FROM pgvpn.cursors"
    cursors = {(r, s): seq for r, s, seq in netns_lab.sql(cursor_query)}
    try:
        done = netns_lab.cli("bench", "--profile", "batched,batched-jumbo", "--offload", "both",
                           "--duration", "2", "--out", str(tmp_path / "bench"), "--json", "-")
    finally:
        netns_lab.use_profile("batched")
    assert before and netns_lab.sql(rows, [last_id]) == before  # every row, byte for byte
    after = {(r, s): seq for r, s, seq in netns_lab.sql(cursor_query)}
    assert all(after[key] >= seq for key, seq in cursors.items())  # no cursor reset
    report = json.loads(done.stdout)
    results = {r["run"]: r for r in report["results"]}
    # each profile with offload off, then on; off comes back on for the next profile
    assert report["profiles"] == ["batched, offload off", "batched",
                                  "batched-jumbo, offload off", "batched-jumbo"]
    added = netns_lab.sql("SELECT count(*) FROM pgvpn.packets WHERE id > %s", [last_id])[0][0]
    for run, result in results.items():  # every byte delivered was counted as logged
        assert result["bytes_logged"] >= result["bytes_received"] > 0, result
        assert result["offload"] == ("offload off" not in run), result
        if result["offload"]:  # measured after the run, rows of its super-packets' size
            assert 1 <= result["ceiling"]["row_bytes"] <= 65535, result
            assert result["ceiling"]["mbps"] > 0, result
        else:  # measured once per MTU, rows of that size; one row, one packet
            assert result["ceiling"]["row_bytes"] == result["mtu"], result
            assert result["wire_packets_logged"] == result["packets_logged"], result
    assert results["batched"]["wire_packets_logged"] > results["batched"]["packets_logged"]
    # each run's raw iperf3 JSON is kept: the off run's is not overwritten by the on run's
    assert {f"iperf3-tunnel-{run}.json" for run in (
        "batched", "batched-offload-off", "batched-jumbo", "batched-jumbo-offload-off")
            } <= set(os.listdir(tmp_path / "bench"))
    assert sum(r["packets_logged"] for r in results.values()) <= added
    assert "emptied" not in done.stderr


def test_a_failed_build_step_says_where_its_whole_output_is(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch
                                                             ) -> None:
    """A build's hundreds of lines go to the build log, not the terminal; a failed step
    shows the log's last lines and its path, and a rolled-back first `up` keeps it."""
    from types import SimpleNamespace

    from lab import state
    from lab.backends.base import LabError
    from lab.backends.docker import BUILD_ERROR_LINES, DockerBackend

    monkeypatch.setattr(state, "STATE_DIR", tmp_path / "lab")
    backend = SimpleNamespace(env=dict(os.environ))
    step = ["sh", "-c", "for i in $(seq 1 300); do echo apt line $i; done; echo E: broken >&2; "
            "exit 3"]
    DockerBackend.build_step(backend, "a step that works", ["echo", "fine"],  # type: ignore[arg-type]
                             timeout=30)
    with pytest.raises(LabError) as failed:
        DockerBackend.build_step(backend, "building the images", step,  # type: ignore[arg-type]
                                 timeout=30)
    said = str(failed.value).splitlines()
    log = state.build_log_path()
    assert said[0] == "building the images failed (exit 3); its last lines:"
    assert said[1:-1] == [f"apt line {i}" for i in range(302 - BUILD_ERROR_LINES, 301)] + [
        "E: broken"]
    assert said[-1] == f"the whole build log: {log}"
    text = log.read_text()
    assert "fine\n" in text and "apt line 1\n" in text and "===== building the images:" in text
    with pytest.raises(LabError) as short:  # a short step's error shows its own lines only
        DockerBackend.build_step(backend, "a short step", ["sh", "-c", "echo one; exit 1"],  # type: ignore[arg-type]
                                 timeout=30)
    assert str(short.value).splitlines()[1:-1] == ["one"]

    (tmp_path / "lab" / "secrets").mkdir()
    (tmp_path / "lab" / "lab.json").write_text("{}")
    state.remove_state(keep_build_log=True)  # a rolled-back first up
    assert [p.name for p in (tmp_path / "lab").iterdir()] == ["build.log"]
    state.remove_state()  # lab down
    assert not (tmp_path / "lab").exists()


def agent_metrics(lab: LabHandle) -> dict[str, dict[str, float]]:
    """Each agent's metrics as `lab status` scraped them (inside its host)."""
    hosts = {h["name"]: h for h in lab.status()["hosts"]}
    return {name: hosts[name]["metrics"] for name in ("peer-a", "peer-b")}


def test_agents_serve_metrics_that_count_what_their_tun_devices_carried(any_lab: LabHandle
                                                                         ) -> None:
    """Prometheus metrics of both agents, scraped by `lab status`: between two quiet
    moments, packets up equal what the agent read from its TUN device and packets down
    what it wrote there; batches took their time in the database."""
    def quiet() -> tuple[dict[str, Any], ...]:
        previous = None
        for _ in range(40):
            any_lab.wait_settled()
            now = (any_lab.tun_counters("peer-a"), any_lab.tun_counters("peer-b"),
                   agent_metrics(any_lab))
            if now == previous:
                return now
            previous = now
            time.sleep(0.5)
        raise AssertionError("the tunnel never went quiet")

    tun_a0, tun_b0, metrics0 = quiet()
    assert any_lab.exec("peer-a", "ping", "-c", "20", "-i", "0.05", "-q",
                        "10.230.0.2").returncode == 0
    tun_a1, tun_b1, metrics1 = quiet()
    up, down = 'pgvpn_packets_total{direction="up"}', 'pgvpn_packets_total{direction="down"}'
    for name, before, after in (("peer-a", tun_a0, tun_a1), ("peer-b", tun_b0, tun_b1)):
        m0, m1 = metrics0[name], metrics1[name]
        assert m1[up] - m0[up] == after["tx"] - before["tx"] >= 20, (name, m0, m1)
        assert m1[down] - m0[down] == after["rx"] - before["rx"] >= 20, (name, m0, m1)
        written = 'pgvpn_batch_seconds_count{direction="up"}'
        assert m1[written] - m0[written] == (m1['pgvpn_batches_total{direction="up"}']
                                             - m0['pgvpn_batches_total{direction="up"}']) > 0
        assert m1['pgvpn_batch_seconds_sum{direction="up"}'] > m0[
            'pgvpn_batch_seconds_sum{direction="up"}']
        assert m1['pgvpn_dropped_frames_total'] == m0['pgvpn_dropped_frames_total']
    assert "sent " in any_lab.cli("status").stdout  # the table shows them too


def test_an_agent_whose_metrics_port_is_taken_says_so_and_starts_once_it_is_free(
        netns_lab: LabHandle) -> None:
    """Another process holds 127.0.0.1:9108 in peer-a's host: the agent stops at start
    with one line saying so (nothing left open), and starts once the port is free."""
    netns_lab.cli("stop", "peer-a")  # its agent holds the port while it runs
    holder = subprocess.Popen(
        ["ip", "netns", "exec", netns_lab.namespace("peer-a"), sys.executable, "-c",
         "import socket, time; s = socket.socket();"
         " s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1);"  # past TIME_WAIT
         " s.bind(('127.0.0.1', 9108)); s.listen();"
         " print('held', flush=True); time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        failed = netns_lab.cli("start", "peer-a", check=False)
        assert failed.returncode == 2, failed.stderr
        assert "peer-a exited during start" in failed.stderr
        assert ("pgvpn: error: cannot serve metrics on 127.0.0.1:9108: Address already in use"
                in failed.stderr), failed.stderr
    finally:
        holder.kill()
        holder.wait()
    netns_lab.cli("start", "peer-a")
    assert netns_lab.exec("peer-a", "ping", "-c", "2", "-W", "2", "10.230.0.2").returncode == 0


PAIRS = {("peer-a", "peer-b", "10.230.0.2"), ("peer-a", "peer-b", "fd00:230::2"),
         ("peer-b", "peer-a", "10.230.0.1"), ("peer-b", "peer-a", "fd00:230::1")}


def test_ping_matrix_pings_every_agent_from_every_other(any_lab: LabHandle) -> None:
    report = json.loads(any_lab.cli("ping-matrix", "--json").stdout)
    assert {(c["from"], c["to"], c["address"]) for c in report["matrix"]} == PAIRS
    assert report["lost"] == 0
    assert all(c["received"] == c["transmitted"] == 3 for c in report["matrix"]), report
    table = any_lab.cli("ping-matrix", "--count", "2").stdout
    assert table.count("2/2") == 4, table


def test_ping_matrix_fails_and_shows_the_loss(netns_lab: LabHandle) -> None:
    """peer-b's agent frozen past ping's deadline: every echo to or from it is lost."""
    from tests.peerside import agent_pid

    pid = agent_pid(netns_lab, "peer-b")
    os.kill(pid, signal.SIGSTOP)
    try:
        done = netns_lab.cli("ping-matrix", "--count", "1", "--json", check=False)
    finally:
        os.kill(pid, signal.SIGCONT)
    assert done.returncode == 1, done
    report = json.loads(done.stdout)
    assert report["lost"] == 4 and all(c["received"] == 0 for c in report["matrix"])
    netns_lab.wait_settled()
