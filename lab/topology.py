"""The lab's topology, read from compose.yaml: the one description both backends build.

Only what the namespace backend needs is modelled (hosts, their role, addresses,
environment and secret files); Docker Compose reads the same file natively.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
PROJECT = "pgvpn"
LABEL = "io.pgvpn.project"
ROLE_LABEL = "io.pgvpn.role"
# Subnets an agent routes besides its own tunnel addresses (space-separated prefixes):
# `lab up` registers them in the owner's routing table (pgvpn.routes).
ROUTES_LABEL = "io.pgvpn.routes"
# host: a plain machine, no agent, no database; dcs: the consensus store (etcd) of a
# replicated database, whose nodes are all `database` hosts run by Patroni
ROLES = ("database", "agent", "host", "dcs")
# A database host with this variable in its environment runs under Patroni (its
# cluster's name): a replicated topology has two or more such nodes and one dcs host.
PATRONI_SCOPE = "PATRONI_SCOPE"
TOPOLOGIES_DIR = ROOT / "topologies"
SECRETS_DIR = "/run/secrets"
SCRATCH_NAME = "replay"  # the lab's scratch host (lab.backends.base.SCRATCH_HOST)

_VARIABLE = re.compile(r"\$\{(?P<name>[A-Z0-9_]+)(?::-(?P<default>[^}]*))?\}|\$\$")


class TopologyError(Exception):
    """compose.yaml does not describe a lab this controller can build."""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose-style ${VAR} / ${VAR:-default} / $$ substitution."""

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        value = env.get(match["name"], "")
        return value if value else (match["default"] or "")

    return _VARIABLE.sub(replace, text)


@dataclass(frozen=True)
class Network:
    name: str
    subnet: ipaddress.IPv4Network


@dataclass(frozen=True)
class Host:
    """One lab host: the database, an agent, or a plain host (on a LAN behind an agent)."""

    name: str
    role: str  # one of ROLES
    addresses: dict[str, ipaddress.IPv4Address]  # network name -> address
    environment: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()
    # the compose service's own: kernel settings of its network namespace, the routes it
    # registers, the command a plain host runs, and how to tell it is ready
    sysctls: dict[str, str] = field(default_factory=dict)
    routes: tuple[str, ...] = ()
    command: tuple[str, ...] = ()
    healthcheck: tuple[str, ...] = ()
    volumes: dict[str, str] = field(default_factory=dict)  # named volume -> mount point

    @property
    def patroni(self) -> bool:
        """A database node run by Patroni (a replicated topology), not a lone postgres."""
        return self.role == "database" and bool(self.environment.get(PATRONI_SCOPE))

    @property
    def tunnel_address(self) -> str | None:
        return self.environment.get("TUN_IP", "").split("/")[0] or None

    @property
    def tunnel_interfaces(self) -> list[str]:
        """Its tunnel addresses with their masks (TUN_IP, then TUN_IP6 if it has one)."""
        return [self.environment[key] for key in ("TUN_IP", "TUN_IP6")
                if self.environment.get(key)]

    @property
    def tunnel_peer(self) -> str | None:
        return self.environment.get("TUN_PEER") or None


@dataclass(frozen=True)
class Topology:
    hosts: dict[str, Host]
    networks: dict[str, Network]
    secret_files: dict[str, str]  # secret name -> source file
    path: Path = COMPOSE_FILE

    @property
    def routes_by_table(self) -> bool:
        """True for a fleet: some agent has no fixed peer, so agents route by the table."""
        return any(not a.environment.get("PGVPN_PEER") for a in self.agents)

    @property
    def databases(self) -> list[Host]:
        """The database hosts: one, or a replicated cluster's nodes (in file order)."""
        return [h for h in self.hosts.values() if h.role == "database"]

    @property
    def database(self) -> Host:
        """The database host; of a replicated cluster the first node (which is the
        primary only at first: ask the lab which node leads now)."""
        return self.databases[0]

    @property
    def replicated(self) -> bool:
        return len(self.databases) > 1

    @property
    def dcs(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.role == "dcs"]

    @property
    def agents(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.role == "agent"]

    @property
    def plain_hosts(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.role == "host"]

    def database_address_for(self, host: Host, node: Host | None = None) -> ipaddress.IPv4Address:
        """The address of the database (or of the node `node`) on a network that `host`
        shares with it."""
        node = node or self.database
        for network, address in node.addresses.items():
            if network in host.addresses:
                return address
        raise TopologyError(f"{host.name} shares no network with {node.name}")


def session_attrs(topology: Topology, replica: bool) -> str:
    """What a conninfo listing every node of a replicated database adds, so that libpq
    keeps the primary (or a standby); nothing for a lone database."""
    if replica and not topology.replicated:
        raise TopologyError(f"{topology.path.name} has one database and no standby to read")
    if not topology.replicated:
        return ""
    return " target_session_attrs=" + ("standby" if replica else "read-write")


def resolve(text: str) -> Path:
    """A topology file given on the command line: a path, or a name in topologies/
    ('fleet' is topologies/fleet.yaml)."""
    for candidate in (Path(text), ROOT / text, ROOT / f"{text}.yaml",
                      TOPOLOGIES_DIR / text, TOPOLOGIES_DIR / f"{text}.yaml"):
        if candidate.is_file():
            return candidate.resolve()
    shipped = sorted(p.stem for p in TOPOLOGIES_DIR.glob("*.yaml"))
    raise TopologyError(f"no topology file {text!r}; give a path, or one of: "
                        f"{', '.join(shipped)} (topologies/), or compose.yaml")


def command_of(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """A service's entrypoint and command as one argv (the list forms only)."""
    argv: list[str] = []
    for key in ("entrypoint", "command"):
        value = spec.get(key) or []
        if not isinstance(value, list):
            raise TopologyError(f"{key}: give a list (exec form), not {value!r}")
        argv += [str(v) for v in value]
    return tuple(argv)


def healthcheck_of(spec: Mapping[str, Any]) -> tuple[str, ...]:
    """The healthcheck's test as an argv (CMD ..., CMD-SHELL '...' or a string, which
    Compose runs with a shell), or () for none."""
    check = spec.get("healthcheck") or {}
    test = check.get("test", []) if isinstance(check, dict) else []
    if isinstance(test, str):
        return ("sh", "-c", test)
    if isinstance(test, list) and test and test[0] == "CMD":
        return tuple(map(str, test[1:]))
    if isinstance(test, list) and len(test) == 2 and test[0] == "CMD-SHELL":
        return ("sh", "-c", str(test[1]))
    return ()


def document_of(env: Mapping[str, str], path: Path) -> dict[str, Any]:
    """A topology file, parsed with `env` substituted as Compose would."""
    try:
        document = yaml.safe_load(interpolate(path.read_text(), env))
    except (OSError, yaml.YAMLError) as exc:
        raise TopologyError(f"cannot read {path}: {exc}") from None
    if not isinstance(document, dict) or not isinstance(document.get("services"), dict):
        raise TopologyError(f"{path} has no services: is it a compose file?")
    return document


def sections(env: Mapping[str, str], path: Path) -> dict[str, dict[str, Any]]:
    """A topology file's services, networks, volumes and secrets as Compose sees them,
    to compare two files (scalars as text: 1500 and "1500", false and "false" are one
    setting to Compose)."""
    def text(value: Any) -> Any:
        if isinstance(value, dict):
            return {str(k): text(v) for k, v in value.items()}
        if isinstance(value, list):
            return [text(v) for v in value]
        return str(value).lower() if isinstance(value, bool) else str(value)

    document = document_of(env, path)
    return {section: dict(text(entries)) if isinstance(entries, dict) else {}
            for section in ("services", "networks", "volumes", "secrets")
            for entries in [document.get(section) or {}]}


def load(env: Mapping[str, str], path: Path = COMPOSE_FILE) -> Topology:
    """Parse a topology file with `env` substituted as Compose would."""
    document = document_of(env, path)
    lab = env.get("PGVPN_LAB_NAME") or PROJECT
    try:
        networks = {name: network_of(name, spec, lab)
                    for name, spec in mapping(document.get("networks"), "networks",
                                              pairs=False).items()}
        hosts = {name: host_of(name, spec, lab) for name, spec in document["services"].items()}
        for name, spec in mapping(document.get("volumes"), "volumes", pairs=False).items():
            labelled(f"volume {name}", spec, lab)
        secret_files = {name: str(spec["file"]) for name, spec
                        in mapping(document.get("secrets"), "secrets", pairs=False).items()}
    except TopologyError as exc:
        raise TopologyError(f"{path}: {exc}") from None
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise TopologyError(f"{path}: {type(exc).__name__}: {exc}") from None
    topology = Topology(hosts, networks, secret_files, path)
    check_database_hosts(topology)
    return topology


def check_database_hosts(topology: Topology) -> None:
    """One lone database, or a Patroni cluster of two or more nodes with one dcs host."""
    where, databases = topology.path, topology.databases
    if not databases or not topology.agents:
        raise TopologyError(f"{where}: the lab needs a database host and at least one agent")
    if len(databases) == 1 and not databases[0].patroni:
        if topology.dcs:
            raise TopologyError(f"{where}: a dcs host serves a replicated database (two or "
                                f"more database hosts with {PATRONI_SCOPE}); this has one")
        return
    lone = [h.name for h in databases if not h.patroni]
    if lone or len(databases) < 2:
        raise TopologyError(f"{where}: a replicated database needs two or more database "
                            f"hosts, each with {PATRONI_SCOPE} in its environment"
                            + (f" ({', '.join(lone)} has none)" if lone else ""))
    if len({h.environment[PATRONI_SCOPE] for h in databases}) != 1:
        raise TopologyError(f"{where}: the database hosts name different clusters "
                            f"({PATRONI_SCOPE}); give them one")
    if len(topology.dcs) != 1:
        raise TopologyError(f"{where}: a replicated database needs exactly one dcs host "
                            f"(etcd, role dcs); this has {len(topology.dcs)}")


def mapping(value: Any, what: str, *, pairs: bool = True) -> dict[str, Any]:
    """A compose mapping; with `pairs`, its list form (["KEY=VALUE", ...]) too."""
    if value is None:
        return {}
    if isinstance(value, dict):
        return value
    if pairs and isinstance(value, list) and all(isinstance(v, str) for v in value):
        return dict(v.split("=", 1) if "=" in v else (v, "") for v in value)
    raise TopologyError(f"{what}: give a mapping, not {value!r}")


def labelled(what: str, spec: Any, lab: str) -> dict[str, Any]:
    """The labels of a service, network or volume, which must carry the lab's name: the
    Docker backend finds, and `lab down` removes, only what carries it."""
    labels = mapping((spec or {}).get("labels") if isinstance(spec, dict) else None,
                     f"{what}'s labels")
    if labels.get(LABEL) != lab:
        raise TopologyError(f"{what} needs label {LABEL}: ${{PGVPN_LAB_NAME:-{PROJECT}}} "
                            "(what the lab finds and removes it by)")
    return labels


def network_of(name: str, spec: Any, lab: str) -> Network:
    if not re.fullmatch(r"[a-z][a-z0-9-]{0,14}", name) or name in ("lo", "pgvpn0"):
        raise TopologyError(f"network {name!r}: use 1-15 of a-z, 0-9 and '-' (a network's "
                            "name is its link's name in each host), not lo or pgvpn0")
    labelled(f"network {name}", spec, lab)
    return Network(name, ipaddress.IPv4Network(spec["ipam"]["config"][0]["subnet"]))


def host_of(name: str, spec: Any, lab: str) -> Host:
    if not isinstance(spec, dict):
        raise TopologyError(f"service {name}: give a mapping, not {spec!r}")
    if name == SCRATCH_NAME:
        raise TopologyError(f"service {name!r}: that name is the lab's scratch host's")
    labels = labelled(f"service {name}", spec, lab)
    role = labels.get(ROLE_LABEL)
    if role not in ROLES:
        raise TopologyError(f"service {name} needs label {ROLE_LABEL}: {'|'.join(ROLES)}")
    networks = spec.get("networks") or {}
    if not isinstance(networks, dict) or not all(
            isinstance(cfg, dict) and "ipv4_address" in cfg for cfg in networks.values()):
        raise TopologyError(f"service {name}: give each of its networks an ipv4_address "
                            "(the lab's addresses are fixed)")
    sysctls = {k: str(v) for k, v in mapping(spec.get("sysctls"), f"{name}'s sysctls").items()}
    for key in sysctls:  # others would change the host itself on the netns backend
        if not re.fullmatch(r"net\.[A-Za-z0-9_.-]+", key):
            raise TopologyError(f"service {name}: sysctl {key!r}: only net.* settings, which "
                                "belong to the host's network namespace")
    routes = tuple(str(labels.get(ROUTES_LABEL, "")).split())
    for route in routes:
        try:
            ipaddress.ip_network(route)
        except ValueError as exc:
            raise TopologyError(f"service {name}: label {ROUTES_LABEL}: {exc}") from None
    command = command_of(spec) if role in ("host", "dcs", "database") else ()
    if role == "host" and not command:
        raise TopologyError(f"service {name}: a plain host needs its command (entrypoint "
                            "and command, list form): it runs no agent")
    return Host(name, role,
                {net: ipaddress.IPv4Address(cfg["ipv4_address"]) for net, cfg in networks.items()},
                {k: str(v) for k, v in mapping(spec.get("environment"),
                                               f"{name}'s environment").items()},
                tuple(spec.get("secrets") or ()), sysctls=sysctls, routes=routes,
                command=command,
                healthcheck=healthcheck_of(spec) if role in ("host", "dcs") else (),
                volumes=volumes_of(name, spec))


def volumes_of(name: str, spec: Mapping[str, Any]) -> dict[str, str]:
    """A service's named volumes (short form VOLUME:/path) as volume -> mount point;
    the netns backend keeps each in a directory of the lab's state."""
    mounts: dict[str, str] = {}
    for entry in spec.get("volumes") or []:
        volume, _, target = str(entry).partition(":")
        target = target.split(":")[0]
        if not re.fullmatch(r"[a-z0-9][a-z0-9_.-]*", volume) or not target.startswith("/"):
            raise TopologyError(f"service {name}: volume {entry!r}: give NAME:/path (a named "
                                "volume of the file)")
        mounts[volume] = target
    return mounts
