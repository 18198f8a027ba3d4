"""Networks of three or more hosts on the namespace backend: a Linux bridge in a namespace
of its own, one veth pair per member (docs/ha-plan.md §2).

Two hosts share a network through one veth pair (NetnsBackend._link); more need a
switch. The bridge lives in `<lab>-<network>+net`, never in the root namespace: there,
Docker sets FORWARD to DROP and loads br_netfilter. A `+` is in no Compose service name
(`^[a-zA-Z0-9._-]+$`), so no host's namespace can ever be called that. The namespace
carries the lab's tag, so NetnsBackend.existing_namespaces() finds it and destroy()
removes it (and with it every port), even once the topology file is gone.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

from lab.backends.base import LabError, Progress, run
from lab.topology import Topology

BRIDGE = "br0"
BRIDGE_SUFFIX = "+net"
# The bridge namespace is a switch, not an IP host: no IPv6 of its own (no addresses,
# no router solicitations), and bridged frames skip its netfilter even where
# br_netfilter is loaded (its bridge-nf-call-* settings are per namespace since 5.3).
BRIDGE_SYSCTLS = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1",
                  "net.bridge.bridge-nf-call-iptables=0",
                  "net.bridge.bridge-nf-call-ip6tables=0",
                  "net.bridge.bridge-nf-call-arptables=0")


@dataclass(frozen=True)
class Port:
    """One member of a bridged network: its end of the veth pair and the bridge's end."""

    host: str
    namespace: str  # the member's namespace
    device: str  # the member's end: named after the network, as a veth pair's ends are
    address: str  # the member's address on it, with the subnet's prefix length
    port: str  # the bridge's end, in the bridge namespace


@dataclass(frozen=True)
class Bridge:
    network: str
    subnet: str
    namespace: str
    ports: tuple[Port, ...]


def port_name(host: str) -> str:
    """The bridge's end of a host's veth pair: a function of the host's name alone, so it
    stays the same as the lab grows (9 characters, under the 15 a link name allows)."""
    return f"v{zlib.crc32(host.encode()):08x}"


def bridge_namespace(prefix: str, network: str) -> str:
    return f"{prefix}{network}{BRIDGE_SUFFIX}"


def plan(topology: Topology, prefix: str) -> dict[str, Bridge]:
    """The bridges the topology needs, by network (only networks of three or more hosts);
    `prefix` is the lab's namespace prefix ("<lab name>-"). Pure: runs nothing."""
    host_namespaces = {prefix + name for name in topology.hosts}
    bridges = {}
    for network in topology.networks.values():
        members = [h for h in topology.hosts.values() if network.name in h.addresses]
        if len(members) <= 2:
            continue
        namespace = bridge_namespace(prefix, network.name)
        if namespace in host_namespaces:  # not a Compose name, but topology.py allows it
            raise LabError(f"host {namespace[len(prefix):]!r} has the name of network "
                           f"{network.name}'s bridge namespace; rename the host")
        ports = tuple(Port(m.name, prefix + m.name, network.name,
                           f"{m.addresses[network.name]}/{network.subnet.prefixlen}",
                           port_name(m.name)) for m in members)
        names = [p.port for p in ports]
        if len(set(names)) != len(names):
            raise LabError(f"network {network.name}: two of its hosts' names have the same "
                           f"CRC-32, so their bridge ports would share a name ({names}); "
                           "rename one of them")
        bridges[network.name] = Bridge(network.name, str(network.subnet), namespace, ports)
    return bridges


def _has_link(namespace: str, device: str) -> bool:
    """The link exists (False too if the namespace does not exist)."""
    return run(["ip", "-n", namespace, "link", "show", "dev", device]).returncode == 0


def refuse_rewiring(bridges: Mapping[str, Bridge]) -> None:
    """Refuse a bridged network whose running hosts are already linked otherwise: a
    two-host network (a veth pair) that gained hosts. Rewiring it would cut the links its
    hosts are using, so it takes a `lab down` first. Run before anything is made."""
    for bridge in bridges.values():
        paired = [p.host for p in bridge.ports
                  if _has_link(p.namespace, p.device) and not _has_link(bridge.namespace, p.port)]
        if paired:
            others = [p.host for p in bridge.ports if p.host not in paired]
            raise LabError(
                f"network {bridge.network} links {' and '.join(paired)} directly (a veth pair, "
                f"made when it had two hosts); with {', '.join(others)} it has "
                f"{len(bridge.ports)} hosts, which the namespace backend joins through a bridge "
                "and cannot rewire in a running lab: run 'lab down' first, then 'lab up' with "
                "this topology")


def _present(namespace: str) -> bool:
    listing = run(["ip", "-j", "netns", "list"]).check("listing namespaces").stdout.strip()
    return namespace in {entry["name"] for entry in json.loads(listing or "[]")}


def _tag_of(namespace: str) -> str:
    shown = run(["ip", "-j", "-n", namespace, "link", "show", "lo"]).check("reading a tag")
    return "".join(str(link.get("ifalias", "")) for link in json.loads(shown.stdout or "[]"))


def build(bridge: Bridge, tag: str, progress: Progress) -> None:
    """Make (or complete) the bridge and its members' links, in a namespace tagged `tag`
    (NetnsBackend's TAG). Idempotent: on a lab that has them it changes nothing; a new
    member gets its veth pair, the others keep theirs."""
    ns = bridge.namespace
    if not _present(ns):
        progress(f"namespace {ns} (bridge of network {bridge.network}, {bridge.subnet})")
        run(["ip", "netns", "add", ns]).check(f"creating namespace {ns}")
    elif _tag_of(ns) not in ("", tag):  # untagged: ours, made just before a crash
        # lab pgvpn's network "x-lan" and lab pgvpn-x's network "lan" share a name
        raise LabError(f"namespace {ns} is another lab's ({_tag_of(ns)}); rename network "
                       f"{bridge.network}, or take that lab down")
    # first, so that `lab down` finds it whatever fails next (as NetnsBackend._tag)
    run(["ip", "-n", ns, "link", "set", "lo", "alias", tag]).check(f"tagging {ns}")
    run(["ip", "-n", ns, "link", "set", "lo", "up"]).check("loopback up")
    run(["ip", "netns", "exec", ns, "sysctl", "-qew", *BRIDGE_SYSCTLS]).check(
        f"bridge settings in {ns}")
    if not _has_link(ns, BRIDGE):
        run(["ip", "-n", ns, "link", "add", BRIDGE, "type", "bridge", "stp_state", "0",
             "forward_delay", "0", "mcast_snooping", "0"]).check(f"creating {BRIDGE} in {ns}")
    run(["ip", "-n", ns, "link", "set", BRIDGE, "up"]).check(f"{BRIDGE} up")
    for port in bridge.ports:
        if not _has_link(port.namespace, port.device):
            if _has_link(ns, port.port):  # its peer is gone, so this one is no one's
                run(["ip", "-n", ns, "link", "del", port.port]).check("removing a stale port")
            progress(f"link {port.host} <-> bridge {bridge.network} ({bridge.subnet})")
            run(["ip", "link", "add", port.device, "netns", port.namespace, "type", "veth",
                 "peer", "name", port.port, "netns", ns]).check("creating veth pair")
        elif not _has_link(ns, port.port):
            refuse_rewiring({bridge.network: bridge})  # raises: a veth pair's end
        run(["ip", "-n", ns, "link", "set", port.port, "master", BRIDGE, "up"]).check(
            f"enslaving {port.port} to {BRIDGE}")
        run(["ip", "-n", port.namespace, "addr", "replace", port.address,
             "dev", port.device]).check("address")
        run(["ip", "-n", port.namespace, "link", "set", port.device, "up"]).check("link up")
