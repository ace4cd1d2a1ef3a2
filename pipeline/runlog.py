"""The run log and window locks.

Every job records a `runs` row (what, which window, counts, outcome) so `brandmon status`
and the backfill's "skip windows already complete" can answer from the database. A lock row
per window makes two runs of the same window exclusive: the second one waits or exits clearly.
A lock whose owner died expires after its TTL, so a crashed run never blocks its re-run for long.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from pipeline.errors import BrandmonError
from pipeline.schema import locks, runs, utcnow


class WindowBusy(BrandmonError):
    """Another live run holds the lock for this window."""

    exit_code = 75  # EX_TEMPFAIL: try again later


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def _pid_alive(owner: str) -> bool:
    host, _, pid = owner.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # cannot tell for another host: trust the TTL
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def try_acquire(engine: Engine, name: str, ttl_s: float = 6 * 3600) -> bool:
    """Take lock `name` if free, expired, or held by a dead process on this host."""
    now = utcnow()
    me = owner_id()
    with engine.begin() as conn:
        row = conn.execute(select(locks).where(locks.c.name == name)).mappings().first()
        if row is not None:
            if row["owner"] == me:
                return True
            if row["expires_at"] > now and _pid_alive(row["owner"]):
                return False
            conn.execute(delete(locks).where(and_(locks.c.name == name, locks.c.owner == row["owner"])))
        try:
            conn.execute(
                insert(locks).values(name=name, owner=me, acquired_at=now, expires_at=now + dt.timedelta(seconds=ttl_s))
            )
        except IntegrityError:
            return False
    return True


def release(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(locks).where(and_(locks.c.name == name, locks.c.owner == owner_id())))


@contextmanager
def window_lock(engine: Engine, name: str, wait_s: float = 0.0, ttl_s: float = 6 * 3600) -> Iterator[None]:
    """Hold lock `name` for the block; wait up to `wait_s` for it, then raise `WindowBusy`."""
    deadline = time.monotonic() + wait_s
    while not try_acquire(engine, name, ttl_s):
        if time.monotonic() >= deadline:
            raise WindowBusy(f"another run is already processing {name}; it will finish or expire, then re-run")
        time.sleep(0.5)
    try:
        yield
    finally:
        release(engine, name)


def start_run(
    engine: Engine,
    kind: str,
    source: str | None = None,
    window_start: dt.datetime | None = None,
    window_end: dt.datetime | None = None,
) -> int:
    with engine.begin() as conn:
        result = conn.execute(
            insert(runs).values(
                kind=kind,
                source=source,
                window_start=window_start,
                window_end=window_end,
                status="running",
                started_at=utcnow(),
                counts={},
                owner=owner_id(),
            )
        )
        return int(result.inserted_primary_key[0])


def finish_run(engine: Engine, run_id: int, status: str, counts: dict[str, Any] | None = None, error: str | None = None) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(status=status, finished_at=utcnow(), counts=counts or {}, error=error)
        )


@contextmanager
def recorded_run(
    engine: Engine,
    kind: str,
    source: str | None = None,
    window_start: dt.datetime | None = None,
    window_end: dt.datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Record a run around a block; the block fills the yielded counts dict."""
    run_id = start_run(engine, kind, source, window_start, window_end)
    counts: dict[str, Any] = {}
    try:
        yield counts
    except BaseException as exc:
        finish_run(engine, run_id, "failed", counts, error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    finish_run(engine, run_id, "succeeded", counts)


def window_complete(engine: Engine, kind: str, source: str, window_start: dt.datetime, window_end: dt.datetime) -> bool:
    """True if a run of this exact window has succeeded (backfill skips it unless --force)."""
    with engine.connect() as conn:
        row = conn.execute(
            select(runs.c.id)
            .where(
                runs.c.kind == kind,
                runs.c.source == source,
                runs.c.window_start == window_start,
                runs.c.window_end == window_end,
                runs.c.status == "succeeded",
            )
            .limit(1)
        ).first()
    return row is not None


def recent_runs(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    with engine.connect() as conn:
        rows = conn.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)).mappings().all()
    return [dict(r) for r in rows]
