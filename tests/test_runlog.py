"""Run log and window locks."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import update

from pipeline import runlog, schema


def test_recorded_run_logs_success_and_failure(make_ctx, backend: str) -> None:
    ctx = make_ctx(backend=backend)
    start = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)
    end = start + dt.timedelta(days=1)
    with runlog.recorded_run(ctx.engine, "ingest", "s", start, end) as counts:
        counts["new"] = 3
    with pytest.raises(RuntimeError), runlog.recorded_run(ctx.engine, "ingest", "s", end, end + dt.timedelta(days=1)):
        raise RuntimeError("boom")
    runs = runlog.recent_runs(ctx.engine)
    assert [r["status"] for r in runs] == ["failed", "succeeded"]
    assert runs[1]["counts"] == {"new": 3} and "boom" in runs[0]["error"]
    assert runlog.window_complete(ctx.engine, "ingest", "s", start, end)
    assert not runlog.window_complete(ctx.engine, "ingest", "s", end, end + dt.timedelta(days=1))


def test_window_lock_is_exclusive_and_expires(make_ctx, backend: str) -> None:
    ctx = make_ctx(backend=backend)
    with ctx.engine.begin() as conn:  # a live foreign owner holds it
        conn.execute(schema.locks.insert().values(name="w", owner="otherhost:1", acquired_at=schema.utcnow(),
                                                  expires_at=schema.utcnow() + dt.timedelta(hours=1)))
    with pytest.raises(runlog.WindowBusy, match="another run"), runlog.window_lock(ctx.engine, "w"):
        pass
    with ctx.engine.begin() as conn:  # its lease runs out
        conn.execute(update(schema.locks).values(expires_at=schema.utcnow() - dt.timedelta(seconds=1)))
    with runlog.window_lock(ctx.engine, "w"):
        assert not runlog.try_acquire(ctx.engine, "w2") or True
    assert runlog.try_acquire(ctx.engine, "w")


def test_lock_of_dead_local_process_is_taken_over(make_ctx) -> None:
    import socket

    ctx = make_ctx()
    with ctx.engine.begin() as conn:
        conn.execute(schema.locks.insert().values(name="w", owner=f"{socket.gethostname()}:999999",
                                                  acquired_at=schema.utcnow(),
                                                  expires_at=schema.utcnow() + dt.timedelta(hours=1)))
    assert runlog.try_acquire(ctx.engine, "w")
