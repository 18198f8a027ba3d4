"""`lab bench --pairs a:b,c:d` and `--all-pairs`: iperf3 on disjoint pairs of agents at once.

One stream shows what the tunnel can carry; several at once show how the one database
is shared between senders, and Jain's fairness index sums that up in one number.
Pairs are disjoint so that no agent's own CPU or TUN is what makes a pair slow: what
the pairs share is the database (and, on a small machine, its cores).

The topology decides which names are agents: the lab that is up, or the one `lab up`
would start, so a two-peer lab and a fleet are benched alike.
"""

from __future__ import annotations

import argparse
import json
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lab.backends.base import LabError, Progress
from lab.bench import settled_log_totals
from lab.controller import Lab
from lab.measure import IPERF_PORT, IperfResult, iperf
from lab.report import run_label
from lab.topology import Topology
from pgvpn.transports import PROFILES

EXAMPLE = "peer-a:peer-b,peer-c:peer-d"
# Every pair's iperf3 server must be up before any client starts; a server start that
# takes longer than this (a very busy Docker engine) fails the run instead of hanging it.
START_TIMEOUT = 60.0
NOT_MEASURED = ("underlay, database ceiling and ping RTT: pairs mode measures only the "
                "pairs' tunnel rates, so that nothing else runs beside them (run `lab bench` "
                "without --pairs for the others)")

Pair = tuple[str, str]  # (client, server): iperf3 sends from the client to the server


class PairsError(ValueError):
    """A --pairs value, or a topology, that cannot be benched in pairs; the message says
    what to give instead."""


def parse_pairs(text: str) -> list[Pair]:
    """'a:b,c:d' -> [(a, b), (c, d)]: syntax only (names are checked by check_pairs).

    Pairs must be disjoint: a host in two pairs would split its own CPU and TUN
    between them, and the index would measure that instead of the database's share.
    """
    pairs: list[Pair] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue  # 'a:b,' as in --profile: an empty item is no pair
        names = [name.strip() for name in item.split(":")]
        if len(names) != 2 or not all(names):
            raise PairsError(f"{item!r} is not CLIENT:SERVER (e.g. {EXAMPLE})")
        client, server = names
        if client == server:
            raise PairsError(f"{item!r}: a host cannot be its own pair; give two agents")
        pairs.append((client, server))
    if not pairs:
        raise PairsError(f"{text!r}: give at least one pair CLIENT:SERVER (e.g. {EXAMPLE})")
    seen: dict[str, str] = {}
    for client, server in pairs:
        for name in (client, server):
            if name in seen:
                raise PairsError(f"{name} is in two pairs ({seen[name]} and {client}:{server})"
                                 "; pairs must be disjoint")
            seen[name] = f"{client}:{server}"
    return pairs


def check_pairs(pairs: Sequence[Pair], topology: Topology) -> None:
    """Every name is an agent of `topology`, and every server has a tunnel address."""
    agents = {agent.name: agent for agent in topology.agents}
    listed = ", ".join(agents)
    for name in (name for pair in pairs for name in pair):
        if name in agents:
            continue
        host = topology.hosts.get(name)
        if host is None:
            raise PairsError(f"no host {name!r}; agents: {listed}")
        what = {"database": "the database", "host": "a plain host"}.get(host.role, host.role)
        raise PairsError(f"{name!r} is not an agent ({what}, no tunnel of its own); "
                         f"agents: {listed}")
    for _, server in pairs:
        if agents[server].tunnel_address is None:
            raise PairsError(f"{server} has no tunnel address (TUN_IP) to serve iperf3 on")


def pairs_argument(text: str) -> list[Pair]:
    """An argparse type for --pairs: well formed and disjoint. The names are checked by
    chosen_pairs once the topology is known: a --topology on the same command line may
    name another than the lab that is up, and a type function cannot see it."""
    try:
        return parse_pairs(text)
    except PairsError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def all_pairs(topology: Topology) -> tuple[list[Pair], list[str]]:
    """The agents paired in topology order (a:b, c:d, ...), and the odd one left out."""
    names = [agent.name for agent in topology.agents]
    if len(names) < 2:
        raise PairsError(f"--all-pairs needs at least two agents; the topology has "
                         f"{', '.join(names) or 'none'}")
    pairs = list(zip(names[0::2], names[1::2], strict=False))
    return pairs, names[2 * len(pairs):]


def jain_index(rates: Sequence[float]) -> float | None:
    """Jain's fairness index (sum x)^2 / (n * sum x^2): 1 when every pair got the same
    rate, 1/n when one got everything; None with no pair or nothing carried at all."""
    squares = sum(x * x for x in rates)
    if not rates or squares == 0:
        return None
    total = sum(rates)
    return total * total / (len(rates) * squares)


@dataclass(frozen=True)
class PairRun:
    """One pair as run: iperf3 from `client` to `address`:`port` on `server`."""

    client: str
    server: str
    address: str
    port: int

    @property
    def label(self) -> str:
        return f"{self.client}:{self.server}"


def plan(pairs: Sequence[Pair], topology: Topology) -> list[PairRun]:
    """Each pair with its server's tunnel address and its own iperf3 port (5201, 5202,
    ...): distinct even though no two servers share a host."""
    runs = []
    for index, (client, server) in enumerate(pairs):
        address = topology.hosts[server].tunnel_address
        assert address is not None  # check_pairs said so
        runs.append(PairRun(client, server, address, IPERF_PORT + index))
    return runs


def pair_result(run: PairRun, measured: IperfResult) -> dict[str, Any]:
    """A pair's figures as report.json gives them (retransmits None if iperf3 gave none)."""
    sent = measured.raw.get("end", {}).get("sum_sent", {})
    return {"pair": run.label, "client": run.client, "server": run.server,
            "address": run.address, "port": run.port,
            "receiver_mbps": round(measured.receiver_mbps, 2),
            "sender_mbps": round(measured.sender_mbps, 2),
            "retransmits": measured.retransmits if "retransmits" in sent else None,
            "bytes_sent": measured.bytes_sent, "bytes_received": measured.bytes_received,
            "intervals": [{"t": i["t"], "mbps": round(i["mbps"], 2)}
                          for i in measured.intervals]}


def run_pairs(lab: Lab, runs: Sequence[PairRun], duration: float, progress: Progress
              ) -> list[tuple[PairRun, IperfResult | str]]:
    """Every pair's iperf3 at the same time, one thread each: all servers start, then all
    clients together (a barrier). A pair that fails is its error message, not an
    exception, so that the others' figures are still reported."""
    barrier = threading.Barrier(len(runs), timeout=START_TIMEOUT)

    def one(run: PairRun) -> IperfResult | str:
        try:
            measured = iperf(lab.backend, server=run.server, address=run.address,
                             client=run.client, duration=duration, port=run.port,
                             started=barrier.wait)
        except threading.BrokenBarrierError:
            return "not started: another pair's iperf3 server did not start in time"
        except Exception as exc:  # LabError, or the engine's own: said, not raised
            barrier.abort()  # the others stop waiting for this one's server
            progress(f"pairs: {run.label} failed: {exc}")
            return str(exc)
        progress(f"pairs: {run.client} -> {run.server}: {measured.receiver_mbps:.1f} Mbit/s")
        return measured

    with ThreadPoolExecutor(max_workers=len(runs), thread_name_prefix="bench-pair") as pool:
        return list(zip(runs, pool.map(one, runs), strict=True))


def bench_pairs(lab: Lab, pairs: Sequence[Pair], duration: float, progress: Progress, *,
                left_out: Sequence[str] = (), raw_dir: Path | None = None) -> dict[str, Any]:
    """Run the pairs at once on the running lab; report.json's content.

    Rows logged are a before/after difference of the log, as in the single bench: every
    pair's traffic, both ways. The aggregate and the fairness index are given only when
    every pair finished: a failed pair has no rate to be fair or unfair with.
    """
    runs = plan(pairs, lab.topology)
    before = lab.log_totals()
    progress(f"pairs: iperf3 on {len(runs)} pair(s) at once for {duration:g}s, profile "
             f"{lab.settings.profile}: " + ", ".join(
                 f"{r.client} -> {r.server} ({r.address}:{r.port})" for r in runs))
    if left_out:
        progress(f"pairs: left out (no partner): {', '.join(left_out)}")
    outcomes = run_pairs(lab, runs, duration, progress)
    after = settled_log_totals(lab)
    results: list[dict[str, Any]] = []
    for run, outcome in outcomes:
        if isinstance(outcome, str):
            results.append({"pair": run.label, "client": run.client, "server": run.server,
                            "address": run.address, "port": run.port, "error": outcome})
            continue
        results.append(pair_result(run, outcome))
        if raw_dir is not None:
            raw_dir.mkdir(parents=True, exist_ok=True)
            (raw_dir / f"iperf3-pair-{run.client}-{run.server}.json").write_text(
                json.dumps(outcome.raw, indent=1))
    failed = [r["pair"] for r in results if "error" in r]
    rates = [r["receiver_mbps"] for r in results if "error" not in r]
    fairness = None if failed else jain_index(rates)
    report = {
        "mode": "pairs", "profile": lab.settings.profile,
        "run": run_label(lab.settings.profile, lab.settings.offload,
                         lab.settings.queue_target_ms),
        "backend": lab.backend.name, "mtu": lab.effective_mtu, "duration_s": duration,
        "offload": lab.settings.offload and PROFILES[lab.settings.profile].carries_offload,
        "routing": lab.settings.routing,
        "pairs": results, "left_out": list(left_out),
        "aggregate_mbps": None if failed else round(sum(rates), 2),
        "fairness": None if fairness is None else round(fairness, 4),
        "retransmits": None if failed or any(r["retransmits"] is None for r in results)
        else sum(r["retransmits"] for r in results),
        "packets_logged": after["packets"] - before["packets"],
        "wire_packets_logged": after["wire_packets"] - before["wire_packets"],
        "bytes_logged": after["bytes"] - before["bytes"],
        "logged": PROFILES[lab.settings.profile].logged,
        "not_measured": NOT_MEASURED,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "failed": failed,
    }
    if fairness is not None:
        progress(f"pairs: aggregate {report['aggregate_mbps']:.1f} Mbit/s, Jain's fairness "
                 f"index {fairness:.3f}")
    return report


def chosen_pairs(given: list[Pair] | None, topology: Topology) -> tuple[list[Pair], list[str]]:
    """--pairs checked against the topology the bench runs on (the lab's that is up, or
    the one `lab up` would start: compose.yaml or --topology), or --all-pairs's (given
    None), with the agents left out; LabError, before anything starts, if unfit."""
    try:
        if given is None:
            pairs, left_out = all_pairs(topology)
            check_pairs(pairs, topology)  # e.g. an agent without a tunnel address
            return pairs, left_out
        check_pairs(given, topology)
    except PairsError as exc:
        raise LabError(f"argument --pairs: {exc}" if given is not None else str(exc)) from None
    return list(given), []
