"""The replicated topology file (topologies/ha.yaml) as both backends read it, with no
lab: its nodes, etcd, volumes and the conninfo that follows the primary; and one line
naming the fault for each way a replicated topology can be malformed."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lab import topology
from lab.topology import TopologyError
from tests.conftest import ROOT
from tests.test_topology import topology_with

ENV = {"PGVPN_LAB_NAME": "pgvpn"}
HA = ROOT / "topologies" / "ha.yaml"


def ha_with(tmp_path: Path, change: object) -> Path:
    return topology_with(HA, tmp_path, change)


def test_the_ha_topology_loads() -> None:
    ha = topology.load(ENV, HA)
    assert ha.replicated and [n.name for n in ha.databases] == ["postgres-1", "postgres-2"]
    assert all(n.patroni and n.command == ("patroni",) for n in ha.databases)
    assert [h.name for h in ha.dcs] == ["etcd"] and ha.dcs[0].healthcheck[0] == "etcdctl"
    assert ha.hosts["postgres-2"].volumes == {"pgdata-2": "/var/lib/pgvpn"}
    assert ha.database.name == "postgres-1"
    # every agent lists every node, and shares a network with each
    for agent in ha.agents:
        hosts = agent.environment["PGHOST"].split(",")
        assert hosts == [str(ha.database_address_for(agent, n)) for n in ha.databases]
        assert agent.environment["PGTARGETSESSIONATTRS"] == "read-write"
    # the peers never share a network with etcd, nor with each other
    assert not set(ha.hosts["peer-a"].addresses) & set(ha.hosts["etcd"].addresses)
    assert not set(ha.hosts["peer-a"].addresses) & set(ha.hosts["peer-b"].addresses)
    assert topology.session_attrs(ha, False) == " target_session_attrs=read-write"
    assert topology.session_attrs(ha, True) == " target_session_attrs=standby"


def test_a_lone_database_has_no_standby_to_read() -> None:
    two = topology.load(ENV)
    assert not two.replicated and topology.session_attrs(two, False) == ""
    with pytest.raises(TopologyError, match="no standby"):
        topology.session_attrs(two, True)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["services"]["postgres-2"]["environment"].pop("PATRONI_SCOPE"),
     "postgres-2 has none"),
    (lambda d: d["services"]["postgres-2"]["environment"].update(PATRONI_SCOPE="other"),
     "different clusters"),
    (lambda d: d["services"].pop("etcd"), "exactly one dcs host"),
    (lambda d: d["services"].update({"etcd-2": d["services"]["etcd"]}),
     "exactly one dcs host"),
    (lambda d: d["services"].pop("postgres-2"), "two or more database hosts"),
    (lambda d: d["services"]["postgres-1"].update(volumes=["/var/lib/pgvpn"]),
     "NAME:/path"),
    (lambda d: d["services"]["etcd"]["labels"].update({"io.pgvpn.role": "etcd"}),
     "dcs"),
])
def test_a_malformed_replicated_topology_is_one_line_naming_the_fault(
        tmp_path: Path, change: object, message: str) -> None:
    with pytest.raises(TopologyError, match=message) as caught:
        topology.load(ENV, ha_with(tmp_path, change))
    assert "\n" not in str(caught.value) and "changed.yaml" in str(caught.value)


def test_a_dcs_host_with_a_lone_database_is_refused(tmp_path: Path) -> None:
    def add_etcd(document: dict[str, dict[str, object]]) -> None:
        ha = yaml.safe_load(HA.read_text())
        document["services"]["etcd"] = ha["services"]["etcd"]
        document["networks"]["net-db"] = ha["networks"]["net-db"]

    path = tmp_path / "lone.yaml"
    document = yaml.safe_load((ROOT / "compose.yaml").read_text())
    add_etcd(document)
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    with pytest.raises(TopologyError, match="serves a replicated database"):
        topology.load(ENV, path)
