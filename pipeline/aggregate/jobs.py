"""Aggregation jobs: the entry points the Airflow DAGs, the demo and the CLI call.

Each day is recomputed in ONE transaction that first clears the day's dirty mark, then
re-matches the day's post texts, then writes the day's counts and signals. Clearing first
matters on Postgres: an ingestion that marks the day again while we work blocks on our
deleted row until we commit, then re-inserts the mark, so its posts are never lost; on
SQLite the write lock serialises the two anyway. A crash rolls the whole day back, mark
included, so the re-run recomputes it.

After the days themselves, the signals (rolling means, z-scores) of the 28 days following
any day whose counts changed are refreshed, since their trailing windows include it. Then the
alert rules are evaluated on all those days and what is new goes out (`pipeline.alerts`).

Before the days, `_prepare` mirrors the catalogue, maps the active model's classes onto it
(`logo_class_map`; classes that match nothing are logged) and, if the active model or its
threshold differs from the one the last successful aggregation counted with (an activation
or threshold change made outside `registry.activate`), marks the days either version scored.
"""

from __future__ import annotations

import datetime as dt
import heapq
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import delete, select

from pipeline.aggregate.catalogue import (
    catalogue_changed,
    catalogue_fingerprint,
    catalogue_to_use,
    sync_catalogue,
    sync_logo_classes,
    unmatched_warning,
)
from pipeline.aggregate.daily import (
    SIGNAL_WINDOW,
    compute_day,
    known_platforms,
    late_image_days,
    update_signals,
)
from pipeline.aggregate.mentions import ActiveModel, active_model, refresh_text_mentions
from pipeline.aggregate.textmatch import Matcher, compile_catalogue
from pipeline.alerts.jobs import dispatch_alerts
from pipeline.alerts.transport import PlainTransport
from pipeline.context import Context
from pipeline.dates import BadDate, check_day, check_span
from pipeline.dirty import mark_days, mark_days_of_model
from pipeline.errors import BrandmonError
from pipeline.progress import Progress, of
from pipeline.runlog import recorded_run, window_lock
from pipeline.schema import dirty_days, mention_daily, runs, utcnow

log = logging.getLogger(__name__)

LOCK_NAME = "aggregate"
LOCK_WAIT_S = 600.0


class AggregateError(BrandmonError):
    """Bad aggregation input (a reversed date range, an unknown brand)."""


@dataclass
class _Prepared:
    matcher: Matcher
    platforms: list[str]
    model: ActiveModel
    catalogue: dict[str, int]
    fingerprint: str
    unmatched_classes: list[str]
    model_change_days: int


def _last_counted_model(conn) -> tuple[str | None, float | None] | None:
    """(model version, threshold) the last successful aggregation counted with, if any."""
    row = conn.execute(
        select(runs.c.counts).where(runs.c.kind == "aggregate", runs.c.status == "succeeded")
        .order_by(runs.c.id.desc()).limit(1)
    ).first()
    if row is None or not isinstance(row.counts, dict) or "model_version" not in row.counts:
        return None
    thr = row.counts.get("model_threshold")
    return row.counts["model_version"], (float(thr) if thr is not None else None)


def _prepare(ctx: Context, allow_empty_catalogue: bool = False) -> _Prepared:
    """Mirror the catalogue and the class map, then read what every day's computation shares.
    An absent or empty configuration never deletes the catalogue (see `catalogue_to_use`)."""
    with ctx.engine.begin() as conn:
        brands = catalogue_to_use(conn, ctx.settings, allow_empty_catalogue)
        cat = sync_catalogue(conn, brands)
        model = active_model(conn)
        platforms = known_platforms(conn)
        _, unmatched = sync_logo_classes(conn, model.classes, brands)
        marked = 0
        last = _last_counted_model(conn)
        if last is not None:
            version, threshold = last
            if version != model.version or (threshold is not None and model.version is not None
                                              and threshold != model.threshold):
                marked = mark_days_of_model(conn, [version, model.version], reason="model-change")
                log.info("active model %s (threshold %s) differs from the last aggregation's %s (%s): "
                         "%d day(s) marked for recomputation", model.version, model.threshold, version,
                         threshold, marked)
    if catalogue_changed(cat):
        log.info("catalogue changed (%s); days already aggregated keep the old catalogue until "
                 "`brandmon aggregate --start D --end D` restates them", cat)
    warning = unmatched_warning(model.version, unmatched)
    if warning:
        log.warning("%s", warning)
    return _Prepared(compile_catalogue(brands), platforms, model, cat, catalogue_fingerprint(brands),
                     unmatched, marked)


def _run_days(ctx: Context, prep: _Prepared, days: Iterable[dt.date],
              progress: Progress) -> tuple[dict[str, Any], list[dt.date]]:
    """Recompute the days (and the days late images pull in), then refresh their followers'
    signals; returns the totals and every day whose signals were computed."""
    queue = sorted(set(days))
    heapq.heapify(queue)
    done: set[dt.date] = set()
    totals = {"days": 0, "posts_matched": 0, "mentions_rewritten": 0, "rows_changed": 0,
              "signals_changed": 0, "followers": 0, "late_image_days": 0}
    changed_days: list[dt.date] = []
    tracker = progress(len(queue), "aggregate", "day")
    while queue:
        day = heapq.heappop(queue)
        if day in done:
            continue
        with ctx.engine.begin() as conn:
            conn.execute(delete(dirty_days).where(dirty_days.c.day == day))
            for k, v in refresh_text_mentions(conn, prep.matcher, day, prep.fingerprint).items():
                totals[k] += v
            res = compute_day(conn, day, prep.platforms, prep.model, utcnow())
            # Later days whose re-post counts this day's late posts change: mark them in this
            # transaction (a crash keeps them queued), then recompute them in this run.
            later = [d for d in late_image_days(conn, day) if d not in done and d not in queue]
            if later:
                mark_days(conn, later, "late-image")
        for d in later:
            heapq.heappush(queue, d)
        totals["late_image_days"] += len(later)
        tracker.update(1)
        if later:
            tracker.note(late_image_days=totals["late_image_days"])  # beyond the first total
        done.add(day)
        totals["days"] += 1
        totals["rows_changed"] += res["counts_changed"] + res["stale_deleted"]
        totals["signals_changed"] += res["signals_changed"]
        if res["counts_changed"] or res["stale_deleted"]:
            changed_days.append(day)
    tracker.close()
    followers = _followers(ctx, changed_days, done)
    tracker = progress(len(followers), "signals", "day")
    for day in followers:
        with ctx.engine.begin() as conn:
            totals["signals_changed"] += update_signals(conn, day, utcnow())
        tracker.update(1)
    tracker.close()
    totals["followers"] = len(followers)
    return totals, sorted(done | set(followers))


def _followers(ctx: Context, changed: Sequence[dt.date], done: set[dt.date]) -> list[dt.date]:
    """Aggregated days within the signal window after a changed day, not recomputed already."""
    if not changed:
        return []
    wanted: set[dt.date] = set()
    for d in changed:
        wanted.update(d + dt.timedelta(days=k) for k in range(1, SIGNAL_WINDOW + 1))
    wanted -= done
    if not wanted:
        return []
    lo, hi = min(wanted), max(wanted)
    with ctx.engine.connect() as conn:
        present = {
            d for (d,) in conn.execute(
                select(mention_daily.c.day).where(mention_daily.c.day >= lo, mention_daily.c.day <= hi).distinct()
            )
        }
    return sorted(wanted & present)


def _result(prep: _Prepared, totals: dict[str, Any]) -> dict[str, Any]:
    return {**totals, "model_version": prep.model.version,
            "model_threshold": prep.model.threshold if prep.model.version else None,
            "platforms": len(prep.platforms), "catalogue_changes": sum(prep.catalogue.values()),
            "unmatched_classes": len(prep.unmatched_classes), "model_change_days": prep.model_change_days}


def aggregate_dirty(ctx: Context, *, progress: Progress | None = None, alert_transport: PlainTransport | None = None,
                    allow_empty_catalogue: bool = False) -> dict:
    """Recompute exactly the days in `dirty_days` (and the signals that depend on them), then
    send the alerts those days raise (see pipeline.alerts.jobs; never fails the run)."""
    with window_lock(ctx.engine, LOCK_NAME, wait_s=LOCK_WAIT_S), recorded_run(ctx.engine, "aggregate", "dirty") as counts:
        prep = _prepare(ctx, allow_empty_catalogue)
        with ctx.engine.connect() as conn:
            days = [d for (d,) in conn.execute(select(dirty_days.c.day).order_by(dirty_days.c.day))]
        totals, touched = _run_days(ctx, prep, days, of(progress))
        counts.update(_result(prep, totals))
        counts.update(dispatch_alerts(ctx, touched, transport=alert_transport))
        if days:
            counts["first_day"], counts["last_day"] = days[0].isoformat(), days[-1].isoformat()
        return dict(counts)


def aggregate_range(ctx: Context, start: dt.date, end: dt.date, *, progress: Progress | None = None,
                    alert_transport: PlainTransport | None = None, allow_empty_catalogue: bool = False) -> dict:
    """Recompute every day from `start` to `end` inclusive, dirty or not, then send the alerts
    they raise that were not sent before."""
    if end < start:
        raise AggregateError(f"--end {end} is before --start {start}")
    try:
        check_day(start)
        check_day(end)
        check_span(start, end)
    except BadDate as exc:
        raise AggregateError(str(exc)) from None
    days = [start + dt.timedelta(days=i) for i in range((end - start).days + 1)]
    w_start = dt.datetime(start.year, start.month, start.day, tzinfo=dt.UTC)
    w_end = dt.datetime(end.year, end.month, end.day, tzinfo=dt.UTC) + dt.timedelta(days=1)
    with (
        window_lock(ctx.engine, LOCK_NAME, wait_s=LOCK_WAIT_S),
        recorded_run(ctx.engine, "aggregate", "range", w_start, w_end) as counts,
    ):
        prep = _prepare(ctx, allow_empty_catalogue)
        totals, touched = _run_days(ctx, prep, days, of(progress))
        counts.update(_result(prep, totals))
        counts.update(dispatch_alerts(ctx, touched, transport=alert_transport))
        return dict(counts)


def write_report(ctx: Context, day: dt.date) -> str:
    """Render the one-page HTML report of `day` into the lake; returns its key."""
    from pipeline.aggregate.report import write_report as _write

    return _write(ctx, day)
