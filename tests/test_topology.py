"""Topology files (lab/topology.py) and what the lab does with a saved one, with no lab:
every shipped file loads as both backends need it; every malformed file gets one line
that names what is wrong; a lab whose file changed or vanished is neither grown into
something else nor left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lab import topology
from lab.topology import TopologyError
from tests.conftest import ROOT

ENV = {"PGVPN_LAB_NAME": "pgvpn"}
FLEET = ROOT / "topologies" / "fleet.yaml"


def fleet_with(tmp_path: Path, change: object) -> Path:
    """fleet.yaml with `change(document)` applied, written to tmp_path."""
    return topology_with(FLEET, tmp_path, change)


def topology_with(source: Path, tmp_path: Path, change: object) -> Path:
    """A topology file with `change(document)` applied, written to tmp_path."""
    document = yaml.safe_load(source.read_text())
    change(document)  # type: ignore[operator]
    path = tmp_path / "changed.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def test_the_shipped_topologies_load() -> None:
    two = topology.load(ENV)
    assert [a.name for a in two.agents] == ["peer-a", "peer-b"] and not two.routes_by_table
    fleet = topology.load(ENV, FLEET)
    assert [a.name for a in fleet.agents] == ["peer-a", "peer-b", "peer-c", "peer-d"]
    assert fleet.routes_by_table and [h.name for h in fleet.plain_hosts] == ["site-host"]
    assert fleet.hosts["peer-c"].routes == ("192.168.50.0/24",)
    assert fleet.hosts["peer-c"].sysctls["net.ipv4.ip_forward"] == "1"
    site = fleet.hosts["site-host"]
    assert site.command[:2] == ("sh", "-c") and site.healthcheck[:2] == ("sh", "-c")


def test_a_topology_is_found_by_name_from_anywhere(tmp_path: Path) -> None:
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        assert topology.resolve("fleet") == FLEET
        assert topology.resolve("compose") == topology.COMPOSE_FILE
        with pytest.raises(TopologyError, match="fleet"):
            topology.resolve("nowhere")
        with pytest.raises(TopologyError):
            topology.resolve(str(tmp_path))  # a directory is no file
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: d["services"]["peer-c"]["labels"].update(
        {"io.pgvpn.routes": "192.168.50.1/24"}), "host bits set"),
    (lambda d: d["services"]["peer-c"]["sysctls"].update({"kernel.shmmax": 1}),
     "only net"),
    (lambda d: [d["services"]["site-host"].pop(k) for k in ("entrypoint", "command")],
     "needs its command"),
    (lambda d: d["services"].update(replay=d["services"].pop("site-host")), "scratch"),
    (lambda d: d["services"]["peer-d"]["labels"].pop("io.pgvpn.project"), "io.pgvpn.project"),
    (lambda d: d["networks"]["lan-c"]["labels"].pop("io.pgvpn.project"), "network lan-c"),
    (lambda d: d["networks"].update({"a-very-long-network-name": d["networks"]["net-a"]}),
     "1-15"),
    (lambda d: d["secrets"]["peer-a"].pop("file"), "KeyError"),
    (lambda d: d.update(networks=["net-a"]), "networks: give a mapping"),
    (lambda d: d["services"].update({"peer-d": None}), "service peer-d: give a mapping"),
    (lambda d: d["services"]["peer-d"].update(networks=["net-d"]), "ipv4_address"),
    (lambda d: d["services"]["peer-d"]["labels"].update({"io.pgvpn.role": "router"}),
     "database|agent|host"),
])
def test_a_malformed_topology_is_one_line_naming_the_fault(
        tmp_path: Path, change: object, message: str) -> None:
    with pytest.raises(TopologyError, match=message) as caught:
        topology.load(ENV, fleet_with(tmp_path, change))
    assert "\n" not in str(caught.value) and "changed.yaml" in str(caught.value)


def test_compose_list_forms_read_as_mappings(tmp_path: Path) -> None:
    def to_lists(document: dict[str, object]) -> None:
        peer = document["services"]["peer-a"]  # type: ignore[index]
        peer["environment"] = [f"{k}={v}" for k, v in peer["environment"].items()]
        peer["labels"] = [f"{k}={v}" for k, v in peer["labels"].items()]

    loaded = topology.load(ENV, fleet_with(tmp_path, to_lists))
    assert loaded.hosts["peer-a"].environment["TUN_IP"] == "10.230.0.1/24"


def lab_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PGVPN_LAB_NAME": "pgvpn-tt", "PGVPN_LAB_DIR": str(tmp_path / "lab")}
    return subprocess.run([sys.executable, "-m", "lab.cli", *args], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=120, check=False)


def saved_lab(tmp_path: Path, saved: Path | None) -> None:
    """A lab's state as `lab up` leaves it (settings and its topology's copy), with no
    lab behind it."""
    state = tmp_path / "lab"
    state.mkdir()
    (state / "lab.json").write_text(json.dumps({
        "backend": "netns", "mtu": 1500, "profile": "batched",
        "topology": str(saved or tmp_path / "gone.yaml")}))
    if saved is not None:
        (state / "topology.yaml").write_bytes(saved.read_bytes())


@pytest.mark.skipif(os.geteuid() != 0, reason="the netns backend needs root")
def test_a_running_lab_is_not_changed_into_another_topology(tmp_path: Path) -> None:
    """Up with compose.yaml: a fleet file changes peer-a, so it is refused, before
    anything is made."""
    saved_lab(tmp_path, topology.COMPOSE_FILE)
    done = lab_cli(tmp_path, "up", "--topology", "fleet")
    assert done.returncode == 2 and "Run 'lab down' first" in done.stderr, done.stderr
    assert "peer-a" in done.stderr and "Traceback" not in done.stderr


def test_a_lab_whose_topology_file_is_gone_says_so_and_still_goes_down(tmp_path: Path
                                                                         ) -> None:
    saved_lab(tmp_path, None)  # an older lab: no copy, and its file deleted since
    done = lab_cli(tmp_path, "exec", "peer-a", "--", "true")
    assert done.returncode == 2 and "gone.yaml" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1
    down = lab_cli(tmp_path, "down")
    assert down.returncode == 0, down.stderr
    assert "cannot be read" in down.stderr and not (tmp_path / "lab").exists()


@pytest.mark.parametrize("name", ["compose.yaml", "topologies/fleet.yaml",
                                  "topologies/ha.yaml"])
def test_every_shipped_topology_hands_the_labs_settings_to_each_agent(name: str) -> None:
    """What `lab up --mtu/--offload/--queue-control/...` chose reaches every agent on
    either backend: each reads the agents' environment from this file, filled in with
    the lab's settings (lab_environment)."""
    from lab.controller import lab_environment
    from lab.state import LabSettings

    settings = LabSettings("netns", 1400, "batched", offload=False, queue_target_ms=7,
                           routing="table")
    env = {**lab_environment(settings), "PGVPN_LAB_NAME": "pgvpn"}
    loaded = topology.load(env, ROOT / name)
    assert loaded.agents
    for agent in loaded.agents:
        # (a YAML loader reads the filled-in "false" as a boolean: the agent takes either)
        assert {key: str(agent.environment.get(key)).lower() for key in (
            "PGVPN_MTU", "PGVPN_OFFLOAD", "PGVPN_QUEUE_TARGET_MS", "PGVPN_PROFILE")} == {
            "PGVPN_MTU": "1400", "PGVPN_OFFLOAD": "false", "PGVPN_QUEUE_TARGET_MS": "7",
            "PGVPN_PROFILE": "batched"}, agent.name
