"""`lab ping-matrix`: every agent host pings every other one's tunnel addresses.

Backend-neutral (lab.measure.ping goes through `Backend.exec`), and topology-neutral:
the targets are whatever tunnel addresses (TUN_IP, TUN_IP6) the topology file gives
its agents, so a two-peer lab and a fleet are checked alike.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

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
    """(host, tunnel address) of every agent, IPv4 first."""
    return [(agent.name, interface.split("/")[0]) for agent in lab.topology.agents
            for interface in agent.tunnel_interfaces]


def ping_matrix(lab: Lab, *, count: int, interval: float) -> list[Cell]:
    """Each agent host pings each other agent's tunnel addresses over the tunnel."""
    aims = targets(lab)
    sources = [agent.name for agent in lab.topology.agents]

    def from_one(source: str) -> list[Cell]:
        return [Cell(source, target, address,
                     ping(lab.backend, source, address, count=count, interval=interval))
                for target, address in aims if target != source]

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        rows = list(pool.map(from_one, sources))
    return [cell for row in rows for cell in row]
