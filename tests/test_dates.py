"""Command-line dates and times (pipeline.dates): examples and Hypothesis properties. They never
raise anything but `BadDate` with a reason, round-trip, and refuse days out of range."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.dates import MAX_DAY, MIN_DAY, BadDate, check_span, parse_day, parse_instant

in_range = st.dates(min_value=MIN_DAY, max_value=MAX_DAY)
out_of_range = st.one_of(st.dates(max_value=MIN_DAY - dt.timedelta(days=1)), st.dates(min_value=MAX_DAY + dt.timedelta(days=1)))
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.text(max_size=80), st.from_regex(r"\A-?\d{1,6}-\d{1,3}-\d{1,3}(T\d\d:\d\d(:\d\d)?)?(Z|[+-]\d\d:\d\d)?\Z")))
def test_any_text_is_a_value_or_a_bad_date(text: str) -> None:
    for parse in (parse_day, parse_instant):
        try:
            value = parse(text)
        except BadDate as exc:
            assert str(exc) and "\n" not in str(exc)
        else:
            day = value.date() if isinstance(value, dt.datetime) else value
            assert MIN_DAY <= day <= MAX_DAY


@given(in_range)
def test_days_round_trip(day: dt.date) -> None:
    assert parse_day(day.isoformat()) == day
    assert parse_day(f"  {day.isoformat()}\n") == day
    assert parse_instant(day.isoformat()) == dt.datetime.combine(day, dt.time(), dt.UTC)


@settings(deadline=None)
@given(st.datetimes(min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2199, 12, 30)), offsets)
def test_instants_round_trip_to_the_same_utc_instant(naive: dt.datetime, tz: dt.tzinfo) -> None:
    when = naive.replace(tzinfo=tz)
    parsed = parse_instant(when.isoformat())
    assert parsed == when and parsed.tzinfo == dt.UTC
    assert parse_instant(naive.isoformat()) == naive.replace(tzinfo=dt.UTC)  # no zone: UTC
    assert parse_instant(when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")) == when


@given(out_of_range)
def test_days_out_of_range_are_refused(day: dt.date) -> None:
    with pytest.raises(BadDate, match="outside the days brandmon handles"):
        parse_day(day.isoformat())
    with pytest.raises(BadDate, match="outside the days brandmon handles"):
        parse_instant(day.isoformat())


def test_examples() -> None:
    with pytest.raises(BadDate, match="a real calendar day"):
        parse_day("2026-02-30")
    with pytest.raises(BadDate, match="outside"):
        parse_instant("9999-12-31T23:30-05:00")  # would overflow in UTC
    with pytest.raises(BadDate, match="outside"):
        parse_instant("0001-01-01T00:00+01:00")
    with pytest.raises(BadDate, match="too long"):
        parse_day("2026-10-01" + " " * 100 + "x")
    with pytest.raises(BadDate, match="--end 2026-10-01 is before --start 2026-10-02"):
        check_span(dt.date(2026, 10, 2), dt.date(2026, 10, 1))


def test_as_utc_examples():
    from pipeline.dates import as_utc

    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert as_utc(dt.datetime(2026, 1, 1, 1)) == dt.datetime(2026, 1, 1, 1, tzinfo=dt.UTC)  # naive is UTC
    assert as_utc(dt.datetime(2026, 1, 1, 1, tzinfo=plus2)) == dt.datetime(2025, 12, 31, 23, tzinfo=dt.UTC)
    assert as_utc(dt.date(2026, 10, 1)) == dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
    assert as_utc("2026-10-01T06:00+02:00") == dt.datetime(2026, 10, 1, 4, tzinfo=dt.UTC)
    with pytest.raises(TypeError):
        as_utc(5)  # type: ignore[arg-type]


@given(st.datetimes(min_value=dt.datetime(1971, 1, 1), max_value=dt.datetime(2199, 1, 1)), offsets)
def test_as_utc_keeps_the_instant_and_is_plain_utc(when, tz):
    from pipeline.dates import as_utc

    out = as_utc(when.replace(tzinfo=tz))
    assert out == when.replace(tzinfo=tz) and out.tzinfo is dt.UTC and type(out) is dt.datetime
    assert as_utc(out) == out
