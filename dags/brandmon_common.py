"""What the brandmon DAG files share at parse time: numeric env settings, retries, failure log.

Not a DAG (listed in `.airflowignore`): a module of the DAGs folder, which Airflow puts on
`sys.path`, so each DAG file imports it at top level the way Airflow's module-management
guide suggests. Standard library and `airflow.sdk`-free on purpose: parsing a DAG file stays
cheap, and `pipeline` is imported only when a callback or task runs.
"""

from __future__ import annotations

import datetime as dt
import os
from typing import Any


def env_number(name: str, default: Any, kind: type = int, minimum: float = 0) -> Any:
    """A numeric parse-time setting from the environment; a bad value fails the import with
    one line naming the variable (not a bare `invalid literal for int()`)."""
    raw = (os.environ.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = kind(raw)
    except ValueError:
        what = "a whole number" if kind is int else "a number"
        example = f"e.g. {default}" if default is not None else "a positive number"
        raise ValueError(f"{name}={raw!r} is not {what}; set {example}, or unset it for the default") from None
    if value < minimum:
        raise ValueError(f"{name}={raw!r} must be at least {minimum}")
    return value


def on_failure(context: Any) -> None:
    """Failure callback: one scrubbed summary paragraph (DAG, task, interval, error)."""
    from pipeline.airflow_support import log_failure

    log_failure(context)


def default_args() -> dict[str, Any]:
    """Retries with exponential backoff (BRANDMON_TASK_RETRIES >= 2, BRANDMON_RETRY_DELAY_S)."""
    return {
        "owner": "brandmon",
        "retries": max(2, env_number("BRANDMON_TASK_RETRIES", 3)),
        "retry_delay": dt.timedelta(seconds=env_number("BRANDMON_RETRY_DELAY_S", 120.0, float)),
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": dt.timedelta(hours=1),
        "on_failure_callback": on_failure,
    }
