"""What the brandmon DAG files share at parse time: numeric env settings, the TensorFlow pool
setting, retries and the failure callback (asset URIs, pool names and the batch-key format are
in `pipeline.dag_assets`).

Why here, in the installed package, and so light: every Airflow tool must import the DAG files
as they are (`airflow dags list-import-errors --local`, a plain `DagBag(dag_folder="dags")`,
the dag-processor, an IDE), and none of them puts the DAGs folder on `sys.path`. So the DAG
files import this module at top level; it imports the standard library only (and
`pipeline.errors`, itself standard library only), never the pipeline's settings, SQLAlchemy,
boto3 or TensorFlow, so parsing stays cheap.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from typing import Any

from pipeline.dag_assets import TF_POOL

# Upper bounds of the numeric parse-time settings. Airflow stores retries and
# max_active_runs in 32-bit integer columns (a larger value is an `integer out of range` in
# the scheduler, not an import error), backs off for at most an hour anyway, and its
# api-server refuses a mapped task longer than [core] max_map_length (default 1024).
MAX_RETRIES = 100
MAX_RETRY_DELAY_S = 86400.0
MAX_ACTIVE_RUNS = 1024


def max_map_length() -> int:
    """Airflow's [core] max_map_length as the environment sets it (default 1024): the most
    mapped tasks a run may expand to."""
    return int(env_number("AIRFLOW__CORE__MAX_MAP_LENGTH", 1024, minimum=1, maximum=2**31 - 1))


def tf_pool(env: Any = None) -> str:
    """The pool TensorFlow tasks (detect batches, training) run in: BRANDMON_TF_POOL or brandmon_tf."""
    return (os.environ if env is None else env).get("BRANDMON_TF_POOL") or TF_POOL


def env_number(name: str, default: Any, kind: type = int, minimum: float = 0, maximum: float | None = None) -> Any:
    """A numeric parse-time setting from the environment; a bad value fails the import with
    one line naming the variable (not a bare `invalid literal for int()`, nor an
    `OverflowError` from `timedelta` or a Postgres `integer out of range` in the scheduler
    later: NaN, infinities and values above `maximum` are refused here)."""
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    what = "a whole number" if kind is int else "a number"
    example = f"e.g. {default}" if default is not None else "a positive number"
    try:
        value = kind(raw)
    except ValueError:
        raise ValueError(f"{name}={raw[:40]!r} is not {what}; set {example}, or unset it for the default") from None
    if not math.isfinite(value):
        raise ValueError(f"{name}={raw[:40]!r} is not a finite number; set {example}, or unset it for the default")
    if value < minimum:
        raise ValueError(f"{name}={raw[:40]!r} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{name}={raw[:40]!r} must be at most {maximum}; set {example}, or unset it for the default")
    return value


def on_failure(context: Any) -> None:
    """Failure callback: one scrubbed summary paragraph (DAG, task, interval, error)."""
    from pipeline.airflow_support import log_failure

    log_failure(context)


def default_args() -> dict[str, Any]:
    """Retries with exponential backoff (BRANDMON_TASK_RETRIES >= 2, BRANDMON_RETRY_DELAY_S)."""
    return {
        "owner": "brandmon",
        "retries": max(2, env_number("BRANDMON_TASK_RETRIES", 3, maximum=MAX_RETRIES)),
        "retry_delay": dt.timedelta(
            seconds=env_number("BRANDMON_RETRY_DELAY_S", 120.0, float, maximum=MAX_RETRY_DELAY_S)
        ),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": dt.timedelta(hours=1),
        "on_failure_callback": on_failure,
    }
