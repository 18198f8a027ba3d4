"""`lab bench --failover`'s arithmetic and report, with no lab: when the tunnel counts as
resumed after a kill, what fails the run, and report.md's table."""

from __future__ import annotations

from typing import Any

from lab.failover import failures, outage, render_failover_markdown


def replies(*spans: tuple[float, float]) -> list[float]:
    """An echo reply every 0.1 s within each (start, end) span."""
    return [round(start + i * 0.1, 3) for start, end in spans
            for i in range(round((end - start) / 0.1) + 1)]


def test_the_outage_ends_with_the_first_reply_after_the_silence() -> None:
    # replies until 100.3 (echoes committed before the kill at 100.0 still arrive), then
    # nothing until 107.5
    seen = outage(replies((95.0, 100.3), (107.5, 110.0)), killed_at=100.0)
    assert seen == {"resumed_s": 7.5, "silent_s": 7.2}


def test_no_reply_after_the_kill_means_the_tunnel_never_resumed() -> None:
    assert outage(replies((95.0, 99.9)), killed_at=100.0) == {"resumed_s": None,
                                                               "silent_s": None}


def report(**summary: Any) -> dict[str, Any]:
    kills = [{"number": 1, "killed": "postgres-1", "promoted": "postgres-2",
              "promoted_s": 6.1, "resumed_s": 7.5, "silent_s": 7.2, "rejoined_s": 12.0,
              "killed_at": 100.0}]
    whole = {"kills": 1, "resumed": 1, "resumed_max_s": 7.5, "resumed_median_s": 7.5,
             "rows_lost": 0, "duplicates": 0, "gaps": 0, **summary}
    return {"backend": "netns", "topology": "ha.yaml", "client": "peer-a",
            "server": "peer-b", "seconds": 34, "kills": kills, "summary": whole,
            "receiver_mbps": 80.0, "zero_throughput_s": 8}


def test_a_clean_run_fails_nothing_and_its_table_has_one_row_per_kill() -> None:
    clean = report()
    clean["failed"] = failures(clean)
    assert clean["failed"] == []
    text = render_failover_markdown(clean)
    assert "| 1 | postgres-1 | postgres-2 | 6.1 | 7.5 | 7.2 | 12.0 |" in text
    assert "rows lost: 0, duplicates: 0" in text and "Failed" not in text


def test_a_lost_row_or_a_tunnel_that_never_came_back_fails_the_run() -> None:
    broken = report(rows_lost=2, gaps=2)
    broken["kills"][0]["resumed_s"] = None
    assert failures(broken) == ["kill 1: the tunnel did not resume",
                                "log: 2 row(s) lost, 0 duplicate(s), 2 gap(s)"]
