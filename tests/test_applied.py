"""Settings really applied: what `lab up` is told, and what the agent's settings say,
is what the running agents do (not only what the lab or the start line records).

The profile is checked per profile in tests/test_profiles.py
(test_the_agents_run_the_chosen_profile).
"""

from __future__ import annotations

import re
import sys

from tests.agentside import AGENT_PIDS
from tests.conftest import LabHandle
from tests.peerside import last_start

PEER_A, PEER_B = "10.230.0.1", "10.230.0.2"
AGENTS = ("peer-a", "peer-b")
LAB_MTU = 1500
LARGE_MTU = 9000
# Opens a session the way the host's running agent opens each of its own: its own
# environment (read from /proc), its own settings (load_config), its own
# Session.connect; then says what the session commits with. argv: VAR=VALUE overrides.
SESSION_PROBE = AGENT_PIDS + """\
from pgvpn.config import load_config
from pgvpn.transports.base import Session
found = []
for pid in agent_pids():
    try:
        environ = open(f"/proc/{pid}/environ", "rb").read().decode().split("\\0")
    except OSError:
        continue
    found.append(dict(item.split("=", 1) for item in environ if "=" in item))
assert len(found) == 1, f"expected one agent, found {len(found)}"
os.environ.clear()
os.environ.update(found[0], **dict(arg.split("=", 1) for arg in sys.argv[1:]))
with Session(load_config()).connect("probe", attempts=1) as conn:
    print(conn.execute("SHOW synchronous_commit").fetchone()[0])
"""


def session_commits(lab: LabHandle, host: str, *overrides: str) -> str:
    """synchronous_commit in a session opened like the agent's own (SESSION_PROBE)."""
    python = "/opt/pgvpn/bin/python" if lab.backend == "docker" else sys.executable
    return lab.exec(host, python, "-c", SESSION_PROBE, *overrides).stdout.strip()


def test_agent_sessions_commit_synchronously_unless_told_otherwise(any_lab: LabHandle
                                                                    ) -> None:
    """The start line's "synchronous commit" comes from the settings; the session is what
    makes a packet durable before it is delivered (README "Durable by default")."""
    for host in AGENTS:
        assert last_start(any_lab, host)["commit"] == "synchronous", host
        assert session_commits(any_lab, host) == "on", host
    assert session_commits(any_lab, "peer-a", "PGVPN_SYNCHRONOUS_COMMIT=false") == "off"


def large_rows(lab: LabHandle, marks: dict[str, int]) -> dict[str, int]:
    """Rows of LARGE_MTU bytes each peer logged past `marks` (its highest seq then)."""
    return {sender: int(lab.sql("SELECT count(*) FROM pgvpn.packets WHERE sender = %s "
                                "AND seq > %s AND length = %s",
                                [sender, mark, LARGE_MTU])[0][0])
            for sender, mark in marks.items()}


def test_up_with_another_mtu_restarts_the_agents_with_it(any_lab: LabHandle) -> None:
    """`lab up --mtu N` on a running lab: both TUN devices have N, and a packet of N bytes
    that may not be fragmented (-M do) crosses whole both ways and is logged whole."""
    try:
        any_lab.cli("up", "--mtu", str(LARGE_MTU))
        assert any_lab.status()["mtu"] == LARGE_MTU
        for host in AGENTS:
            assert any_lab.tun_link(host)["mtu"] == LARGE_MTU, host
            assert int(last_start(any_lab, host)["mtu"]) == LARGE_MTU, host
        marks = {sender: int(seq) for sender, seq in any_lab.sql(
            "SELECT name, coalesce((SELECT max(seq) FROM pgvpn.packets WHERE sender = name), "
            "0) FROM pgvpn.peers")}
        payload = LARGE_MTU - 28  # IPv4 and ICMP headers
        done = any_lab.exec("peer-a", "ping", "-c", "3", "-i", "0.2", "-W", "5", "-M", "do",
                            "-s", str(payload), PEER_B, check=False)
        assert re.search(r"\b3 received", done.stdout), done.stdout + done.stderr
        assert all(n >= 3 for n in large_rows(any_lab, marks).values()), large_rows(
            any_lab, marks)
    finally:
        any_lab.cli("up", "--mtu", str(LAB_MTU))
    for host in AGENTS:
        assert any_lab.tun_link(host)["mtu"] == LAB_MTU, host
