"""Durations and points in time as people type them: 7d, 12h, 1h30m, or an ISO timestamp.

Shared by retention (how old is too old) and the log filters (since / until), so
that every command reads "30m" the same way and rejects typos with one clear line.
"""

from __future__ import annotations

import re
from datetime import datetime, timedelta

from pgvpn.errors import PgvpnError

UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_PART = re.compile(r"(\d+(?:\.\d+)?)([smhdw])", re.ASCII)
_WHOLE = re.compile(r"(?:\d+(?:\.\d+)?[smhdw])+", re.ASCII)
# Longer than anything a log is kept or looked back at, and far from datetime's limits.
MAX_DURATION = timedelta(days=100 * 365)


class TimeSpecError(PgvpnError):
    """A duration or time that cannot be read."""


def parse_duration(text: str) -> timedelta:
    """'7d', '12h', '30m', '90s', '1h30m', '2w' -> timedelta; anything else is an error.

    A bare number is refused on purpose: "7" could be days or seconds.
    """
    compact = text.strip().lower().replace(" ", "")
    if not compact or not _WHOLE.fullmatch(compact):
        raise TimeSpecError(f"bad duration {text!r}: use a number and a unit (s, m, h, d or "
                            "w), e.g. 7d, 12h, 30m or 1h30m")
    seconds = sum(float(number) * UNITS[unit] for number, unit in _PART.findall(compact))
    if seconds > MAX_DURATION.total_seconds():
        raise TimeSpecError(f"bad duration {text!r}: longer than {MAX_DURATION.days}d")
    return timedelta(seconds=seconds)


def parse_positive_duration(text: str) -> timedelta:
    """A duration that must be longer than zero (retention, intervals)."""
    duration = parse_duration(text)
    if duration <= timedelta(0):
        raise TimeSpecError(f"bad duration {text!r}: must be longer than zero")
    return duration


def parse_time(text: str, now: datetime) -> datetime:
    """A point in time: a duration ago ('10m' = ten minutes before `now`) or an ISO time.

    ISO times without an offset are in the local time zone, as `date` prints them.
    """
    stripped = text.strip()
    if stripped.lower() == "now":
        return now
    if _WHOLE.fullmatch(stripped.lower().replace(" ", "")):
        return now - parse_duration(stripped)
    try:
        moment = datetime.fromisoformat(stripped)
        return moment if moment.tzinfo is not None else moment.astimezone()
    except ValueError:
        raise TimeSpecError(f"bad time {text!r}: give a duration ago (10m, 2h, 1d) or an ISO "
                            "time such as 2025-11-25T14:30 or '2025-11-25 14:30:00+00'"
                            ) from None
    except OverflowError:  # the local time zone pushed it past year 1 or 9999
        raise TimeSpecError(f"bad time {text!r}: out of range") from None


def format_duration(duration: timedelta) -> str:
    """The short form parse_duration reads back: 1d2h, 5m32s, 0.25s."""
    total = duration.total_seconds()
    if total < 0:
        return "-" + format_duration(-duration)
    if total < 60:
        return f"{total:.3g}s"
    parts = []
    remaining = round(total)
    for unit in ("d", "h", "m", "s"):
        count, remaining = divmod(remaining, UNITS[unit])
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts[:2])
