"""brandmon_detect: score the images that ingestion stored and nobody scored yet.

Scheduled on the `brandmon://posts` asset (every finished ingest run). It lists the pending
work as batch keys (XCom holds keys, never images), maps `detect_pending` over them in the
`brandmon_tf` pool so that however many workers run, only as many TensorFlow processes as
the pool has slots load a model at once, then emits `brandmon://detections`.

Create the pool once (docker-compose's airflow-init does it):
`airflow pools set brandmon_tf 1 "TensorFlow inference and training"`; raise the slots to
run more detections in parallel on bigger workers.

Idempotent: an image scored by the active model is not pending any more, so a re-run (or a
retried batch) finds nothing to do. Without an active model the run logs how to train one
(the brandmon_train DAG) and succeeds with nothing scored; aggregation still runs on text
mentions.

Parse-time settings: BRANDMON_TF_POOL (default brandmon_tf), BRANDMON_DETECT_BATCH_IMAGES
(images per mapped task; default 32 x detector.batch_size), BRANDMON_DETECT_MAX_TASKS
(default 256 mapped tasks per run; the rest waits for the next run).
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pendulum
from airflow.sdk import Asset, dag, get_current_context, task

POSTS = Asset("brandmon://posts")
DETECTIONS = Asset("brandmon://detections")

TF_POOL = os.environ.get("BRANDMON_TF_POOL") or "brandmon_tf"
BATCH_IMAGES = (
    int(os.environ["BRANDMON_DETECT_BATCH_IMAGES"])
    if os.environ.get("BRANDMON_DETECT_BATCH_IMAGES")
    else None
)
MAX_TASKS = int(os.environ.get("BRANDMON_DETECT_MAX_TASKS") or 256)


def _on_failure(context: Any) -> None:
    from pipeline.airflow_support import log_failure

    log_failure(context)


DEFAULT_ARGS = {
    "owner": "brandmon",
    "retries": max(2, int(os.environ.get("BRANDMON_TASK_RETRIES") or 3)),
    "retry_delay": dt.timedelta(seconds=float(os.environ.get("BRANDMON_RETRY_DELAY_S") or 120)),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": dt.timedelta(hours=1),
    "on_failure_callback": _on_failure,
}


@dag(
    dag_id="brandmon_detect",
    schedule=[POSTS],
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
        """Keys of the pending image batches (empty without an active model: logged)."""
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
        _version, first, last = (batch_key.split(":") + ["", "", ""])[:3]
        get_current_context()["brandmon_batch"] = f"{first[:10]}..{last[:10]}"  # type: ignore[index]
        from pipeline.airflow_support import counts_only, task_context
        from pipeline.detector.jobs import detect_pending

        with task_context() as ctx:
            return counts_only(detect_pending(ctx, batch_key=batch_key, progress=False))

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

    publish(detect.expand(batch_key=list_batches()))


brandmon_detect()
