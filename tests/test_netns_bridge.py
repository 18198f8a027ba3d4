"""Networks of three or more hosts on the namespace backend (lab/backends/netnsbridge.py,
issue 12 step 1): a bridge in a namespace of its own, one veth pair per member.

Unit tests of the link plan first (no root); then real namespaces made by
NetnsBackend.create() for a small topology of our own (10.233.x): every member pings
every other, a second create() changes nothing, a grown topology adds only the new
member's link, a veth pair that would need rewiring is refused, and nothing is left
behind, even by `lab down` after a crash with no record of the topology.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from lab import topology
from lab.backends import netnsbridge
from lab.backends.base import LabError
from tests.conftest import ROOT, TEST_LAB, LabHandle, netns_ready

LAB = TEST_LAB + "-br"  # a lab of its own: nothing of the session's lab is touched
NETWORKS = {"lan": "10.233.0.0/24", "pair": "10.233.1.0/24"}
# host -> role, {network: address}: lan has three hosts (a bridge), pair two (a veth pair)
HOSTS: dict[str, tuple[str, dict[str, str]]] = {
    "db": ("database", {"lan": "10.233.0.10", "pair": "10.233.1.10"}),
    "peer": ("agent", {"lan": "10.233.0.11", "pair": "10.233.1.11"}),
    "box": ("host", {"lan": "10.233.0.12"}),
}
# The bridge's end of each host's veth pair: CRC-32 of the host's name, so it never
# changes as a lab grows (literal here, so a change of the scheme is seen).
PORTS = {"db": "ve3f4bc28", "peer": "va2e6f9b9", "box": "v08a9483a", "box2": "vdcd1cef7"}


def write_topology(path: Path, hosts: dict[str, tuple[str, dict[str, str]]]) -> Path:
    """A topology file of `hosts` on NETWORKS, shaped as topologies/ha.yaml is."""
    lab_label = {topology.LABEL: "${PGVPN_LAB_NAME:-pgvpn}"}
    services: dict[str, Any] = {}
    for name, (role, addresses) in hosts.items():
        services[name] = {
            "image": "pgvpn-agent:latest",
            "labels": {**lab_label, topology.ROLE_LABEL: role},
            "networks": {net: {"ipv4_address": a} for net, a in addresses.items()}}
        if role == "host":
            services[name]["command"] = ["sleep", "infinity"]
    document = {"services": services,
                "networks": {net: {"labels": lab_label, "ipam": {"config": [{"subnet": s}]}}
                             for net, s in NETWORKS.items()}}
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def load(path: Path, lab: str = "pgvpn") -> topology.Topology:
    return topology.load({"PGVPN_LAB_NAME": lab}, path)


# ------------------------------------------------------------------ the plan (unit)
def test_a_three_host_network_is_bridged_and_a_two_host_one_is_not(tmp_path: Path) -> None:
    bridges = netnsbridge.plan(load(write_topology(tmp_path / "t.yaml", HOSTS)), "pgvpn-x-")
    assert list(bridges) == ["lan"]  # pair stays a veth pair (NetnsBackend._link)
    lan = bridges["lan"]
    assert lan.namespace == "pgvpn-x-lan+net" and lan.subnet == "10.233.0.0/24"
    assert [(p.host, p.namespace, p.device, p.address, p.port) for p in lan.ports] == [
        ("db", "pgvpn-x-db", "lan", "10.233.0.10/24", PORTS["db"]),
        ("peer", "pgvpn-x-peer", "lan", "10.233.0.11/24", PORTS["peer"]),
        ("box", "pgvpn-x-box", "lan", "10.233.0.12/24", PORTS["box"])]


def test_growing_keeps_every_port_and_adds_the_new_one(tmp_path: Path) -> None:
    small = netnsbridge.plan(load(write_topology(tmp_path / "s.yaml", HOSTS)), "pgvpn-")
    grown = {**HOSTS, "box2": ("host", {"lan": "10.233.0.13"})}
    large = netnsbridge.plan(load(write_topology(tmp_path / "l.yaml", grown)), "pgvpn-")
    assert large["lan"].ports[:3] == small["lan"].ports
    assert [p.port for p in large["lan"].ports[3:]] == [PORTS["box2"]]


def test_the_shipped_topologies() -> None:
    """ha.yaml bridges all three networks; compose.yaml and fleet.yaml keep veth pairs."""
    env = {"PGVPN_LAB_NAME": "pgvpn"}
    ha = netnsbridge.plan(topology.load(env, ROOT / "topologies" / "ha.yaml"), "pgvpn-")
    assert {net: [p.host for p in bridge.ports] for net, bridge in ha.items()} == {
        "net-db": ["etcd", "postgres-1", "postgres-2"],
        "net-a": ["postgres-1", "postgres-2", "peer-a"],
        "net-b": ["postgres-1", "postgres-2", "peer-b"]}
    assert netnsbridge.plan(topology.load(env), "pgvpn-") == {}
    assert netnsbridge.plan(topology.load(env, ROOT / "topologies" / "fleet.yaml"),
                            "pgvpn-") == {}


def test_a_host_named_like_a_bridge_namespace_is_refused(tmp_path: Path) -> None:
    """No Compose service name has a '+', but topology.py does not check names."""
    hosts = {**HOSTS, "lan+net": ("host", {"pair": "10.233.1.12"})}
    with pytest.raises(LabError, match=r"host 'lan\+net' has the name of network lan's"):
        netnsbridge.plan(load(write_topology(tmp_path / "t.yaml", hosts)), "pgvpn-")


# ------------------------------------------------------- real namespaces (integration)
# NetnsBackend names everything after the lab of the process it runs in, so each
# call runs in a process of its own with the test lab's name.
DRIVER = """
import sys
from pathlib import Path
from lab import state, topology
from lab.backends.base import LabError
from lab.backends.netns import NetnsBackend
from lab.controller import lab_environment
env = lab_environment(state.LabSettings("netns", 1500, "batched"))
backend = NetnsBackend(topology.load(env, Path(sys.argv[2])), env)
try:
    getattr(backend, sys.argv[1])(lambda message: print(message, flush=True))
except LabError as exc:
    sys.exit(f"lab: error: {exc}")
"""


def backend_call(lab: LabHandle, action: str, path: Path, *, check: bool = True
                 ) -> subprocess.CompletedProcess[str]:
    done = subprocess.run([sys.executable, "-c", DRIVER, action, str(path)], env=lab.env,
                          cwd=ROOT, capture_output=True, text=True, timeout=120, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{action} exited {done.returncode}:\n{done.stdout}{done.stderr}")
    return done


def ip_json(namespace: str, *argv: str) -> list[dict[str, Any]]:
    shown = subprocess.run(["ip", "-j", "-n", namespace, *argv], capture_output=True,
                           text=True, check=True, timeout=30)
    return json.loads(shown.stdout or "[]")  # type: ignore[no-any-return]


def links(namespace: str) -> dict[str, tuple[Any, ...]]:
    """Each link: its index (a new one if it was made again), master, whether it is set
    up, IPv4 addresses (not what the kernel changes by itself meanwhile: operstate, which
    follows the peer's carrier a moment later, or IPv6 link-local addresses)."""
    addresses = {a["ifname"]: sorted(f"{i['local']}/{i['prefixlen']}" for i in a["addr_info"])
                 for a in ip_json(namespace, "-4", "addr", "show")}
    return {link["ifname"]: (link["ifindex"], link.get("master"), "UP" in link["flags"],
                             addresses.get(link["ifname"], []))
            for link in ip_json(namespace, "link", "show")}


def everything(lab: LabHandle, hosts: dict[str, Any]) -> dict[str, Any]:
    return {ns: links(ns) for ns in [*(lab.namespace(h) for h in hosts),
                                     lab.namespace("lan+net")]}


def assert_all_reach_each_other(lab: LabHandle, hosts: dict[str, tuple[str, dict[str, str]]]
                                ) -> None:
    """Every member of lan pings every other, and has resolved its MAC address by ARP."""
    members = {name: addresses["lan"] for name, (_, addresses) in hosts.items()}
    macs = {name: ip_json(lab.namespace(name), "link", "show", "lan")[0]["address"]
            for name in members}
    for source in members:
        for target, address in members.items():
            if target == source:
                continue
            done = subprocess.run(["ip", "netns", "exec", lab.namespace(source), "ping",
                                   "-n", "-c", "1", "-W", "3", address], capture_output=True,
                                  text=True, timeout=30, check=False)
            assert done.returncode == 0, f"{source} -> {target} ({address}): {done.stdout}"
            neighbours = {n["dst"]: n.get("lladdr") for n in
                          ip_json(lab.namespace(source), "neigh", "show", "dev", "lan")}
            assert neighbours.get(address) == macs[target], (source, target, neighbours)


@pytest.fixture
def bridge_lab() -> Any:
    reason = netns_ready()
    if reason:
        pytest.skip(f"netns lab unavailable: {reason}")
    lab = LabHandle("netns", LAB)
    lab.cli("down")  # a crashed earlier run must not poison this one
    try:
        yield lab
    finally:
        namespaces = lab.namespaces().values()
        lab.cli("down")
        leftovers = lab.leftovers(namespaces)
        assert not leftovers, f"lab down left these behind: {leftovers}"


@pytest.mark.integration
def test_three_hosts_on_a_bridge(bridge_lab: LabHandle, tmp_path: Path) -> None:
    lab, bridge = bridge_lab, bridge_lab.namespace("lan+net")
    first = backend_call(lab, "create", write_topology(tmp_path / "three.yaml", HOSTS))
    assert f"namespace {bridge} (bridge of network lan, 10.233.0.0/24)" in first.stdout
    assert "link db <-> bridge lan" in first.stdout and "pair" not in first.stdout
    assert set(lab.namespaces()) == {lab.namespace(h) for h in (*HOSTS, "lan+net")}

    shown = links(bridge)
    assert {name for name, link in shown.items() if link[1] == "br0"} == \
        {PORTS[h] for h in HOSTS}
    assert all(addresses == [] for name, (*_, addresses) in shown.items() if name != "lo")
    options = ip_json(bridge, "-d", "link", "show", "br0")[0]["linkinfo"]["info_data"]
    assert (options["stp_state"], options["forward_delay"]) == (0, 0)
    sysctl = subprocess.run(["ip", "netns", "exec", bridge, "cat",
                             "/proc/sys/net/ipv6/conf/all/disable_ipv6"],
                            capture_output=True, text=True, check=True).stdout
    assert sysctl.strip() == "1"
    assert links(lab.namespace("db"))["pair"][1] is None  # two hosts: a veth pair, no bridge
    root = {link["ifname"] for link in json.loads(subprocess.run(
        ["ip", "-j", "link", "show"], capture_output=True, text=True, check=True).stdout)}
    assert not root & {*PORTS.values(), "lan", "pair"}  # nothing in the root namespace
    assert_all_reach_each_other(lab, HOSTS)
    # Bridged frames skip the bridge namespace's netfilter, even where br_netfilter is
    # loaded (Docker loads it): a firewall there, however strict, drops none of them.
    subprocess.run(["ip", "netns", "exec", bridge, "iptables", "-P", "FORWARD", "DROP"],
                   check=True, timeout=30)
    assert subprocess.run(["ip", "netns", "exec", lab.namespace("box"), "ping", "-n", "-c",
                           "1", "-W", "3", HOSTS["db"][1]["lan"]], capture_output=True,
                          timeout=30, check=False).returncode == 0

    before = everything(lab, HOSTS)
    again = backend_call(lab, "create", tmp_path / "three.yaml")
    assert again.stdout == "" and everything(lab, HOSTS) == before  # changes nothing

    grown = {**HOSTS, "box2": ("host", {"lan": "10.233.0.13"})}
    more = backend_call(lab, "create", write_topology(tmp_path / "four.yaml", grown))
    assert more.stdout.splitlines() == [f"namespace {lab.namespace('box2')}",
                                        "link box2 <-> bridge lan (10.233.0.0/24)"]
    after = everything(lab, grown)
    for ns, old in before.items():  # every link that was there is the same link
        assert {name: after[ns][name] for name in old} == old, ns
    assert set(after[bridge]) - set(before[bridge]) == {PORTS["box2"]}
    assert_all_reach_each_other(lab, grown)

    backend_call(lab, "destroy", tmp_path / "four.yaml")
    assert lab.namespaces() == {}


@pytest.mark.integration
def test_a_veth_pair_that_gains_a_third_host_is_refused(bridge_lab: LabHandle,
                                                        tmp_path: Path) -> None:
    lab = bridge_lab
    backend_call(lab, "create", write_topology(tmp_path / "three.yaml", HOSTS))
    before = everything(lab, HOSTS)
    grown = {**HOSTS, "box2": ("host", {"pair": "10.233.1.13"})}
    refused = backend_call(lab, "create", write_topology(tmp_path / "grown.yaml", grown),
                           check=False)
    assert refused.returncode != 0
    assert ("network pair links db and peer directly (a veth pair, made when it had two "
            "hosts); with box2 it has 3 hosts") in refused.stderr
    assert "run 'lab down' first" in refused.stderr
    assert refused.stdout == ""  # refused before anything was made
    assert set(lab.namespaces()) == set(before)
    assert everything(lab, HOSTS) == before

    # A crash: no settings, no topology file. `lab down` still finds the bridge by its tag.
    for path in tmp_path.glob("*.yaml"):
        path.unlink()
    down = lab.cli("down")
    assert f"removing namespace {lab.namespace('lan+net')}" in down.stderr + down.stdout
    assert lab.namespaces() == {}


@pytest.mark.integration
def test_another_labs_namespace_of_the_same_name_is_not_taken(bridge_lab: LabHandle,
                                                             tmp_path: Path) -> None:
    """Lab pgvpn-x's network "lan" and lab pgvpn's network "x-lan" share a bridge
    namespace name: the second lab up is refused, and the first keeps its namespace."""
    lab, foreign = bridge_lab, bridge_lab.namespace("lan+net")
    other = "io.pgvpn.project=pgvpn-other"
    subprocess.run(["ip", "netns", "add", foreign], check=True, timeout=30)
    try:
        subprocess.run(["ip", "-n", foreign, "link", "set", "lo", "alias", other], check=True,
                       timeout=30)
        refused = backend_call(lab, "create", write_topology(tmp_path / "t.yaml", HOSTS),
                               check=False)
        assert refused.returncode != 0
        assert f"namespace {foreign} is another lab's ({other})" in refused.stderr
        assert [link.get("ifalias") for link in ip_json(foreign, "link", "show")] == [other]
    finally:
        subprocess.run(["ip", "netns", "del", foreign], check=True, timeout=30)
