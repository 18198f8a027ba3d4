"""What the trust tests need beyond conftest: a peer's own connection, and the lab CLI
with extra environment (e.g. a short max_replay_age for one agent start).

A peer's connection is its real role (pgvpn_peer_a ...): over the Unix socket on the
namespace backend (the privileges are the role's, however it logs in), over TLS
with its password on Docker, where the host reaches the database like a peer does.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgvpn.admin import role_name
from tests.conftest import ROOT, LabHandle


def peer_conninfo(lab: LabHandle, peer: str) -> str:
    """How peer `peer` logs in: its own role, its own password file."""
    params: dict[str, Any] = conninfo_to_dict(lab.conninfo())
    params.pop("password", None)
    params.update(user=role_name(peer), passfile=str(lab.state_dir / "secrets" / peer),
                  application_name=f"pgvpn tests as {peer}")
    return make_conninfo(**params)


def connect_as(lab: LabHandle, peer: str) -> psycopg.Connection:
    return psycopg.connect(peer_conninfo(lab, peer), autocommit=True)


def owner_execute(lab: LabHandle, statement: str, params: Any = None) -> int:
    """A statement that returns no rows, as the owner; returns its row count."""
    with psycopg.connect(lab.conninfo(), autocommit=True) as conn:
        return conn.execute(statement, params).rowcount


@contextmanager
def temporary_lent(lab: LabHandle, peer: str) -> Iterator[None]:
    """TEMPORARY on the database for `peer` for a while, as the owner grants it.

    Peers have none (sql/005_trust.sql): lending it shows that each defence behind
    that one holds on its own.
    """
    privilege, role = "TEMPORARY ON DATABASE pgvpn", role_name(peer)
    owner_execute(lab, f"GRANT {privilege} TO {role}")
    try:
        yield
    finally:
        owner_execute(lab, f"REVOKE {privilege} FROM {role}")


def lab_cli(lab: LabHandle, *args: str, env: dict[str, str] | None = None,
            timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    """`lab ARGS` with extra environment (compose.yaml reads it, e.g. PGVPN_MAX_REPLAY_AGE)."""
    done = subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env={**lab.env, **(env or {})}, cwd=ROOT,
                          check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"lab {' '.join(args)} exited {done.returncode}:\n"
                             f"{done.stdout}\n{done.stderr}")
    return done


def agent_log(lab: LabHandle, host: str, tail: int = 400) -> str:
    return lab.cli("logs", host, "--tail", str(tail)).stdout


WHOLE_LOG = 100_000  # the most lines `lab logs --tail` gives (lab.cli.MAX_LOG_LINES)
# The agent's start line (pgvpn.agent): what it runs with, as it understood its settings.
START_LINE = re.compile(r"peer (?P<peer>\S+): (?P<tun>\S+) on .*, mtu (?P<mtu>\d+), "
                        r"offload (?P<offload>on|off[^)]*?)"
                        r"(?:, queue control (?P<queue_ms>\d+) ms)?\) -> "
                        r"peer .*, profile (?P<profile>\S+), (?P<commit>\w+) commit$",
                        re.MULTILINE)


def log_lines(lab: LabHandle, host: str) -> list[str]:
    """The host's whole log, a line each; the blank lines `lab logs` may end with (after
    a container's log, say) are no lines, or a mark would count them as seen."""
    return agent_log(lab, host, WHOLE_LOG).rstrip().splitlines()


def log_mark(lab: LabHandle, host: str) -> int:
    """How many lines the host's log holds now: a window over what an action adds starts
    there (the log keeps every earlier test's lines)."""
    lines = log_lines(lab, host)
    assert len(lines) < WHOLE_LOG, f"{host}'s log is too long to window"
    return len(lines)


def log_since(lab: LabHandle, host: str, mark: int) -> str:
    """The lines the host's log gained since `log_mark` gave `mark`."""
    lines = log_lines(lab, host)
    assert mark <= len(lines) < WHOLE_LOG, f"{host}'s log shrank or grew too long: {mark}"
    return "\n".join(lines[mark:])


def last_start(lab: LabHandle, host: str) -> re.Match[str]:
    """The newest start line in the host's agent log: the running agent's own."""
    starts = list(START_LINE.finditer(agent_log(lab, host, WHOLE_LOG)))
    assert starts, f"no start line in {host}'s log"
    return starts[-1]


def counted_warnings(log: str, what: str) -> int:
    """The sum of the counts in the agent's rate-limited 'WHAT: N (last: ...)' warnings."""
    return sum(int(n) for n in re.findall(re.escape(what) + r": (\d+) \(last: ", log))


def wait_for(condition: Any, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def sender_stream_is_whole(lab: LabHandle) -> dict[str, tuple[int, int, int, int]]:
    """Per sender: rows, distinct seqs, first and last seq. Whole = no seq twice, no gap."""
    rows = lab.sql("SELECT sender, count(*), count(DISTINCT seq), min(seq), max(seq) "
                   "FROM pgvpn.packets GROUP BY sender")
    return {sender: (int(n), int(distinct), int(first), int(last))
            for sender, n, distinct, first, last in rows}


def agent_marks(lab: LabHandle, peer: str) -> set[str]:
    """The instance marks of `peer`'s agent sessions (application_name `pgvpn PEER JOB
    MARK`, one random mark per agent process): a restarted agent has another."""
    rows = lab.sql("SELECT application_name FROM pg_stat_activity WHERE application_name "
                   "LIKE %s", [f"pgvpn {peer} %"], superuser=True)
    return {name.rsplit(" ", 1)[1] for (name,) in rows}


def agent_running(lab: LabHandle, host: str) -> bool:
    return any(h["running"] for h in lab.status()["hosts"] if h["name"] == host)


def docker_container(lab: LabHandle, host: str) -> str:
    """The id of a Docker lab's container for `host` (running or not), by the labels
    the lab gives it."""
    from lab.backends.docker import LABEL

    found = subprocess.run(
        ["docker", "ps", "-a", "-q", "--filter", f"label={LABEL}={lab.name}",
         "--filter", f"label=com.docker.compose.service={host}"],
        capture_output=True, text=True, check=True, timeout=30).stdout.split()
    assert len(found) == 1, f"{host}: containers {found}"
    return found[0]


def agent_pid(lab: LabHandle, host: str) -> int:
    """The netns lab's agent process in `host` (`ip netns exec` execs it: same pid)."""
    return int((lab.state_dir / "netns" / f"{host}.pid").read_text())


def docker_state(lab: LabHandle, host: str, field: str) -> int:
    """A number of the container's State (Pid, ExitCode), as `docker inspect` gives it."""
    return int(subprocess.run(["docker", "inspect", "-f", f"{{{{.State.{field}}}}}",
                               docker_container(lab, host)],
                              capture_output=True, text=True, check=True, timeout=30).stdout)
