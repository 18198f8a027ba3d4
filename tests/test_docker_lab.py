"""Integration: the Docker lab's own life cycle, with the engine to itself.

A first `lab up` that fails is rolled back, whether a host died or did not come up in
time, and the error names the host and shows its log; `lab down --images` removes
every image pgvpn built, and the next `lab up` builds them again, making the base
image with debootstrap where no registry answers, in a handful of progress lines (the
builds' own output goes to the lab's build log). These run last in a session
(marker docker_alone): they take the session's Docker lab down, because a second
lab's networks would overlap it.
"""

from __future__ import annotations

import subprocess

import pytest

from lab.backends.docker import LOCAL_BASE, PUBLIC_BASE
from tests.conftest import TEST_LAB, LabHandle
from tests.peerside import lab_cli

pytestmark = [pytest.mark.docker, pytest.mark.docker_alone]
LIFE_LAB = TEST_LAB + "-l"  # beside the session's labs, never a lab of yours


def pgvpn_images() -> list[str]:
    """Every image pgvpn built, as repository:tag (or id, if untagged)."""
    listed = subprocess.run(["docker", "images", "--filter", "label=io.pgvpn.project=pgvpn",
                             "--format", "{{.Repository}}:{{.Tag}}"],
                            capture_output=True, text=True, check=True).stdout
    return sorted(listed.split())


def image_exists(name: str) -> bool:
    return subprocess.run(["docker", "image", "inspect", name], capture_output=True,
                          check=False).returncode == 0


@pytest.fixture
def life_lab(docker_alone: None) -> LabHandle:
    lab = LabHandle("docker", LIFE_LAB)
    lab.cli("down")
    return lab


def test_a_first_up_whose_agent_dies_is_rolled_back(life_lab: LabHandle) -> None:
    failed = lab_cli(life_lab, "up", "--backend", "docker", check=False, timeout=1800,
                     env={"PGVPN_MAX_REPLAY_AGE": "forever"})
    assert failed.returncode == 2, failed
    assert "lab: error: peer-a exited during start; its log:" in failed.stderr
    # the agent's own words, from its container's log
    assert ("max_replay_age = 'forever' (from $PGVPN_MAX_REPLAY_AGE): must be a number of "
            "seconds") in failed.stderr
    assert "lab up failed: rolling back" in failed.stderr
    assert life_lab.leftovers() == []  # containers, networks, volume, state directory
    assert "nothing to remove" in life_lab.cli("down").stderr


def test_a_first_up_whose_host_is_not_ready_in_time_is_rolled_back(
        life_lab: LabHandle) -> None:
    # postgres needs several seconds to initialise and pass its health check
    failed = lab_cli(life_lab, "up", "--backend", "docker", check=False, timeout=1800,
                     env={"PGVPN_START_TIMEOUT": "0.5"})
    assert failed.returncode == 2, failed
    assert ("lab: error: postgres did not become ready within 0.5s (PGVPN_START_TIMEOUT "
            "sets another limit); its log:") in failed.stderr
    assert "lab up failed: rolling back" in failed.stderr
    assert life_lab.leftovers() == []


@pytest.mark.parametrize("given", ["0", "-3", "soon", "7200"])
def test_a_bad_start_timeout_is_refused_before_anything_is_made(
        life_lab: LabHandle, given: str) -> None:
    failed = lab_cli(life_lab, "up", "--backend", "docker", check=False, timeout=1800,
                     env={"PGVPN_START_TIMEOUT": given})
    assert failed.returncode == 2, failed
    assert (f"PGVPN_START_TIMEOUT={given!r}: give seconds, more than 0 and at most 3600"
            in failed.stderr)
    assert life_lab.leftovers() == []


@pytest.mark.slow
def test_down_images_removes_them_and_up_builds_them_again(life_lab: LabHandle) -> None:
    """The whole way a fresh machine goes: no image at all, then `lab up`."""
    assert pgvpn_images(), "the session built the images: there is something to remove"
    removed = life_lab.cli("down", "--images").stderr
    assert pgvpn_images() == [], removed
    assert "removing image pgvpn-agent:" in removed and "removing image pgvpn-postgres:" in removed

    up = life_lab.cli("up", "--backend", "docker", timeout=3600).stderr
    try:
        if image_exists(PUBLIC_BASE):  # a registry answered (or the image was here)
            assert "no registry answers" not in up
        else:
            assert (f"no registry answers: building {LOCAL_BASE} locally with debootstrap"
                    in up), up
            assert LOCAL_BASE in pgvpn_images()
        assert "building images from" in up
        # a handful of progress lines; apt's, debootstrap's and Docker's go to the build log
        build_log = life_lab.state_dir / "build.log"
        assert f"(output in {build_log})" in up and len(up.splitlines()) <= 40, up
        assert len(build_log.read_text(errors="replace").splitlines()) > 100
        assert {i.split(":")[0] for i in pgvpn_images()} >= {"pgvpn-agent", "pgvpn-postgres"}
        pinged = life_lab.exec("peer-a", "ping", "-c", "2", "-W", "2", "10.230.0.2")
        assert "2 received" in pinged.stdout
    finally:
        life_lab.cli("down")
    assert life_lab.leftovers() == []
