"""The normaliser's UTC time coercion (`parse_time`, `check_time`), by Hypothesis: any value is an
aware UTC datetime or a `Reject` with a one-line reason; ISO strings and epoch numbers round-trip
to the same instant; times out of range are refused."""

from __future__ import annotations

import datetime as dt
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.sources.parsing import MIN_TIME, Reject, check_time, parse_time

NOW = dt.datetime(2026, 10, 2, 12, tzinfo=dt.UTC)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: dt.timezone(dt.timedelta(minutes=m)))
anything = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=80),
              st.from_regex(r"\A-?\d{1,5}-\d\d-\d\d([T ]\d\d:\d\d(:\d\d(\.\d{1,9})?)?)?(Z|z|[+-]\d\d:?\d\d)?\Z"),
              st.from_regex(r"\A\s*-?\d{1,20}(\.\d{0,6})?\s*\Z")),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=5), children, max_size=3)),
    max_leaves=5,
)


@settings(max_examples=1000, deadline=None)
@given(anything)
def test_any_value_is_a_utc_time_or_a_reject_with_a_reason(value) -> None:
    try:
        when = parse_time(value)
    except Reject as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert when.tzinfo is dt.UTC or when.utcoffset() == dt.timedelta(0)
    try:
        check_time(when, NOW)
    except Reject as exc:
        assert "out of range" in str(exc)


@settings(max_examples=500, deadline=None)
@given(st.datetimes(min_value=dt.datetime(1990, 1, 2), max_value=dt.datetime(2100, 1, 1)), offsets)
def test_iso_strings_round_trip_to_the_same_instant(naive: dt.datetime, tz: dt.tzinfo) -> None:
    when = naive.replace(tzinfo=tz)
    assert parse_time(when.isoformat()) == when
    assert parse_time(f" {when.isoformat()} ") == when
    assert parse_time(json.loads(json.dumps(when.isoformat()))) == when
    assert parse_time(when.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")) == when
    assert parse_time(naive.isoformat()) == naive.replace(tzinfo=dt.UTC)  # no zone: UTC


@settings(max_examples=500, deadline=None)
@given(st.integers(int(MIN_TIME.timestamp()), int(dt.datetime(2100, 1, 1, tzinfo=dt.UTC).timestamp())))
def test_epoch_seconds_and_milliseconds_round_trip(seconds: int) -> None:
    expected = dt.datetime.fromtimestamp(seconds, dt.UTC)
    assert parse_time(seconds) == expected
    assert parse_time(str(seconds)) == expected
    assert parse_time(seconds * 1000) == expected


@given(st.one_of(st.datetimes(max_value=dt.datetime(1989, 12, 31)),
                 st.datetimes(min_value=dt.datetime(2026, 10, 5), max_value=dt.datetime(9999, 12, 30))))
def test_times_out_of_range_are_refused(naive: dt.datetime) -> None:
    with pytest.raises(Reject, match="out of range"):
        check_time(parse_time(naive.replace(tzinfo=dt.UTC).isoformat()), NOW)


@pytest.mark.parametrize("value", ["0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", 1e15, -1e15, float("nan"),
                                   float("inf"), "1e400", True, [], {}, "２０２６-10-02"])
def test_examples_are_rejected(value) -> None:
    with pytest.raises(Reject):
        check_time(parse_time(value), NOW)
