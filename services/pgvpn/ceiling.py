"""`pgvpn ceiling`: what the database ingests with no tunnel at all.

The tunnel can never carry more than its database logs, so the bench judges the
tunnel by the ratio of the two, measured in the same run. This writes rows of a
given size for a few seconds, as the agent's uplink does under load (its own
connection settings, TLS and commit mode, a binary COPY per batch committed on its
own, then a NOTIFY) but from memory instead of a TUN device, into a table of the
same shape as the log that the owner made for the purpose (`lab bench` makes
`pgvpn_bench.ingest` and drops it after), never into the log itself.
"""

from __future__ import annotations

import os
import re
import time
from typing import Any

import psycopg
from psycopg import sql

from pgvpn.errors import PgvpnError
from pgvpn.transports.base import Session
from pgvpn.transports.batched import copy_batch, copy_statement, notify

TABLE_NAME = re.compile(r"([a-z_][a-z0-9_]{0,62})\.([a-z_][a-z0-9_]{0,62})")
# A peer may insert into the log itself: rows numbered from 1 there would stand beside
# its agent's own numbering, so the tool refuses pgvpn's schemas whatever the grants.
FORBIDDEN_SCHEMAS = ("pgvpn", "pgvpn_admin")


def table_name(text: str) -> str:
    """`schema.table`, both plain lower-case identifiers, outside pgvpn's own schemas
    (checked, returned as given)."""
    match = TABLE_NAME.fullmatch(text)
    if match is None:
        raise ValueError("give the table as schema.table, in lower-case letters, digits "
                         "and _ (e.g. pgvpn_bench.ingest)")
    if match[1] in FORBIDDEN_SCHEMAS:
        raise ValueError(f"the ceiling never writes schema {match[1]} (the packet log and its "
                         "administration): give a scratch table of the log's shape, e.g. "
                         "pgvpn_bench.ingest")
    return text


def measure(session: Session, table: str, *, seconds: float, size: int,
            batch: int) -> dict[str, Any]:
    """Write `batch`-row batches of `size`-byte rows into `table` for `seconds`.

    Returns rows, bytes, batches, the seconds taken and the rate in Mbit/s.
    """
    statement = copy_statement(sql.Identifier(*table_name(table).split(".")))
    packet = bytes([0x45]) + os.urandom(size - 1)  # incompressible, like real traffic
    packets = [packet] * batch
    config = session.config
    # A channel nobody listens on: the NOTIFY costs its commit, and no agent wakes up.
    channel = f"pgvpn.ceiling.{config.name}"
    conn = session.connect("ceiling")
    try:
        batches = 0
        started = time.monotonic()
        deadline = started + seconds
        while time.monotonic() < deadline:
            copy_batch(conn, statement, config.peer or config.name, batches * batch + 1, packets)
            notify(conn, channel)
            batches += 1
        elapsed = time.monotonic() - started
    except (psycopg.errors.UndefinedTable, psycopg.errors.InvalidSchemaName):
        raise PgvpnError(f"table {table} does not exist: the database owner makes it "
                         "(lab bench makes pgvpn_bench.ingest for the run)") from None
    except psycopg.errors.InsufficientPrivilege as exc:
        raise PgvpnError(f"this peer may not write {table}: {exc.diag.message_primary}; "
                         "the database owner grants INSERT for the run") from None
    finally:
        conn.close()
    rows = batches * batch
    return {"table": table, "rows": rows, "bytes": rows * size, "batches": batches,
            "row_bytes": size, "batch_rows": batch, "seconds": round(elapsed, 3),
            "mbps": round(rows * size * 8 / elapsed / 1e6, 2)}
