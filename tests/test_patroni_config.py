"""images/postgres/patroni_config.py: the Patroni directory of a database node.

The renderer runs as a subprocess with a made-up environment, as the entrypoint and
the netns backend run it (as root; the files go to the postgres user). The last test
boots a real one-node Patroni cluster on loopback from what it wrote.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from lab import tls
from lab.topology import ROOT

SCRIPT = ROOT / "images" / "postgres" / "patroni_config.py"
SYSTEM_PYTHON = "/usr/bin/python3"  # Debian's: the one Patroni is installed for
OWNER = "postgres" if os.geteuid() == 0 else pwd.getpwuid(os.geteuid()).pw_name
AGENTS = "10.232.1.0/24 10.232.2.0/24"
NODES = "10.232.0.0/24"
# Characters that pgpass, YAML and the REST API's basic auth must all carry intact.
PASSWORDS = {"owner": "o:w\\n'e r\"1", "replication": "r:e\\p2", "rewind": "re:w\\3",
             "patroni-api": "a:p\\i4"}


def patroni_available() -> bool:
    return subprocess.run([SYSTEM_PYTHON, "-c", "import patroni, etcd"],
                          capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def secrets() -> Iterator[Path]:
    """Password files and the lab CA's TLS files, in a directory only root reads."""
    with tempfile.TemporaryDirectory(prefix="pgvpn-test-patroni-secrets-") as scratch:
        directory = Path(scratch)
        for name, password in PASSWORDS.items():
            (directory / name).write_text(password + "\n")
            (directory / name).chmod(0o600)
        tls.ensure_certificates(directory, lab_name="pgvpn-test-patroni",
                                names=["postgres-1", "postgres-2", "localhost"],
                                addresses=["10.232.0.11", "10.232.0.12", "127.0.0.1"])
        yield directory


def base_env(secrets: Path, ssl: str = "require", **extra: str) -> dict[str, str]:
    return {"PATH": "/usr/bin:/bin", "PGVPN_SSL": ssl,
            "PGVPN_OWNER_PASSWORD_FILE": str(secrets / "owner"),
            "PGVPN_REPLICATION_PASSWORD_FILE": str(secrets / "replication"),
            "PGVPN_REWIND_PASSWORD_FILE": str(secrets / "rewind"),
            "PGVPN_PATRONI_API_PASSWORD_FILE": str(secrets / "patroni-api"),
            "PGVPN_SSL_CA_FILE": str(secrets / tls.CA_CERT),
            "PGVPN_SSL_CERT_FILE": str(secrets / tls.SERVER_CERT),
            "PGVPN_SSL_KEY_FILE": str(secrets / tls.SERVER_KEY),
            "PGVPN_HBA_CIDRS": AGENTS, "PGVPN_REPLICATION_CIDR": NODES, **extra}


def render(env: dict[str, str], out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), "--out", str(out), "--owner", OWNER,
                           *args], env=env, capture_output=True, text=True, timeout=30)


def rendered(env: dict[str, str], out: Path) -> dict[str, dict[str, object]]:
    result = render(env, out)
    assert result.returncode == 0, result.stderr
    return json.loads((out / "10-node.yml").read_text())  # type: ignore[no-any-return]


@pytest.fixture
def workdir() -> Iterator[Path]:
    """A directory the owner can traverse (pytest's tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="pgvpn-test-patroni-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


COMMON = ["local all all peer", "local replication replicator scram-sha-256",
          "host all all 127.0.0.1/32 scram-sha-256", "host all all ::1/128 scram-sha-256"]


@pytest.mark.parametrize(("ssl", "expected"), [
    ("off", ["host replication replicator 10.232.0.0/24 scram-sha-256",
             "host postgres rewind 10.232.0.0/24 scram-sha-256",
             "host all all 10.232.1.0/24 scram-sha-256",
             "host all all 10.232.2.0/24 scram-sha-256"]),
    ("on", ["hostssl replication replicator 10.232.0.0/24 scram-sha-256",
            "hostssl postgres rewind 10.232.0.0/24 scram-sha-256",
            "host replication replicator 10.232.0.0/24 scram-sha-256",
            "host postgres rewind 10.232.0.0/24 scram-sha-256",
            "hostssl all all 10.232.1.0/24 scram-sha-256",
            "host all all 10.232.1.0/24 scram-sha-256",
            "hostssl all all 10.232.2.0/24 scram-sha-256",
            "host all all 10.232.2.0/24 scram-sha-256"]),
    ("require", ["hostssl replication replicator 10.232.0.0/24 scram-sha-256",
                 "hostssl postgres rewind 10.232.0.0/24 scram-sha-256",
                 "hostssl all all 10.232.1.0/24 scram-sha-256",
                 "hostssl all all 10.232.2.0/24 scram-sha-256"]),
])
def test_pg_hba_follows_the_ssl_mode(secrets: Path, workdir: Path, ssl: str,
                                     expected: list[str]) -> None:
    config = rendered(base_env(secrets, ssl, PGVPN_SOCKET_DIR=str(workdir / "run")),
                      workdir / "conf")
    assert config["postgresql"]["pg_hba"] == COMMON + expected


def test_trust_for_the_netns_backend_and_a_private_socket_directory(
        secrets: Path, workdir: Path) -> None:
    socket_dir = workdir / "run"
    config = rendered(base_env(secrets, PGVPN_LOCAL_AUTH="trust", PGVPN_SOCKET_DIR=str(socket_dir)),
                      workdir / "conf")
    assert config["postgresql"]["pg_hba"][0] == "local all all trust"  # type: ignore[index]
    assert config["postgresql"]["parameters"]["unix_socket_directories"] == str(socket_dir)  # type: ignore[index]
    assert stat.S_IMODE(socket_dir.stat().st_mode) == 0o700


def test_tls_copies_and_verify_full_for_the_nodes_own_connections(
        secrets: Path, workdir: Path) -> None:
    out = workdir / "conf"
    config = rendered(base_env(secrets, "on", PGVPN_SOCKET_DIR=str(workdir / "run")), out)
    postgresql, api = config["postgresql"], config["restapi"]
    assert postgresql["parameters"] == {
        "unix_socket_directories": str(workdir / "run"), "ssl": "on",
        "ssl_cert_file": str(out / "server.crt"), "ssl_key_file": str(out / "server.key")}
    for source, copy in ((tls.CA_CERT, "ca.crt"), (tls.SERVER_CERT, "server.crt"),
                         (tls.SERVER_KEY, "server.key")):
        assert (out / copy).read_bytes() == (secrets / source).read_bytes()
    assert postgresql["authentication"] == {
        role: {"username": user, "password": PASSWORDS[secret], "sslmode": "verify-full",
               "sslrootcert": str(out / "ca.crt")}
        for role, user, secret in (("superuser", "postgres", "owner"),
                                   ("replication", "replicator", "replication"),
                                   ("rewind", "rewind", "rewind"))}
    assert api["authentication"] == {"username": "patroni", "password": PASSWORDS["patroni-api"]}
    assert postgresql["pgpass"] == str(out / "pgpass")


def test_ssl_off_leaves_no_tls_behind(secrets: Path, workdir: Path) -> None:
    out = workdir / "conf"
    env = base_env(secrets, PGVPN_SOCKET_DIR=str(workdir / "run"))
    rendered(env, out)
    (out / "20-old.yml").write_text("ttl: 99\n")
    (out / "pgpass").write_text("written by Patroni\n")
    config = rendered({**env, "PGVPN_SSL": "off"}, out)
    assert config["postgresql"]["parameters"]["ssl"] == "off"  # type: ignore[index]
    assert all("sslmode" not in auth
               for auth in config["postgresql"]["authentication"].values())  # type: ignore[attr-defined]
    assert sorted(p.name for p in out.iterdir()) == [".pgvpn-patroni", "00-pgvpn.yml",
                                                     "10-node.yml", "pgpass"]
    assert (out / "00-pgvpn.yml").read_bytes() == SCRIPT.with_name("patroni.yml").read_bytes()


def test_every_file_is_private_to_the_owner(secrets: Path, workdir: Path) -> None:
    out, socket_dir = workdir / "conf", workdir / "run"
    rendered(base_env(secrets, PGVPN_SOCKET_DIR=str(socket_dir)), out)
    uid = pwd.getpwnam(OWNER).pw_uid
    assert (out.stat().st_uid, stat.S_IMODE(out.stat().st_mode)) == (uid, 0o700)
    assert sorted(p.name for p in out.iterdir()) == [
        ".pgvpn-patroni", "00-pgvpn.yml", "10-node.yml", "ca.crt", "server.crt", "server.key"]
    for path in out.iterdir():
        assert (path.stat().st_uid, stat.S_IMODE(path.stat().st_mode)) == (uid, 0o600), path
    assert (socket_dir.stat().st_uid, stat.S_IMODE(socket_dir.stat().st_mode)) == (uid, 0o2775)


def test_a_directory_of_someone_else_is_not_taken_over(secrets: Path, workdir: Path) -> None:
    """A mistyped PGVPN_SOCKET_DIR (think /etc) must not be chowned to postgres."""
    taken = workdir / "taken"
    taken.mkdir()
    (taken / "keep").write_text("root's\n")
    os.chown(taken, 0, 0)
    result = render(base_env(secrets, PGVPN_SOCKET_DIR=str(taken)), workdir / "conf")
    assert result.returncode == 2
    assert f"{taken} is not empty and was not made by this script" in result.stderr
    assert taken.stat().st_uid == 0 and stat.S_IMODE(taken.stat().st_mode) == 0o755


def test_the_owners_own_directory_is_not_cleaned_either(secrets: Path, workdir: Path) -> None:
    """--out mistyped as a directory the owner already has (think --owner root --out
    /etc): refused, its files kept and its mode unchanged."""
    mine = workdir / "mine"
    mine.mkdir(mode=0o755)
    (mine / "important.yml").write_text("keep\n")
    shutil.chown(mine, OWNER, OWNER)
    result = render(base_env(secrets, PGVPN_SOCKET_DIR=str(workdir / "run")), mine)
    assert result.returncode == 2 and "was not made by this script" in result.stderr
    assert (mine / "important.yml").read_text() == "keep\n"
    assert stat.S_IMODE(mine.stat().st_mode) == 0o755


def test_a_planted_symlink_is_replaced_not_followed(secrets: Path, workdir: Path) -> None:
    out, victim = workdir / "conf", workdir / "victim"
    env = base_env(secrets, PGVPN_SOCKET_DIR=str(workdir / "run"))
    rendered(env, out)  # the owner's own directory now, where it could plant one
    victim.write_text("untouched\n")
    (out / "10-node.yml").unlink()
    (out / "10-node.yml").symlink_to(victim)
    rendered(env, out)
    assert victim.read_text() == "untouched\n"
    assert not (out / "10-node.yml").is_symlink()


def test_no_password_in_the_output(secrets: Path, workdir: Path) -> None:
    result = render(base_env(secrets, PGVPN_SOCKET_DIR=str(workdir / "run")), workdir / "conf")
    assert result.returncode == 0
    for password in PASSWORDS.values():
        assert password not in result.stdout + result.stderr


@pytest.mark.skipif(not patroni_available(), reason="Patroni is not installed: scripts/setup.sh")
def test_patroni_reads_the_directory(secrets: Path, workdir: Path) -> None:
    """Patroni 3.0.2's own loader merges 00 and 10 and its environment as intended."""
    out = workdir / "conf"
    rendered(base_env(secrets, PGVPN_SOCKET_DIR=str(workdir / "run")), out)
    probe = ("import json, sys; from patroni.config import Config; c = Config(sys.argv[1]); "
             "print(json.dumps({'postgresql': c['postgresql'], 'restapi': c['restapi'], "
             "'bootstrap': c['bootstrap'], 'etcd3': c['etcd3']}, default=str))")
    env = {"PATH": "/usr/bin:/bin", "PATRONI_SCOPE": "pgvpn", "PATRONI_NAME": "postgres-1",
           "PATRONI_ETCD3_HOST": "10.232.0.5:2379",
           "PATRONI_RESTAPI_LISTEN": "10.232.0.11:8008",
           "PATRONI_RESTAPI_CONNECT_ADDRESS": "10.232.0.11:8008",
           "PATRONI_POSTGRESQL_CONNECT_ADDRESS": "10.232.0.11:5432",
           "PATRONI_POSTGRESQL_DATA_DIR": str(workdir / "data")}
    result = subprocess.run([SYSTEM_PYTHON, "-c", probe, str(out)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    config = json.loads(result.stdout)
    postgresql = config["postgresql"]
    assert postgresql["authentication"]["replication"]["username"] == "replicator"
    assert postgresql["authentication"]["replication"]["sslmode"] == "verify-full"
    assert postgresql["pg_hba"][-1] == "hostssl all all 10.232.2.0/24 scram-sha-256"
    assert postgresql["bin_dir"] == "/usr/lib/postgresql/15/bin"
    assert postgresql["use_unix_socket_repl"] is True
    assert postgresql["data_dir"] == str(workdir / "data")
    assert config["restapi"]["auth"] == f"patroni:{PASSWORDS['patroni-api']}"
    assert config["etcd3"] == {"host": "10.232.0.5:2379"}
    dcs = config["bootstrap"]["dcs"]
    assert (dcs["ttl"], dcs["loop_wait"], dcs["retry_timeout"]) == (5, 1, 2)
    assert dcs["synchronous_mode"] is True and dcs["synchronous_mode_strict"] is False
    assert dcs["postgresql"]["parameters"]["max_connections"] == 50


@pytest.mark.parametrize(("change", "message"), [
    ({"PGVPN_OWNER_PASSWORD_FILE": ""}, "PGVPN_OWNER_PASSWORD_FILE is not set"),
    ({"PGVPN_REWIND_PASSWORD_FILE": "/nonexistent/rewind"},
     "cannot read PGVPN_REWIND_PASSWORD_FILE=/nonexistent/rewind: No such file"),
    ({"PGVPN_REPLICATION_PASSWORD_FILE": "/"},
     "cannot read PGVPN_REPLICATION_PASSWORD_FILE=/: Is a directory"),
    ({"PGVPN_PATRONI_API_PASSWORD_FILE": "@empty"}, "is empty"),
    ({"PGVPN_OWNER_PASSWORD_FILE": "@two-lines"}, "must be one line of printable ASCII"),
    ({"PGVPN_REWIND_PASSWORD_FILE": "@accent"}, "must be one line of printable ASCII"),
    ({"PGVPN_SSL": "yes"}, "PGVPN_SSL must be off, on or require (got 'yes')"),
    ({"PGVPN_LOCAL_AUTH": "md5"}, "PGVPN_LOCAL_AUTH must be peer or trust (got 'md5')"),
    ({"PGVPN_HBA_CIDRS": "10.0.0.0/8 trust"}, "PGVPN_HBA_CIDRS: 'trust' does not appear"),
    ({"PGVPN_REPLICATION_CIDR": ""}, "PGVPN_REPLICATION_CIDR is not set"),
    ({"PGVPN_SSL_CA_FILE": ""}, "PGVPN_SSL_CA_FILE is not set"),
    ({"PGVPN_SSL_KEY_FILE": "@owner"}, "PGVPN_SSL_KEY_FILE=@owner is not a PEM file"),
    ({"PGVPN_SOCKET_DIR": "/run/a,/tmp"}, "PGVPN_SOCKET_DIR must be an absolute path"),
    ({"PGVPN_SOCKET_DIR": "run/postgresql"}, "PGVPN_SOCKET_DIR must be an absolute path"),
    ({"PGVPN_SOCKET_DIR": "/run/../etc"}, "without .."),
    ({"PGVPN_OWNER_PASSWORD_FILE": "@fifo"}, "PASSWORD_FILE=@fifo is not a regular file"),
])
def test_bad_input_is_one_clear_line(secrets: Path, workdir: Path, change: dict[str, str],
                                     message: str) -> None:
    files = {"@empty": "", "@two-lines": "a\nb\n", "@accent": "caf\u00e9\n",
             "@owner": PASSWORDS["owner"]}
    change = dict(change)
    for key, value in change.items():
        if value == "@fifo":  # would block a reader that does not check
            os.mkfifo(workdir / "fifo")
            change[key] = str(workdir / "fifo")
            message = message.replace(value, str(workdir / "fifo"))
        elif value in files:
            path = workdir / value.lstrip("@")
            path.write_text(files[value])
            change[key] = str(path)
            message = message.replace(value, str(path))
    out = workdir / "conf"
    result = render(base_env(secrets, **{"PGVPN_SOCKET_DIR": str(workdir / "run"), **change}), out)
    assert result.returncode == 2
    assert result.stderr.startswith("patroni_config: error: ")
    assert message in result.stderr
    assert result.stderr.count("\n") == 1
    assert not out.exists() and not (workdir / "run").exists()  # nothing half-written


@pytest.mark.parametrize(("args", "message"), [
    (["--owner", "no-such-user-pgvpn"], "--owner: no such user 'no-such-user-pgvpn'"),
    (["--template", "/nonexistent/patroni.yml"], "cannot read the shared settings"),
])
def test_bad_arguments(secrets: Path, workdir: Path, args: list[str], message: str) -> None:
    result = render(base_env(secrets), workdir / "conf", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_relative_out_is_refused(secrets: Path) -> None:
    result = render(base_env(secrets), Path("conf"))
    assert (result.returncode, result.stderr.strip()) == (
        2, "patroni_config: error: --out must be an absolute path (got 'conf')")


# ---- a real one-node cluster on loopback, from the rendered directory ----

def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cluster_members(api_port: int) -> list[dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{api_port}/cluster", timeout=2) as reply:
            return json.load(reply)["members"]  # type: ignore[no-any-return]
    except OSError:
        return []


def command_lines() -> list[str]:
    """Every process's argv, as one string each."""
    lines = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):  # the process may have ended meanwhile
                lines.append((entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(
                    errors="replace"))
    return lines


def stop(process: subprocess.Popen[bytes], timeout: float = 30) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runs Patroni as postgres)")
@pytest.mark.skipif(not (patroni_available() and shutil.which("etcd")),
                    reason="Patroni or etcd is not installed: scripts/setup.sh")
def test_patroni_bootstraps_a_leader_from_the_rendered_directory(
        secrets: Path, workdir: Path) -> None:
    """initdb with the owner password, pg_hba and TLS accepted by Postgres, the roles,
    and no password on any process's command line while it all happens."""
    etcd_port, peer_port, api_port, pg_port = (free_port() for _ in range(4))
    out, socket_dir = workdir / "conf", workdir / "run"
    rendered(base_env(secrets, PGVPN_SOCKET_DIR=str(socket_dir)), out)
    data = workdir / "pg" / "data"  # Patroni makes the data directory in its parent
    data.parent.mkdir()
    shutil.chown(data.parent, OWNER, OWNER)
    etcd = subprocess.Popen(
        ["etcd", "--name", "test", "--data-dir", str(workdir / "etcd"),
         "--listen-client-urls", f"http://127.0.0.1:{etcd_port}",
         "--advertise-client-urls", f"http://127.0.0.1:{etcd_port}",
         "--listen-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer_port}",
         "--initial-cluster", f"test=http://127.0.0.1:{peer_port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"PATH": "/usr/bin:/bin"})
    env = {"PATH": "/usr/bin:/bin", "HOME": str(workdir), "PATRONI_SCOPE": "pgvpn-test",
           "PATRONI_NAME": "node-1", "PATRONI_ETCD3_HOST": f"127.0.0.1:{etcd_port}",
           "PATRONI_RESTAPI_LISTEN": f"127.0.0.1:{api_port}",
           "PATRONI_RESTAPI_CONNECT_ADDRESS": f"127.0.0.1:{api_port}",
           "PATRONI_POSTGRESQL_LISTEN": f"127.0.0.1:{pg_port}",
           "PATRONI_POSTGRESQL_CONNECT_ADDRESS": f"127.0.0.1:{pg_port}",
           "PATRONI_POSTGRESQL_DATA_DIR": str(data)}
    log = (workdir / "patroni.log").open("wb")
    patroni = subprocess.Popen(["setpriv", "--reuid=postgres", "--regid=postgres",
                                "--init-groups", "patroni", str(out)],
                               env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        seen: set[str] = set()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and patroni.poll() is None:
            seen.update(command_lines())
            members = cluster_members(api_port)
            if any(m["role"] == "leader" and m["state"] == "running" for m in members):
                break
            time.sleep(0.2)
        else:
            pytest.fail("no running leader: " + (workdir / "patroni.log").read_text()[-3000:])
        for password in PASSWORDS.values():
            assert not [line for line in seen if password in line]
        with psycopg.connect(host="127.0.0.1", port=pg_port, dbname="postgres", user="postgres",
                             password=PASSWORDS["owner"], sslmode="verify-full",
                             sslrootcert=str(secrets / tls.CA_CERT), connect_timeout=5) as conn:
            assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"
                                ).fetchone() == (True,)
            roles = conn.execute("SELECT rolname, rolreplication FROM pg_roles "
                                 "WHERE rolname IN ('replicator', 'rewind') ORDER BY 1").fetchall()
            assert roles == [("replicator", True), ("rewind", False)]
            assert conn.execute("SELECT count(*) FROM pg_hba_file_rules WHERE error IS NOT NULL"
                                ).fetchone() == (0,)
            assert conn.execute("SHOW max_connections").fetchone() == ("50",)
            assert conn.execute("SHOW synchronous_commit").fetchone() == ("on",)
        assert (socket_dir / f".s.PGSQL.{pg_port}").is_socket()
    finally:
        stop(patroni)
        stop(etcd)
        log.close()
    assert patroni.returncode == 0


def test_unsafe_rest_requests_only_from_the_nodes_network(secrets: Path, workdir: Path
                                                          ) -> None:
    """A peer can reach a node's REST address through its own link to the node: a
    switchover needs an address of net-db besides the password."""
    config = rendered(base_env(secrets, PGVPN_SOCKET_DIR=str(workdir / "run")),
                      workdir / "conf")
    restapi = config["restapi"]
    assert restapi["allowlist"] == [NODES] and restapi["allowlist_include_members"] is True
