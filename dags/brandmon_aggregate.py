"""brandmon_aggregate: recompute the days touched since the last run, then write the report
and refresh each brand's forecast of daily mentions (`demand_signal`, read by `v_forecast`).

Scheduled on the `brandmon://detections` asset, so it runs after each detection run (which
follows each ingest run), or on `brandmon://aggregate-backlog`, its own tail event: one run
at a time, and Airflow's scheduler consumes only the events older than the queue entry a run
is made from, so detections events that arrive while a run is being created would wait for
the next night. `requeue` looks for events newer than this run (through the Task SDK's
`inlet_events`) and, if there are any, emits the backlog event: the next run starts at once
and consumes them. `aggregate_dirty` recomputes `mention_daily` for every day in the
dirty-day queue (new posts, new scores) and clears it: a re-run finds an empty queue and
changes nothing. The alerts those days raise go out once each (the `alert_ledger` table;
Slack/SMTP destinations with a `conn_id` use the providers' hooks). The report is for the last day of the ingest windows that led to this run,
or the `day` param of a manual run, or yesterday (UTC).

Parse-time settings (a non-numeric value is an import error naming the variable):
BRANDMON_TASK_RETRIES (default 3, at least 2), BRANDMON_RETRY_DELAY_S (default 120).
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

from pipeline import dag_assets, dag_support

DETECTIONS = dag_assets.assets().detections
BACKLOG = dag_assets.assets().aggregate_backlog


DEFAULT_ARGS = dag_support.default_args()


@dag(
    dag_id="brandmon_aggregate",
    schedule=(DETECTIONS | BACKLOG),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["brandmon", "aggregate"],
    params={
        "day": Param(
            None,
            type=["null", "string"],
            format="date",
            description="Report day (YYYY-MM-DD); empty = the last ingested day",
        ),
    },
    doc_md=__doc__,
)
def brandmon_aggregate() -> None:
    @task
    def aggregate() -> dict[str, int]:
        """Recompute mention_daily for the dirty days, send their alerts; counts only."""
        from pipeline.aggregate.jobs import aggregate_dirty
        from pipeline.airflow_support import alert_transport, counts_only, task_context

        with task_context() as ctx:
            return counts_only(aggregate_dirty(ctx, alert_transport=alert_transport()))

    @task
    def report(
        params: dict[str, Any] | None = None,
        triggering_asset_events: Any = None,
        dag_run: Any = None,
    ) -> str:
        """Write the daily report; returns where it went (a key or path, not the report)."""
        from pipeline.aggregate.jobs import write_report
        from pipeline.airflow_support import choose_report_day, task_context

        day = choose_report_day(
            (params or {}).get("day"), triggering_asset_events, getattr(dag_run, "run_after", None)
        )
        with task_context() as ctx:
            return str(write_report(ctx, day))

    @task
    def forecast() -> dict[str, int]:
        """Refresh each brand's forecast in demand_signal (read by v_forecast); counts only."""
        from pipeline.aggregate.forecast import refresh_forecasts
        from pipeline.airflow_support import task_context

        with task_context() as ctx:
            return refresh_forecasts(ctx)

    @task(outlets=[BACKLOG], inlets=[DETECTIONS, BACKLOG])
    def requeue(
        _report: str, inlet_events: Any = None, outlet_events: Any = None, dag_run: Any = None
    ) -> int:
        """Events newer than this run (a tail nobody consumed): emit the backlog event; else skip."""
        from pipeline.airflow_support import late_events, late_or_skip

        late = late_events(inlet_events, [DETECTIONS, BACKLOG], getattr(dag_run, "run_after", None))
        late_or_skip(late)  # raises AirflowSkipException: no event
        if outlet_events is not None:
            outlet_events[BACKLOG].extra = {"late_events": late}
        return late

    done = aggregate()
    written = report()
    done >> written
    done >> forecast()
    requeue(written)


brandmon_aggregate()
