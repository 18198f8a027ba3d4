"""The agent with a replicated database's host list (pgvpn.dbhosts): the order it tries
the hosts in, the user's connect_timeout, the route guard over every host, and the
refusal of asynchronous commit with several hosts.

Real libpq against loopback only: a port nobody listens on refuses at once, and a
socket that listens but never answers stands for a host that black-holes (a killed
container's address), where only connect_timeout ends the attempt.
"""

from __future__ import annotations

import ipaddress
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgvpn import db, dbhosts
from pgvpn.config import check_database_hosts, load_config
from pgvpn.errors import ConfigError, DatabaseError
from pgvpn.routing import routable

BASE_ENV = {"PGVPN_NAME": "peer-a", "PGVPN_PEER": "peer-b", "TUN_IP": "10.230.0.1/24"}
HA_HOSTS = "10.232.1.10,10.232.1.20"


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A loopback port that accepts TCP connections and never says a word."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        yield listener.getsockname()[1]


def refused_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def seconds_to_fail(conninfo: str) -> float:
    started = time.monotonic()
    with pytest.raises(DatabaseError):
        db.connect(conninfo)
    return time.monotonic() - started


@pytest.fixture
def no_pg_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for variable in ("PGHOST", "PGHOSTADDR", "PGPORT", "PGCONNECT_TIMEOUT",
                     "PGTARGETSESSIONATTRS", "PGSERVICE"):
        monkeypatch.delenv(variable, raising=False)


@pytest.mark.usefixtures("no_pg_environment")
def test_the_users_connect_timeout_holds_not_a_fixed_one(
        silent_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    base = f"host=127.0.0.1 port={silent_port} dbname=x user=x sslmode=disable"
    assert 1.8 < seconds_to_fail(f"{base} connect_timeout=2") < 3.5
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "2")
    assert 1.8 < seconds_to_fail(base) < 3.5
    monkeypatch.delenv("PGCONNECT_TIMEOUT")
    assert 4.8 < seconds_to_fail(base) < 6.5  # none given: DEFAULT_CONNECT_TIMEOUT
    assert dbhosts.DEFAULT_CONNECT_TIMEOUT == 5
    # libpq takes whole seconds only: said at once, not retried as a network failure
    monkeypatch.setenv("PGCONNECT_TIMEOUT", "2.5")
    started = time.monotonic()
    with pytest.raises(DatabaseError, match=r"connect_timeout '2.5' \(connection string or "
                       r"PGCONNECT_TIMEOUT\): give whole seconds"):
        db.connect(base, attempts=5)
    assert time.monotonic() - started < 1


@pytest.mark.usefixtures("no_pg_environment")
def test_host_lists_come_from_the_conninfo_or_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    listed = dbhosts.HostList.of(f"host={HA_HOSTS} port=5432")
    assert (listed.hosts, listed.ports, len(listed)) == (("10.232.1.10", "10.232.1.20"),
                                                         ("5432",), 2)
    assert listed.describe(1) == "10.232.1.20:5432"
    monkeypatch.setenv("PGHOST", HA_HOSTS)
    monkeypatch.setenv("PGPORT", "5432,5433")
    assert dbhosts.HostList.of("dbname=pgvpn").ports == ("5432", "5433")
    assert len(dbhosts.HostList.of("host=db1 port=5432 dbname=pgvpn")) == 1  # the conninfo's
    with pytest.raises(ValueError, match="1 host but 2 ports"):
        dbhosts.HostList.of("host=db1")
    with pytest.raises(ValueError, match="2 hosts but 3 ports"):
        dbhosts.HostList.of("port=1,2,3")
    with pytest.raises(ValueError, match="2 host names but 1 hostaddr values"):
        dbhosts.HostList.of("hostaddr=10.0.0.1")


@pytest.mark.usefixtures("no_pg_environment")
def test_a_lost_host_goes_last_and_host_addr_and_port_stay_aligned() -> None:
    conninfo = ("host=a,b,c hostaddr=10.0.0.1,10.0.0.2,10.0.0.3 port=5001,5002,5003 "
                "dbname=pgvpn")
    order = dbhosts.HostOrder()
    arranged, hosts = order.arrange(conninfo)
    assert conninfo_to_dict(arranged)["host"] == "a,b,c"
    order.lost(hosts, 0, "was lost")
    params = conninfo_to_dict(order.arrange(conninfo)[0])
    assert (params["host"], params["hostaddr"], params["port"]) == (
        "b,c,a", "10.0.0.2,10.0.0.3,10.0.0.1", "5002,5003,5001")
    assert params["dbname"] == "pgvpn"
    order.lost(hosts, 0, "was lost")  # again: no change
    order.lost(hosts, 1, "was lost")
    assert conninfo_to_dict(order.arrange(conninfo)[0])["host"] == "c,a,b"
    assert hosts.index_of("b", "10.0.0.2", "5002") == 1
    assert hosts.index_of("b", "10.0.0.2", "5003") is None
    # one host: the connection string is left as it is
    single = "host=db1 port=5432 dbname=pgvpn"
    assert dbhosts.HostOrder().arrange(single)[0] == single


@pytest.mark.usefixtures("no_pg_environment")
def test_reconnects_start_with_the_host_that_answered(silent_port: int) -> None:
    """A host that black-holes costs a whole connect_timeout: once another host was
    reached (here one that refuses, so that the whole connect fails fast), the next
    attempts try that one first and the silent one last."""
    refused = refused_port()
    conninfo = (f"host=127.0.0.1,127.0.0.1 port={silent_port},{refused} dbname=x user=x "
                "sslmode=disable connect_timeout=2")
    order = dbhosts.HostOrder()
    arranged, hosts = order.arrange(conninfo)
    assert conninfo_to_dict(arranged)["port"] == f"{silent_port},{refused}"
    order.lost(hosts, 0, "was lost")  # as AgentConnection.close reports it
    started = time.monotonic()
    with pytest.raises(DatabaseError, match=rf"every host failed: 127.0.0.1:{refused}: "
                       rf"Connection refused; 127.0.0.1:{silent_port}: connection timeout "
                       "expired"):
        db.connect(conninfo, hosts=order)
    assert 1.8 < time.monotonic() - started < 3.5


@pytest.mark.usefixtures("no_pg_environment")
def test_agent_connections_ask_for_a_read_write_server_unless_told_otherwise(
        monkeypatch: pytest.MonkeyPatch) -> None:
    added = conninfo_to_dict(dbhosts.read_write(f"host={HA_HOSTS}"))
    assert added["target_session_attrs"] == "read-write"
    chosen = f"host={HA_HOSTS} target_session_attrs=any"
    assert dbhosts.read_write(chosen) == chosen
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "primary")
    assert dbhosts.read_write("host=db1") == "host=db1"


@pytest.mark.usefixtures("no_pg_environment")
def test_every_database_host_is_kept_out_of_the_tunnel(monkeypatch: pytest.MonkeyPatch
                                                      ) -> None:
    """The route guard covers each host of the list, not only the one connected to: a
    route over the standby's address would cut the agent off at the failover."""
    conninfo = f"host={HA_HOSTS},localhost,/run/postgresql dbname=pgvpn"
    found, problems = dbhosts.addresses(conninfo)
    assert problems == []
    assert {ipaddress.ip_address("10.232.1.10"), ipaddress.ip_address("10.232.1.20"),
            ipaddress.ip_address("127.0.0.1")} <= found  # the socket directory is none
    prefixes = {ipaddress.ip_network(p) for p in (
        "10.232.1.16/28", "10.232.0.0/16", "10.232.2.0/24", "127.0.0.0/8", "fd00::/8")}
    tun = [ipaddress.ip_interface("10.230.0.1/24")]
    wanted, said = routable(prefixes, "pgvpn0", tun, found)
    assert wanted == {ipaddress.ip_network("10.232.2.0/24")}
    assert ("10.232.0.0/16 not routed into pgvpn0: it holds the database's address "
            "10.232.1.10, 10.232.1.20, which this agent reaches outside the tunnel") in said
    assert any(s.startswith("10.232.1.16/28 not routed into pgvpn0: it holds the database's "
                            "address 10.232.1.20,") for s in said)
    assert any(s.startswith("127.0.0.0/8 not routed") for s in said)
    assert "fd00::/8 not routed into pgvpn0: it has no IPv6 address (TUN_IP6)" in said
    # the same list from PGHOST, with a hostaddr for each name: libpq connects to
    # those, and never looks the names up (nor does the guard)
    monkeypatch.setenv("PGHOST", "db-a.invalid,db-b.invalid")
    monkeypatch.setenv("PGHOSTADDR", HA_HOSTS)

    def no_lookup(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"looked up {args[0]}, which has a hostaddr")

    monkeypatch.setattr(socket, "getaddrinfo", no_lookup)
    assert dbhosts.addresses("dbname=pgvpn") == (
        {ipaddress.ip_address("10.232.1.10"), ipaddress.ip_address("10.232.1.20")}, [])


@pytest.mark.usefixtures("no_pg_environment")
def test_asynchronous_commit_with_several_hosts_is_refused(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    off = {**BASE_ENV, "PGVPN_SYNCHRONOUS_COMMIT": "false"}
    single = load_config(environ={**off, "DATABASE_URL": "host=10.232.1.10"})
    check_database_hosts(single, {})  # one host: as before
    check_database_hosts(load_config(environ={**BASE_ENV, "DATABASE_URL": f"host={HA_HOSTS}"}),
                         {})
    several = load_config(environ={**off, "DATABASE_URL": f"host={HA_HOSTS}"})
    with pytest.raises(ConfigError, match=r"synchronous_commit is off "
                       r"\(\$PGVPN_SYNCHRONOUS_COMMIT\) but the database has 2 hosts "
                       r"\(10.232.1.10:5432, 10.232.1.20:5432\): after a failover"):
        check_database_hosts(several, {})
    from_environment = load_config(environ=off)
    with pytest.raises(ConfigError, match="the database has 2 hosts"):
        check_database_hosts(from_environment, {"PGHOST": HA_HOSTS})
    with pytest.raises(ConfigError, match="2 hosts but 3 ports"):
        check_database_hosts(from_environment, {"PGHOST": HA_HOSTS, "PGPORT": "1,2,3"})


def test_the_agent_refuses_to_start_in_one_line() -> None:
    """The real command, before it touches the TUN or the network (loopback hosts, in
    case it did)."""
    env = {**BASE_ENV, "PATH": "/usr/bin", "PGVPN_SYNCHRONOUS_COMMIT": "false",
           "PGHOST": "127.0.0.1,127.0.0.2", "PGPORT": str(refused_port()),
           "PGVPN_METRICS_LISTEN": ""}
    done = subprocess.run([sys.executable, "-m", "pgvpn.cli", "run"], capture_output=True,
                          text=True, env=env, check=False, timeout=60)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "pgvpn: error: synchronous_commit is off ($PGVPN_SYNCHRONOUS_COMMIT) but the "
        "database has 2 hosts (127.0.0.1:"), done.stderr


def test_a_multi_host_failure_is_one_line_per_host() -> None:
    ports = [refused_port(), refused_port()]
    with pytest.raises(psycopg.OperationalError) as raised:
        psycopg.connect(f"host=127.0.0.1,localhost port={ports[0]},{ports[1]} dbname=x "
                        "user=x sslmode=disable")
    said = db.explain(raised.value)
    assert "\n" not in said
    assert said.startswith(f"every host failed: 127.0.0.1:{ports[0]}: Connection refused; "
                           f"localhost:{ports[1]}: Connection refused"), said
    assert said.endswith("(check that the server runs and that DATABASE_URL or "
                         "PGHOST/PGPORT point at it)")
