"""The namespace backend: each lab host is a network namespace, linked by veth pairs.

Everything it makes is named with the `pgvpn-` prefix; processes are found by the
namespace they run in (`ip netns pids`), never by a name pattern.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg

from lab import state
from lab.backends import netnsbridge, netnsha, netnspg
from lab.backends.base import (
    SCRATCH_HOST,
    TUN_DEVICE,
    Backend,
    ExecResult,
    HostState,
    LabError,
    Progress,
    run,
)
from lab.topology import SECRETS_DIR, Host, Network, session_attrs
from pgvpn import bootstrap

PREFIX = f"{state.LAB_NAME}-"
TAG = f"io.pgvpn.project={state.LAB_NAME}"  # on each namespace's loopback (ifalias)
PG_PORT = 5432
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
class NetnsBackend(Backend):
    name = "netns"

    @property
    def root(self) -> Path:
        return state.STATE_DIR / "netns"

    def namespace(self, host: str) -> str:
        if host not in self.topology.hosts and host != SCRATCH_HOST:
            raise LabError(f"no host {host!r} in the lab; hosts: {', '.join(self.topology.hosts)}")
        return PREFIX + host

    # ----------------------------------------------------------------- checks
    def available(self) -> str | None:
        if os.geteuid() != 0:
            return "the namespace backend needs root (network namespaces, TUN devices)"
        if shutil.which("ip") is None:
            return "iproute2 ('ip') is missing: apt-get install iproute2"
        if netnspg.postgres_bindir() is None:
            return "PostgreSQL server binaries are missing: apt-get install postgresql"
        if shutil.which("iperf3") is None:
            return "iperf3 is missing: apt-get install iperf3"
        if not Path("/dev/net/tun").exists():
            return "/dev/net/tun is missing: modprobe tun"
        return None

    # ---------------------------------------------------------------- create
    def existing_namespaces(self) -> list[str]:
        """This lab's namespaces, never another lab's: exactly <lab name>-<host> for the
        topology's hosts, and any other that carries this lab's tag (a host of a larger
        topology the lab once had, even if its file is gone)."""
        listing = run(["ip", "-j", "netns", "list"]).stdout.strip()
        present = {entry["name"] for entry in json.loads(listing or "[]")}
        found = [PREFIX + host for host in (*self.topology.hosts, SCRATCH_HOST)
                 if PREFIX + host in present]
        return found + sorted(ns for ns in present - set(found)
                              if ns.startswith(PREFIX) and self._tagged(ns))

    @staticmethod
    def _tag(ns: str) -> None:
        """Mark a namespace as this lab's, in the kernel itself (loopback's alias)."""
        run(["ip", "-n", ns, "link", "set", "lo", "alias", TAG]).check(f"tagging {ns}")

    @staticmethod
    def _tagged(ns: str) -> bool:
        shown = run(["ip", "-j", "-n", ns, "link", "show", "lo"])
        links = json.loads(shown.stdout or "[]") if shown.returncode == 0 else []
        return any(link.get("ifalias") == TAG for link in links)

    def create(self, progress: Progress) -> None:
        bridges = netnsbridge.plan(self.topology, PREFIX)  # networks of 3 or more hosts
        netnsbridge.refuse_rewiring(bridges)  # before anything is made
        existing = set(self.existing_namespaces())
        for host in self.topology.hosts.values():
            ns = self.namespace(host.name)
            if ns not in existing:
                progress(f"namespace {ns}")
                run(["ip", "netns", "add", ns]).check(f"creating namespace {ns}")
            run(["ip", "-n", ns, "link", "set", "lo", "up"]).check("loopback up")
            self._tag(ns)
            for key, value in host.sysctls.items():  # as Docker applies compose's sysctls
                run(["ip", "netns", "exec", ns, "sysctl", "-qw", f"{key}={value}"]).check(
                    f"sysctl {key}={value} in {ns}")
        for network in self.topology.networks.values():
            members = [h for h in self.topology.hosts.values() if network.name in h.addresses]
            if len(members) == 1:  # linked once a larger topology brings its second host
                progress(f"network {network.name}: only {members[0].name} is on it (not "
                         "linked until a second host is)")
                continue
            if network.name in bridges:
                netnsbridge.build(bridges[network.name], TAG, progress)
            elif not members:
                raise LabError(f"network {network.name} has no hosts; the namespace backend "
                               "links the hosts that share a network")
            else:
                self._link(network, members, progress)

    def _link(self, network: Network, members: list[Host], progress: Progress) -> None:
        """The network's veth pair, one end in each member's namespace, addressed."""
        # Both ends are created directly inside their namespaces, so each can carry
        # the network's own name and nothing is ever left in the root namespace.
        ends = [network.name[:15]] * 2
        first, second = (self.namespace(m.name) for m in members)
        if run(["ip", "-n", first, "link", "show", ends[0]]).returncode == 0:
            return
        progress(f"link {members[0].name} <-> {members[1].name} ({network.subnet})")
        run(["ip", "link", "add", ends[0], "netns", first, "type", "veth",
             "peer", "name", ends[1], "netns", second]).check("creating veth pair")
        for member, end in zip(members, ends, strict=True):
            ns = self.namespace(member.name)
            address = f"{member.addresses[network.name]}/{network.subnet.prefixlen}"
            run(["ip", "-n", ns, "addr", "add", address, "dev", end]).check("address")
            run(["ip", "-n", ns, "link", "set", end, "up"]).check("link up")

    # ----------------------------------------------------------------- start
    def start(self, host: Host, progress: Progress) -> None:
        if self.service_pid(host.name) is not None:
            data = self.root / "pgdata"
            if host.role == "database" and not host.patroni \
                    and netnspg.configure(data, host, self.topology):
                progress("postgres: TLS or access settings changed, reloading them")
                with psycopg.connect(self.admin_conninfo("postgres", superuser=True),
                                     connect_timeout=5, autocommit=True) as conn:
                    conn.execute("SELECT pg_reload_conf()")
            return
        netnsha.prepare_volumes(self, host)
        if host.patroni:
            netnsha.start_node(self, host, progress)
        elif host.role == "database":
            self._start_postgres(host, progress)
        elif host.role == "agent":
            self._start_agent(host, progress)
        else:
            self._start_plain_host(host, progress)

    def spawn(self, host: str, argv: list[str], env: dict[str, str]) -> int:
        (self.root / "logs").mkdir(parents=True, exist_ok=True)
        with open(self.root / "logs" / f"{host}.log", "ab") as log:
            process = subprocess.Popen(
                ["ip", "netns", "exec", self.namespace(host), *argv], stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        (self.root / f"{host}.pid").write_text(str(process.pid))
        return process.pid

    def _start_postgres(self, host: Host, progress: Progress) -> None:
        bindir = netnspg.postgres_bindir()
        assert bindir is not None
        data, sockets = self.root / "pgdata", self.root / "run"
        state.STATE_DIR.mkdir(parents=True, exist_ok=True)
        for directory in (state.STATE_DIR, self.root):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)  # the postgres user must reach its data below
        if not (data / "PG_VERSION").exists():
            progress("initdb (PostgreSQL data directory)")
            netnspg.initdb(bindir, data, sockets, PG_PORT)
        netnspg.configure(data, host, self.topology)
        tls = ([] if host.environment.get("PGVPN_SSL", "off") == "off" else
               ["-c", "ssl=on", "-c", f"ssl_cert_file={data / 'server.crt'}",
                "-c", f"ssl_key_file={data / 'server.key'}"])
        progress("starting postgres" + (" (TLS)" if tls else ""))
        # every address of its namespace (only its links and loopback), also for a data
        # directory made before that was the setting: a network linked later is served
        self.spawn(host.name,
                    [*netnspg.AS_POSTGRES, str(bindir / "postgres"), "-D", str(data),
                     "-c", "listen_addresses=*", *tls],
                    {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"})
        self.wait_started(host.name, ready=self._accepts_connections,
                          alive=lambda: self.service_pid(host.name) is not None,
                          condition="accept connections", timeout=READY_TIMEOUT, poll=0.2)

    def _accepts_connections(self) -> bool:
        try:
            psycopg.connect(self.admin_conninfo("postgres", superuser=True),
                            connect_timeout=2).close()
        except psycopg.OperationalError:
            return False
        return True

    def agent_environment(self, host: Host) -> dict[str, str]:
        """The host's compose environment, with secret paths pointing at the lab's files."""
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8",
               "PYTHONUNBUFFERED": "1"}
        for key, value in host.environment.items():
            secret = value.startswith(SECRETS_DIR + "/")
            env[key] = str(netnspg.local_path(value)) if secret else \
                netnsha.volume_path(self, host, value)
        return env

    def path_in_host(self, host: str, path: str) -> str:
        self.namespace(host)  # namespaces share the file system: only secrets are elsewhere
        return str(netnspg.local_path(path))

    def _start_agent(self, host: Host, progress: Progress) -> None:
        progress(f"starting agent {host.name}")
        self.spawn(host.name, [sys.executable, "-m", "pgvpn.cli", "run"],
                    self.agent_environment(host))
        self.wait_started(host.name, ready=lambda: bool(self.tunnel_addresses(host.name)),
                          alive=lambda: self.service_pid(host.name) is not None,
                          condition=f"bring its TUN device {TUN_DEVICE} up",
                          timeout=READY_TIMEOUT, poll=0.1)

    def _start_plain_host(self, host: Host, progress: Progress) -> None:
        """A plain host runs its topology command (as its container would) in its
        namespace, and is ready when its healthcheck passes there."""
        if not host.command:
            raise LabError(f"{host.name}: a plain host needs a command (its entrypoint and "
                           "command in the topology file)")
        progress(f"starting {host.name}")
        self.spawn(host.name, list(host.command), self.agent_environment(host))

        def healthy() -> bool:
            return not host.healthcheck or self.exec(host.name, host.healthcheck,
                                                     timeout=10).returncode == 0

        self.wait_started(host.name, ready=healthy,
                          alive=lambda: self.service_pid(host.name) is not None,
                          condition="pass its healthcheck", timeout=READY_TIMEOUT, poll=0.2)

    # ------------------------------------------------------------------ stop
    def service_pid(self, host: str) -> int | None:
        """The pid of the host's service if it is alive (and not a zombie)."""
        try:
            pid = int((self.root / f"{host}.pid").read_text())
            with open(f"/proc/{pid}/stat") as stat:
                if stat.read().rsplit(")", 1)[1].split()[0] == "Z":
                    os.waitpid(pid, os.WNOHANG)
                    return None
            return pid
        except (OSError, ValueError, ChildProcessError):
            return None

    def stop(self, host: Host) -> None:
        if host.patroni:
            netnsha.stop_node(self, host, kill=False)
            return
        pid = self.service_pid(host.name)
        if pid is None:
            return
        # postgres: SIGINT is its fast shutdown; the agent treats SIGTERM as "stop cleanly"
        os.kill(pid, signal.SIGINT if host.role == "database" else signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while self.service_pid(host.name) is not None and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.service_pid(host.name) is not None:
            os.kill(pid, signal.SIGKILL)
        (self.root / f"{host.name}.pid").unlink(missing_ok=True)

    def kill(self, host: Host) -> None:
        if host.patroni:
            netnsha.stop_node(self, host, kill=True)
            return
        pid = self.service_pid(host.name)
        if pid is None:
            return
        os.kill(pid, signal.SIGKILL)
        # A killed postmaster's children notice and exit by themselves; a new one
        # cannot start while they still hold its shared memory, nor while its own pid
        # still exists, even as a zombie that nobody reaped yet: wait for all of them.
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and (
                Path(f"/proc/{pid}").exists()
                or (host.role == "database" and self._postgres_processes(host.name))):
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)  # reaps it if we are its parent
            time.sleep(0.1)
        (self.root / f"{host.name}.pid").unlink(missing_ok=True)

    def _postgres_processes(self, host: str) -> list[int]:
        """Processes of the postgres user in the host's namespace (waited for, never killed)."""
        found = []
        uid = pwd.getpwnam("postgres").pw_uid
        for pid in run(["ip", "netns", "pids", self.namespace(host)]).stdout.split():
            with contextlib.suppress(OSError):
                if Path(f"/proc/{pid}").stat().st_uid == uid:
                    found.append(int(pid))
        return found

    # ------------------------------------------------------------ operations
    def exec(self, host: str, argv: Sequence[str], *, timeout: float = 60) -> ExecResult:
        return run(["ip", "netns", "exec", self.namespace(host), *argv], timeout=timeout)

    def exec_pgvpn_as_agent(self, host: str, args: Sequence[str], *,
                            timeout: float = 60) -> ExecResult:
        namespace = self.namespace(host)  # an unknown host: the lab's hosts, named
        agent = self.topology.hosts.get(host)
        if agent is None or agent.role != "agent":
            raise LabError(f"{host} runs no agent, so it has no agent's settings")
        return run(["ip", "netns", "exec", namespace, *self.pgvpn_command(), *args],
                   timeout=timeout, env=self.agent_environment(agent))

    def logs(self, host: str, tail: int = 100) -> str:
        self.namespace(host)
        try:
            lines = (self.root / "logs" / f"{host}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(lines[-tail:])

    def admin_conninfo(self, dbname: str = "pgvpn", *, superuser: bool = False,
                       replica: bool = False) -> str:
        # The socket directory is root's and postgres's only, so local trust is safe.
        user = "postgres" if superuser else bootstrap.OWNER
        nodes = self.topology.databases
        sockets = ([netnsha.socket_directory(self, node) for node in nodes]
                   if self.topology.replicated else [self.root / "run"])
        return (f"host={','.join(map(str, sockets))} port={','.join([str(PG_PORT)] * len(nodes))} "
                f"user={user} dbname={dbname}" + session_attrs(self.topology, replica))

    # ------------------------------------------------- log tools (lab replay)
    def pgvpn_command(self) -> list[str]:
        return [sys.executable, "-m", "pgvpn.cli"]

    def copy_in(self, host: str, name: str, data: bytes) -> str:
        self.namespace(host)  # namespaces share the file system: any host reads it there
        path = self.root / "files" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return str(path)

    def ensure_scratch_host(self, progress: Progress) -> str:
        ns = PREFIX + SCRATCH_HOST
        if ns not in self.existing_namespaces():
            progress(f"namespace {ns} (scratch host for replays, no links)")
            run(["ip", "netns", "add", ns]).check(f"creating namespace {ns}")
            run(["ip", "-n", ns, "link", "set", "lo", "up"]).check("loopback up")
            self._tag(ns)
        return SCRATCH_HOST

    def exists(self) -> bool:
        return bool(self.existing_namespaces())

    def states(self) -> list[HostState]:
        present = set(self.existing_namespaces())
        result = []
        for host in self.topology.hosts.values():
            exists = self.namespace(host.name) in present
            running = exists and self.service_pid(host.name) is not None
            result.append(HostState(
                host.name, host.role, running,
                {net: str(addr) for net, addr in host.addresses.items()},
                self.tunnel_addresses(host.name) if running and host.role == "agent" else [],
                "" if exists else "namespace missing"))
        return result

    # --------------------------------------------------------------- destroy
    def destroy(self, progress: Progress) -> None:
        for ns in self.existing_namespaces():
            self._kill_namespace_processes(ns, progress)
            progress(f"removing namespace {ns}")
            run(["ip", "netns", "del", ns]).check(f"removing namespace {ns}")
        shutil.rmtree(self.root, ignore_errors=True)

    def _kill_namespace_processes(self, ns: str, progress: Progress) -> None:
        def pids() -> list[int]:
            return [int(p) for p in run(["ip", "netns", "pids", ns]).stdout.split()]

        found = pids()
        if not found:
            return
        progress(f"stopping {len(found)} process(es) in {ns}")
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in found:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            deadline = time.monotonic() + STOP_TIMEOUT
            while (found := pids()) and time.monotonic() < deadline:
                time.sleep(0.1)
            if not found:
                return
        raise LabError(f"processes {found} in {ns} survived SIGKILL")
