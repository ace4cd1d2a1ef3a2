"""The run log and window locks.

Every job records a `runs` row (what, which window, counts, outcome) so `brandmon status`
and the backfill's "skip windows already complete" can answer from the database. A lock row
per window makes two runs of the same window exclusive: the second one waits or exits clearly.

A crashed holder must not block its re-run for long (an Airflow retry comes 2 minutes after a
worker died), so a lock is a short lease: while held, a heartbeat thread renews it every TTL/4
seconds; a holder killed with SIGKILL stops renewing and its lock expires after the TTL
(`BRANDMON_LOCK_TTL_S`, default 120 s). On the holder's own host liveness is known exactly:
a dead (or reused) pid frees the lock at once, and a live one keeps it even if its heartbeat was
held up, e.g. behind a long SQLite write transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, and_, delete, insert, select, update
from sqlalchemy.exc import IntegrityError

from pipeline.errors import BrandmonError
from pipeline.schema import locks, runs, utcnow
from pipeline.settings import lock_host as host_id
from pipeline.settings import lock_ttl_s

log = logging.getLogger(__name__)


class WindowBusy(BrandmonError):
    """Another live run holds the lock for this window."""

    exit_code = 75  # EX_TEMPFAIL: try again later


def owner_id() -> str:
    return f"{host_id()}:{os.getpid()}"


def _process_start(pid: int) -> float | None:
    """When process `pid` started (Unix time, ~1 s precision), from /proc; None if unknown."""
    try:
        ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
        btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return btime + ticks / os.sysconf("SC_CLK_TCK")


def _holder_alive(owner: str, acquired_at: dt.datetime) -> bool | None:
    """True/False if `owner` runs on this host (its pid, not reused since `acquired_at`); None if
    it is on another host, where only the lease's expiry can tell."""
    host, _, pid = owner.rpartition(":")
    if host != host_id() or not pid.isdigit():
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    started = _process_start(int(pid))
    return not (started is not None and started > acquired_at.timestamp() + 2)  # a new process with an old pid


def try_acquire(engine: Engine, name: str, ttl_s: float | None = None) -> bool:
    """Take lock `name` if free, held by a dead process of this host, or expired (another host)."""
    ttl = lock_ttl_s() if ttl_s is None else ttl_s
    now = utcnow()
    me = owner_id()
    with engine.begin() as conn:
        row = conn.execute(select(locks).where(locks.c.name == name)).mappings().first()
        if row is not None:
            if row["owner"] == me:
                return True
            alive = _holder_alive(row["owner"], row["acquired_at"])
            if alive or (alive is None and row["expires_at"] > now):
                return False
            why = "process gone" if alive is False else "lease expired"
            log.warning("lock %s: taking over from %s (%s)", name, row["owner"], why)
            conn.execute(delete(locks).where(and_(locks.c.name == name, locks.c.owner == row["owner"])))
            mark_abandoned(conn, row["owner"], f"abandoned: its process stopped ({why}); {name} taken over by {me}")
        try:
            conn.execute(
                insert(locks).values(name=name, owner=me, acquired_at=now, expires_at=now + dt.timedelta(seconds=ttl))
            )
        except IntegrityError:
            return False
    return True


def release(engine: Engine, name: str) -> None:
    with engine.begin() as conn:
        conn.execute(delete(locks).where(and_(locks.c.name == name, locks.c.owner == owner_id())))


class _Heartbeat(threading.Thread):
    """Renews a held lock every ttl/4 seconds until stopped (the holder's liveness signal)."""

    def __init__(self, engine: Engine, name: str, ttl_s: float) -> None:
        super().__init__(name=f"lock-heartbeat {name}", daemon=True)
        self.engine, self.lock_name, self.ttl_s, self.owner = engine, name, ttl_s, owner_id()
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.ttl_s / 4):
            try:
                with self.engine.begin() as conn:
                    renewed = conn.execute(
                        update(locks)
                        .where(locks.c.name == self.lock_name, locks.c.owner == self.owner)
                        .values(expires_at=utcnow() + dt.timedelta(seconds=self.ttl_s))
                    ).rowcount
            except Exception as exc:  # a blip: the next beat tries again, the lease has slack
                log.warning("lock %s: heartbeat failed (%s); retrying", self.lock_name, type(exc).__name__)
                continue
            if not renewed:
                log.error("lock %s: lost (taken over after its lease ran out); another run may overlap", self.lock_name)
                return

    def stop(self) -> None:
        self.stopped.set()
        self.join(timeout=30)


@contextmanager
def window_lock(engine: Engine, name: str, wait_s: float = 0.0, ttl_s: float | None = None) -> Iterator[None]:
    """Hold lock `name` for the block (renewed by a heartbeat); wait up to `wait_s` for it, then
    raise `WindowBusy`."""
    ttl = lock_ttl_s() if ttl_s is None else ttl_s
    deadline = time.monotonic() + wait_s
    while not try_acquire(engine, name, ttl):
        if time.monotonic() >= deadline:
            raise WindowBusy(
                f"another run is already processing {name}; wait for it to finish (a crashed run's lock "
                f"expires within {ttl:.0f} s), then re-run"
            )
        time.sleep(min(0.5, max(0.05, ttl / 8)))
    beat = _Heartbeat(engine, name, ttl)
    beat.start()
    try:
        yield
    finally:
        beat.stop()
        release(engine, name)


def run_lease(run_id: int) -> str:
    """The lock row that is a running run's lease (renewed by its heartbeat while it lives)."""
    return f"run:{run_id}"


def start_run(
    engine: Engine,
    kind: str,
    source: str | None = None,
    window_start: dt.datetime | None = None,
    window_end: dt.datetime | None = None,
    ttl_s: float | None = None,
) -> int:
    """Record a `running` run and its lease in one transaction (a reader never sees one
    without the other)."""
    ttl = lock_ttl_s() if ttl_s is None else ttl_s
    now = utcnow()
    with engine.begin() as conn:
        result = conn.execute(
            insert(runs).values(
                kind=kind,
                source=source,
                window_start=window_start,
                window_end=window_end,
                status="running",
                started_at=now,
                counts={},
                owner=owner_id(),
            )
        )
        run_id = int(result.inserted_primary_key[0])
        conn.execute(insert(locks).values(name=run_lease(run_id), owner=owner_id(), acquired_at=now,
                                          expires_at=now + dt.timedelta(seconds=ttl)))
        return run_id


def finish_run(engine: Engine, run_id: int, status: str, counts: dict[str, Any] | None = None, error: str | None = None) -> None:
    with engine.begin() as conn:
        conn.execute(
            update(runs)
            .where(runs.c.id == run_id)
            .values(status=status, finished_at=utcnow(), counts=counts or {}, error=error)
        )
        conn.execute(delete(locks).where(locks.c.name == run_lease(run_id)))


def _lease_live(lease: Any, now: dt.datetime) -> bool:
    alive = _holder_alive(lease["owner"], lease["acquired_at"])
    return bool(alive) or (alive is None and lease["expires_at"] > now)


def effective_status(run: Any, leases: dict[str, Any], now: dt.datetime | None = None) -> str:
    """A run's status as it stands: `abandoned` for a `running` run whose process was killed
    (SIGKILL, a lost machine): its lease is gone or expired, or its process on this host is dead.
    A run recorded before runs had leases counts as running while its process lives."""
    if run["status"] != "running":
        return str(run["status"])
    now = now or utcnow()
    lease = leases.get(run_lease(run["id"]))
    if lease is not None:
        return "running" if _lease_live(lease, now) else "abandoned"
    alive = _holder_alive(run["owner"] or "", run["started_at"]) if run["owner"] else False
    return "running" if alive else "abandoned"


def mark_abandoned(conn: Any, owner: str, reason: str) -> int:
    """Mark `owner`'s running runs whose lease is dead as `abandoned` (when a later run takes over
    a lock from that owner); returns how many."""
    now = utcnow()
    rows = conn.execute(select(runs.c.id, runs.c.status, runs.c.owner, runs.c.started_at)
                        .where(runs.c.status == "running", runs.c.owner == owner)).mappings().all()
    if not rows:
        return 0
    names = [run_lease(r["id"]) for r in rows]
    leases = {r["name"]: r for r in conn.execute(select(locks).where(locks.c.name.in_(names))).mappings()}
    n = 0
    for r in rows:
        if effective_status(r, leases, now) == "abandoned":
            conn.execute(update(runs).where(runs.c.id == r["id"], runs.c.status == "running")
                         .values(status="abandoned", finished_at=now, error=reason[:2000]))
            conn.execute(delete(locks).where(locks.c.name == run_lease(r["id"])))
            n += 1
    return n


@contextmanager
def recorded_run(
    engine: Engine,
    kind: str,
    source: str | None = None,
    window_start: dt.datetime | None = None,
    window_end: dt.datetime | None = None,
) -> Iterator[dict[str, Any]]:
    """Record a run around a block; the block fills the yielded counts dict."""
    ttl = lock_ttl_s()
    run_id = start_run(engine, kind, source, window_start, window_end, ttl_s=ttl)
    beat = _Heartbeat(engine, run_lease(run_id), ttl)
    beat.start()
    counts: dict[str, Any] = {}
    try:
        yield counts
    except BaseException as exc:
        beat.stop()
        finish_run(engine, run_id, "failed", counts, error=f"{type(exc).__name__}: {exc}"[:2000])
        raise
    beat.stop()
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
    """The last runs, newest first; `status` is the effective one (`abandoned` computed at read
    time for a killed run still recorded as `running`, see `effective_status`)."""
    with engine.connect() as conn:
        rows = conn.execute(select(runs).order_by(runs.c.id.desc()).limit(limit)).mappings().all()
        names = [run_lease(r["id"]) for r in rows if r["status"] == "running"]
        leases = {r["name"]: r for r in conn.execute(select(locks).where(locks.c.name.in_(names))).mappings()} if names else {}
    now = utcnow()
    out = []
    for r in rows:
        row = dict(r)
        row["status"] = effective_status(r, leases, now)
        if row["status"] == "abandoned" and r["status"] == "running" and not row.get("error"):
            row["error"] = "abandoned: its process stopped without finishing (killed?); re-run the same command"
        out.append(row)
    return out
