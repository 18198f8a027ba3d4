"""`lab bench --pairs` and `--all-pairs`: parsing, Jain's index, the report, and a run.

The unit tests need no lab (topologies are made up here, so that they do not depend on
any topology file); the CLI refusals run `lab` under a lab name nobody uses; one test
runs the pairs bench on the two-peer netns lab.
"""

from __future__ import annotations

import ipaddress
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from lab.pairs import (
    PairsError,
    all_pairs,
    check_pairs,
    chosen_pairs,
    jain_index,
    parse_pairs,
    plan,
)
from lab.pairsreport import render_pairs_markdown
from lab.topology import Host, Topology
from tests.conftest import ROOT, LabHandle


def made_up_topology(agents: int, *, without_tunnel: str | None = None) -> Topology:
    """A database, `agents` agents peer-a, peer-b, ... and a plain host."""
    hosts = {"postgres": Host("postgres", "database", {"net": ipaddress.IPv4Address("10.9.0.1")})}
    for index in range(agents):
        name = f"peer-{chr(ord('a') + index)}"
        environment = {} if name == without_tunnel else {"TUN_IP": f"10.230.0.{index + 1}/24"}
        hosts[name] = Host(name, "agent", {"net": ipaddress.IPv4Address(f"10.9.0.{index + 2}")},
                           environment)
    hosts["site-host"] = Host("site-host", "host", {"lan": ipaddress.IPv4Address("10.8.0.2")})
    return Topology(hosts, {}, {})


# ------------------------------------------------------------------ parsing

def test_pairs_are_parsed_in_order_client_first() -> None:
    assert parse_pairs("peer-a:peer-b") == [("peer-a", "peer-b")]
    assert parse_pairs("peer-b:peer-a, peer-c : peer-d,") == [("peer-b", "peer-a"),
                                                               ("peer-c", "peer-d")]


@pytest.mark.parametrize(("text", "message"), [
    ("peer-a", "'peer-a' is not CLIENT:SERVER (e.g. peer-a:peer-b,peer-c:peer-d)"),
    ("peer-a:peer-b:peer-c", "'peer-a:peer-b:peer-c' is not CLIENT:SERVER"),
    (":peer-b", "':peer-b' is not CLIENT:SERVER"),
    ("peer-a:", "'peer-a:' is not CLIENT:SERVER"),
    ("peer-a:peer-b,peer-c", "'peer-c' is not CLIENT:SERVER"),
    ("peer-a:peer-a", "'peer-a:peer-a': a host cannot be its own pair; give two agents"),
    ("peer-a:peer-b,peer-b:peer-c", "peer-b is in two pairs (peer-a:peer-b and "
                                    "peer-b:peer-c); pairs must be disjoint"),
    ("peer-a:peer-b,peer-c:peer-a", "peer-a is in two pairs"),
    ("peer-a:peer-b,peer-a:peer-b", "peer-a is in two pairs"),
    ("", "'': give at least one pair CLIENT:SERVER"),
    (" , ,", "' , ,': give at least one pair CLIENT:SERVER"),
])
def test_malformed_pairs_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(PairsError) as refused:
        parse_pairs(text)
    assert message in str(refused.value)


@pytest.mark.parametrize(("pairs", "message"), [
    ([("peer-a", "peer-z")], "no host 'peer-z'; agents: peer-a, peer-b, peer-c, peer-d"),
    ([("postgres", "peer-b")], "'postgres' is not an agent (the database, no tunnel of its "
                               "own); agents: peer-a, peer-b, peer-c, peer-d"),
    ([("peer-a", "peer-b"), ("site-host", "peer-c")], "'site-host' is not an agent (a plain "
                                                      "host"),
    ([("peer-a", "peer-d")], "peer-d has no tunnel address (TUN_IP) to serve iperf3 on"),
])
def test_names_are_checked_against_the_topology(pairs: list[tuple[str, str]],
                                                message: str) -> None:
    topology = made_up_topology(4, without_tunnel="peer-d")
    with pytest.raises(PairsError) as refused:
        check_pairs(pairs, topology)
    assert message in str(refused.value)
    check_pairs([("peer-d", "peer-a"), ("peer-b", "peer-c")], topology)  # a client needs none


def test_all_pairs_takes_the_agents_in_topology_order_and_names_the_odd_one() -> None:
    assert all_pairs(made_up_topology(2)) == ([("peer-a", "peer-b")], [])
    assert all_pairs(made_up_topology(4)) == ([("peer-a", "peer-b"), ("peer-c", "peer-d")], [])
    assert all_pairs(made_up_topology(5)) == ([("peer-a", "peer-b"), ("peer-c", "peer-d")],
                                              ["peer-e"])
    with pytest.raises(PairsError, match="--all-pairs needs at least two agents; the "
                                         "topology has peer-a"):
        all_pairs(made_up_topology(1))


def test_each_pair_gets_its_servers_tunnel_address_and_its_own_port() -> None:
    runs = plan([("peer-a", "peer-b"), ("peer-d", "peer-c")], made_up_topology(4))
    assert [(r.label, r.address, r.port) for r in runs] == [
        ("peer-a:peer-b", "10.230.0.2", 5201), ("peer-d:peer-c", "10.230.0.3", 5202)]


def test_chosen_pairs_refuse_with_a_lab_error() -> None:
    from lab.backends.base import LabError

    with pytest.raises(LabError, match="argument --pairs: no host 'peer-c'; agents: peer-a, "
                                       "peer-b"):
        chosen_pairs([("peer-a", "peer-c")], made_up_topology(2))
    assert chosen_pairs(None, made_up_topology(3)) == ([("peer-a", "peer-b")], ["peer-c"])


# ------------------------------------------------------------------ Jain's index

def test_jain_index() -> None:
    assert jain_index([250.0, 250.0, 250.0, 250.0]) == pytest.approx(1.0)
    assert jain_index([42.0]) == pytest.approx(1.0)
    for n in range(2, 7):  # one pair carried everything
        assert jain_index([300.0] + [0.0] * (n - 1)) == pytest.approx(1 / n)
    # (1 + 2 + 3)^2 / (3 * (1 + 4 + 9)) = 36 / 42
    assert jain_index([1.0, 2.0, 3.0]) == pytest.approx(6 / 7)
    assert jain_index([100.0, 300.0]) == pytest.approx(0.8)  # 400^2 / (2 * 100000)
    assert jain_index([]) is None and jain_index([0.0, 0.0]) is None


# ------------------------------------------------------------------ the report

def made_up_report(rates: list[float | None], left_out: list[str] | None = None
                   ) -> dict[str, Any]:
    """What lab.pairs.bench_pairs returns; a rate of None is a pair that failed."""
    pairs = []
    for index, rate in enumerate(rates):
        client, server = f"peer-{'aceg'[index]}", f"peer-{'bdfh'[index]}"
        pair: dict[str, Any] = {"pair": f"{client}:{server}", "client": client,
                                "server": server, "address": f"10.230.0.{2 * index + 2}",
                                "port": 5201 + index}
        if rate is None:
            pair["error"] = "iperf3 peer-c -> peer-d failed: | unable to connect"
        else:
            pair.update(receiver_mbps=rate, sender_mbps=rate, retransmits=index,
                        bytes_sent=10**7, bytes_received=10**7,
                        intervals=[{"t": 1.0, "mbps": rate * 0.9}, {"t": 2.0, "mbps": rate}])
        pairs.append(pair)
    failed = [p["pair"] for p in pairs if "error" in p]
    ok = [r for r in rates if r is not None]
    fairness = jain_index(ok)
    return {"mode": "pairs", "profile": "batched", "run": "batched", "backend": "netns",
            "mtu": 1500, "duration_s": 2, "offload": True, "routing": "table",
            "pairs": pairs, "left_out": left_out or [],
            "aggregate_mbps": None if failed else round(sum(ok), 2),
            "fairness": None if failed or fairness is None else round(fairness, 4),
            "retransmits": None if failed else sum(range(len(rates))),
            "packets_logged": 500, "wire_packets_logged": 9000, "bytes_logged": 12_000_000,
            "logged": True, "not_measured": "underlay, database ceiling and ping RTT",
            "generated_at": "2026-11-27T10:00:00+00:00", "failed": failed}


def test_the_report_gives_each_pair_the_aggregate_and_fairness(tmp_path: Path) -> None:
    from lab.pairsreport import write_pairs_report

    report = made_up_report([100.0, 300.0], left_out=["peer-e"])
    markdown = render_pairs_markdown(report)
    assert "| peer-a -> peer-b | 10.230.0.2:5201 | 100.0 | 25.0% | 0 |" in markdown
    assert "| peer-c -> peer-d | 10.230.0.4:5202 | 300.0 | 75.0% | 1 |" in markdown
    assert "| **aggregate** | | **400.0** | | 1 |" in markdown
    assert "Jain's fairness index over the 2 pair(s)" in markdown and "**0.800**" in markdown
    assert "0.500 = one pair got everything" in markdown
    assert "Left out: peer-e" in markdown
    assert "500 rows (9000 packets on the wire), 12.0 MB" in markdown
    assert "Not measured in pairs mode: underlay, database ceiling and ping RTT" in markdown
    write_pairs_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text()) == report
    assert (tmp_path / "throughput.png").read_bytes().startswith(b"\x89PNG")
    assert "![per-second throughput of each pair](throughput.png)" in (
        tmp_path / "report.md").read_text()


def test_a_failed_pair_is_shown_and_leaves_no_aggregate() -> None:
    markdown = render_pairs_markdown(made_up_report([100.0, None]))
    assert "| peer-c -> peer-d | 10.230.0.4:5202 | **failed**: iperf3 peer-c -> peer-d " \
           "failed: / unable to connect | | |" in markdown
    assert "| **aggregate** | | **n/a** | | n/a |" in markdown
    assert "not computed, since peer-c:peer-d failed" in markdown
    one = render_pairs_markdown(made_up_report([80.0]))
    assert "**1.000** (one pair: 1 by definition)" in one


# ------------------------------------------------------------------ the command line

def lab_cli(*args: str, lab_name: str = "pgvpn-pairchk") -> subprocess.CompletedProcess[str]:
    """`lab ARGS` under a lab name nobody uses, which no lab may be left under."""
    env = {**os.environ, "PGVPN_LAB_NAME": lab_name}
    env.pop("PGVPN_LAB_DIR", None)
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True,
                          text=True, cwd=ROOT, env=env, timeout=60, check=False)


@pytest.mark.parametrize(("args", "message"), [
    (["--pairs", "peer-a"], "argument --pairs: 'peer-a' is not CLIENT:SERVER"),
    (["--pairs", "peer-a:peer-a"], "argument --pairs: 'peer-a:peer-a': a host cannot be"),
    (["--pairs", "peer-a:peer-b,peer-b:peer-a"], "peer-b is in two pairs"),
    (["--pairs", ","], "give at least one pair"),
    (["--pairs", "peer-a:peer-b", "--all-pairs"],
     "argument --all-pairs: not allowed with argument --pairs"),
    # names: the topology the bench would run (no lab is up under this name: compose.yaml)
    (["--pairs", "peer-a:peer-z", "--backend", "netns"],
     "argument --pairs: no host 'peer-z'; agents: peer-a, peer-b"),
    (["--pairs", "postgres:peer-b", "--backend", "netns"],
     "argument --pairs: 'postgres' is not an agent (the database"),
    (["--all-pairs", "--profile", "batched,blog-v1"], "run one profile"),
    (["--pairs", "peer-a:peer-b", "--offload", "both"], "run one profile"),
])
def test_bad_pairs_are_refused_in_one_line_before_anything_starts(
        args: list[str], message: str, tmp_path: Path) -> None:
    done = lab_cli("bench", "--out", str(tmp_path / "out"), *args)
    assert done.returncode == 2, done
    assert done.stderr.startswith("lab: error: ") and done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert done.stdout == "" and not (tmp_path / "out").exists()
    assert not Path("/var/tmp/pgvpn-pairchk-lab").exists()


def test_help_teaches_with_examples() -> None:
    shown = lab_cli("bench", "--help").stdout
    assert "lab bench --pairs peer-a:peer-b,peer-c:peer-d" in shown
    assert "--all-pairs" in shown and "Jain's fairness index" in shown


# ------------------------------------------------------------------ on a lab

def test_pairs_bench_on_the_two_peer_lab(netns_lab: LabHandle, tmp_path: Path) -> None:
    """One pair through the tunnel: its rate is the aggregate, fairness 1 by definition,
    the rows logged are counted, and the report and chart are written."""
    out = tmp_path / "pairs"
    done = netns_lab.cli("bench", "--pairs", "peer-a:peer-b", "--duration", "2",
                         "--out", str(out), "--json", "-")
    report = json.loads(done.stdout)  # stdout holds the JSON and nothing else
    assert report["mode"] == "pairs" and report["backend"] == "netns"
    assert [(p["client"], p["server"], p["address"], p["port"]) for p in report["pairs"]] == [
        ("peer-a", "peer-b", "10.230.0.2", 5201)]
    (pair,) = report["pairs"]
    assert pair["receiver_mbps"] > 0 and len(pair["intervals"]) >= 2
    assert isinstance(pair["retransmits"], int)
    assert report["aggregate_mbps"] == pytest.approx(sum(p["receiver_mbps"]
                                                         for p in report["pairs"]))
    assert report["fairness"] == 1.0 and report["failed"] == [] and report["left_out"] == []
    assert report["bytes_logged"] >= pair["bytes_received"] > 0  # every byte was a row
    assert "underlay_mbps" not in report and "ceiling" not in report  # not measured
    assert {"report.json", "report.md", "throughput.png",
            "iperf3-pair-peer-a-peer-b.json"} <= set(os.listdir(out))
    markdown = (out / "report.md").read_text()
    assert "Jain's fairness index" in markdown and "**1.000**" in markdown
    assert "Not measured in pairs mode" in markdown
    assert "pairs: peer-a -> peer-b:" in done.stderr  # progress while it ran

    # --all-pairs on two agents is that one pair, the other way round nowhere
    again = json.loads(netns_lab.cli("bench", "--all-pairs", "--duration", "1", "--out",
                                     str(tmp_path / "all"), "--json", "-").stdout)
    assert [p["pair"] for p in again["pairs"]] == ["peer-a:peer-b"]
    assert again["left_out"] == [] and again["fairness"] == 1.0
