"""Unit tests: durations and times as people type them (pgvpn.timespec), to the limits."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest

from pgvpn.timespec import (
    TimeSpecError,
    format_duration,
    parse_duration,
    parse_positive_duration,
    parse_time,
)

NOW = datetime(2025, 11, 25, 12, 0, tzinfo=UTC)
HOW = "use a number and a unit (s, m, h, d or w), e.g. 7d, 12h, 30m or 1h30m"


@pytest.mark.parametrize(("seconds", "text"), [
    (0, "0s"), (0.25, "0.25s"), (59, "59s"), (60, "1m"), (61, "1m1s"), (3600, "1h"),
    (86400 + 7200 + 180, "1d2h"), (-90, "-1m30s"), (-0.5, "-0.5s")])
def test_short_forms(seconds: float, text: str) -> None:
    """Below a minute in seconds, else the two largest units; negative with a '-'."""
    assert format_duration(timedelta(seconds=seconds)) == text


def test_spaces_inside_a_duration_are_ignored_everywhere() -> None:
    assert parse_duration("1h 30m") == timedelta(minutes=90)
    assert parse_time(" 1h 30m ", NOW) == NOW - timedelta(minutes=90)


def test_a_bad_duration_says_how_to_write_one() -> None:
    with pytest.raises(TimeSpecError) as caught:
        parse_duration("7")
    assert str(caught.value) == f"bad duration '7': {HOW}"


def test_the_longest_duration_is_a_century() -> None:
    assert parse_duration("36500d") == timedelta(days=36500)
    with pytest.raises(TimeSpecError) as caught:
        parse_duration("36501d")
    assert str(caught.value) == "bad duration '36501d': longer than 36500d"


def test_positive_durations_refuse_zero_only() -> None:
    assert parse_positive_duration("1s") == timedelta(seconds=1)
    assert parse_positive_duration("2d") == timedelta(days=2)
    with pytest.raises(TimeSpecError) as caught:
        parse_positive_duration("0s")
    assert str(caught.value) == "bad duration '0s': must be longer than zero"
    with pytest.raises(TimeSpecError, match="bad duration 'soon'"):
        parse_positive_duration("soon")


def test_an_iso_time_keeps_its_own_offset() -> None:
    # +05:45 is no zone a test machine runs in, so a conversion to local time shows.
    moment = parse_time("2025-11-25T11:00:00+05:45", NOW)
    assert moment.utcoffset() == timedelta(hours=5, minutes=45)


def test_a_bad_time_says_what_a_time_looks_like() -> None:
    with pytest.raises(TimeSpecError) as caught:
        parse_time("yesterday", NOW)
    assert str(caught.value) == (
        "bad time 'yesterday': give a duration ago (10m, 2h, 1d) or an ISO time such as "
        "2025-11-25T14:30 or '2025-11-25 14:30:00+00'")


def test_a_time_the_local_zone_pushes_out_of_range(monkeypatch: pytest.MonkeyPatch) -> None:
    """At UTC-12 (a POSIX TZ string: no zone database needed) the last second of 9999
    has no UTC equivalent; that is one line too, not an OverflowError."""
    monkeypatch.setenv("TZ", "<-12>12")
    time.tzset()
    try:
        with pytest.raises(TimeSpecError) as caught:
            parse_time("9999-12-31T23:59:59", NOW)
    finally:
        monkeypatch.undo()
        time.tzset()
    assert str(caught.value) == "bad time '9999-12-31T23:59:59': out of range"
