"""The lab controller: brings the topology up and down on whichever backend is chosen.

It never asks which backend it drives; backends are picked by `make_backend`.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg

from lab import state, tls, topology
from lab.backends.base import Backend, HostState, LabError, Progress
from lab.cluster import Cluster
from lab.measure import scrape_metrics, wait_for_ping
from pgvpn import admin, bootstrap, migrate, routes
from pgvpn.errors import PgvpnError
from pgvpn.timespec import format_duration
from pgvpn.transports import PROFILES

BACKENDS = ("docker", "netns")
# Oldest and newest along each peer's (sender, seq) index: no scan of the whole log.
LOG_STORAGE = """
SELECT (SELECT coalesce(sum(bytes), 0) FROM pgvpn.log_partitions),
       (SELECT count(*) FROM pgvpn.log_partitions),
       (SELECT min((SELECT p.logged_at FROM pgvpn.packets p WHERE p.sender = s.name
                    ORDER BY p.seq LIMIT 1)) FROM pgvpn.peers s),
       (SELECT max((SELECT p.logged_at FROM pgvpn.packets p WHERE p.sender = s.name
                    ORDER BY p.seq DESC LIMIT 1)) FROM pgvpn.peers s),
       (SELECT retention FROM pgvpn.log_settings)
"""
TUNNEL_TIMEOUT = 45.0
# The packet log proper: no measurement empties it, whatever a profile lists as its tables.
PACKET_LOG_TABLES = frozenset({"pgvpn.packets", "pgvpn.cursors"})


def lab_environment(settings: state.LabSettings) -> dict[str, str]:
    """The variables compose.yaml is filled in with."""
    env = dict(os.environ)
    env.update({"PGVPN_LAB_NAME": state.LAB_NAME,
                "PGVPN_MTU": str(settings.mtu), "PGVPN_PROFILE": settings.profile,
                "PGVPN_OFFLOAD": "true" if settings.offload else "false",
                "PGVPN_QUEUE_TARGET_MS": str(settings.queue_target_ms),
                "PGVPN_ROUTING": settings.routing,
                "PGVPN_LAB_SECRETS": str(state.secrets_dir())})
    # The server always offers TLS; without it (--no-tls) it also accepts plaintext
    # and the agents, explicitly allowed to, use it.
    env.update({"PGVPN_SSL": "require", "PGVPN_SSLMODE": "verify-full",
                "PGVPN_ALLOW_PLAINTEXT": "false"} if settings.tls else
               {"PGVPN_SSL": "on", "PGVPN_SSLMODE": "disable", "PGVPN_ALLOW_PLAINTEXT": "true"})
    return env


def scratch_tables(profile: str) -> list[str]:
    """The tables a bench empties before running `profile`: the blog reproductions' own."""
    return [t for t in PROFILES[profile].tables if t not in PACKET_LOG_TABLES]


def running_topology(settings: state.LabSettings) -> Path:
    """The topology file of the lab that is up: its saved copy (see state), else (a lab
    made by an older version) the file its settings name."""
    saved = state.saved_topology_path()
    return saved if saved.is_file() else Path(settings.topology)


def static_topology() -> topology.Topology:
    """The hosts and roles of the lab that is up, else of compose.yaml: to check names
    given on a command line before the lab itself is looked at."""
    current = state.load_settings()
    if current is None:
        return topology.load(lab_environment(state.LabSettings("netns", 1500, "batched")))
    return topology.load(lab_environment(current), running_topology(current))


def make_backend(name: str, settings: state.LabSettings, path: Path | None = None) -> Backend:
    """The backend called `name`, or the first available one for 'auto', for the
    topology file `path` (by default the one the settings name)."""
    env = lab_environment(settings)
    topo = topology.load(env, path or Path(settings.topology))
    if name == "auto":
        for candidate in BACKENDS:
            backend = make_backend(candidate, settings, path)
            if backend.available() is None:
                return backend
        raise LabError("no lab backend can run here; see 'lab check'")
    if name == "docker":
        try:
            from lab.backends.docker import DockerBackend
        except ImportError as exc:
            raise LabError(f"the docker backend cannot load: {exc}") from None

        return DockerBackend(topo, env)
    if name == "netns":
        from lab.backends.netns import NetnsBackend

        return NetnsBackend(topo, env)
    raise LabError(f"unknown backend {name!r}; choose auto, {', '.join(BACKENDS)}")


class Lab:
    """A pgvpn lab on one backend: a topology's database, agents and plain hosts."""

    def __init__(self, backend: Backend, settings: state.LabSettings) -> None:
        self.backend = backend
        self.settings = settings
        self.topology = backend.topology

    @classmethod
    def current(cls) -> Lab:
        """The lab that `lab up` made, or LabError if there is none."""
        settings = state.load_settings()
        if settings is None:
            raise LabError("no lab is up; start one with 'lab up'")
        return cls(make_backend(settings.backend, settings, running_topology(settings)),
                   settings)

    @property
    def effective_mtu(self) -> int:
        return PROFILES[self.settings.profile].default_mtu(self.settings.mtu)

    def up(self, progress: Progress) -> None:
        """Create and start everything; a first `up` that fails is rolled back."""
        problem = self.backend.available()
        if problem:
            raise LabError(f"the {self.backend.name} backend cannot run: {problem}")
        self.backend.check_start_timeout()
        previous = state.load_settings()
        first = previous is None and not self.backend.exists()
        if previous and previous.backend != self.settings.backend and not first:
            raise LabError(f"a lab is already up on the {previous.backend} backend; "
                           "run 'lab down' first")
        if previous and not first:
            self.check_topology_change(previous)
        # a larger topology adds hosts and leaves the running ones be
        changed = previous is not None and dataclasses.replace(
            previous, topology=self.settings.topology) != self.settings
        if self.topology.replicated and not PROFILES[self.settings.profile].routes_by_table:
            raise LabError(f"{self.topology.path.name} replicates pgvpn.packets, and profile "
                           f"{self.settings.profile} logs elsewhere (as in the blog's posts; "
                           "v3's table is unlogged, which no standby receives): choose "
                           "batched or batched-jumbo")
        if self.topology.routes_by_table and not PROFILES[self.settings.profile].routes_by_table:
            raise LabError(f"{self.topology.path.name} routes by the owner's table, and profile "
                           f"{self.settings.profile} carries one fixed pair of peers (as in the "
                           "blog's posts): choose batched or batched-jumbo")
        try:
            state.save_settings(self.settings)
            if self.topology.path != state.saved_topology_path():
                shutil.copyfile(self.topology.path, state.saved_topology_path())
            passwords = self._ensure_secrets()
            self.backend.create(progress)
            self._start_database(progress)
            self._prepare_database(passwords, progress)
            for host in self.topology.plain_hosts:
                self.backend.start(host, progress)
            for agent in self.topology.agents:
                if changed:
                    progress(f"restarting {agent.name} with mtu {self.effective_mtu}, "
                             f"profile {self.settings.profile}"
                             + ("" if self.settings.offload else ", offload off")
                             + (f", queue control {self.settings.queue_target_ms} ms"
                                if self.settings.queue_target_ms else "")
                             + ("" if self.settings.tls else ", WITHOUT TLS")
                             + f", routing {self.settings.routing}")
                    self.backend.stop(agent)
                self.backend.start(agent, progress)
            self.wait_for_tunnel(progress)
        except BaseException:
            if first:
                progress("lab up failed: rolling back")
                self.down(progress, keep_build_log=True)
            raise

    def _start_database(self, progress: Progress) -> None:
        """The database; of a replicated one, etcd first, then the nodes in file order
        (the first to start initialises the cluster, the others copy it), ready once a
        leader runs with a synchronous standby."""
        for host in [*self.topology.dcs, *self.topology.databases]:
            self.backend.start(host, progress)
        if self.topology.replicated:
            Cluster(self.backend, self.topology).wait_healthy(progress)

    def cluster(self) -> Cluster:
        """The replicated database's Patroni cluster (LabError for a lone database)."""
        return Cluster(self.backend, self.topology)

    def check_topology_change(self, previous: state.LabSettings) -> None:
        """A running lab may only grow: every host, network, volume and secret it has
        must stay exactly as it is in the new file (compared with the copy the lab was
        made from, so an edit of the same file counts too): nothing running restarts."""
        old_path, env = running_topology(previous), lab_environment(self.settings)
        try:
            old = topology.sections(env, old_path)
        except topology.TopologyError as exc:
            raise LabError(f"the running lab's topology cannot be read ({exc}); run 'lab "
                           "down' first") from None
        new = topology.sections(env, self.topology.path)
        changed = [name for section, entries in old.items()
                   for name, spec in entries.items()
                   if new.get(section, {}).get(name) != spec]
        if changed:
            raise LabError(f"the lab that is up (topology {previous.topology}) has "
                           f"{', '.join(changed)}, which {self.topology.path} does not keep "
                           "as it is. Run 'lab down' first (a running lab only grows: a "
                           "topology with everything it has, unchanged, adds the rest)")

    def wait_for_tunnel(self, progress: Progress) -> None:
        for agent in self.topology.agents:
            peer = agent.tunnel_peer
            if peer:
                progress(f"waiting for {agent.name} -> {peer} over the tunnel")
                wait_for_ping(self.backend, agent.name, peer, TUNNEL_TIMEOUT)

    def _password_secrets(self) -> list[str]:
        """The secrets that are passwords; the others are TLS files (lab.tls)."""
        return [name for name in self.topology.secret_files if name not in tls.FILES]

    def _ensure_secrets(self) -> dict[str, str]:
        """Passwords and TLS files, made once; returns secret name -> password."""
        pgpass_users = {a.name: a.environment["PGUSER"] for a in self.topology.agents}
        passwords = state.ensure_secrets([*self._password_secrets(), state.OWNER_SECRET],
                                         pgpass_users)
        # one certificate for every node of the database: whichever leads, agents and
        # the nodes' own replication verify it (production would give each its own)
        nodes = self.topology.databases
        tls.ensure_certificates(state.secrets_dir(), lab_name=state.LAB_NAME,
                                names=[*(node.name for node in nodes), "localhost"],
                                addresses=[*(str(address) for node in nodes
                                             for address in node.addresses.values()),
                                           "127.0.0.1"])
        return passwords

    def _prepare_database(self, passwords: dict[str, str], progress: Progress) -> None:
        """`pgvpn db init` as the superuser, then as the owner the schema and the peers."""
        try:
            bootstrap.init_database(self.backend.admin_conninfo("postgres", superuser=True),
                                    "pgvpn", bootstrap.OWNER, passwords[state.OWNER_SECRET],
                                    progress)
        except (PgvpnError, psycopg.Error) as exc:
            raise LabError(f"cannot prepare the lab's database: {exc}") from None
        with self.admin() as conn:
            version = migrate.migrate(conn)
            progress(f"schema at version {version}")
            for agent in self.topology.agents:
                admin.ensure_peer_role(conn, agent.name, passwords[agent.name])
            for agent in self.topology.agents:  # the topology is the authority on them
                addresses = tuple(map(routes.tunnel_address, agent.tunnel_interfaces))
                subnets = tuple(map(routes.route_prefix, agent.routes))
                routes.add_routes(conn, agent.name, routes.Routes(addresses, subnets),
                                  replace=True)

    @contextmanager
    def admin(self) -> Iterator[psycopg.Connection]:
        """An owner connection to the lab's database (the operator's rights)."""
        try:
            conn = psycopg.connect(self.backend.admin_conninfo(), autocommit=True,
                                   connect_timeout=5)
        except psycopg.OperationalError as exc:
            raise LabError(f"cannot reach the lab's database: {exc}") from None
        with conn:
            yield conn

    def down(self, progress: Progress, *, keep_build_log: bool = False) -> None:
        """Remove everything; a rollback keeps the build log its error points to."""
        self.backend.destroy(progress)
        state.remove_state(keep_build_log=keep_build_log)

    def log_totals(self) -> dict[str, Any]:
        """Packets and bytes in the running profile's log (zero for one that logs nothing)."""
        query = PROFILES[self.settings.profile].log_totals_query()
        if query is None:
            return {"packets": 0, "bytes": 0, "wire_packets": 0}
        with self.admin() as conn:
            row = conn.execute(query).fetchone()
        assert row is not None
        return {"packets": int(row[0]), "bytes": int(row[1]), "wire_packets": int(row[2])}

    def with_profile(self, profile: str, offload: bool | None = None,
                     queue_target_ms: int | None = None) -> Lab:
        """The same lab with another transport profile, and offload and queue control
        settings if given (applied by the next `up`)."""
        settings = dataclasses.replace(
            self.settings, profile=profile,
            offload=self.settings.offload if offload is None else offload,
            queue_target_ms=(self.settings.queue_target_ms if queue_target_ms is None
                             else queue_target_ms),
            # a blog profile carries one fixed pair: it runs with routing peer
            routing=self.settings.routing if PROFILES[profile].routes_by_table else "peer")
        return Lab(make_backend(settings.backend, settings), settings)

    def start_for_bench(self, progress: Progress) -> None:
        """Run the agents with this lab's profile, after emptying only its scratch tables.

        The packet log (pgvpn.packets, pgvpn.cursors) is never emptied: a bench counts
        rows as a before/after difference, and the agents resume their seq and cursors.
        """
        scratch = scratch_tables(self.settings.profile)
        if scratch:
            with self.admin() as conn:
                conn.execute(f"TRUNCATE {', '.join(scratch)}")
            progress(f"emptied {', '.join(scratch)} ({self.settings.profile}'s own table; "
                     "the packet log pgvpn.packets is kept)")
        self.up(progress)

    def status(self) -> dict[str, Any]:
        hosts: list[HostState] = self.backend.states()
        report: dict[str, Any] = {
            "backend": self.backend.name, "mtu": self.effective_mtu,
            "profile": self.settings.profile, "tls": self.settings.tls,
            "offload": self.settings.offload, "routing": self.settings.routing,
            "topology": self.settings.topology,  # the file it was made from
            "hosts": [vars(h) for h in hosts]}
        for host in report["hosts"]:
            known = self.topology.hosts.get(host["name"])
            listen = known.environment.get("PGVPN_METRICS_LISTEN") if known else None
            if host["running"] and listen:
                try:
                    host["metrics"] = scrape_metrics(self.backend, host["name"], listen)
                except LabError as exc:
                    host["metrics"] = {"error": str(exc)}
        if self.topology.replicated:
            self._cluster_status(report)
        try:
            report["log"] = self.log_totals()
            if PROFILES[self.settings.profile].log_table == "pgvpn.packets":
                report["log"].update(self.log_storage())
        except (LabError, psycopg.Error) as exc:
            report["log"] = {"error": str(exc).strip()}
        return report

    def _cluster_status(self, report: dict[str, Any]) -> None:
        """Each node's role, state and timeline (Patroni), and each standby's
        replication as the primary sees it (exact lag, not Patroni's sample)."""
        try:
            members = self.cluster().members()
        except LabError as exc:
            report["cluster"] = {"error": str(exc)}
            return
        try:
            replication = self.cluster().replication(
                self.backend.admin_conninfo("postgres", superuser=True))
        except psycopg.Error as exc:
            replication = {}
            report["replication_error"] = str(exc).strip()
        report["cluster"] = [vars(m) for m in members]
        roles = {m.name: m for m in members}
        for host in report["hosts"]:
            member = roles.get(host["name"])
            if member is not None:
                host["detail"] = ", ".join(filter(None, [
                    member.role.replace("_", " "), member.state,
                    f"timeline {member.timeline}" if member.timeline else "",
                    replication.get(member.name, ""), host["detail"]]))

    def log_storage(self) -> dict[str, Any]:
        """pgvpn.packets on disk: its partitions' size, their number, the time span logged."""
        with self.admin() as conn:
            row = conn.execute(LOG_STORAGE).fetchone()
        assert row is not None
        size, partitions, first, last, keep = row
        span = (f"{first:%Y-%m-%d %H:%M:%S} .. {last:%Y-%m-%d %H:%M:%S} "
                f"({format_duration(last - first)})" if first else "empty")
        return {"disk_bytes": int(size), "partitions": int(partitions),
                "first": first.isoformat() if first else None,
                "last": last.isoformat() if last else None, "span": span,
                "retention": format_duration(keep) if keep else "forever"}
