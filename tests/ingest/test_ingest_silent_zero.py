"""The silent-zero warning: loud when a window fetched items and kept none, quiet otherwise."""

from __future__ import annotations

from pipeline.ingest.jobs import silent_zero


def test_warns_when_every_item_fell_outside_the_window() -> None:
    msg = silent_zero({"fetched": 40, "out_of_window": 40})
    assert msg is not None and "fetched 40 items, stored 0" in msg


def test_quiet_when_anything_was_stored_quarantined_or_superseded() -> None:
    assert silent_zero({"fetched": 0}) is None
    assert silent_zero({"fetched": 5, "unchanged": 5}) is None
    assert silent_zero({"fetched": 5, "rejected": 1, "out_of_window": 4}) is None
    # Lost to a later copy stored by another window (archive days in any order): accounted for.
    assert silent_zero({"fetched": 5, "superseded": 5}) is None
