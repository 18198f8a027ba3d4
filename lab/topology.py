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

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE_FILE = ROOT / "compose.yaml"
PROJECT = "pgvpn"
LABEL = "io.pgvpn.project"
ROLE_LABEL = "io.pgvpn.role"
SECRETS_DIR = "/run/secrets"

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
    """One lab host: the database or an agent."""

    name: str
    role: str  # "database" or "agent"
    addresses: dict[str, ipaddress.IPv4Address]  # network name -> address
    environment: dict[str, str] = field(default_factory=dict)
    secrets: tuple[str, ...] = ()

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

    @property
    def database(self) -> Host:
        return next(h for h in self.hosts.values() if h.role == "database")

    @property
    def agents(self) -> list[Host]:
        return [h for h in self.hosts.values() if h.role == "agent"]

    def database_address_for(self, host: Host) -> ipaddress.IPv4Address:
        """The database's address on a network that `host` shares with it."""
        for network, address in self.database.addresses.items():
            if network in host.addresses:
                return address
        raise TopologyError(f"{host.name} shares no network with {self.database.name}")


def load(env: Mapping[str, str], path: Path = COMPOSE_FILE) -> Topology:
    """Parse compose.yaml with `env` substituted as Compose would."""
    try:
        document = yaml.safe_load(interpolate(path.read_text(), env))
    except (OSError, yaml.YAMLError) as exc:
        raise TopologyError(f"cannot read {path}: {exc}") from None
    networks = {
        name: Network(name, ipaddress.IPv4Network(spec["ipam"]["config"][0]["subnet"]))
        for name, spec in (document.get("networks") or {}).items()
    }
    hosts = {}
    for name, spec in document["services"].items():
        role = (spec.get("labels") or {}).get(ROLE_LABEL)
        if role not in {"database", "agent"}:
            raise TopologyError(f"service {name} needs label {ROLE_LABEL}: database|agent")
        addresses = {net: ipaddress.IPv4Address(cfg["ipv4_address"])
                     for net, cfg in (spec.get("networks") or {}).items()}
        hosts[name] = Host(name, role, addresses,
                           {k: str(v) for k, v in (spec.get("environment") or {}).items()},
                           tuple(spec.get("secrets") or ()))
    secret_files = {name: spec["file"] for name, spec in (document.get("secrets") or {}).items()}
    topology = Topology(hosts, networks, secret_files)
    if sum(h.role == "database" for h in hosts.values()) != 1 or not topology.agents:
        raise TopologyError("the lab needs exactly one database host and at least one agent")
    return topology
