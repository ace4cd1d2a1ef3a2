"""brandmon_detect: score the images that ingestion stored and nobody scored yet.

Scheduled on `brandmon://posts` (every finished ingest run) OR `brandmon://model` (a model
was activated: its images must be scored) OR `brandmon://detect-backlog` (this DAG's own
previous run left work). It lists the pending work as batch keys (XCom holds keys, never
images), maps `detect_pending` over them in the `brandmon_tf` pool so that however many
workers run, only as many TensorFlow processes as the pool has slots load a model at once,
then emits `brandmon://detections`.

A run maps at most BRANDMON_DETECT_MAX_TASKS batches. `requeue` emits
`brandmon://detect-backlog`, so the next run starts as soon as this one ends (one run at a
time) instead of waiting for the next ingest, when images are still pending (a backfill, a
new model to score history with) and this run scored some, or when asset events newer than
this run exist: Airflow's scheduler consumes only the events older than the queue entry a
run is made from, so events arriving while a run is being created would otherwise wait
for the next trigger (the tail of a catch-up). A run that scored nothing never requeues for
pending images, so a stuck batch cannot loop; with nothing pending and no late event
`requeue` is skipped and emits nothing.

Create the pool once (docker-compose's airflow-init does it):
`airflow pools set brandmon_tf 1 "TensorFlow inference and training"`; raise the slots to
run more detections in parallel on bigger workers.

Idempotent: an image scored by the active model is not pending any more, so a re-run (or a
retried batch) finds nothing to do. Without an active model the run logs how to train one
(the brandmon_train DAG) and succeeds with nothing scored; aggregation still runs on text
mentions.

Parse-time settings (a non-numeric or out-of-range value is an import error naming the variable):
BRANDMON_TF_POOL (default brandmon_tf), BRANDMON_DETECT_BATCH_IMAGES (images per mapped
task; default 32 x detector.batch_size), BRANDMON_DETECT_MAX_TASKS (default 256 mapped tasks
per run, at most Airflow's max_map_length), BRANDMON_TASK_RETRIES (default 3, 2..100),
BRANDMON_RETRY_DELAY_S (default 120, at most a day).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context, task

from pipeline import dag_assets, dag_support

POSTS = dag_assets.assets().posts
MODEL = dag_assets.assets().model
BACKLOG = dag_assets.assets().detect_backlog
DETECTIONS = dag_assets.assets().detections


TF_POOL = dag_support.tf_pool()
BATCH_IMAGES = dag_support.detect_batch_images()
MAX_TASKS = dag_support.detect_max_tasks()


DEFAULT_ARGS = dag_support.default_args()


@dag(
    dag_id="brandmon_detect",
    schedule=(POSTS | MODEL | BACKLOG),
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["brandmon", "detect", "tensorflow"],
    doc_md=__doc__,
)
def brandmon_detect() -> None:
    @task
    def list_batches() -> list[str]:
        """Keys of the pending image batches, at most MAX_TASKS (empty without an active model: logged)."""
        from pipeline.airflow_support import task_context
        from pipeline.detector.jobs import pending_batches

        with task_context() as ctx:
            keys = list(pending_batches(ctx, batch_size=BATCH_IMAGES))
        return keys[:MAX_TASKS]

    @task(
        pool=TF_POOL,
        map_index_template="{{ brandmon_batch }}",
        execution_timeout=dt.timedelta(hours=2),
    )
    def detect(batch_key: str) -> dict[str, int]:
        """Score one batch of pending images with the active model; counts only."""
        get_current_context()["brandmon_batch"] = dag_assets.batch_label(batch_key)  # type: ignore[index]
        from pipeline.airflow_support import counts_only, task_context
        from pipeline.detector.jobs import detect_pending

        with task_context() as ctx:
            return counts_only(detect_pending(ctx, batch_key=batch_key))

    @task(outlets=[DETECTIONS], trigger_rule="none_failed")
    def publish(
        counts: Any, triggering_asset_events: Any = None, outlet_events: Any = None
    ) -> dict[str, int]:
        """Emit the detections asset event, forwarding the ingest windows it covers."""
        from pipeline.airflow_support import event_windows, merge_windows, sum_counts

        totals = sum_counts(counts or [])
        if outlet_events is not None:
            window = merge_windows(event_windows(triggering_asset_events))
            outlet_events[DETECTIONS].extra = {**window, "scored": int(totals.get("scored", 0))}
        return totals

    @task(outlets=[BACKLOG], inlets=[POSTS, MODEL, BACKLOG])
    def requeue(
        totals: dict[str, int],
        triggering_asset_events: Any = None,
        inlet_events: Any = None,
        outlet_events: Any = None,
        dag_run: Any = None,
    ) -> int:
        """Work left and progress made, or late events: emit the backlog event (next run right
        away); else skip."""
        from pipeline.airflow_support import (
            backlog_or_skip,
            event_windows,
            late_events,
            merge_windows,
            task_context,
        )
        from pipeline.detector.jobs import pending_batches

        with task_context() as ctx:
            left = len(pending_batches(ctx, batch_size=BATCH_IMAGES))
        late = late_events(inlet_events, [POSTS, MODEL, BACKLOG], getattr(dag_run, "run_after", None))
        backlog_or_skip(left, totals, late)  # raises AirflowSkipException: no event
        if outlet_events is not None:
            window = merge_windows(event_windows(triggering_asset_events))
            outlet_events[BACKLOG].extra = {**window, "batches_left": left, "late_events": late}
        return left

    requeue(publish(detect.expand(batch_key=list_batches())))


brandmon_detect()
