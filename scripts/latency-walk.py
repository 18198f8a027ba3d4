#!/usr/bin/env python3
"""Time each step of one packet's walk through the tunnel (README, "Latency: one
packet's walk"), on a namespace lab of its own that it removes afterwards.

The agents are stopped while the steps are timed (so that nothing else runs), and the
steps run as the peers' own roles, over TLS, with synchronous commit, exactly the
statements the agent sends (imported from pgvpn.transports.batched). Then the agents
start again and 200 pings give the end-to-end RTT. Every figure is a median of N
tries: "hot" back to back, "idle" with IDLE_GAP seconds of sleep before each, which
is what a packet of an interactive session meets.

    .venv/bin/python scripts/latency-walk.py        # about a minute
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LAB = "pgvpn-walk"
ENV = {**os.environ, "PGVPN_LAB_NAME": LAB}
LAB_CMD = [sys.executable, "-m", "lab.cli"]

# Runs inside a peer's namespace with that agent's environment; prints JSON.
STEPS = r'''
import json, statistics, sys, time
import psycopg
from pgvpn.transports.batched import COPY_PACKETS, INSERT_AND_NOTIFY, NEXT_BATCH
from pgvpn.transports.batched import copy_batch, notify
from pgvpn.transports.base import channel_for
N, IDLE_GAP = 200, 0.005
me, peer = sys.argv[1], sys.argv[2]
channel = channel_for(peer)
conn = psycopg.connect(autocommit=True)
listener = psycopg.connect(autocommit=True)
listener.execute(f'LISTEN "{channel}"')
seq = conn.execute("SELECT pgvpn.last_sent_seq()").fetchone()[0]
packet = bytes([0x45]) + bytes(83)  # an 84-byte echo request
def median(step, gap):
    times = []
    for _ in range(N):
        if gap:
            time.sleep(gap)
        started = time.perf_counter()
        step()
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)
def select_1():
    conn.execute("SELECT 1", prepare=True)
def insert_and_notify():
    global seq
    seq += 1
    conn.execute(INSERT_AND_NOTIFY, {"first": seq, "receiver": peer, "packets": [packet],
                                     "offloads": None,
                                     "channel": channel}, prepare=True)
def copy_then_notify():
    global seq
    seq += 1
    copy_batch(conn, COPY_PACKETS, peer, seq, [packet])
    notify(conn, channel)
def notified():
    insert_and_notify()
    for _ in listener.notifies(timeout=1, stop_after=1):
        pass
result = {}
for name, step in (("round trip (SELECT 1)", select_1),
                   ("uplink: INSERT+NOTIFY, one statement", insert_and_notify),
                   ("uplink: COPY, then NOTIFY (bulk path)", copy_then_notify),
                   ("uplink statement until the listener has the notification", notified)):
    result[name] = {"hot": median(step, 0), "idle": median(step, IDLE_GAP)}
print(json.dumps(result))
'''
# As the receiver: its reading statement on one row (the last one the sender wrote),
# the cursor's UPDATE and commit included; the cursor ends on that row.
READ = r'''
import json, statistics, sys, time
import psycopg
from pgvpn.transports.batched import NEXT_BATCH, READER_SETUP
me, sender = sys.argv[1], sys.argv[2]
conn = psycopg.connect(autocommit=True)
conn.execute(READER_SETUP)  # the downlink's session, as BatchedDownlink.prepare sets it
last = conn.execute("SELECT max(seq) FROM pgvpn.inbox WHERE sender = %s", [sender]).fetchone()[0]
params = {"me": me, "peer": sender, "after": last - 1, "limit": 1024, "max_packet": 1500,
          "max_bytes": 4 << 20}
def median(gap):
    times = []
    for _ in range(200):
        if gap:
            time.sleep(gap)
        started = time.perf_counter()
        with conn.cursor(binary=True) as cur:
            assert len(cur.execute(NEXT_BATCH, params, prepare=True).fetchall()) == 1
        times.append((time.perf_counter() - started) * 1000)
    return round(statistics.median(times), 3)
print(json.dumps({"hot": median(0), "idle": median(0.005)}))
'''


def lab(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*LAB_CMD, *args], env=ENV, cwd=ROOT, capture_output=True,
                          text=True, check=check)


def in_peer(peer: str, *argv: str) -> str:
    code = ("import sys; from lab.controller import Lab; b = Lab.current().backend; "
            "h = b.topology.hosts[sys.argv[1]]; from lab.backends.base import run; "
            "r = run(['ip', 'netns', 'exec', b.namespace(h.name), "
            "*sys.argv[2:]], timeout=300, env=b.agent_environment(h)); "
            "sys.stdout.write(r.stdout); sys.stderr.write(r.stderr); sys.exit(r.returncode)")
    done = subprocess.run([sys.executable, "-c", code, peer, *argv], env=ENV, cwd=ROOT,
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{argv[:3]} in {peer} failed: {done.stderr.strip()[-500:]}")
    return done.stdout


def fsync_ms() -> float:
    """pg_test_fsync's fdatasync (Linux's default wal_sync_method), one 8 kB write, on
    the file system of the lab's database."""
    code = ("from lab import state; from lab.backends.netns import postgres_bindir; "
            "print(postgres_bindir()); print(state.STATE_DIR)")
    bindir, lab_dir = subprocess.run([sys.executable, "-c", code], env=ENV, cwd=ROOT,
                                     capture_output=True, text=True,
                                     check=True).stdout.split()
    test_file = Path(lab_dir) / "fsync.test"
    out = subprocess.run([str(Path(bindir) / "pg_test_fsync"), "-s", "1", "-f", str(test_file)],
                         capture_output=True, text=True, check=True).stdout
    test_file.unlink(missing_ok=True)
    line = next(line for line in out.splitlines() if line.strip().startswith("fdatasync"))
    return float(line.split()[-2]) / 1000


def main() -> int:
    lab("up", "--backend", "netns", "--no-tls" if "--no-tls" in sys.argv else "--tls")
    try:
        lab("stop", "peer-a")
        lab("stop", "peer-b")
        steps = json.loads(in_peer("peer-a", sys.executable, "-c", STEPS, "peer-a", "peer-b"))
        read = in_peer("peer-b", sys.executable, "-c", READ, "peer-b", "peer-a")
        steps["downlink: SELECT a batch + cursor UPDATE, one statement"] = json.loads(read)
        steps["WAL flush (pg_test_fsync, fdatasync)"] = {"hot": fsync_ms(), "idle": None}
        lab("start", "peer-a")
        lab("start", "peer-b")
        ping = lab("exec", "peer-a", "--", "ping", "-n", "-c", "200", "-i", "0.02",
                   "10.230.0.2", check=False).stdout  # a lost echo is no reason to stop
        rtts = sorted(float(line.split("time=")[1].split()[0])
                      for line in ping.splitlines() if "time=" in line)
        steps["end to end: ping RTT through the tunnel (both directions)"] = {
            "p50": rtts[len(rtts) // 2], "p99": rtts[int(len(rtts) * 0.99) - 1],
            "min": rtts[0]}
    finally:
        lab("down", check=False)
    width = max(map(len, steps))
    for name, figures in steps.items():
        print(f"{name:<{width}}  " + "  ".join(f"{k} {v} ms" for k, v in figures.items()
                                                if v is not None))
    return 0


if __name__ == "__main__":
    sys.exit(main())
