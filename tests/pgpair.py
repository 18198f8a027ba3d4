"""A throwaway PostgreSQL primary and streaming hot standby on this host, no Patroni.

For the log tools' `--replica` tests (tests/test_replica_reads.py): both servers
are the Debian 15 binaries run as the postgres user, each in a temporary data
directory, listening on a socket directory of its own only (no TCP), so they
touch nothing but their own files. `stop()` ends them by the PIDs started here.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
from psycopg.conninfo import make_conninfo

from pgvpn import admin, bootstrap, migrate

BINDIR = Path("/usr/lib/postgresql/15/bin")
AS_POSTGRES = ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]
SETTINGS = ["-c", "listen_addresses=", "-c", "fsync=off", "-c", "shared_buffers=16MB",
            "-c", "max_connections=20", "-c", "log_min_messages=warning"]
READY_TIMEOUT = 60.0


def unavailable() -> str | None:
    """Why this host cannot run the pair, or None."""
    if os.geteuid() != 0:
        return "needs root (to run postgres as the postgres user)"
    if not (BINDIR / "postgres").exists():
        return f"no PostgreSQL 15 in {BINDIR}"
    if shutil.which("setpriv") is None:
        return "setpriv is not installed"
    return None


def free_port() -> int:
    """A port number no one listens on over TCP; it names the socket file only."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Node:
    """One server: its data directory, socket directory, port and process."""

    name: str
    data: Path
    sockets: Path
    port: int
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    def conninfo(self, user: str = bootstrap.OWNER, dbname: str = "pgvpn") -> str:
        return make_conninfo(host=str(self.sockets), port=str(self.port), user=user,
                             dbname=dbname)

    def start(self) -> None:
        log = (self.data.parent / f"{self.name}.log").open("ab")
        with log:
            self.process = subprocess.Popen(
                [*AS_POSTGRES, str(BINDIR / "postgres"), "-D", str(self.data),
                 "-k", str(self.sockets), "-p", str(self.port), *SETTINGS],
                stdout=log, stderr=log, env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"})
        deadline = time.monotonic() + READY_TIMEOUT
        while True:
            try:
                psycopg.connect(self.conninfo("postgres", "postgres"), connect_timeout=2).close()
                return
            except psycopg.OperationalError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"{self.name} did not start: "
                                         f"{(self.data.parent / f'{self.name}.log').read_text()}"
                                         ) from None
                time.sleep(0.2)

    def stop(self) -> None:
        """Fast shutdown (SIGINT) of the process started here, then SIGKILL if it lingers."""
        process, self.process = self.process, None
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=10)


@dataclass
class Pair:
    root: Path
    primary: Node
    standby: Node

    def wait_replayed(self, timeout: float = 30.0) -> None:
        """Until the standby has replayed everything the primary has written so far:
        `synchronous_commit` waits for a flush at most, never for replay."""
        with psycopg.connect(self.primary.conninfo("postgres", "postgres"),
                             autocommit=True) as conn:
            row = conn.execute("SELECT pg_current_wal_lsn()").fetchone()
        assert row is not None
        written = row[0]
        deadline = time.monotonic() + timeout
        with psycopg.connect(self.standby.conninfo("postgres", "postgres"),
                             autocommit=True) as conn:
            while True:
                done = conn.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn",
                                    [written]).fetchone()
                if done and done[0]:
                    return
                assert time.monotonic() < deadline, f"the standby never replayed {written}"
                time.sleep(0.1)

    def stop(self) -> None:
        for node in (self.standby, self.primary):
            node.stop()
        shutil.rmtree(self.root, ignore_errors=True)


def as_postgres(program: str, *argv: str) -> None:
    done = subprocess.run([*AS_POSTGRES, str(BINDIR / program), *argv], capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0, f"{program} failed: {done.stdout}{done.stderr}"


def make_pair(prefix: str, standby_settings: tuple[str, ...] = ()) -> Pair:
    """initdb a primary, give it pgvpn's schema (`pgvpn db init`, then the owner's
    migrations) and two peers, then clone a standby with pg_basebackup -R."""
    root = Path(tempfile.mkdtemp(prefix=f"{prefix}-pair-", dir="/var/tmp"))
    root.chmod(0o755)  # the postgres user reaches its directories below
    nodes = []
    for name in ("primary", "standby"):
        sockets, data = root / f"{name}-run", root / f"{name}-data"
        for directory in (sockets, data):  # only root and postgres may connect or read
            directory.mkdir(mode=0o700)
            shutil.chown(directory, "postgres", "postgres")
        nodes.append(Node(name, data, sockets, free_port()))
    primary, standby = nodes
    pair = Pair(root, primary, standby)
    try:
        as_postgres("initdb", "-D", str(primary.data), "-U", "postgres", "-E", "UTF8",
                    "--auth-local=trust")
        primary.start()
        bootstrap.init_database(primary.conninfo("postgres", "postgres"), "pgvpn",
                                bootstrap.OWNER, None, lambda _: None)
        with psycopg.connect(primary.conninfo(), autocommit=True) as conn:
            migrate.migrate(conn)
            for peer in ("peer-a", "peer-b"):
                admin.ensure_peer_role(conn, peer, f"{prefix}-{peer}-password")
        as_postgres("pg_basebackup", "-h", str(primary.sockets), "-p", str(primary.port),
                    "-U", "postgres", "-D", str(standby.data), "-R", "-X", "stream",
                    "-c", "fast")
        if standby_settings:
            with (standby.data / "postgresql.auto.conf").open("a") as conf:
                conf.write("".join(f"{line}\n" for line in standby_settings))
        standby.start()
        return pair
    except BaseException:
        pair.stop()
        raise
