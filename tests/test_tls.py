"""TLS between the agents and Postgres: on by default, verified, plaintext only on request."""

from __future__ import annotations

import sys
from pathlib import PurePath

import pytest

from lab.measure import ping
from pgvpn.admin import role_name
from pgvpn.tlspolicy import agent_conninfo
from tests.conftest import CliBackend, LabHandle
from tests.peerside import agent_log

DATABASE_FOR = {"peer-a": "10.231.1.10", "peer-b": "10.231.2.10"}
TRY_CONNECT = """\
import sys, psycopg
try:
    psycopg.connect(sys.argv[1], connect_timeout=5).close()
    print("connected")
except psycopg.OperationalError as exc:
    print("refused:", str(exc).strip().splitlines()[-1])
"""
AGENT_ENV = {"PGVPN_NAME": "peer-a", "PGVPN_PEER": "peer-b", "TUN_IP": "10.230.9.1/24",
             "TUN_PEER": "10.230.9.2", "PGVPN_TUN_NAME": "pgvpn9", "PGVPN_CONNECT_ATTEMPTS": "1"}


def in_host(lab: LabHandle) -> tuple[list[str], PurePath, str]:
    """(python, the secrets directory, PATH) as seen inside a lab host."""
    if lab.backend == "netns":  # namespaces share this host's files and venv
        return [sys.executable], lab.state_dir / "secrets", "/usr/bin:/bin"
    return ["/opt/pgvpn/bin/python"], PurePath("/run/secrets"), "/opt/pgvpn/bin:/usr/bin:/bin"


def try_connect(lab: LabHandle, peer: str, **params: str) -> str:
    """Connect from inside host `peer` as its role; 'connected' or 'refused: why'."""
    python, secrets, _ = in_host(lab)
    conninfo = {"host": DATABASE_FOR[peer], "dbname": "pgvpn", "user": role_name(peer),
                "passfile": str(secrets / peer),
                "sslrootcert": str(secrets / "ca-cert"), **params}
    text = " ".join(f"{k}='{v}'" for k, v in conninfo.items())
    return lab.exec(peer, *python, "-c", TRY_CONNECT, text).stdout.strip()


def run_agent_in(lab: LabHandle, host: str, env: dict[str, str]) -> tuple[int, str]:
    """`pgvpn run` inside `host` with exactly `env`; (exit code, stderr)."""
    python, _, path = in_host(lab)
    command = [*python, "-m", "pgvpn.cli", "run"]
    done = lab.exec(host, "env", "-i", f"PATH={path}", *(f"{k}={v}" for k, v in env.items()),
                    *command, check=False, timeout=60)
    return done.returncode, done.stderr


def test_agents_talk_to_postgres_over_verified_tls(any_lab: LabHandle) -> None:
    sessions = any_lab.sql(
        "SELECT a.usename, s.ssl, s.version FROM pg_stat_activity a JOIN pg_stat_ssl s "
        "USING (pid) WHERE a.usename IN ('pgvpn_peer_a', 'pgvpn_peer_b')", superuser=True)
    assert len(sessions) >= 6  # control, uplink, downlink (which LISTENs) of each agent
    assert all(ssl for _, ssl, _ in sessions), sessions
    assert all(version.startswith("TLSv1.") for _, _, version in sessions)
    for host in ("peer-a", "peer-b"):
        assert "server verified" in agent_log(any_lab, host)
        assert "WITHOUT TLS" not in agent_log(any_lab, host)
    assert any_lab.status()["tls"] is True


def test_the_network_path_accepts_only_verified_tls(any_lab: LabHandle) -> None:
    assert try_connect(any_lab, "peer-a", sslmode="verify-full") == "connected"
    refused = try_connect(any_lab, "peer-a", sslmode="disable")
    assert refused.startswith("refused") and "no encryption" in refused
    # a server that the lab's CA did not vouch for, or another name than it vouched for
    assert "certificate verify failed" in try_connect(any_lab, "peer-a", sslmode="verify-full",
                                                      sslrootcert="system")
    impostor = try_connect(any_lab, "peer-a", sslmode="verify-full", host="impostor",
                           hostaddr=DATABASE_FOR["peer-a"])
    assert 'does not match host name "impostor"' in impostor
    assert "password authentication failed" in try_connect(
        any_lab, "peer-a", sslmode="verify-full", password="wrong")


def test_an_agent_asks_for_verify_full_unless_told_otherwise(any_lab: LabHandle) -> None:
    """No sslmode anywhere: verify-full, which needs the CA; the error says what to check."""
    _, secrets, _ = in_host(any_lab)
    code, stderr = run_agent_in(any_lab, "peer-a", {
        **AGENT_ENV, "PGHOST": DATABASE_FOR["peer-a"], "PGDATABASE": "pgvpn",
        "PGUSER": "pgvpn_peer_a", "PGPASSFILE": str(secrets / "peer-a"), "HOME": "/nonexistent"})
    assert code == 2 and "Traceback" not in stderr
    assert "root certificate file" in stderr and "sslrootcert" in stderr


def test_plaintext_only_when_asked_and_then_with_a_warning(any_lab: LabHandle) -> None:
    any_lab.cli("up", "--no-tls")
    try:
        assert any_lab.status()["tls"] is False
        assert ping(CliBackend(any_lab), "peer-a", "10.230.0.2", count=2).received == 2
        sessions = any_lab.sql(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.usename IN ('pgvpn_peer_a', 'pgvpn_peer_b')", superuser=True)
        assert sessions and not any(ssl for (ssl,) in sessions)
        assert "running WITHOUT TLS" in agent_log(any_lab, "peer-a")
        # the server now takes plaintext, but an agent not told it may use it refuses
        _, secrets, _ = in_host(any_lab)
        code, stderr = run_agent_in(any_lab, "peer-a", {
            **AGENT_ENV, "DATABASE_URL": f"host={DATABASE_FOR['peer-a']} dbname=pgvpn "
            f"user=pgvpn_peer_a passfile={secrets / 'peer-a'} sslmode=disable",
            "PGVPN_ALLOW_PLAINTEXT": "false"})
        assert code == 2 and "Traceback" not in stderr
        assert "is not encrypted" in stderr and "PGVPN_ALLOW_PLAINTEXT" in stderr
    finally:
        any_lab.cli("up", "--tls")
    assert any_lab.status()["tls"] is True
    assert try_connect(any_lab, "peer-b", sslmode="disable").startswith("refused")
    assert ping(CliBackend(any_lab), "peer-b", "10.230.0.1", count=2).received == 2


@pytest.mark.parametrize(("conninfo", "environ", "allow", "expected"), [
    ("host=db", {}, False, "verify-full"),
    ("postgresql://u@db/pgvpn", {}, False, "verify-full"),
    ("host=db sslmode=require", {}, False, "require"),
    ("host=db", {"PGSSLMODE": "verify-ca"}, False, None),
    ("host=db", {}, True, None),
])
def test_sslmode_defaults_to_verify_full(monkeypatch: pytest.MonkeyPatch, conninfo: str,
                                         environ: dict[str, str], allow: bool,
                                         expected: str | None) -> None:
    monkeypatch.delenv("PGSSLMODE", raising=False)
    for key, value in environ.items():
        monkeypatch.setenv(key, value)
    result = agent_conninfo(conninfo, allow)
    if expected is None:
        assert result == conninfo  # left to libpq and the environment
    else:
        assert f"sslmode={expected}" in result
