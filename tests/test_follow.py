"""Integration: `pgvpn log --follow` prints packets as they are logged, once each.

A follower started before a ping prints that ping's echo requests and replies, with
the filter applied, and nothing that was logged before it started (-n 0).
"""

from __future__ import annotations

import contextlib
import queue
import subprocess
import sys
import threading
import time

from tests.conftest import ROOT, LabHandle

SIZE = 1111  # ICMP payload: the packets are 1139 bytes, a size nothing else here uses
PACKET = f"{SIZE + 28} B"


def test_follow_prints_new_packets_once_and_filtered(netns_lab: LabHandle) -> None:
    env = {**netns_lab.env, "DATABASE_URL": netns_lab.conninfo()}
    follower = subprocess.Popen(
        [sys.executable, "-m", "pgvpn.cli", "log", "--follow", "-n", "0", "--proto", "icmp"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout or []],
                              daemon=True)
    reader.start()
    try:
        time.sleep(2)  # the follower has read the log's heads: what comes next is new
        assert follower.poll() is None, follower.stderr.read() if follower.stderr else ""
        netns_lab.exec("peer-a", "ping", "-n", "-c3", "-i0.2", "-W2", "-s", str(SIZE),
                       "10.230.0.2")  # check=True: all three answered
        seen: list[str] = []
        deadline = time.monotonic() + 20
        while sum(PACKET in line for line in seen) < 6 and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                seen.append(lines.get(timeout=0.5))
        time.sleep(2)  # anything printed twice would come now
        while not lines.empty():
            seen.append(lines.get())
    finally:
        follower.terminate()
        follower.wait(timeout=10)
    ours = [line for line in seen if PACKET in line]
    assert len(ours) == 6, seen  # three requests, three replies, each once
    assert sum("peer-a > peer-b" in line for line in ours) == 3, ours
    assert sum("peer-b > peer-a" in line for line in ours) == 3, ours
    assert all("ICMP" in line.upper() for line in seen), seen  # the filter held
