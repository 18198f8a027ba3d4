"""The replicated database as the lab sees it: Patroni's view of its nodes, waiting for
a healthy cluster, a planned switchover, and each standby's replication lag.

Patroni's REST API listens only on the nodes' own network (net-db), which no peer and
not the lab's host can reach on every backend, so every request runs inside a running
node (`Backend.exec`, with the python3 Patroni itself runs on): one path for both
backends.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from lab.backends.base import Backend, LabError, Progress
from lab.topology import Host, Topology

API_USER = "patroni"  # restapi.authentication's user (images/postgres/patroni_config.py)
API_PASSWORD_VARIABLE = "PGVPN_PATRONI_API_PASSWORD_FILE"
CLUSTER_TIMEOUT = 120.0
SWITCHOVER_TIMEOUT = 60.0
# Run inside a node: one HTTP request to its own REST API, the password read there from
# the node's secret file (never on a command line); prints status and body as JSON.
REQUEST = r"""
import base64, json, sys, urllib.error, urllib.request
method, url, body, secret = sys.argv[1:5]
request = urllib.request.Request(url, method=method, data=body.encode() or None,
                                 headers={"Content-Type": "application/json"})
if secret:
    token = base64.b64encode(b"patroni:" + open(secret, "rb").read().strip()).decode()
    request.add_header("Authorization", "Basic " + token)
try:
    with urllib.request.urlopen(request, timeout=10) as answer:
        status, text = answer.status, answer.read().decode()
except urllib.error.HTTPError as error:
    status, text = error.code, error.read().decode()
except Exception as error:  # refused, reset, timed out: said in one line by the lab
    status, text = 0, f"{type(error).__name__}: {error}"
print(json.dumps({"status": status, "body": text}))
"""
# Exact figures from the primary: Patroni's own `lag` is sampled once per HA loop.
REPLICATION = """
SELECT application_name, state, sync_state,
       pg_wal_lsn_diff(pg_current_wal_lsn(), replay_lsn)::bigint,
       extract(epoch FROM replay_lag)
FROM pg_stat_replication
"""


@dataclass(frozen=True)
class Member:
    """One node as Patroni reports it (GET /cluster)."""

    name: str
    role: str  # leader, sync_standby, replica
    state: str  # running, streaming, starting, stopped, ...
    timeline: int | None
    lag: int | str | None  # bytes, or 'unknown'


def rest_address(node: Host) -> str:
    address = node.environment.get("PATRONI_RESTAPI_CONNECT_ADDRESS")
    if not address:
        raise LabError(f"{node.name} has no PATRONI_RESTAPI_CONNECT_ADDRESS in the topology")
    return address


class Cluster:
    """The Patroni cluster of a replicated topology, reached through its nodes."""

    def __init__(self, backend: Backend, topology: Topology) -> None:
        if not topology.replicated:
            raise LabError(f"{topology.path.name} has one database and no Patroni: "
                           "use a replicated topology (lab up --topology ha)")
        self.backend = backend
        self.nodes = topology.databases

    def request(self, path: str, *, method: str = "GET", body: dict[str, Any] | None = None,
                via: Host | None = None) -> tuple[int, Any]:
        """One REST request run inside a node (`via`, else the first that answers)."""
        errors = []
        for node in [via] if via else self.nodes:
            secret = self.backend.path_in_host(
                node.name, node.environment.get(API_PASSWORD_VARIABLE, "")) \
                if method != "GET" else ""
            try:
                done = self.backend.exec(node.name, [
                    "python3", "-c", REQUEST, method, f"http://{rest_address(node)}{path}",
                    json.dumps(body) if body else "", secret], timeout=20)
            except LabError as exc:  # not running
                errors.append(f"{node.name}: {exc}")
                continue
            if done.returncode != 0:
                errors.append(f"{node.name}: {(done.stderr or done.stdout).strip()[-200:]}")
                continue
            answer = json.loads(done.stdout)
            if answer["status"] == 0:
                errors.append(f"{node.name}: Patroni did not answer ({answer['body']})")
                continue
            try:
                return answer["status"], json.loads(answer["body"])
            except json.JSONDecodeError:
                return answer["status"], answer["body"]
        raise LabError(f"no database node answered {method} {path}: {'; '.join(errors)}. "
                       "See 'lab status': is each node's Patroni running, and etcd (the dcs "
                       "host)? A switchover needs both nodes and etcd")

    def members(self) -> list[Member]:
        _, cluster = self.request("/cluster")
        if not isinstance(cluster, dict):
            raise LabError(f"Patroni answered /cluster with {cluster!r}")
        return [Member(m["name"], m.get("role", ""), m.get("state", ""), m.get("timeline"),
                       m.get("lag")) for m in cluster.get("members", [])]

    def leader(self) -> Host:
        """The node that is primary now."""
        for member in self.members():
            if member.role == "leader" and member.state == "running":
                return self.node(member.name)
        raise LabError("the cluster has no running leader now; see 'lab status'")

    def node(self, name: str) -> Host:
        for node in self.nodes:
            if node.name == name:
                return node
        raise LabError(f"no database node {name!r}; nodes: "
                       f"{', '.join(n.name for n in self.nodes)}")

    def healthy(self, members: list[Member]) -> bool:
        """A running leader and every other node a streaming synchronous standby."""
        leaders = [m for m in members if m.role == "leader" and m.state == "running"]
        standbys = [m for m in members if m.role == "sync_standby"
                    and m.state in ("running", "streaming")]
        return len(leaders) == 1 and len(standbys) >= 1 \
            and len(members) == len(self.nodes)

    def wait_healthy(self, progress: Progress, timeout: float = CLUSTER_TIMEOUT) -> list[Member]:
        """Wait until a leader runs and a synchronous standby follows it: only then is a
        commit on two nodes (before, Patroni lets the primary commit alone)."""
        progress("waiting for the cluster: a leader and a synchronous standby")
        deadline = time.monotonic() + timeout
        members: list[Member] = []
        while time.monotonic() < deadline:
            try:
                members = self.members()
            except LabError:
                members = []
            if self.healthy(members):
                progress("cluster: " + describe(members))
                return members
            time.sleep(0.5)
        raise LabError(f"the cluster did not become healthy within {timeout:g}s (now: "
                       f"{describe(members) or 'no answer'}); see 'lab logs postgres-1'")

    def switchover(self, progress: Progress, candidate: str | None = None,
                   timeout: float = SWITCHOVER_TIMEOUT) -> tuple[str, str]:
        """A planned switchover through Patroni; returns (old leader, new leader) once
        the new one runs and the old one follows it again as a synchronous standby."""
        members = self.members()
        if not self.healthy(members):
            raise LabError(f"the cluster is not healthy ({describe(members)}): a switchover "
                           "needs a leader and a synchronous standby; see 'lab status'")
        leader = next(m.name for m in members if m.role == "leader")
        if candidate == leader:
            raise LabError(f"{candidate} is the leader already")
        if candidate is None:
            candidate = next(m.name for m in members if m.role == "sync_standby")
        self.node(candidate)
        progress(f"switchover: {leader} -> {candidate} (Patroni)")
        status, answer = self.request("/switchover", method="POST",
                                      body={"leader": leader, "candidate": candidate},
                                      via=self.node(leader))
        if status != 200:
            raise LabError(f"Patroni refused the switchover (HTTP {status}): {answer}")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                members = self.members()
            except LabError:
                members = []
            roles = {m.name: m.role for m in members}
            if roles.get(candidate) == "leader" and self.healthy(members):
                progress("cluster: " + describe(members))
                return leader, candidate
            time.sleep(0.5)
        raise LabError(f"{candidate} did not lead a healthy cluster within {timeout:g}s "
                       f"(now: {describe(members)})")

    def replication(self, conninfo: str) -> dict[str, str]:
        """Each standby's replication as the primary sees it: node -> one line."""
        with psycopg.connect(conninfo, connect_timeout=5, autocommit=True) as conn:
            rows = conn.execute(REPLICATION).fetchall()
        return {name: f"{state}, {sync}, lag {lag or 0} B"
                + (f", replay {replay * 1000:.1f} ms" if replay is not None else "")
                for name, state, sync, lag, replay in rows}


def describe(members: list[Member]) -> str:
    return ", ".join(f"{m.name} {m.role.replace('_', ' ')} ({m.state}"
                     + (f", timeline {m.timeline}" if m.timeline is not None else "") + ")"
                     for m in members)
