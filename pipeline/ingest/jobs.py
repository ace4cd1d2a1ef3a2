"""Ingestion jobs: the functions the CLI, the Airflow DAGs and the demo call.

One run = one half-open window [start, end) of one source, under a window lock, recorded in
the run log:
0. bring the source's derived state up to date (`index_step`: the archive's day index);
1. fetch raw pages (the connector) and write them to the raw lake as they come, in parts;
   after each part the walk's cursor is saved in `sources.cursor`, so an interrupted window
   resumes from there instead of starting over;
2. normalise every record (bad ones are quarantined with their reason);
3. in ONE transaction: upsert posts and image rows, replace the window's quarantine rows,
   mark the UTC days of new or edited posts dirty, clear the window's cursor;
4. fetch the window's images (each outcome recorded per image; never fails the run).
A source that fails (after the HTTP client's retries) fails its run with a `BrandmonError`
before step 3, so the database never holds half a window; the lake parts are rewritten by
the re-run.
"""

from __future__ import annotations

import datetime as dt
import gc
import logging
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Connection, Engine, select, update

from pipeline.context import Context
from pipeline.dates import as_utc
from pipeline.dirty import mark_days
from pipeline.errors import BrandmonError, ConfigError
from pipeline.ingest import images as image_fetch
from pipeline.ingest import lake
from pipeline.ingest.http import scrub
from pipeline.ingest.loader import dedupe, load_posts, record_rejects, touch_source
from pipeline.progress import Progress, Tracker, of
from pipeline.runlog import recorded_run, window_complete, window_lock
from pipeline.schema import sources, utcnow
from pipeline.settings import Settings
from pipeline.sources.connector import Connector
from pipeline.sources.parsing import Reject, excerpt
from pipeline.sources.registry import REGISTRY, make_connector

log = logging.getLogger(__name__)

COUNT_KEYS = (
    "fetched", "new", "updated", "unchanged", "rejected",
    "images_stored", "images_failed", "images_quarantined",
)


class IngestError(BrandmonError):
    """An ingest run failed for a reason other than the feed (storage, database, a bug)."""


def window_key(start: dt.datetime, end: dt.datetime) -> str:
    return f"{lake.stamp(start)}_{lake.stamp(end)}"


# --- resume cursors (sources.cursor = {"windows": {key: progress}, "latest_end": iso}) ------------


def _cursor_row(conn: Connection, name: str) -> dict[str, Any]:
    q = select(sources.c.cursor).where(sources.c.name == name)
    if conn.dialect.name == "postgresql":
        q = q.with_for_update()
    cur = conn.execute(q).scalar()
    return dict(cur) if isinstance(cur, dict) else {}


def load_progress(engine: Engine, name: str, key: str) -> dict[str, Any] | None:
    with engine.connect() as conn:
        return _cursor_row(conn, name).get("windows", {}).get(key)


def _set_progress(conn: Connection, name: str, key: str, progress: dict[str, Any] | None, latest_end: dt.datetime | None = None) -> None:
    """Set (or clear) one window's resume point; `latest_end` records the newest window done."""
    old = _cursor_row(conn, name)
    cursor = dict(old)
    windows = dict(cursor.get("windows") or {})
    if progress is None:
        windows.pop(key, None)
    else:
        windows[key] = progress
    cursor["windows"] = windows
    if latest_end is not None and latest_end.isoformat() > str(cursor.get("latest_end") or ""):
        cursor["latest_end"] = latest_end.isoformat()
    if cursor != old:  # a re-run that changes nothing leaves the row as it was
        conn.execute(update(sources).where(sources.c.name == name).values(cursor=cursor, updated_at=utcnow()))


def save_progress(engine: Engine, name: str, kind: str, key: str, progress: dict[str, Any] | None) -> None:
    with engine.begin() as conn:
        touch_source(conn, name, kind)
        _set_progress(conn, name, key, progress)


# --- steps ---------------------------------------------------------------------------------------


def _fetch(ctx: Context, connector: Connector, name: str, start: dt.datetime, end: dt.datetime, force: bool,
           counts: dict[str, Any]) -> list[tuple[Any, str | None]]:
    """All records of the window with the lake key of the page each came from."""
    collected: list[tuple[Any, str | None]] = []
    if not connector.writes_raw:
        for page in connector.pages(start, end):
            counts["pages"] += 1
            records = page.records if page.records is not None else connector.records_of(page.body)
            collected += [(r, page.raw_key) for r in records]
        return collected

    store = ctx.store
    key = window_key(start, end)
    part_pages = max(1, int(connector.source.get("part_pages", 20)))
    part, seq, resume = 0, 0, None
    progress = None if force else load_progress(ctx.engine, name, key)
    if progress:
        have = lake.window_parts(store, name, start, end)
        if all(i in have for i in range(int(progress.get("parts", 0)))):
            for i in range(int(progress["parts"])):
                for line in lake.read_part(store, have[i]):
                    collected += [(r, have[i]) for r in connector.records_of(line.get("body"))]
                    seq += 1
            part, resume = int(progress["parts"]), progress.get("state")
            counts["resumed_pages"] = seq
            log.info("%s %s: resuming after %d stored pages", name, key, seq)
    buffer: list[dict[str, Any]] = []
    for page in connector.pages(start, end, resume):
        counts["pages"] += 1
        pkey = lake.part_key(name, start, end, part)
        buffer.append({"seq": seq, "fetched_at": utcnow().isoformat(), "request": page.request, "body": page.body})
        seq += 1
        records = page.records if page.records is not None else connector.records_of(page.body)
        collected += [(r, pkey) for r in records]
        if len(buffer) >= part_pages:
            lake.write_part(store, pkey, buffer)
            part += 1
            buffer = []
            if page.state is not None:
                save_progress(ctx.engine, name, connector.kind, key, {"parts": part, "state": page.state, "pages": seq})
    if buffer:
        lake.write_part(store, lake.part_key(name, start, end, part), buffer)
        part += 1
    lake.delete_parts_from(store, name, start, end, part)
    return collected


def _normalise(ctx: Context, connector: Connector, records: list[tuple[Any, str | None]], start: dt.datetime, end: dt.datetime,
               counts: dict[str, Any]) -> tuple[list[tuple[Any, str | None]], list[dict[str, str]]]:
    normalizer = connector.make_normalizer(ctx.settings.author_salt.get())
    items: list[tuple[Any, str | None]] = []
    rejects: dict[str, dict[str, str]] = {}
    normalize = connector.normalize
    for i, (record, raw_key) in enumerate(records):
        try:
            post = normalize(normalizer, record)
        except Reject as exc:
            reason = str(exc)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:  # an unexpected record shape
            reason = f"unexpected record shape ({type(exc).__name__})"
        else:
            if start <= post.posted_at < end:
                items.append((post, raw_key))
            else:
                counts["out_of_window"] += 1
            continue
        ref = connector.record_ref(record) or f"{raw_key or 'page'}#{i}"
        rejects[ref] = {"record_ref": ref, "reason": reason, "excerpt": excerpt(record)}
    return items, list(rejects.values())


def silent_zero(counts: dict[str, Any]) -> str | None:
    """The warning for a window whose requests returned items but which stored no post and
    quarantined nothing (every item out of window or a duplicate), else None.

    Why: that is how a source breaks without an error (ids the connector misreads, a clock or
    time zone off, a server that ignores the window): the run would succeed with zero rows.
    """
    fetched = int(counts.get("fetched", 0))
    stored = int(counts.get("new", 0)) + int(counts.get("updated", 0)) + int(counts.get("unchanged", 0))
    # A superseded item lost to a later copy of the same post stored by another window: accounted for.
    if not fetched or stored or counts.get("rejected", 0) or counts.get("superseded", 0):
        return None
    return (f"fetched {fetched} items, stored 0, quarantined 0: {int(counts.get('out_of_window', 0))} outside the window, "
            f"{int(counts.get('duplicates', 0))} duplicates; check the source's clock and time zone, its ids "
            "(Mastodon-API sources: id_mode) and that the window is the one you meant")


@contextmanager
def gc_paused() -> Iterator[None]:
    """The cyclic garbage collector off for a block that builds many small objects.

    Why: a window's records are hundreds of thousands of fresh dicts and Posts, and each
    collection re-walks all of them: measured at about a third of the CPU of parsing and
    normalising an archive day. They hold no reference cycles; refcounting frees them.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def index_step(ctx: Context, connector: Connector, counts: dict[str, Any], *, force: bool = False,
               progress: Progress | None = None) -> None:
    """Step 0: build (or reuse) the source's index (the archive's day partitions), under a lock,
    and hand it to the connector; rows it cannot place are quarantined (window_start empty).

    `force` (`--force`) rebuilds it even if the export looks unchanged (a partition lost from
    the lake, a changed parser), once per connector: the other windows of the same forced
    backfill reuse the fresh index (`Connector.refreshed`)."""
    index = connector.index
    if index is None:
        return
    name = connector.source.name
    rebuild = force and not connector.refreshed
    listing = index.listing()
    fp = index.fingerprint(listing)
    current = index.read_manifest(ctx.store)
    if rebuild or not current or current.get("fingerprint") != fp:
        with window_lock(ctx.engine, f"ingest-index:{name}", wait_s=3600):
            current = index.read_manifest(ctx.store)
            if rebuild or not current or current.get("fingerprint") != fp:
                current, rejects = index.build(ctx.store, fp, listing, current, progress)
                with ctx.engine.begin() as conn:
                    record_rejects(conn, name, None, rejects)  # only changes are written
                counts["indexed_rows"] = counts.get("indexed_rows", 0) + current["rows"]
                counts["rejected"] = counts.get("rejected", 0) + len(rejects)
                connector.refreshed = True
    connector.use_index(ctx.store, current)


def _run_window(ctx: Context, connector: Connector, name: str, start: dt.datetime, end: dt.datetime, force: bool,
                progress: Progress | None, counts: dict[str, Any]) -> None:
    index_step(ctx, connector, counts, force=force, progress=progress)
    with gc_paused():
        records = _fetch(ctx, connector, name, start, end, force, counts)
        counts["fetched"] = len(records)
        items, rejects = _normalise(ctx, connector, records, start, end, counts)
        unique = dedupe(items, connector.ties)
        counts["duplicates"] = len(items) - len(unique)
        now = utcnow()
        with ctx.engine.begin() as conn:
            touch_source(conn, name, connector.kind)
            result = load_posts(conn, name, unique, now, unique=True, ties=connector.ties)
            record_rejects(conn, name, start, rejects, window_end=end)
            if result.days:
                mark_days(conn, result.days, "ingest")
            _set_progress(conn, name, window_key(start, end), None, latest_end=end)
        del records, items, unique
    counts["new"], counts["updated"], counts["unchanged"] = result.new, result.updated, result.unchanged
    counts["superseded"] = result.superseded
    counts["rejected"] += len(rejects)
    counts["dirty_days"] = len(result.days)
    warning = silent_zero(counts)
    if warning:
        counts["silent_zero"] = 1
        counts["warning"] = warning
        log.warning("%s %s .. %s: %s", name, start.isoformat(), end.isoformat(), warning)
    if connector.source.get("fetch_images", True):
        with ctx.engine.connect() as conn:
            rows = image_fetch.pending_rows(conn, sources_in=[name], window=(start, end))
        got = image_fetch.process(ctx, rows, {name: connector.image_bytes}, progress=progress)
        for k, v in got.items():
            counts[k] += v


def _retry_hint(exc: BaseException) -> str:
    """What to do about an unexpected failure: re-run only if a re-run can help (a dropped
    connection, an I/O error, a timeout); otherwise say so (bad input is quarantined, never
    raised, so what is left is a bug or the environment)."""
    from sqlalchemy.exc import DBAPIError, OperationalError

    if isinstance(exc, OSError | TimeoutError | OperationalError) or (isinstance(exc, DBAPIError) and exc.connection_invalidated):
        return "re-run the same window to complete it"
    if isinstance(exc, MemoryError):
        return "out of memory: re-run with fewer backfill workers or on a larger worker"
    return "re-running will fail the same way until the cause is fixed (please report it with the log)"


def ingest_window(ctx: Context, source: str, start: dt.datetime, end: dt.datetime, *, force: bool = False,
                  progress: Progress | None = None, connector: Connector | None = None) -> dict[str, int]:
    """Ingest one half-open window [start, end) of `source`; returns the run's counts.

    Counts are integers, except `warning` (text; with `silent_zero: 1`) when the window fetched
    items but stored and quarantined none (see `silent_zero`); the run log row keeps it too.

    A window already ingested successfully is skipped (`{"skipped": 1}`) unless `force`.
    Raises `WindowBusy` if another run holds the window, a `BrandmonError` if the run fails.
    """
    start, end = as_utc(start), as_utc(end)
    if not start < end:
        raise ConfigError(f"empty window: start {start.isoformat()} is not before end {end.isoformat()}")
    src = ctx.settings.source(source)
    key = window_key(start, end)
    with window_lock(ctx.engine, f"ingest:{source}:{key}"):
        if not force and window_complete(ctx.engine, "ingest", source, start, end):
            return {"skipped": 1, **dict.fromkeys(COUNT_KEYS, 0)}
        own = connector is None
        conn_obj = connector or make_connector(ctx.settings, src)
        try:
            with recorded_run(ctx.engine, "ingest", source, start, end) as counts:
                counts.update(dict.fromkeys(COUNT_KEYS, 0), pages=0, duplicates=0, out_of_window=0, superseded=0)
                try:
                    _run_window(ctx, conn_obj, source, start, end, force, progress, counts)
                except BrandmonError as exc:
                    msg = scrub(str(exc), [*conn_obj.secrets, ctx.settings.author_salt.get()])
                    if msg != str(exc):
                        raise type(exc)(msg) from None
                    raise
                except Exception as exc:
                    detail = scrub(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:500],
                                   [*conn_obj.secrets, ctx.settings.author_salt.get()])
                    raise IngestError(f"ingest of {source} {start.isoformat()} .. {end.isoformat()} failed: {detail}; "
                                      f"{_retry_hint(exc)}") from exc
                return {k: v if k == "warning" else int(v) for k, v in counts.items()}
        finally:
            if own:
                conn_obj.close()


def backfill(ctx: Context, source: str, start: dt.date, end: dt.date, *, force: bool = False,
             progress: Progress | None = None, workers: int = 1) -> dict[str, int]:
    """Ingest daily windows from `start` to `end` (both inclusive); windows already complete are skipped.

    `workers` > 1 runs that many windows at once in separate processes (windows are
    independent: each has its own lock and transaction). Worth it for archive backfills on
    Postgres, where parsing and normalising, not the feed, is the bottleneck.
    """
    if isinstance(start, dt.datetime):
        start = start.date()
    if isinstance(end, dt.datetime):
        end = end.date()
    if end < start:
        raise ConfigError(f"backfill end {end} is before its start {start}")
    if workers < 1:
        raise ConfigError("backfill workers must be at least 1")
    src = ctx.settings.source(source)
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    totals: Counter[str] = Counter()
    bar = of(progress)(len(days), f"backfill {source}", "day")
    connector = make_connector(ctx.settings, src)
    try:
        if workers == 1 or len(days) == 1:
            for day in days:
                totals.update(_backfill_day(ctx, connector, source, day, force, progress))
                totals["windows"] += 1
                bar.update(1)
                bar.note(new=totals["new"], rejected=totals["rejected"])
        else:
            # e.g. the archive index, once, before the workers start (rebuilt here if forced:
            # the workers' connectors are told it is fresh, so they do not rebuild it again)
            index_step(ctx, connector, totals, force=force, progress=progress)
            _backfill_parallel(ctx, source, days, force, workers, totals, bar, refreshed=connector.refreshed)
    finally:
        bar.close()
        connector.close()
    return {k: int(v) for k, v in totals.items()}


def _backfill_day(ctx: Context, connector: Connector, source: str, day: dt.date, force: bool,
                  progress: Progress | None = None) -> dict[str, int]:
    s = dt.datetime.combine(day, dt.time(), dt.UTC)
    try:
        counts = ingest_window(ctx, source, s, s + dt.timedelta(days=1), force=force, progress=progress, connector=connector)
        counts.pop("warning", None)  # logged and in the run log; backfill totals count `silent_zero` windows
        return counts
    except BrandmonError as exc:
        raise type(exc)(f"backfill of {source} stopped at {day}: {exc}") from None


_WORKER: dict[str, Any] = {}


def _worker_init(settings: Settings, source: str, refreshed: bool = False) -> None:
    ctx = Context(settings)
    connector = make_connector(settings, settings.source(source))
    connector.refreshed = refreshed
    _WORKER.update(ctx=ctx, connector=connector)


def _worker_day(source: str, day: dt.date, force: bool) -> dict[str, int]:
    return _backfill_day(_WORKER["ctx"], _WORKER["connector"], source, day, force)


def _backfill_parallel(ctx: Context, source: str, days: list[dt.date], force: bool, workers: int, totals: Counter[str], bar: Tracker,
                       refreshed: bool = False) -> None:
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    ctx.engine.dispose()  # no pooled connection crosses into the workers
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_worker_init, initargs=(ctx.settings, source, refreshed))
    try:
        pending = {pool.submit(_worker_day, source, day, force) for day in days}
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for fut in done:
                try:
                    counts = fut.result()  # re-raises a worker's error here
                except BrokenProcessPool:
                    raise IngestError(f"a backfill worker of {source} died (killed or out of memory); windows not "
                                      "finished were rolled back: re-run the backfill to resume") from None
                totals.update(counts)
                totals["windows"] += 1
                bar.update(1)
            bar.note(new=totals["new"], rejected=totals["rejected"])
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def fetch_images(ctx: Context, *, source: str | None = None, post_ids: list[int] | None = None,
                 progress: Progress | None = None) -> dict[str, int]:
    """(Re)try pending and failed images, optionally of one source or some posts only."""
    with ctx.engine.connect() as conn:
        rows = image_fetch.pending_rows(conn, sources_in=[source] if source else None, post_ids=post_ids)
    byte_sources = {}
    connectors = []
    configured = {s.name: s for s in ctx.settings.sources}
    for name in sorted({r["source"] for r in rows}):
        if name in configured and REGISTRY[configured[name].kind].serves_images:
            c = make_connector(ctx.settings, configured[name])
            connectors.append(c)
            byte_sources[name] = c.image_bytes
    try:
        with recorded_run(ctx.engine, "images", source) as counts:
            counts.update(image_fetch.process(ctx, rows, byte_sources, progress=progress))
            counts["attempted"] = len(rows)
            return {k: int(v) for k, v in counts.items()}
    finally:
        for c in connectors:
            c.close()
