"""The database's hosts when a connection string names several: a replicated database
(PGHOST=10.232.1.10,10.232.1.20 with target_session_attrs=read-write).

psycopg splits such a list itself and tries the hosts in the order given, one
connect_timeout each, shuffling them only with load_balance_hosts=random
(psycopg/_conninfo_attempts.py); libpq checks target_session_attrs on each. What
neither knows is which host just failed: after a failover every reconnect would try
the old primary first, and a host that black-holes SYNs (a killed container) costs a
whole connect_timeout each time. `HostOrder` keeps the order for one agent: the host a
connection was lost from goes last, the one a connection was made to goes first.

Also here: every host's addresses (the route guard keeps them out of the tunnel), and
the connect_timeout in force.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from psycopg.rows import TupleRow

log = logging.getLogger(__name__)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address

#: Seconds a connection attempt to one host may take when the user set no
#: connect_timeout (conninfo or PGCONNECT_TIMEOUT): libpq's default is to wait forever.
DEFAULT_CONNECT_TIMEOUT = 5
_ENV = {"host": "PGHOST", "hostaddr": "PGHOSTADDR", "port": "PGPORT",
        "connect_timeout": "PGCONNECT_TIMEOUT",
        "target_session_attrs": "PGTARGETSESSIONATTRS"}


def param(params: Mapping[str, Any], key: str, environ: Mapping[str, str]) -> str | None:
    """A connection parameter as libpq takes it: the connection string's, else the
    environment's (an empty variable counts as unset, as in libpq)."""
    if key in params and params[key] is not None:
        return str(params[key])
    return environ.get(_ENV[key]) or None


def connect_timeout(conninfo: str, environ: Mapping[str, str] | None = None) -> int | None:
    """The connect_timeout the user gave (connection string or PGCONNECT_TIMEOUT), or
    None; ValueError for one libpq would refuse (it takes whole seconds only)."""
    environ = os.environ if environ is None else environ
    value = param(conninfo_to_dict(conninfo), "connect_timeout", environ)
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        raise ValueError(f"connect_timeout {value!r} (connection string or "
                         "PGCONNECT_TIMEOUT): give whole seconds, e.g. 2") from None


def read_write(conninfo: str, environ: Mapping[str, str] | None = None) -> str:
    """`conninfo` with target_session_attrs=read-write unless the user chose one: the
    agent writes on every connection, so among several hosts it needs the primary, and
    a single host that is a standby is refused at connect, with libpq's reason."""
    environ = os.environ if environ is None else environ
    if param(conninfo_to_dict(conninfo), "target_session_attrs", environ) is not None:
        return conninfo
    return make_conninfo(conninfo, target_session_attrs="read-write")


@dataclass(frozen=True)
class HostList:
    """The host, hostaddr and port lists of a connection string, as libpq pairs them:
    hosts and hostaddrs one for one, ports one for each or one for all."""

    hosts: tuple[str, ...] = ()
    hostaddrs: tuple[str, ...] = ()
    ports: tuple[str, ...] = ()

    @classmethod
    def of(cls, conninfo: str, environ: Mapping[str, str] | None = None) -> HostList:
        """ValueError, saying what to fix, for lists libpq could not pair."""
        environ = os.environ if environ is None else environ
        params = conninfo_to_dict(conninfo)

        def split(key: str) -> tuple[str, ...]:
            value = param(params, key, environ)
            return tuple(value.split(",")) if value else ()  # as libpq: no trimming

        found = cls(split("host"), split("hostaddr"), split("port"))
        count = len(found)
        if found.hosts and found.hostaddrs and len(found.hosts) != len(found.hostaddrs):
            raise ValueError(f"{len(found.hosts)} host names but {len(found.hostaddrs)} "
                             "hostaddr values (host/PGHOST, hostaddr/PGHOSTADDR): give one "
                             "address per host")
        if len(found.ports) > 1 and len(found.ports) != count:
            hosts = f"{count} host{'' if count == 1 else 's'}"
            raise ValueError(f"{hosts} but {len(found.ports)} ports (port/PGPORT): give one "
                             "port for all of them, or one per host")
        return found

    def __len__(self) -> int:
        return max(len(self.hosts), len(self.hostaddrs))

    def _part(self, values: tuple[str, ...], index: int) -> str:
        return values[index] if len(values) > 1 else values[0] if values else ""

    def describe(self, index: int) -> str:
        """host:port of one entry, for a message."""
        host = self.hosts[index] if self.hosts else self.hostaddrs[index]
        return f"{host}:{self._part(self.ports, index) or '5432'}"

    def index_of(self, host: str, hostaddr: str, port: str) -> int | None:
        """Which entry a connection (PQhost, PQhostaddr, PQport) was made to."""
        for index in range(len(self)):
            if ((not self.hosts or self.hosts[index] == host)
                    and (not self.hostaddrs or self.hostaddrs[index] == hostaddr)
                    and (len(self.ports) <= 1 or self.ports[index] == port)):
                return index
        return None

    def arranged(self, order: list[int]) -> dict[str, str]:
        """The lists in `order`, each one kept aligned with the others."""
        params = {}
        for key, values in (("host", self.hosts), ("hostaddr", self.hostaddrs),
                            ("port", self.ports)):
            if len(values) > 1:
                params[key] = ",".join(values[i] for i in order)
        return params


class HostOrder:
    """The order in which one agent's connections try the database's hosts (shared by
    its threads): the host of a connection just made goes first, the host of one
    lost (or found on a read-only standby) goes last. One host: nothing changes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._order: list[int] = []
        self._hosts: HostList | None = None

    def arrange(self, conninfo: str) -> tuple[str, HostList]:
        """`conninfo` with its hosts in the current order, and its host list."""
        hosts = HostList.of(conninfo)
        with self._lock:
            if hosts != self._hosts:  # new, or the settings changed: the given order
                self._hosts, self._order = hosts, list(range(len(hosts)))
            order = list(self._order)
        if len(hosts) <= 1:
            return conninfo, hosts
        return make_conninfo(conninfo, **hosts.arranged(order)), hosts

    def _move(self, hosts: HostList, index: int, *, first: bool) -> bool:
        with self._lock:
            if hosts != self._hosts or len(self._order) <= 1:
                return False
            before = list(self._order)
            self._order.remove(index)
            if first:
                self._order.insert(0, index)
            else:
                self._order.append(index)
            return self._order != before

    def connected(self, conn: AgentConnection, hosts: HostList) -> None:
        """A connection was made: its host goes first, and the connection reports
        itself when it is closed (`AgentConnection.close`)."""
        index = hosts.index_of(conn.info.host, conn.info.hostaddr, str(conn.info.port))
        if index is None or len(hosts) <= 1:
            return
        conn.placed = (self, hosts, index)
        if self._move(hosts, index, first=True):
            log.info("database: connected to %s, which is tried first from now on",
                     hosts.describe(index))

    def lost(self, hosts: HostList, index: int, why: str) -> None:
        if self._move(hosts, index, first=False):
            log.warning("database: %s %s; it is tried last from now on",
                        hosts.describe(index), why)


class AgentConnection(psycopg.Connection[TupleRow]):
    """A connection that tells its HostOrder, when it is closed, that its host was lost.

    Every reconnect in the agent, whichever profile's, closes the lost connection
    before it opens the next: so close() is the one place that sees each of them.
    """

    placed: tuple[HostOrder, HostList, int] | None = None

    def close(self) -> None:
        placed, self.placed = self.placed, None
        if placed is not None:
            order, hosts, index = placed
            if self.broken:
                order.lost(hosts, index, "was lost")
            elif not self.closed and self.info.parameter_status("in_hot_standby") == "on":
                order.lost(hosts, index, "is a read-only standby now")
        super().close()


def addresses(conninfo: str, environ: Mapping[str, str] | None = None
              ) -> tuple[set[Address], list[str]]:
    """Every IP address a connection string may reach its database at (each host name
    resolved; socket directories are no address), and a problem for each host name
    that does not resolve."""
    hosts = HostList.of(conninfo, environ)
    found: set[Address] = set()
    problems = []
    for index in range(len(hosts)):
        given = hosts.hostaddrs[index] if hosts.hostaddrs else ""
        host = given or hosts.hosts[index]  # libpq connects to a hostaddr, unresolved
        if not host or host.startswith(("/", "@")):
            continue  # a Unix socket's directory (or abstract name): not routed
        try:
            found.add(ipaddress.ip_address(host))
            continue
        except ValueError:
            if given:
                problems.append(f"hostaddr {given!r} is no IP address")
                continue
        try:
            infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
        except OSError as exc:
            problems.append(f"database host {host!r} does not resolve ({exc.strerror or exc})")
            continue
        found.update(ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos)
    return found, problems
