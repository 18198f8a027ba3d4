"""The small interface every lab backend implements: hosts you can start, stop and exec in.

The controller (lab.controller) drives a Backend without knowing which one it is;
bench and ping only ever call `exec`.
"""

from __future__ import annotations

import base64
import json
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from lab.topology import SCRATCH_NAME, Host, Topology

Progress = Callable[[str], None]
COPY_CHUNK = 96 * 1024  # base64 characters per exec: under Linux's 128 kB per argument
TUN_DEVICE = "pgvpn0"  # the agents' default tun_name
# A host with no links at all, made on demand by `lab replay` and removed by `lab down`:
# whatever a replay makes its stack answer cannot leave it.
SCRATCH_HOST = SCRATCH_NAME
# Seconds each host may take to come up, instead of the backend's own default: for a
# machine slower than the defaults allow for (or a test that wants a timeout now).
START_TIMEOUT_VARIABLE = "PGVPN_START_TIMEOUT"


class LabError(Exception):
    """Something the lab could not do, with what to check."""


@dataclass(frozen=True)
class ExecResult:
    returncode: int
    stdout: str
    stderr: str

    def check(self, what: str) -> ExecResult:
        if self.returncode != 0:
            detail = (self.stderr or self.stdout).strip().splitlines()[-3:]
            raise LabError(f"{what} failed (exit {self.returncode}): {' | '.join(detail)}")
        return self


@dataclass
class HostState:
    """What `lab status` shows of one host."""

    name: str
    role: str
    running: bool
    underlay: dict[str, str] = field(default_factory=dict)
    tunnel: list[str] = field(default_factory=list)
    detail: str = ""


class Backend(ABC):
    """One way of making the lab's hosts: Docker containers or network namespaces."""

    name: str

    def __init__(self, topology: Topology, env: dict[str, str] | None = None) -> None:
        self.topology = topology
        self.env = dict(env or {})  # what compose.yaml was filled in with

    @abstractmethod
    def available(self) -> str | None:
        """None if this backend can run here, else why not (and how to fix it)."""

    @abstractmethod
    def create(self, progress: Progress) -> None:
        """Make the hosts and networks (nothing started yet); idempotent."""

    @abstractmethod
    def start(self, host: Host, progress: Progress) -> None:
        """Start a host's service and wait until it is ready (bounded wait)."""

    @abstractmethod
    def stop(self, host: Host) -> None:
        """Stop a host's service gracefully (SIGTERM, then SIGKILL after a timeout)."""

    @abstractmethod
    def kill(self, host: Host) -> None:
        """Kill a host's service with SIGKILL: a crash, no clean shutdown (fault tests)."""

    @abstractmethod
    def exec(self, host: str, argv: Sequence[str], *, timeout: float = 60) -> ExecResult:
        """Run a command inside a host; never raises for a non-zero exit."""

    @abstractmethod
    def logs(self, host: str, tail: int = 100) -> str: ...

    @abstractmethod
    def admin_conninfo(self, dbname: str = "pgvpn", *, superuser: bool = False,
                       replica: bool = False) -> str:
        """How the operator (the controller itself) reaches the database.

        As the owner of pgvpn (bootstrap.OWNER, no superuser) for everything but
        `pgvpn db init`'s work and the server's own administration (superuser=True).
        Of a replicated database: every node, and libpq keeps the primary (or with
        `replica` a standby, which the log tools may read instead).
        """

    def path_in_host(self, host: str, path: str) -> str:
        """Where a file the topology names (e.g. a /run/secrets path) is as seen from
        inside `host`: the same path in a container."""
        return path

    @abstractmethod
    def exists(self) -> bool:
        """True if any host of this lab exists on this backend."""

    @abstractmethod
    def states(self) -> list[HostState]: ...

    @abstractmethod
    def destroy(self, progress: Progress) -> None:
        """Remove everything this backend made for the lab, found by label or prefix."""

    def tunnel_addresses(self, host: str) -> list[str]:
        """The global addresses of an agent's TUN device while it is up, else []."""
        shown = self.exec(host, ["ip", "-j", "addr", "show", "dev", TUN_DEVICE], timeout=10)
        if shown.returncode != 0:
            return []
        links = json.loads(shown.stdout or "[]")
        return [f"{a['local']}/{a['prefixlen']}" for link in links if "UP" in link["flags"]
                for a in link.get("addr_info", []) if a.get("scope") == "global"]

    # Optional, for `lab replay`: a backend without them says so in one line.
    def pgvpn_command(self) -> list[str]:
        """How to run the `pgvpn` command inside a host (the agent image's entry point)."""
        return ["pgvpn"]

    def exec_pgvpn_as_agent(self, host: str, args: Sequence[str], *,
                            timeout: float = 60) -> ExecResult:
        """Run `pgvpn ARGS` in an agent's host with that agent's own settings (its
        environment: database, role, TLS); a container's environment already is."""
        return self.exec(host, [*self.pgvpn_command(), *args], timeout=timeout)

    def copy_in(self, host: str, name: str, data: bytes) -> str:
        """Put a file into `host` (replaced if there); returns its path inside the host.

        This default works on any backend through `exec` alone: base64 in pieces that
        fit one command-line argument, appended by the host's shell. Fine for the
        small files replay copies; a backend with a faster way overrides it.
        """
        path = f"/tmp/{name}"
        encoded = base64.b64encode(data).decode()
        self.exec(host, ["sh", "-c", ': > "$0"', path]).check(f"creating {path} in {host}")
        for start in range(0, len(encoded), COPY_CHUNK):
            self.exec(host, ["sh", "-c", 'printf %s "$1" | base64 -d >> "$0"', path,
                             encoded[start:start + COPY_CHUNK]]).check(f"writing {path}")
        return path

    def start_timeout(self, default: float) -> float:
        """`default` seconds, or what PGVPN_START_TIMEOUT says."""
        given = self.env.get(START_TIMEOUT_VARIABLE, "").strip()
        if not given:
            return default
        try:
            seconds = float(given)
        except ValueError:
            seconds = 0.0
        if not 0 < seconds <= 3600:
            raise LabError(f"{START_TIMEOUT_VARIABLE}={given!r}: give seconds, more than 0 "
                           "and at most 3600")
        return seconds

    def check_start_timeout(self) -> None:
        """Refuse a bad PGVPN_START_TIMEOUT before a command changes anything."""
        self.start_timeout(0.0)

    def remove_images(self, progress: Progress) -> None:
        """Remove the images this backend builds (`lab down --images`); none by default."""
        progress(f"the {self.name} backend builds no images")

    def wait_started(self, host: str, *, ready: Callable[[], bool], alive: Callable[[], bool],
                     condition: str, timeout: float, poll: float) -> None:
        """Poll `ready` until it holds; fail at once if the service died, or at the
        timeout, either way with the tail of its log so the user sees why. The
        timeout is the backend's default unless PGVPN_START_TIMEOUT says otherwise."""
        timeout = self.start_timeout(timeout)
        deadline = time.monotonic() + timeout
        while not ready():
            if not alive():
                raise LabError(f"{host} exited during start; its log:\n{self.logs(host, 15)}")
            if time.monotonic() > deadline:
                raise LabError(f"{host} did not {condition} within {timeout:g}s "
                               f"({START_TIMEOUT_VARIABLE} sets another limit); its log:\n"
                               f"{self.logs(host, 15)}")
            time.sleep(poll)

    @abstractmethod
    def ensure_scratch_host(self, progress: Progress) -> str:
        """Make (once) a host with no network links for replays; returns its name."""


def run(argv: Sequence[str], *, timeout: float = 60,
        env: dict[str, str] | None = None) -> ExecResult:
    """Run a local command, capturing output; a timeout becomes a LabError."""
    try:
        done = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout,
                              env=env, check=False)
    except subprocess.TimeoutExpired:
        raise LabError(f"{' '.join(argv[:6])} did not finish within {timeout:.0f}s") from None
    except FileNotFoundError:
        raise LabError(f"{argv[0]} is not installed; run 'lab check'") from None
    return ExecResult(done.returncode, done.stdout, done.stderr)
