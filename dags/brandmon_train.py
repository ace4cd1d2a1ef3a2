"""brandmon_train: train a logo classifier on a labelled dataset, register it, and activate
it only if it beats the active model (on the same held-out images; the `activate` param can
also say `always` or `never`).

Manual (no schedule), and created unpaused (`is_paused_upon_creation=False`: a paused DAG's
triggered run would wait in `queued`): trigger it from the UI form or
`airflow dags trigger brandmon_train -c '{"dataset": "/data/logos", "epochs": 10}'`.
Training runs in the `brandmon_tf` pool, so it never shares a worker's cores with
detection batches beyond the pool's slots. A retry trains again from the same inputs; the
registry keeps every version and activation is decided by metrics, so a repeat is harmless.

When the new version is activated, `publish` emits `brandmon://model`, which schedules
`brandmon_detect` to score the images with it (activation already marked the days those
images belong to for re-aggregation); a version that is not activated emits nothing.

The `options` param is checked before anything loads (unknown keys, a `mode` other than
auto/head/full/finetune:N, a `threshold_rule`, `fusion`, `crop_net` or `matcher` other than
its lower-case choices, values of the wrong type or out of range, e.g. more than 500 epochs
or an input over 1024 px): a bad one fails the run with one line.
Parse-time settings: BRANDMON_TF_POOL, BRANDMON_TASK_RETRIES, BRANDMON_RETRY_DELAY_S (a
non-numeric value is an import error naming the variable).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import pendulum
from airflow.sdk import Param, dag, task

from pipeline import dag_assets, dag_support

MODEL = dag_assets.assets().model
TF_POOL = dag_support.tf_pool()
# What the UI form and `airflow dags trigger -c` validate before a run exists; the task
# checks every option again (pipeline.airflow_support.check_train_options).
TRAIN_MODES = r"^(auto|head|full|finetune:([1-9]|1[01]))$"  # N = 1..11 (check_mode)


DEFAULT_ARGS = dag_support.default_args()


@dag(
    dag_id="brandmon_train",
    schedule=None,
    start_date=pendulum.datetime(2024, 1, 1, tz="UTC"),
    catchup=False,
    max_active_runs=1,
    # Manual only (no schedule), so nothing runs by itself when it is active; created unpaused
    # so that a triggered run starts instead of waiting in `queued` for an unpause.
    is_paused_upon_creation=False,
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
        "activate": Param(
            "if_better",
            type="string",
            enum=["if_better", "always", "never"],
            description="if_better: only when it beats the active model at the operating point, both scored on "
            "the new validation split (precision lower bound, then recall, brand top-1, F1); "
            "never: register only (activate later with `brandmon model activate V`)",
        ),
        "options": Param(
            {},
            type="object",
            properties={
                "mode": {"type": "string", "pattern": TRAIN_MODES},
                # the bounds of pipeline.airflow_support.TRAIN_OPTION_RANGES (checked again there)
                "input_size": {"type": ["null", "integer"], "minimum": 32, "maximum": 1024},
                "epochs": {"type": ["null", "integer"], "minimum": 0, "maximum": 500},
                "head_epochs": {"type": "integer", "minimum": 0, "maximum": 1000},
                "batch_size": {"type": "integer", "minimum": 1, "maximum": 1024},
                "matcher": {"type": "string", "enum": ["auto", "on", "off"]},
                # the choices resolve_config accepts, case and all (a test keeps them equal)
                "threshold_rule": {"type": "string", "enum": ["wilson", "point"]},
                "fusion": {"type": "string", "enum": ["val", "fitted"]},
                "crop_net": {"type": "string", "enum": ["auto", "off"]},
            },
            description='Advanced settings overriding the profile, e.g. {"input_size": 128, "mode": "finetune:2"}',
        ),
    },
    doc_md=__doc__,
)
def brandmon_train() -> None:
    @task(pool=TF_POOL, execution_timeout=dt.timedelta(hours=12))
    def train(params: dict[str, Any] | None = None) -> dict[str, Any]:
        """Train, register, activate if better; returns the version, activation, headline metrics."""
        from pipeline.airflow_support import check_train_options, task_context, train_summary
        from pipeline.detector.jobs import train_model

        p = params or {}
        options = check_train_options(p.get("options"))  # one-line ConfigError, before any loading
        with task_context() as ctx:
            result = train_model(
                ctx,
                p["dataset"],
                fmt=p.get("format") or "folders",
                weights=p.get("weights") or "auto",
                epochs=p.get("epochs"),
                target_precision=float(p.get("target_precision") or 0.9),
                profile=p.get("profile") or "default",
                activate=p.get("activate") or "if_better",
                **options,
            )
        return train_summary(result)

    @task(outlets=[MODEL])
    def publish(summary: dict[str, Any], outlet_events: Any = None) -> str:
        """Emit `brandmon://model` when the new version was activated; otherwise skip (no event)."""
        from pipeline.airflow_support import activated_or_skip

        version = activated_or_skip(summary)  # raises AirflowSkipException when not activated
        if outlet_events is not None:
            outlet_events[MODEL].extra = {"version": version}
        return version

    publish(train())


brandmon_train()
