"""Integration: `pgvpn ceiling`, the database's own rate that `lab bench` judges the
tunnel by. It runs as a peer, with that agent's settings, and writes only a scratch
table the owner made for it: never the packet log."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from lab import ceiling
from tests.conftest import ROOT, LabHandle

TABLE = ceiling.TABLE


def ceiling_as(lab: LabHandle, peer: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`pgvpn ARGS` in the peer's host with its agent's own environment, as lab bench runs it."""
    code = ("import json, sys; from lab.controller import Lab; "
            "r = Lab.current().backend.exec_pgvpn_as_agent(sys.argv[1], sys.argv[2:], "
            "timeout=60); print(json.dumps([r.returncode, r.stdout, r.stderr]))")
    done = subprocess.run([sys.executable, "-c", code, peer, "ceiling", *args],
                          capture_output=True, text=True, env=lab.env, cwd=ROOT, check=True)
    returncode, stdout, stderr = json.loads(done.stdout)
    return subprocess.CompletedProcess(args, returncode, stdout, stderr)


@pytest.fixture
def scratch(netns_lab: LabHandle) -> Iterator[LabHandle]:
    """The table lab bench makes, with its SQL; peer-a may not write it yet."""
    netns_lab.sql(ceiling.SCRATCH_SQL)
    yield netns_lab
    netns_lab.sql(f"DROP SCHEMA {ceiling.SCHEMA} CASCADE")


def test_the_ceiling_writes_its_table_as_the_peer_and_never_the_log(scratch: LabHandle
                                                                     ) -> None:
    lab = scratch
    refused = ceiling_as(lab, "peer-a", TABLE, "--seconds", "0.3", "--json")
    assert refused.returncode == 2, refused
    assert f"this peer may not write {TABLE}: permission denied" in refused.stderr
    assert "the database owner grants INSERT" in refused.stderr

    lab.sql(ceiling.GRANTS_SQL.format(role="pgvpn_peer_a"))  # the bench's own grants
    logged_before = lab.sql("SELECT count(*) FROM pgvpn.packets")[0][0]
    done = ceiling_as(lab, "peer-a", TABLE, "--seconds", "1", "--size", "1400",
                      "--batch", "64", "--json")
    assert done.returncode == 0, done
    result = json.loads(done.stdout)
    rows = lab.sql(f"SELECT count(*), count(DISTINCT seq), min(seq), max(seq), "
                   f"sum(length), array_agg(DISTINCT sender), array_agg(DISTINCT receiver), "
                   f"count(DISTINCT md5(data)) FROM {TABLE}")[0]
    # every row reported is in the table, numbered 1..n, as peer-a (the database's default)
    assert rows == (result["rows"], result["rows"], 1, result["rows"], result["bytes"],
                    ["peer-a"], ["peer-b"], 1), rows
    assert result["rows"] == 64 * result["batches"] > 0 and result["bytes"] == 1400 * result[
        "rows"]
    assert result["mbps"] == pytest.approx(result["bytes"] * 8 / result["seconds"] / 1e6,
                                           rel=0.01)
    # the log got none of them: whatever it gained meanwhile is the agents' own traffic
    written = lab.sql(f"SELECT md5(data) FROM {TABLE} LIMIT 1")[0][0]
    assert lab.sql("SELECT count(*) FROM pgvpn.packets WHERE md5(data) = %s",
                   [written])[0][0] == 0
    assert lab.sql("SELECT count(*) FROM pgvpn.packets")[0][0] - logged_before < result["rows"]
    # ids of its own: the log's id sequence did not move for them
    assert lab.sql(f"SELECT min(id), max(id) FROM {TABLE}")[0] == (1, result["rows"])


def test_the_ceiling_says_what_is_wrong_before_writing_anything(netns_lab: LabHandle) -> None:
    for args, said in (
            (["pgvpn.packets"], "the ceiling never writes schema pgvpn (the packet log"),
            (["pgvpn_admin.x"], "the ceiling never writes schema pgvpn_admin"),
            (["ingest"], "give the table as schema.table"),
            (["Bench.ingest"], "give the table as schema.table"),
            (["pgvpn_bench.ingest\n"], "give the table as schema.table"),
            ([TABLE, "--seconds", "0"], "must be a number 0.1-60"),
            ([TABLE, "--size", "65536"], "1-65535"),
            ([TABLE, "--batch", "65536", "--size", "65535"], "more than 64 MiB a batch"),
            (["tap_nowhere.ingest", "--seconds", "0.2"],
             "table tap_nowhere.ingest does not exist: the database owner makes it")):
        done = ceiling_as(netns_lab, "peer-a", *args)
        assert done.returncode == 2 and said in done.stderr, (args, done)
        assert "Traceback" not in done.stderr
