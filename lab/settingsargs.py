"""The lab's settings on the command line (`lab up`, `lab bench`): the options, and
what they come to with the lab that is up."""

from __future__ import annotations

import argparse
from pathlib import Path

from lab import state, topology
from lab.backends.base import LabError
from lab.controller import lab_environment, make_backend
from pgvpn.cliargs import whole
from pgvpn.config import MAX_MTU, MIN_MTU
from pgvpn.transports import PROFILES

# CoDel's target when the lab turns queue control on: RFC 8289's 5 ms.
QUEUE_TARGET_MS = 5


def add_lab_settings(parser: argparse.ArgumentParser, *, several: bool = False) -> None:
    parser.add_argument("-f", "--topology", type=topology_file, default=None, metavar="FILE",
                        help="the lab's hosts and networks, a file in the compose format both "
                        "backends read: a path, or a name in topologies/ (e.g. fleet: four "
                        "peers routing by the owner's table, and a plain host behind "
                        "peer-c). Default: the lab's, else compose.yaml (two peers). A "
                        "running lab only grows: a file with all its hosts unchanged adds "
                        "the others without restarting them")
    parser.add_argument("--mtu", type=whole(MIN_MTU, MAX_MTU), default=None,
                        help=f"TUN MTU, {MIN_MTU}-{MAX_MTU} (default 1500)")
    parser.add_argument("--tls", action=argparse.BooleanOptionalAction, default=None,
                        help="agents reach postgres over TLS, verifying its certificate "
                        "(default); --no-tls lets them use plaintext, to measure what TLS "
                        "costs")
    parser.add_argument("--offload", choices=("on", "off", "both") if several else ("on", "off"),
                        default=None,
                        help="TCP segmentation offload on the agents' TUN devices (profiles "
                        "batched and batched-jumbo; default on): one row carries up to 64 KB "
                        "of a TCP stream; off logs one row per packet on the wire"
                        + ("; both runs each such profile with offload off, then on, to "
                           "compare them in one report" if several else ""))
    parser.add_argument("--queue-control", choices=("on", "off", "both") if several
                        else ("on", "off"), default=None,
                        help="queue control at the agents' uplinks (default off): sparse "
                        "flows (echoes, ACKs, keystrokes) are sent before the bulk ones read "
                        f"with them, and CoDel drops a bulk flow's packet when packets have "
                        f"waited over {QUEUE_TARGET_MS} ms for 100 ms, so that TCP slows down"
                        + ("; both runs each profile without it, then with it, to compare "
                           "them in one report" if several else ""))
    parser.add_argument("--routing", choices=("peer", "table"), default=None,
                        help="how agents pick each packet's receiver: peer (default), the "
                        "topology's fixed pairs; table, the owner's routing table "
                        "(pgvpn.routes), as a fleet does")
    if several:
        parser.add_argument("--profile", type=profile_list, default=None,
                            metavar="NAME[,NAME...]|all",
                            help="transport profile(s), run in turn: "
                            f"{', '.join(PROFILES)}, or all (default: the lab's, else batched)")
    else:
        parser.add_argument("--profile", choices=list(PROFILES), default=None,
                            help="transport profile (default batched)")


def topology_file(text: str) -> str:
    """An argparse type: a topology file that exists (see topology.resolve)."""
    try:
        return str(topology.resolve(text))
    except topology.TopologyError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def profile_list(text: str) -> list[str]:
    """'all' or comma-separated profile names, in the order given, without repeats."""
    names = list(PROFILES) if text == "all" else [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown profile {', '.join(unknown) or repr(text)}; choose from "
            f"{', '.join(PROFILES)}, or all")
    return list(dict.fromkeys(names))


def requested_topology(args: argparse.Namespace) -> str:
    """The topology file asked for (--topology), else the lab's, else compose.yaml."""
    current = state.load_settings()
    return str(args.topology or (current.topology if current else topology.COMPOSE_FILE))


def routes_by_table(path: str) -> bool:
    """Whether the topology's agents have no fixed peer (a fleet)."""
    return topology.load(lab_environment(state.LabSettings("netns", 1500, "batched")),
                         Path(path)).routes_by_table


def requested_settings(args: argparse.Namespace) -> state.LabSettings:
    """Settings from the command line, falling back to the lab that is up, then defaults."""
    current = state.load_settings()
    mtu = args.mtu if args.mtu is not None else (current.mtu if current else 1500)
    backend = args.backend
    if current is not None and backend == "auto":
        backend = current.backend
    if backend == "auto":
        backend = make_backend("auto", state.LabSettings("auto", mtu, "batched")).name
    profile = args.profile or (current.profile if current else "batched")
    tls = args.tls if args.tls is not None else (current.tls if current else True)
    offload = current.offload if current else True
    if getattr(args, "offload", None) in ("on", "off"):
        offload = args.offload == "on"
    queue_target_ms = current.queue_target_ms if current else 0
    if getattr(args, "queue_control", None) in ("on", "off"):
        queue_target_ms = QUEUE_TARGET_MS if args.queue_control == "on" else 0
    path = requested_topology(args)
    routing = args.routing or (current.routing if current else "peer")
    fleet = routes_by_table(path)
    if fleet:  # its agents have no fixed peer: the table is the only way they can route
        if args.routing == "peer":
            raise LabError(f"{Path(path).name}'s agents have no fixed peer (PGVPN_PEER): "
                           "they route by the owner's table; drop --routing peer")
        routing = "table"
    if not PROFILES[profile].routes_by_table and routing == "table" and not fleet:
        if args.routing == "table":
            raise LabError(f"profile {profile} carries one fixed pair of peers, as in the "
                           "blog's posts: use --routing peer with it")
        routing = "peer"  # the lab's table routing, left for a blog profile
    return state.LabSettings(backend=backend, mtu=mtu, profile=profile, tls=tls,
                             offload=offload, queue_target_ms=queue_target_ms,
                             routing=routing, topology=path)
