"""Shared fixtures: a real lab (namespaces by default) driven through the `lab` CLI."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest

from lab.backends.base import SCRATCH_HOST
from lab.controller import static_topology

ROOT = Path(__file__).resolve().parent.parent
# Tests use their own lab name, so a user's lab ("pgvpn") is never touched.
TEST_LAB = os.environ.get("PGVPN_TEST_LAB_NAME", "pgvpn-test")


class LabHandle:
    """A running lab as the tests see it: the CLI, exec in hosts, the owner's SQL."""

    def __init__(self, backend: str, name: str = TEST_LAB) -> None:
        self.backend = backend
        self.name = name
        self.env = {**os.environ, "PGVPN_LAB_NAME": name}
        self.env.pop("PGVPN_LAB_DIR", None)
        self.state_dir = Path(f"/var/tmp/{name}-lab")

    def cli(self, *args: str, timeout: float = 600, check: bool = True
            ) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True,
                              text=True, timeout=timeout, env=self.env, cwd=ROOT, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"lab {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stdout}\n{done.stderr}")
        return done

    def exec(self, host: str, *argv: str, timeout: float = 120, check: bool = True
             ) -> subprocess.CompletedProcess[str]:
        return self.cli("exec", host, "--", *argv, timeout=timeout, check=check)

    def status(self) -> dict[str, Any]:
        return json.loads(self.cli("status", "--json").stdout)  # type: ignore[no-any-return]

    def conninfo(self, *, superuser: bool = False) -> str:
        """The owner's connection (or the server's superuser's), as the controller builds it."""
        code = ("from lab.controller import Lab; "
                f"print(Lab.current().backend.admin_conninfo(superuser={superuser}))")
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              env=self.env, cwd=ROOT, check=True)
        return done.stdout.strip()

    def sql(self, query: str, params: Any = None, *, superuser: bool = False
            ) -> list[tuple[Any, ...]]:
        """Rows of `query` ([] for a statement that returns none)."""
        with psycopg.connect(self.conninfo(superuser=superuser), autocommit=True) as conn:
            cursor = conn.execute(query, params)
            return cursor.fetchall() if cursor.description else []

    def namespaces(self) -> dict[str, int]:
        """This lab's network namespaces, the replay scratch host's included, by name:
        their inode, which every process in one shows in /proc/PID/ns/net."""
        listing = subprocess.run(["ip", "-j", "netns", "list"], capture_output=True,
                                 text=True, check=True).stdout
        hosts = [*static_topology().hosts, SCRATCH_HOST]  # the replay scratch host's too
        ours = {self.namespace(h) for h in hosts}
        return {n["name"]: os.stat(f"/run/netns/{n['name']}").st_ino
                for n in json.loads(listing or "[]")
                if n["name"] in ours or self.tagged(n["name"])}

    def tagged(self, namespace: str) -> bool:
        """The namespace carries this lab's tag (lab.backends.netns.TAG): its networks'
        bridges, hosts of a topology it once had. A bare `<lab>-` prefix would also match
        another lab's (pgvpn-test-f- starts with pgvpn-test-)."""
        if not namespace.startswith(f"{self.name}-"):
            return False
        shown = subprocess.run(["ip", "-j", "-n", namespace, "link", "show", "lo"],
                               capture_output=True, text=True, check=False)
        return shown.returncode == 0 and any(
            link.get("ifalias") == f"io.pgvpn.project={self.name}"
            for link in json.loads(shown.stdout or "[]"))

    def processes(self, namespaces: Iterable[int] = ()) -> list[str]:
        """Processes of this lab's: in one of its `namespaces` (inodes, which outlive a
        removed namespace's name), or naming its state directory (postgres's data
        directory, the agents' password files)."""
        inodes = {f"net:[{inode}]" for inode in namespaces}
        # A process of ours keeps its removed namespace, and so its inode, alive: an
        # inode that another lab's named namespace has now was freed and reused.
        ours = set(self.namespaces())
        for name in os.listdir("/run/netns") if os.path.isdir("/run/netns") else []:
            if name not in ours:
                with contextlib.suppress(OSError):  # removed meanwhile
                    inodes.discard(f"net:[{os.stat(f'/run/netns/{name}').st_ino}]")
        mine = f"{self.state_dir}/".encode()
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                text = Path(f"/proc/{pid}/cmdline").read_bytes()
                if (os.readlink(f"/proc/{pid}/ns/net") in inodes or mine in text
                        or mine in Path(f"/proc/{pid}/environ").read_bytes()):
                    argv = text.replace(b"\0", b" ").decode(errors="replace")
                    found.append(f"process {pid}: {argv}")
            except OSError:
                continue  # it ended meanwhile
        return found

    def leftovers(self, namespaces: Iterable[int] = ()) -> list[str]:
        """Anything of this lab's that still exists: namespaces (the replay scratch
        host's and network bridges' too), processes (see `processes`), Docker objects, state."""
        found = list(self.namespaces())
        found += self.processes(namespaces)
        if shutil.which("docker") and self.backend == "docker":
            label = f"label=io.pgvpn.project={self.name}"
            for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
                names = subprocess.run(["docker", *kind, "-q", "--filter", label],
                                       capture_output=True, text=True, check=True).stdout
                found += [f"docker {kind[0]} {n}" for n in names.split()]
        if self.state_dir.exists():
            found.append(str(self.state_dir))
        return found

    def use_profile(self, profile: str) -> None:
        """Run the agents with transport `profile` (`lab up` restarts them only on a change)."""
        self.cli("up", "--profile", profile)

    def logged_by_sender(self, table: str) -> dict[str, int]:
        """Rows per sender in a profile's packet table (Profile.log_table)."""
        rows = self.sql(f"SELECT sender, count(*) FROM {table} GROUP BY sender")
        return {sender: int(count) for sender, count in rows}

    def tun_stats64(self, host: str) -> dict[str, Any]:
        """The TUN device's counters as `ip -s -j link` shows them (rx, tx: packets,
        bytes, dropped ...), counted since its agent made it."""
        shown = json.loads(self.exec(host, "ip", "-s", "-j", "link", "show", "pgvpn0").stdout)
        return shown[0]["stats64"]  # type: ignore[no-any-return]

    def tun_counters(self, host: str) -> dict[str, int]:
        stats = self.tun_stats64(host)
        return {"tx": stats["tx"]["packets"], "rx": stats["rx"]["packets"],
                "tx_dropped": stats["tx"]["dropped"]}

    def tun_link(self, host: str) -> dict[str, Any]:
        """The host's TUN device as `ip -j link` shows it: ifindex (new with every agent
        start), mtu."""
        shown = json.loads(self.exec(host, "ip", "-j", "link", "show", "pgvpn0").stdout)
        return shown[0]  # type: ignore[no-any-return]

    def pgvpn(self, *args: str, timeout: float = 120, check: bool = True
              ) -> subprocess.CompletedProcess[bytes]:
        """The `pgvpn` command run here with the operator's connection (the log tools)."""
        env = {**self.env, "DATABASE_URL": self.conninfo()}
        done = subprocess.run([sys.executable, "-m", "pgvpn.cli", *args], capture_output=True,
                              timeout=timeout, env=env, cwd=ROOT, check=False)
        if check and done.returncode != 0:
            raise AssertionError(f"pgvpn {' '.join(args)} exited {done.returncode}:\n"
                                 f"{done.stderr.decode(errors='replace')}")
        return done

    def namespace(self, host: str) -> str:
        """A host's network namespace (namespace backend): <lab name>-<host>."""
        return f"{self.name}-{host}"

    def wait_settled(self, timeout: float = 20) -> None:
        """Wait until every logged packet was read by its receiver."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pending = self.sql(
                "SELECT count(*) FROM pgvpn.packets p JOIN pgvpn.cursors c "
                "ON c.receiver = p.receiver AND c.sender = p.sender WHERE p.seq > c.last_seq")
            if pending[0][0] == 0:
                return
            time.sleep(0.2)
        raise AssertionError("logged packets were still undelivered after the timeout")


class CliBackend:
    """Lets lab.measure (iperf, ping) drive a test lab through `lab exec`."""

    def __init__(self, lab: LabHandle) -> None:
        self.lab = lab

    def exec(self, host: str, argv: Any, *, timeout: float = 60) -> Any:
        from lab.backends.base import ExecResult

        done = self.lab.exec(host, *argv, timeout=timeout, check=False)
        return ExecResult(done.returncode, done.stdout, done.stderr)


def netns_ready() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    for tool in ("ip", "iperf3", "ping"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed"
    return None


def docker_ready() -> str | None:
    if shutil.which("docker") is None:
        return "docker is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return "no Docker engine answers"
    return None


@contextlib.contextmanager
def running_lab(backend: str, name: str, topology: str | None = None
                ) -> Iterator[LabHandle]:
    """A lab of its own named `name` (of `topology`, else compose.yaml's two peers),
    up for the block; then down, and nothing of it left behind."""
    reason = netns_ready() if backend == "netns" else docker_ready() or netns_ready()
    if reason:
        pytest.skip(f"{backend} lab unavailable: {reason}")
    lab = LabHandle(backend, name)
    lab.cli("down")  # a crashed earlier run must not poison this one
    lab.cli("up", "--backend", backend, *(("--topology", topology) if topology else ()),
            timeout=3600)
    try:
        yield lab
    finally:
        namespaces = lab.namespaces().values()  # to find what ran in them once removed
        lab.cli("down")
        leftovers = lab.leftovers(namespaces)
        assert not leftovers, f"lab down left these behind: {leftovers}"


@pytest.fixture(scope="session")
def netns_lab() -> Iterator[LabHandle]:
    with running_lab("netns", TEST_LAB) as lab:
        yield lab


@pytest.fixture(scope="session")
def docker_lab() -> Iterator[LabHandle]:
    with running_lab("docker", TEST_LAB + "-d") as lab:
        yield lab


@pytest.fixture(scope="session", params=["netns", pytest.param("docker", marks=pytest.mark.docker)])
def any_lab(request: pytest.FixtureRequest) -> LabHandle:
    """The same tests on both backends: the lab's promise is that they behave alike."""
    fixture = "netns_lab" if request.param == "netns" else "docker_lab"
    return request.getfixturevalue(fixture)  # type: ignore[no-any-return]


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked docker_alone run last (their fixture takes the session's Docker lab
    down); the order of everything else stays as pytest grouped it."""
    items.sort(key=lambda item: item.get_closest_marker("docker_alone") is not None)


@pytest.fixture
def docker_alone() -> None:
    """The Docker engine with no lab of this session's on it: compose.yaml's networks
    have fixed subnets, so a second lab could not start beside the session's."""
    docker_engine_alone()


def docker_engine_alone() -> None:
    """docker_alone's work, for a fixture of a wider scope (a module's lab)."""
    reason = docker_ready() or netns_ready()
    if reason:
        pytest.skip(f"docker lab unavailable: {reason}")
    session_lab = LabHandle("docker", TEST_LAB + "-d")
    session_lab.cli("down")
    assert session_lab.leftovers() == []
    labs = subprocess.run(["docker", "ps", "-a", "--filter", "label=io.pgvpn.project",
                           "--format", '{{.Label "io.pgvpn.project"}}'], capture_output=True,
                          text=True, check=True).stdout.split()
    others = sorted({lab for lab in labs if not lab.startswith(f"{TEST_LAB}-")})
    if others:  # a lab that is not this session's: yours, or another session's
        pytest.skip(f"another pgvpn Docker lab is up ({', '.join(others)}): these tests "
                    "need the engine to themselves")
