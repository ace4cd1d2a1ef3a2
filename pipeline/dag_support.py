"""What the brandmon DAG files share at parse time: their environment knobs, the TensorFlow pool
setting, retries and the failure callback (asset URIs, pool names and the batch-key format are
in `pipeline.dag_assets`).

Why here, in the installed package, and so light: every Airflow tool must import the DAG files
as they are (`airflow dags list-import-errors --local`, a plain `DagBag(dag_folder="dags")`,
the dag-processor, an IDE), and none of them puts the DAGs folder on `sys.path`. So the DAG
files import this module at top level; it imports the standard library only (and
`pipeline.errors`, itself standard library only), never the pipeline's settings, SQLAlchemy,
boto3 or TensorFlow, so parsing stays cheap.

Every environment variable a DAG file reads while parsed is read here (the knobs below), and
everything else the package reads of the environment is read in `pipeline.settings`: those
are the only two modules that touch `os.environ` (`tests/test_settings_env.py`). This one
cannot simply call `pipeline.settings`, which brings YAML and the config parsers to every parse.
"""

from __future__ import annotations

import datetime as dt
import math
import os
from typing import Any

from pipeline.dag_assets import TF_POOL

DEFAULT_INGEST_SCHEDULE = "@daily"
DEFAULT_INGEST_START = "2026-01-01"

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


# --- Parse-time knobs (environment) ----------------------------------------------------------


def task_retries() -> int:
    """BRANDMON_TASK_RETRIES (default 3, at least 2: a task's first retry is often a blip)."""
    return max(2, env_number("BRANDMON_TASK_RETRIES", 3, maximum=MAX_RETRIES))


def retry_delay_s() -> float:
    """BRANDMON_RETRY_DELAY_S: the first retry's delay, doubled each time (default 120)."""
    return env_number("BRANDMON_RETRY_DELAY_S", 120.0, float, maximum=MAX_RETRY_DELAY_S)


def ingest_schedule() -> str:
    """brandmon_ingest's cron or preset: BRANDMON_INGEST_SCHEDULE (or the Airflow variable of
    that name set through the environment), default @daily; the DAG validates it."""
    return (os.environ.get("BRANDMON_INGEST_SCHEDULE") or os.environ.get("AIRFLOW_VAR_BRANDMON_INGEST_SCHEDULE")
            or DEFAULT_INGEST_SCHEDULE)


def ingest_start() -> str:
    """brandmon_ingest's first interval: BRANDMON_INGEST_START (ISO date; the DAG parses it)."""
    return os.environ.get("BRANDMON_INGEST_START") or DEFAULT_INGEST_START


def ingest_max_active_runs() -> int:
    return env_number("BRANDMON_INGEST_MAX_ACTIVE_RUNS", 4, minimum=1, maximum=MAX_ACTIVE_RUNS)


def detect_batch_images() -> int | None:
    """BRANDMON_DETECT_BATCH_IMAGES: images per mapped detect task (None: the DAG's default)."""
    return env_number("BRANDMON_DETECT_BATCH_IMAGES", None, minimum=1, maximum=1_000_000)


def detect_max_tasks() -> int:
    """BRANDMON_DETECT_MAX_TASKS: mapped detect tasks per run (more than [core] max_map_length
    and the api-server refuses the list at run time)."""
    return env_number("BRANDMON_DETECT_MAX_TASKS", 256, minimum=1, maximum=max_map_length())


def on_failure(context: Any) -> None:
    """Failure callback: one scrubbed summary paragraph (DAG, task, interval, error)."""
    from pipeline.airflow_support import log_failure

    log_failure(context)


def default_args() -> dict[str, Any]:
    """Retries with exponential backoff (BRANDMON_TASK_RETRIES >= 2, BRANDMON_RETRY_DELAY_S)."""
    return {
        "owner": "brandmon",
        "retries": task_retries(),
        "retry_delay": dt.timedelta(seconds=retry_delay_s()),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": dt.timedelta(hours=1),
        "on_failure_callback": on_failure,
    }
