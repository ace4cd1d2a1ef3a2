"""brandmon_train: train a logo classifier on a labelled dataset, register it, and activate
it only if it beats the active model (on the same held-out metrics).

Manual (no schedule): trigger it from the UI form or
`airflow dags trigger brandmon_train -c '{"dataset": "/data/logos", "epochs": 10}'`.
Training runs in the `brandmon_tf` pool, so it never shares a worker's cores with
detection batches beyond the pool's slots. A retry trains again from the same inputs; the
registry keeps every version and activation is decided by metrics, so a repeat is harmless.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

TF_POOL = os.environ.get("BRANDMON_TF_POOL") or "brandmon_tf"


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
    dag_id="brandmon_train",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["brandmon", "train", "tensorflow"],
    params={
        "dataset": Param(
            "",
            type="string",
            minLength=1,
            description="Labelled images: a folder readable by the worker (one sub-folder per class for 'folders')",
        ),
        "format": Param(
            "folders",
            type="string",
            enum=["folders", "boxes"],
            description="Dataset layout: folders (one per class) or boxes",
        ),
        "weights": Param(
            "auto",
            type="string",
            description="Base weights: auto (ImageNet from the Keras cache if present, else none), imagenet, none, or an .h5 path",
        ),
        "epochs": Param(
            None,
            type=["null", "integer"],
            minimum=1,
            maximum=500,
            description="Empty = profile default",
        ),
        "target_precision": Param(
            0.9,
            type="number",
            minimum=0.5,
            maximum=1.0,
            description="Precision the score threshold is tuned for",
        ),
        "profile": Param(
            "default", type="string", enum=["default", "demo"], description="Training profile"
        ),
        "options": Param(
            {},
            type="object",
            description='Advanced settings overriding the profile, e.g. {"input_size": 128, "mode": "head"}',
        ),
    },
    doc_md=__doc__,
)
def brandmon_train() -> None:
    @task(pool=TF_POOL, execution_timeout=dt.timedelta(hours=12))
    def train(params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train, register, activate if better; returns the version, activation, headline metrics."""
        from pipeline.airflow_support import task_context, train_summary
        from pipeline.detector.jobs import train_model

        p = params or {}
        with task_context() as ctx:
            result = train_model(
                ctx,
                p["dataset"],
                fmt=p.get("format") or "folders",
                weights=p.get("weights") or "auto",
                epochs=p.get("epochs"),
                target_precision=float(p.get("target_precision") or 0.9),
                profile=p.get("profile") or "default",
                activate="if_better",
                progress=False,
                **dict(p.get("options") or {}),
            )
        return train_summary(result)

    train()


brandmon_train()
