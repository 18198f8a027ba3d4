"""`lab ping-matrix`: every host pings every other one over the tunnel.

Backend-neutral (lab.measure.ping goes through `Backend.exec`), and topology-neutral:
the targets are whatever tunnel addresses (TUN_IP, TUN_IP6) the topology file gives
its agents, and its plain hosts on subnets an agent routes, so a two-peer lab and a
fleet are checked alike.
"""

from __future__ import annotations

import ipaddress
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from rich.table import Table

from lab.controller import Lab
from lab.measure import PingResult, ping

WORKERS = 4  # sources pinging at once: a bounded load, whatever the fleet's size


@dataclass(frozen=True)
class Cell:
    source: str
    target: str
    address: str
    result: PingResult

    @property
    def ok(self) -> bool:
        return self.result.lost == 0

    def as_json(self) -> dict[str, Any]:
        return {"from": self.source, "to": self.target, "address": self.address,
                "transmitted": self.result.transmitted, "received": self.result.received,
                "rtt_ms": self.result.rtt_ms}


def targets(lab: Lab) -> list[tuple[str, str]]:
    """(host, address) of every agent's tunnel addresses, and of every plain host whose
    address lies in an agent's routed subnets (site-host behind peer-c)."""
    found = [(agent.name, interface.split("/")[0]) for agent in lab.topology.agents
             for interface in agent.tunnel_interfaces]
    subnets = [ipaddress.ip_network(r) for a in lab.topology.agents for r in a.routes]
    found += [(host.name, str(address)) for host in lab.topology.plain_hosts
              for address in host.addresses.values()
              if any(address in subnet for subnet in subnets)]
    return found


def over_the_tunnel(lab: Lab, source: str, target: str, address: str) -> bool:
    """Whether `source` reaches `address` only through the tunnel: not itself, no shared
    link, and (a plain host, on an IPv4 LAN) IPv4."""
    hosts = lab.topology.hosts
    if source == target or set(hosts[source].addresses) & set(hosts[target].addresses):
        return False
    return hosts[source].role == "agent" or ipaddress.ip_address(address).version == 4


def ping_matrix(lab: Lab, *, count: int, interval: float) -> list[Cell]:
    """Each agent and plain host pings every other's addresses over the tunnel."""
    aims = targets(lab)
    sources = [host.name for host in (*lab.topology.agents, *lab.topology.plain_hosts)]

    def from_one(source: str) -> list[Cell]:
        return [Cell(source, target, address,
                     ping(lab.backend, source, address, count=count, interval=interval))
                for target, address in aims if over_the_tunnel(lab, source, target, address)]

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        rows = list(pool.map(from_one, sources))
    return [cell for row in rows for cell in row]


def render(cells: list[Cell], count: int, hosts: list[str]) -> list[Table]:
    """One table per address family: a row per source, a column per target host, both
    in the topology's order (`hosts`)."""
    tables = []
    for family in (4, 6):
        mine = [c for c in cells if ipaddress.ip_address(c.address).version == family]
        if not mine:
            continue
        table = Table(title=f"IPv{family} ping over the tunnel ({count} each; received/sent, "
                      "avg RTT)")
        table.add_column("from \\ to")
        columns = sorted({c.target for c in mine}, key=hosts.index)
        for target in columns:
            table.add_column(target)
        by_pair = {(c.source, c.target): c for c in mine}
        for source in sorted({c.source for c in mine}, key=hosts.index):
            row = []
            for target in columns:
                cell = by_pair.get((source, target))
                if cell is None:
                    row.append("-")
                    continue
                text = f"{cell.result.received}/{cell.result.transmitted}"
                if cell.result.rtt_ms:
                    text += f" {cell.result.rtt_ms['avg']:.1f}ms"
                row.append(text if cell.ok else f"[red]{text}[/]")
            table.add_row(source, *row)
        tables.append(table)
    return tables
