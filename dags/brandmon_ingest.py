"""brandmon_ingest: pull every configured source for one data interval.

One DAG run per data interval (daily by default), one mapped task per source, so a run is
"every source for [data_interval_start, data_interval_end)". `catchup` is on: a backfill of
history is `airflow backfill create --dag-id brandmon_ingest --from-date 2025-01-01
--to-date 2025-12-31`. Each task calls `pipeline.ingest.jobs.ingest_window`, which skips a
window it already completed, so clearing or re-running a run changes nothing.

The last task emits the `brandmon://posts` asset event that schedules `brandmon_detect`; its
extra carries the interval (never data) so the report downstream knows which day it covers.

Parse-time settings (environment, cheap to read): BRANDMON_INGEST_SCHEDULE (cron or preset,
default @daily), BRANDMON_INGEST_START (ISO date, default 2026-01-01),
BRANDMON_INGEST_MAX_ACTIVE_RUNS (default 4, at most 1024), BRANDMON_TASK_RETRIES (default 3,
2..100), BRANDMON_RETRY_DELAY_S (default 120, at most a day); a non-numeric or out-of-range
value is an import error naming the variable. The source list is read from BRANDMON_CONFIG at run time, never while parsing.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import CronDataIntervalTimetable, Param, dag, get_current_context, task

from pipeline import dag_assets, dag_support

POSTS = dag_assets.assets().posts


SCHEDULE = dag_support.ingest_schedule()


def _timetable(expression: str) -> CronDataIntervalTimetable:
    """Data intervals on `expression`; a bad one is one line naming the variable."""
    timetable = CronDataIntervalTimetable(expression, timezone="UTC")
    try:
        timetable.validate()
    except Exception as exc:  # AirflowTimetableInvalid: croniter's message alone names nothing
        raise ValueError(
            f"BRANDMON_INGEST_SCHEDULE={expression!r} is not a cron expression or preset "
            f"(e.g. @daily, 0 2 * * *): {exc}"
        ) from None
    return timetable


def _start_date(raw: str) -> Any:
    try:
        return pendulum.parse(raw, tz="UTC")
    except ValueError:
        raise ValueError(
            f"BRANDMON_INGEST_START={raw!r} is not a date; use YYYY-MM-DD (the first interval)"
        ) from None


TIMETABLE = _timetable(SCHEDULE)
START_DATE = _start_date(dag_support.ingest_start())
MAX_ACTIVE_RUNS = dag_support.ingest_max_active_runs()


DEFAULT_ARGS = dag_support.default_args()


@dag(
    dag_id="brandmon_ingest",
    schedule=TIMETABLE,
    start_date=START_DATE,
    catchup=True,
    max_active_runs=MAX_ACTIVE_RUNS,
    default_args=DEFAULT_ARGS,
    tags=["brandmon", "ingest"],
    params={
        "sources": Param(
            [],
            type="array",
            items={"type": "string"},
            description="Only these sources (names from BRANDMON_CONFIG); empty = all",
        ),
    },
    doc_md=__doc__,
)
def brandmon_ingest() -> None:
    @task
    def list_sources(params: dict[str, Any] | None = None) -> list[str]:
        """The configured source names (a few strings in XCom), optionally filtered."""
        from pipeline.airflow_support import select_sources
        from pipeline.settings import load_settings

        return select_sources(load_settings(), (params or {}).get("sources") or [])

    @task(map_index_template="{{ brandmon_source }}")
    def ingest(
        source: str, data_interval_start: Any = None, data_interval_end: Any = None
    ) -> dict[str, int]:
        """One source over this run's data interval; returns counts only."""
        get_current_context()["brandmon_source"] = source  # type: ignore[index]
        from pipeline.airflow_support import as_utc, counts_only, require_interval, task_context
        from pipeline.ingest.jobs import ingest_window

        start, end = require_interval(data_interval_start, data_interval_end)
        with task_context() as ctx:
            counts = ingest_window(ctx, source, as_utc(start), as_utc(end))
        return counts_only(counts)

    @task(outlets=[POSTS])
    def publish(
        counts: Any,
        data_interval_start: Any = None,
        data_interval_end: Any = None,
        outlet_events: Any = None,
    ) -> dict[str, int]:
        """Emit the posts asset event (the interval in its extra) and the run's totals."""
        from pipeline.airflow_support import as_utc, sum_counts

        totals = sum_counts(counts)
        if outlet_events is not None:
            outlet_events[POSTS].extra = {
                "start": as_utc(data_interval_start).isoformat(),
                "end": as_utc(data_interval_end).isoformat(),
                "new": int(totals.get("new", 0)),
            }
        return totals

    publish(ingest.expand(source=list_sources()))


brandmon_ingest()
