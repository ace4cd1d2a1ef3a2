"""Dates and times given on the command line (and DAG params): parsed, bounded, one-line reasons.

Why bounds: every command does date arithmetic past what it is given (a report reads the 28
days before its day, the signals the 28 after, a window ends the day after its last day), and
pandas/matplotlib stop at 2262. Python's `date` stops at 9999-12-31 and `0001-01-01`, where
that arithmetic raised `OverflowError` tracebacks. brandmon's data starts no earlier than 1990
(the normaliser refuses older posts), so days from 1970-01-01 to 2199-12-31 are accepted
everywhere and anything else is refused with the range in the message.
"""

from __future__ import annotations

import datetime as dt

MIN_DAY = dt.date(1970, 1, 1)
MAX_DAY = dt.date(2199, 12, 31)
MAX_CHARS = 64  # the longest ISO date/time with an offset and microseconds is ~32


class BadDate(ValueError):
    """A date or time argument that is refused; `str(exc)` is the one-line reason."""


def _range_reason(day: dt.date, text: str) -> str:
    return f"{text!r} is outside the days brandmon handles ({MIN_DAY} to {MAX_DAY})"


def check_day(day: dt.date, text: str | None = None) -> dt.date:
    """`day` if within MIN_DAY..MAX_DAY, else BadDate."""
    if not MIN_DAY <= day <= MAX_DAY:
        raise BadDate(_range_reason(day, text if text is not None else day.isoformat()))
    return day


def parse_day(value: object) -> dt.date:
    """`YYYY-MM-DD` -> date; BadDate (with the reason) for anything else or out of range."""
    if isinstance(value, dt.datetime):
        value = value.date()
    if isinstance(value, dt.date):
        return check_day(value)
    text = str(value).strip()
    if len(text) > MAX_CHARS:
        raise BadDate(f"not a date (YYYY-MM-DD): {text[:20]!r}... is too long")
    try:
        day = dt.date.fromisoformat(text)
    except ValueError:
        raise BadDate(f"not a date (YYYY-MM-DD, a real calendar day): {text!r}") from None
    return check_day(day, text)


def parse_instant(value: object) -> dt.datetime:
    """`2026-10-01`, `2026-10-01T06:00`, `...Z` or with an offset (no zone means UTC) -> aware UTC
    datetime; BadDate for anything else or outside MIN_DAY..MAX_DAY (in UTC)."""
    text = str(value).strip()
    if len(text) > MAX_CHARS:
        raise BadDate(f"not an ISO date/time: {text[:20]!r}... is too long")
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise BadDate(f"not an ISO date/time: {text!r} (e.g. 2026-10-01 or 2026-10-01T06:00Z)") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    if not MIN_DAY <= when.date() <= MAX_DAY:  # checked before the shift to UTC, which can overflow
        raise BadDate(_range_reason(when.date(), text))
    when = when.astimezone(dt.UTC)
    check_day(when.date(), text)
    return when


def as_utc(value: dt.datetime | dt.date | str) -> dt.datetime:
    """The one UTC coercion: an aware stdlib UTC datetime from a stdlib or pendulum datetime
    (naive means UTC), a date (its midnight UTC) or an ISO string. Airflow hands pendulum
    datetimes, which are rebuilt as stdlib ones so that they compare, hash and print alike."""
    if isinstance(value, str):
        value = dt.datetime.fromisoformat(value)
    if not isinstance(value, dt.datetime):
        if not isinstance(value, dt.date):
            raise TypeError(f"expected a datetime, got {type(value).__name__}")
        return dt.datetime.combine(value, dt.time(), dt.UTC)
    if value.tzinfo is None:
        value = value.replace(tzinfo=dt.UTC)
    value = value.astimezone(dt.UTC)
    return dt.datetime(value.year, value.month, value.day, value.hour, value.minute, value.second,
                       value.microsecond, tzinfo=dt.UTC)


def check_span(start: dt.date, end: dt.date, what: str = "--end") -> None:
    """Refuse an inclusive day range whose end is before its start."""
    if end < start:
        raise BadDate(f"{what} {end} is before --start {start}")
