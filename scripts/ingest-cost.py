#!/usr/bin/env python3
"""What pgvpn's write path costs the database, per row and per byte (docs/scaling.md).

Runs `pgvpn ceiling` (the uplink's own COPY + NOTIFY path, with the agent's settings:
TLS, synchronous commit) from the lab's first peer into a scratch table of the log's
shape, as `lab bench` does (lab/ceiling.py), and around each run samples:
- the CPU seconds (user + system) of every postgres process in the database hosts'
  namespaces, the postmaster's reaped children included (the run's own backend has
  exited by the time of the second sample), and of anything else there (Patroni);
- the CPU seconds of the ceiling client itself (RUSAGE_CHILDREN: it is our child);
- the machine's busy CPU (/proc/stat), to show what others ran meanwhile;
- WAL written (pg_current_wal_lsn, pg_stat_wal), and the table's size on disk.
A wall-clock rate alone says little on a shared machine; CPU per row says more.

    PGVPN_LAB_NAME=NAME .venv/bin/python scripts/ingest-cost.py [--sizes 1500,65000]
        [--repeat 3] [--seconds 5] [--commits] [--json FILE]

--commits also measures how many commits per second the whole server takes from 1 and
from 8 clients (pgbench, superuser over the Unix socket, into a scratch table): a
one-row INSERT, and the same INSERT with a pg_notify in the statement, as the agent's
small batches do. A commit that notifies holds a cluster-wide lock through its WAL
flush (and a synchronous standby's reply), so these do not add up across clients.

Netns backend only (it reads the namespaces' processes from /proc).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from lab.backends.base import LabError
from lab.backends.netns import NetnsBackend
from lab.ceiling import CEILING_BATCH, GRANTS_SQL, SCHEMA, SCRATCH_SQL, TABLE, _owner
from lab.controller import Lab
from pgvpn.admin import role_name
from pgvpn.tun import READ_BYTES

TICK = os.sysconf("SC_CLK_TCK")
PGBENCH = "/usr/lib/postgresql/15/bin/pgbench"
PROBE = "pgvpn_scaling_probe"
COMMIT_SCRIPTS = {
    "insert": f"INSERT INTO {PROBE}.t (data) VALUES ('\\x45');\n",
    "insert_notify": (f"WITH i AS (INSERT INTO {PROBE}.t (data) VALUES ('\\x45')) "
                      "SELECT pg_notify('pgvpn.scaling-probe', '');\n"),
}


def namespace_cpu(namespaces: list[str]) -> dict[str, float]:
    """CPU seconds so far of the processes in `namespaces`: postgres's (with the
    children it reaped) and everything else's, per namespace."""
    result: dict[str, float] = {}
    for ns in namespaces:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True,
                              check=True).stdout.split()
        pg = other = 0
        for pid in pids:
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                continue  # exited between the listing and now
            comm = stat[stat.index("(") + 1:stat.rindex(")")]
            fields = stat[stat.rindex(")") + 2:].split()
            ticks = sum(int(f) for f in fields[11:15])  # utime stime cutime cstime
            if comm.startswith("postgres"):
                pg += ticks
            else:
                other += ticks
        result[f"{ns}:postgres"] = pg / TICK
        result[f"{ns}:other"] = other / TICK
    return result


def machine_busy() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = values[3] + values[4]
    return (sum(values) - idle) / TICK, sum(values) / TICK


def wal(conn: psycopg.Connection) -> tuple[str, int, int, int]:
    row = conn.execute("SELECT pg_current_wal_lsn()::text, wal_records, wal_fpi, wal_bytes "
                       "FROM pg_stat_wal").fetchone()
    assert row is not None
    return row[0], int(row[1]), int(row[2]), int(row[3])


def one_run(lab: Lab, size: int, seconds: float, namespaces: list[str]) -> dict[str, Any]:
    client = lab.topology.agents[0]
    batch = max(1, min(CEILING_BATCH, READ_BYTES // size))
    _owner(lab, "making the scratch table", SCRATCH_SQL)
    _owner(lab, "granting", sql.SQL(GRANTS_SQL).format(role=sql.Identifier(role_name(client.name))))
    su = psycopg.connect(lab.backend.admin_conninfo("pgvpn", superuser=True), autocommit=True)
    try:
        su.execute("CHECKPOINT")  # every run starts from the same state (full-page images)
        wal0, cpu0, busy0 = wal(su), namespace_cpu(namespaces), machine_busy()
        child0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = lab.backend.exec_pgvpn_as_agent(client.name, [
            "ceiling", TABLE, "--seconds", f"{seconds:g}", "--size", str(size),
            "--batch", str(batch), "--json"], timeout=seconds + 60)
        child1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        time.sleep(0.2)  # let the postmaster reap the run's backend
        cpu1, busy1, wal1 = namespace_cpu(namespaces), machine_busy(), wal(su)
        done.check(f"pgvpn ceiling on {client.name}")
        result = dict(json.loads(done.stdout))
        lsn_bytes = su.execute("SELECT pg_wal_lsn_diff(%s, %s)", [wal1[0], wal0[0]]).fetchone()
        counted = su.execute(f"SELECT count(*), coalesce(sum(length), 0), "
                             f"pg_total_relation_size('{SCHEMA}.ingest_rows') FROM {TABLE}"
                             ).fetchone()
    finally:
        su.close()
        _owner(lab, "dropping the scratch table", f"DROP SCHEMA IF EXISTS {SCHEMA} CASCADE")
    assert lsn_bytes is not None and counted is not None
    if counted[0] != result["rows"] or counted[1] != result["bytes"]:
        raise LabError(f"the table holds {counted[0]} rows / {counted[1]} bytes, the ceiling "
                       f"said {result['rows']} / {result['bytes']}")
    pg_cpu = sum(cpu1[k] - cpu0[k] for k in cpu0 if k.endswith(":postgres"))
    rows = result["rows"]
    busy, total = busy1[0] - busy0[0], busy1[1] - busy0[1]
    return {
        **result,
        "postgres_cpu_s": round(pg_cpu, 2),
        "postgres_cpu_by_ns": {k: round(cpu1[k] - cpu0[k], 2) for k in cpu0},
        "client_cpu_s": round(child1.ru_utime + child1.ru_stime
                              - child0.ru_utime - child0.ru_stime, 2),
        # cores busy on average during the run, whoever used them (of os.cpu_count())
        "machine_busy_cores": round(busy / (total / (os.cpu_count() or 1)), 2) if total else None,
        "rows_per_s": round(rows / result["seconds"]),
        "mbyte_per_s": round(result["bytes"] / result["seconds"] / 1e6, 1),
        "rows_per_pg_cpu_s": round(rows / pg_cpu) if pg_cpu else None,
        "mbyte_per_pg_cpu_s": round(result["bytes"] / pg_cpu / 1e6, 1) if pg_cpu else None,
        "wal_bytes_per_row": round(float(lsn_bytes[0]) / rows, 1),
        "wal_records_per_row": round((wal1[1] - wal0[1]) / rows, 2),
        "wal_fpi": wal1[2] - wal0[2],
        "disk_bytes_per_row": round(counted[2] / rows, 1),
    }


def commit_rates(lab: Lab, seconds: float, repeat: int) -> dict[str, Any]:
    """Commits/s of a one-row INSERT, with and without a NOTIFY, from 1 and 8 clients."""
    conninfo = lab.backend.admin_conninfo("pgvpn", superuser=True)
    with psycopg.connect(conninfo, autocommit=True) as conn:
        conn.execute(f"DROP SCHEMA IF EXISTS {PROBE} CASCADE; CREATE SCHEMA {PROBE}; "
                     f"CREATE TABLE {PROBE}.t (id bigint GENERATED ALWAYS AS IDENTITY, "
                     "data bytea)")
    rates: dict[str, list[float]] = {}
    try:
        for _ in range(repeat):
            for name, text in COMMIT_SCRIPTS.items():
                script = Path(f"/tmp/{PROBE}-{os.getpid()}-{name}.sql")
                script.write_text(text)
                try:
                    for clients in (1, 8):
                        done = subprocess.run(
                            [PGBENCH, "-n", "-M", "prepared", "-c", str(clients), "-j", "1",
                             "-T", f"{seconds:g}", "-f", str(script), conninfo],
                            capture_output=True, text=True, timeout=seconds + 60)
                        tps = [line.split()[2] for line in done.stdout.splitlines()
                               if line.startswith("tps")]
                        if done.returncode != 0 or not tps:
                            raise LabError(f"pgbench failed: {done.stderr.strip()[-300:]}")
                        rates.setdefault(f"{name}_{clients}_clients", []).append(float(tps[0]))
                finally:
                    script.unlink(missing_ok=True)
    finally:
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA IF EXISTS {PROBE} CASCADE")
    for key, values in rates.items():
        print(f"commits/s {key}: " + ", ".join(f"{v:.0f}" for v in values), file=sys.stderr)
    return {key: {"runs": [round(v) for v in values], "median": round(statistics.median(values)),
                  "min": round(min(values)), "max": round(max(values))}
            for key, values in rates.items()}


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median and min..max of each figure over the repeats."""
    out: dict[str, Any] = {}
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            values = [r[key] for r in runs if r[key] is not None]
            out[key] = {"median": statistics.median(values), "min": min(values),
                        "max": max(values)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="1500,65000")
    parser.add_argument("--repeat", type=int, default=3, choices=range(1, 11))
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--commits", action="store_true",
                        help="also measure commits/s with and without NOTIFY (pgbench)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    if not 0.5 <= args.seconds <= 60:
        parser.error("--seconds: 0.5 to 60")
    try:
        sizes = [int(s) for s in args.sizes.split(",") if s.strip()]  # "": --commits only
    except ValueError:
        parser.error("--sizes: whole numbers of bytes, comma-separated (e.g. 1500,65000)")
    if not all(20 <= s <= 65535 for s in sizes):
        parser.error("--sizes: each 20 to 65535 bytes")
    lab = Lab.current()
    backend = lab.backend
    if not isinstance(backend, NetnsBackend):
        parser.error("netns labs only (the CPU is read from the namespaces' processes)")
    namespaces = [backend.namespace(h.name) for h in lab.topology.databases]
    idle0, t0 = namespace_cpu(namespaces), time.monotonic()
    time.sleep(3)
    idle1, t1 = namespace_cpu(namespaces), time.monotonic()
    report: dict[str, Any] = {
        "lab": os.environ.get("PGVPN_LAB_NAME", "pgvpn"), "namespaces": namespaces,
        "idle_cpu_s_per_s": {k: round((idle1[k] - idle0[k]) / (t1 - t0), 3) for k in idle0},
        "loadavg": Path("/proc/loadavg").read_text().split()[:3], "sizes": {}}
    for size in sizes:
        runs = [one_run(lab, size, args.seconds, namespaces) for _ in range(args.repeat)]
        for run in runs:
            print(f"{size} B: {run['rows_per_s']} rows/s {run['mbyte_per_s']} MB/s, postgres "
                  f"{run['postgres_cpu_s']} CPU-s -> {run['rows_per_pg_cpu_s']} rows/CPU-s, "
                  f"client {run['client_cpu_s']} CPU-s, WAL {run['wal_bytes_per_row']} B/row, "
                  f"machine {run['machine_busy_cores']} cores busy", file=sys.stderr)
        report["sizes"][str(size)] = {"runs": runs, "summary": summary(runs)}
    if args.commits:
        report["commits_per_s"] = commit_rates(lab, args.seconds, args.repeat)
    text = json.dumps(report, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LabError as exc:
        sys.exit(f"ingest-cost: {exc}")
