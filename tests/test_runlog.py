"""Run log and window locks."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import update

from pipeline import runlog, schema
from pipeline.errors import ConfigError


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


HOLDER = """
import sys, time
from pipeline.context import Context
from pipeline.runlog import window_lock
from pipeline.settings import load_settings

ctx = Context(load_settings())
with window_lock(ctx.engine, sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


def _holder(ctx, name: str, **env: str):
    """A child process that takes lock `name` and holds it until killed."""
    import os
    import subprocess
    import sys

    s = ctx.settings
    child_env = {**os.environ, "BRANDMON_DATABASE_URL": s.database_url, "BRANDMON_STORAGE_URL": s.storage_url,
                 "BRANDMON_HOME": str(s.home), "BRANDMON_AUTHOR_SALT": s.author_salt.get(), **env}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, name], env=child_env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline() if proc.stdout else ""
    assert line.strip() == "held", proc.stderr.read() if proc.stderr else ""
    return proc


def _sigkill(proc) -> None:
    import signal

    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    proc.stdout.close()
    proc.stderr.close()


def test_lock_of_a_sigkilled_holder_on_another_host_expires_after_the_ttl(make_ctx, backend: str) -> None:
    """The holder renews its lease while alive (well past the TTL); SIGKILLed, it stops, and the
    lock is taken over once the TTL has run out (not before)."""
    import time

    ttl = 1.5
    ctx = make_ctx(backend=backend)
    proc = _holder(ctx, "ingest:w", BRANDMON_LOCK_HOST="another-host", BRANDMON_LOCK_TTL_S=str(ttl))
    try:
        until = time.monotonic() + 3 * ttl
        while time.monotonic() < until:  # alive: the heartbeat keeps the lease fresh
            assert not runlog.try_acquire(ctx.engine, "ingest:w")
            time.sleep(0.1)
    finally:
        _sigkill(proc)
    killed = time.monotonic()
    assert not runlog.try_acquire(ctx.engine, "ingest:w")  # the last renewal still holds
    while not runlog.try_acquire(ctx.engine, "ingest:w"):
        assert time.monotonic() - killed < ttl + 3, "the dead holder's lock never expired"
        time.sleep(0.05)
    waited = time.monotonic() - killed
    assert ttl * 0.5 <= waited < ttl + 3
    with ctx.engine.connect() as conn:
        assert conn.execute(schema.locks.select()).mappings().one()["owner"] == runlog.owner_id()


def test_lock_of_a_sigkilled_holder_on_this_host_is_taken_over_at_once(make_ctx, backend: str) -> None:
    ctx = make_ctx(backend=backend)
    proc = _holder(ctx, "ingest:w")  # default TTL: 120 s
    try:
        assert not runlog.try_acquire(ctx.engine, "ingest:w")
    finally:
        _sigkill(proc)
    assert runlog.try_acquire(ctx.engine, "ingest:w")


def test_a_reused_pid_does_not_keep_a_dead_holders_lock(make_ctx) -> None:
    """The pid in the lock is alive again, but as a process started after the lock was taken."""
    import socket
    import subprocess
    import sys

    ctx = make_ctx()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        with ctx.engine.begin() as conn:
            conn.execute(schema.locks.insert().values(
                name="w", owner=f"{socket.gethostname()}:{sleeper.pid}",
                acquired_at=schema.utcnow() - dt.timedelta(minutes=10), expires_at=schema.utcnow() + dt.timedelta(hours=1)))
        assert runlog.try_acquire(ctx.engine, "w")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_live_local_holder_keeps_its_lock_past_the_ttl(make_ctx) -> None:
    """On its own host a live holder is never robbed, even if its heartbeat was held up."""
    ctx = make_ctx()
    proc = _holder(ctx, "w")
    try:
        with ctx.engine.begin() as conn:  # as if the heartbeat had been stuck for a long while
            conn.execute(update(schema.locks).values(expires_at=schema.utcnow() - dt.timedelta(minutes=5)))
        assert not runlog.try_acquire(ctx.engine, "w")
        with pytest.raises(runlog.WindowBusy, match="another run is already processing w"), runlog.window_lock(ctx.engine, "w"):
            pass
    finally:
        _sigkill(proc)


def test_bad_lock_ttl_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setenv("BRANDMON_LOCK_TTL_S", "soon")
    with pytest.raises(ConfigError, match="BRANDMON_LOCK_TTL_S='soon' must be a number of seconds from 1 to"):
        runlog.lock_ttl_s()
