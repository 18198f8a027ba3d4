"""Agent settings: one table of settings feeds YAML, environment, CLI and --help."""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import psycopg
import yaml
from psycopg.conninfo import conninfo_to_dict

from pgvpn.dbhosts import HostList
from pgvpn.errors import ConfigError

# A peer's database role is "pgvpn_" + its name with '-' as '_' (pgvpn.admin.role_name),
# and the database maps the role back (pgvpn.current_peer()): so no '_' in names, and
# at most 57 characters, for the role to fit PostgreSQL's 63-byte identifiers.
PEER_NAME = re.compile(r"\A[a-z0-9][a-z0-9-]{0,56}\Z")  # \Z: '$' lets "peer-a\n" through
# pgvpn_agent, pgvpn_reader, pgvpn_owner and pgvpn_peermaker are not peers (pgvpn.bootstrap).
RESERVED_PEER_NAMES = frozenset({"agent", "reader", "owner", "peermaker"})
MIN_MTU = 576  # the IPv4 minimum; below it some peers' packets cannot be carried
MAX_MTU = 65535
MAX_REPLAY_AGE = 365 * 86400
MAX_BATCH_PACKETS = 65536
MAX_QUEUE_TARGET_MS = 1000
MAX_CONNECT_ATTEMPTS = 1000
# How often an agent writes last_seen and its counters (`pgvpn show` reads them).
HEARTBEAT_SECONDS = 5.0


def peer_name(value: str) -> str:
    if not PEER_NAME.match(value):
        raise ValueError("use 1-57 characters: lower-case letters, digits or '-'")
    if value in RESERVED_PEER_NAMES:
        raise ValueError(f"{value!r} is reserved (pgvpn_{value} is one of pgvpn's own roles)")
    return value


def _interface(value: str) -> ipaddress.IPv4Interface | ipaddress.IPv6Interface:
    if "/" not in value:
        raise ValueError("give an address with its prefix length, e.g. 10.230.0.1/24")
    return ipaddress.ip_interface(value)


def _whole(low: int, high: int) -> Callable[[str], int]:
    def parse(value: str) -> int:
        if not value.strip().isascii() or not value.strip().isdigit():
            raise ValueError(f"must be a whole number between {low} and {high}")
        number = int(value)
        if not low <= number <= high:
            raise ValueError(f"must be a whole number between {low} and {high}")
        return number

    return parse


def _seconds_up_to(high: int, span: str) -> Callable[[str], float]:
    """Seconds, finite, more than 0 and at most `high` (`span` names it): the rule is
    the message whatever is wrong, Python's "could not convert" included."""
    rule = f"must be a number of seconds, more than 0 and at most {high} ({span})"

    def parse(value: str) -> float:
        try:
            number = float(value)
        except ValueError:
            raise ValueError(rule) from None
        if not math.isfinite(number) or not 0 < number <= high:
            raise ValueError(rule)
        return number

    return parse


# The database gets these as an interval (make_interval)...
_seconds = _seconds_up_to(MAX_REPLAY_AGE, "a year")
# ...and libpq and the server take these as int32 milliseconds.
_timeout = _seconds_up_to(86400, "a day")


def listen_parts(value: str) -> tuple[str, int]:
    """ADDR:PORT ([ADDR]:PORT for IPv6) as (address, port), or ValueError saying how."""
    host, sep, port = value.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    rule = "give ADDR:PORT, e.g. 127.0.0.1:9108 or [::1]:9108 (an IP address, port 1-65535)"
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(rule) from None
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(rule)
    if ":" in host and not value.startswith("["):
        raise ValueError(rule)
    return host, int(port)


def listen_address(value: str) -> str:
    """ADDR:PORT to serve on, or "" for off; checked, returned as given."""
    if value:
        listen_parts(value)
    return value


def _conninfo(value: str) -> str:
    try:
        conninfo_to_dict(value)
    except psycopg.Error:
        raise ValueError("not a valid libpq connection string or URL") from None
    return value


def _bool(value: str) -> bool:
    lowered = str(value).strip().lower()
    if lowered in {"1", "true", "yes", "on"}:
        return True
    if lowered in {"0", "false", "no", "off"}:
        return False
    raise ValueError("use true or false")


def interface_name(value: str) -> str:
    """What the kernel takes as a device name (dev_valid_name), in printable ASCII."""
    if (not 0 < len(value) < 16 or value in {".", ".."} or not value.isascii()
            or not value.isprintable() or any(c in value for c in "/: ")):
        raise ValueError("interface names have 1-15 printable ASCII characters, "
                         "no '/', ':' or spaces")
    return value


def _routing(value: str) -> str:
    if value not in ROUTING:
        raise ValueError(f"use {' or '.join(ROUTING)}")
    return value


def _profile(value: str) -> str:
    from pgvpn.transports import PROFILES  # late: transports import config

    if value not in PROFILES:
        raise ValueError(f"unknown profile; choose one of {', '.join(sorted(PROFILES))}")
    return value


@dataclass(frozen=True)
class Setting:
    """One agent setting: its YAML key, environment variable, parser and help."""

    key: str
    env: str
    parse: Callable[[str], Any]
    default: Any
    help: str
    secret: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("name", "PGVPN_NAME", peer_name, None,
            "this peer's name; packets it sends are logged with it as sender"),
    Setting("peer", "PGVPN_PEER", peer_name, None,
            "the remote peer's name: every packet read from the TUN goes to it; unset, "
            "the agent routes each packet by the owner's routing table (pgvpn.routes) to "
            "any number of peers and reads from all of them"),
    Setting("routing", "PGVPN_ROUTING", _routing, None,
            "'peer': every packet to PGVPN_PEER; 'table': to the peer whose route holds its "
            "destination (longest-prefix match over pgvpn.routes), PGVPN_PEER unused, and "
            "kernel routes on the TUN for every other peer's prefixes, following changes "
            "(default: peer if PGVPN_PEER is set, else table)"),
    Setting("database_url", "DATABASE_URL", _conninfo, "",
            "libpq connection string or URL; empty means the PG* environment variables",
            secret=True),
    Setting("tun_ip", "TUN_IP", _interface, None,
            "this end's tunnel address with prefix, e.g. 10.230.0.1/24"),
    Setting("tun_peer", "TUN_PEER", ipaddress.ip_address, None,
            "the remote end's tunnel address, e.g. 10.230.0.2 (`pgvpn probe`'s default "
            "target); optional"),
    Setting("tun_ip6", "TUN_IP6", _interface, None,
            "optional IPv6 tunnel address with prefix, e.g. fd00:230::1/64"),
    Setting("tun_name", "PGVPN_TUN_NAME", interface_name, "pgvpn0",
            "name of the TUN device to create"),
    Setting("mtu", "PGVPN_MTU", _whole(MIN_MTU, MAX_MTU), 1500,
            f"TUN MTU ({MIN_MTU}-{MAX_MTU}); 65000 is fastest"),
    Setting("profile", "PGVPN_PROFILE", _profile, "batched",
            "transport profile: how packets are written, woken up and read"),
    Setting("synchronous_commit", "PGVPN_SYNCHRONOUS_COMMIT", _bool, True,
            "wait for the WAL flush of every batch; false is faster but a database crash "
            "can lose rows whose packets were already delivered"),
    Setting("offload", "PGVPN_OFFLOAD", _bool, True,
            "TCP segmentation and checksum offload on the TUN device (profiles batched and "
            "batched-jumbo): one read, row and write carry up to 64 KB of a TCP stream; "
            "false logs one row per packet on the wire"),
    Setting("queue_target_ms", "PGVPN_QUEUE_TARGET_MS", _whole(0, MAX_QUEUE_TARGET_MS), 0,
            "queue control at the uplink: sparse flows (echoes, ACKs, keystrokes) go in a "
            "batch before the bulk ones read with them, and when packets have waited longer "
            "than this many milliseconds for 100 ms, CoDel drops a bulk flow's packet so "
            f"that TCP slows down (1-{MAX_QUEUE_TARGET_MS}; 0, the default, turns it off)"),
    Setting("batch_packets", "PGVPN_BATCH_PACKETS", _whole(1, MAX_BATCH_PACKETS), 1024,
            f"most packets written in one COPY (1-{MAX_BATCH_PACKETS})"),
    Setting("max_replay_age", "PGVPN_MAX_REPLAY_AGE", _seconds, 30.0,
            "packets older than this many seconds (at most a year) are not written to a "
            "live TUN at start"),
    Setting("allow_plaintext", "PGVPN_ALLOW_PLAINTEXT", _bool, False,
            "allow a database connection without TLS (a warning is logged); otherwise "
            "sslmode defaults to verify-full and an unencrypted TCP connection is refused"),
    Setting("connect_attempts", "PGVPN_CONNECT_ATTEMPTS", _whole(1, MAX_CONNECT_ATTEMPTS),
            10, f"database connection attempts at start before giving up "
            f"(1-{MAX_CONNECT_ATTEMPTS})"),
    # Liveness on real networks: a NAT that forgets an idle flow, or a path that
    # black-holes, would otherwise leave a connection dead but unnoticed for
    # minutes (unacknowledged data) or hours (an idle one).
    Setting("keepalive_idle", "PGVPN_KEEPALIVE_IDLE", _whole(1, 86400), 5,
            "seconds a database connection may be idle before TCP keepalive probes "
            "start (also keeps NAT mappings alive)"),
    Setting("keepalive_interval", "PGVPN_KEEPALIVE_INTERVAL", _whole(1, 3600), 2,
            "seconds between TCP keepalive probes"),
    Setting("keepalive_count", "PGVPN_KEEPALIVE_COUNT", _whole(1, 100), 3,
            "unanswered keepalive probes after which a connection counts as lost"),
    Setting("tcp_user_timeout", "PGVPN_TCP_USER_TIMEOUT", _timeout, 10.0,
            "seconds sent data may stay unacknowledged before the connection counts as "
            "lost (a black-holed path); libpq's tcp_user_timeout"),
    Setting("statement_timeout", "PGVPN_STATEMENT_TIMEOUT", _timeout, 30.0,
            "longest statement on the control connection (heartbeat, partition "
            "maintenance, start-up checks); the data path is bounded by lock_timeout and "
            "the TCP settings instead, since a batch's time grows with the link's speed"),
    Setting("lock_timeout", "PGVPN_LOCK_TIMEOUT", _timeout, 5.0,
            "longest wait for a lock, e.g. the partition-maintenance lock; the statement is "
            "retried (data path) or its job put off (maintenance)"),
    Setting("maintenance_interval", "PGVPN_MAINTENANCE_INTERVAL", _seconds, 3600.0,
            "seconds between runs of the log's maintenance (partitions ahead; retention is the "
            "owner's `pgvpn prune`); "
            "a failed run is retried within a minute and never stops the tunnel"),
    Setting("metrics_listen", "PGVPN_METRICS_LISTEN", listen_address, "",
            "serve Prometheus metrics on ADDR:PORT (packets, bytes, batches and their "
            "latency, reconnects, dropped frames, skipped rows), e.g. 127.0.0.1:9108; "
            "empty: off"),
    Setting("log_level", "PGVPN_LOG_LEVEL", str.upper, "INFO",
            "DEBUG shows per-second counters; INFO, WARNING, ERROR"),
)
REQUIRED = ("name", "tun_ip")
ROUTING = ("peer", "table")


@dataclass(frozen=True)
class AgentConfig:
    """Everything one agent needs to run; immutable once validated."""

    name: str
    tun_ip: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    peer: str | None = None
    tun_peer: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    routing: str = ""  # "peer" or "table"; "" until __post_init__ chooses
    database_url: str = ""
    tun_ip6: ipaddress.IPv6Interface | None = None
    tun_name: str = "pgvpn0"
    mtu: int = 1500
    profile: str = "batched"
    synchronous_commit: bool = True
    offload: bool = True
    queue_target_ms: int = 0
    batch_packets: int = 1024
    max_replay_age: float = 30.0
    allow_plaintext: bool = False
    connect_attempts: int = 10
    keepalive_idle: int = 5
    keepalive_interval: int = 2
    keepalive_count: int = 3
    tcp_user_timeout: float = 10.0
    statement_timeout: float = 30.0
    lock_timeout: float = 5.0
    maintenance_interval: float = 3600.0
    metrics_listen: str = ""
    log_level: str = "INFO"

    def __post_init__(self) -> None:
        if not self.routing:
            object.__setattr__(self, "routing", "peer" if self.peer else "table")
        if self.routing == "peer" and self.peer is None:
            raise ConfigError("routing 'peer' sends every packet to one peer: set peer "
                              "($PGVPN_PEER), or leave routing unset to route by the "
                              "owner's routing table")
        if self.routing == "peer" and self.name == self.peer:
            raise ConfigError(f"name and peer are both {self.name!r}: "
                              "a peer cannot tunnel to itself")
        if self.tun_peer is not None and (self.tun_peer.version != self.tun_ip.version
                                          or self.tun_peer == self.tun_ip.ip):
            raise ConfigError(
                f"tun_peer {self.tun_peer} must be another address of the same family as "
                f"tun_ip {self.tun_ip}")
        if self.tun_ip6 is not None and self.tun_ip6.version != 6:
            raise ConfigError(f"tun_ip6 {self.tun_ip6} is not an IPv6 address")
        if self.log_level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ConfigError(f"log_level {self.log_level!r}: use DEBUG, INFO, WARNING or ERROR")

    @property
    def fixed_peer(self) -> str:
        """The one peer every packet goes to (routing 'peer'), for a profile that has
        no other way (the blog's); the agent refuses such a profile with routing
        'table' before it opens a link."""
        if self.peer is None or self.routing != "peer":
            raise ConfigError("this profile sends every packet to one peer: set PGVPN_PEER")
        return self.peer

    def describe(self) -> dict[str, Any]:
        """The settings as plain values, secrets masked, for logs and status."""
        secret = {s.key for s in SETTINGS if s.secret}
        return {
            f.name: ("***" if f.name in secret and getattr(self, f.name) else
                     str(getattr(self, f.name)) if getattr(self, f.name) is not None else None)
            for f in fields(self)
        }


def _parse(setting: Setting, raw: Any, origin: str) -> Any:
    try:
        return setting.parse(str(raw) if not isinstance(raw, str) else raw)
    except ValueError as exc:
        shown = "(not shown)" if setting.secret else repr(raw)
        raise ConfigError(f"{setting.key} = {shown} (from {origin}): {exc}") from None


def load_config(
    path: Path | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> AgentConfig:
    """Merge settings: defaults < YAML file < environment < command line."""
    environ = os.environ if environ is None else environ
    by_key = {s.key: s for s in SETTINGS}
    values: dict[str, Any] = {}
    if path is not None:
        values.update(_read_yaml(path, by_key))
    for setting in SETTINGS:
        if environ.get(setting.env, "") != "":
            values[setting.key] = _parse(setting, environ[setting.env], f"${setting.env}")
    for key, raw in (overrides or {}).items():
        if raw is not None:
            values[key] = _parse(by_key[key], raw, f"--{key.replace('_', '-')}")
    missing = [k for k in REQUIRED if k not in values]
    if missing:
        hints = ", ".join(f"{k} (${by_key[k].env})" for k in missing)
        raise ConfigError(f"missing setting: {hints}; see 'pgvpn run --help'")
    return AgentConfig(**values)


def check_database_hosts(config: AgentConfig, environ: Mapping[str, str] | None = None
                         ) -> None:
    """Refuse a host list libpq could not pair, and asynchronous commit with several
    hosts: a failover then loses acknowledged rows, whose packets were delivered
    (a commit returns before the standby has it), and the next primary repeats seqs."""
    try:
        hosts = HostList.of(config.database_url, environ)
    except (ValueError, psycopg.Error) as exc:
        raise ConfigError(f"database_url / PG* variables: {exc}") from None
    if len(hosts) > 1 and not config.synchronous_commit:
        listed = ", ".join(hosts.describe(i) for i in range(len(hosts)))
        raise ConfigError(
            f"synchronous_commit is off ($PGVPN_SYNCHRONOUS_COMMIT) but the database has "
            f"{len(hosts)} hosts ({listed}): after a failover the new primary may lack rows "
            "whose packets were already delivered, since a commit would return before the "
            "standby has it; set PGVPN_SYNCHRONOUS_COMMIT=true (the default), or name one "
            "host")


def _read_yaml(path: Path, by_key: Mapping[str, Setting]) -> dict[str, Any]:
    try:
        document = yaml.safe_load(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if document is None:
        return {}
    if not isinstance(document, dict):
        raise ConfigError(f"config file {path} must be a mapping of setting: value")
    unknown = sorted(map(str, set(document) - set(by_key)))
    if unknown:
        raise ConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; "
                          f"known: {', '.join(by_key)}")
    return {k: _parse(by_key[k], v, str(path)) for k, v in document.items() if v is not None}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add one --flag per setting, with its environment variable and default in the help."""
    group = parser.add_argument_group(
        "settings", "each may also come from the YAML file (--config) or the environment; "
        "the command line wins, then the environment, then the file")
    for setting in SETTINGS:
        default = "" if setting.default in (None, "") else f" (default {setting.default})"
        required = " [required]" if setting.key in REQUIRED else ""
        group.add_argument(f"--{setting.key.replace('_', '-')}", dest=setting.key,
                           metavar=setting.env, default=None,
                           help=f"{setting.help}{default}{required}; env ${setting.env}")
