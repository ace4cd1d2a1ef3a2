"""Helpers for the DAG tests: the Airflow subprocess environment and runner (imported by
conftest.py and the test modules; a unique basename, so no clash with tests/conftest.py)."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
DAGS = REPO / "dags"
RUNNER = Path(__file__).with_name("airflow_runner.py")

# In-process imports of airflow.sdk (the connection-mapping unit tests) must never touch
# ~/airflow: point them at a private home before anything imports Airflow.
_INPROC_HOME = Path(tempfile.mkdtemp(prefix="brandmon-airflow-inproc-"))
atexit.register(shutil.rmtree, _INPROC_HOME, True)
os.environ.setdefault("AIRFLOW_HOME", str(_INPROC_HOME))
os.environ.setdefault("AIRFLOW__CORE__LOAD_EXAMPLES", "False")


def airflow_base_env(home: Path) -> dict[str, str]:
    """Environment for an Airflow subprocess: private home, our DAGs, SQLite metadata."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "BRANDMON_"))}
    env.update(
        {
            "AIRFLOW_HOME": str(home),
            "AIRFLOW__CORE__DAGS_FOLDER": str(DAGS),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__UNIT_TEST_MODE": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "AIRFLOW__LOGGING__LOGGING_LEVEL": "WARNING",
            "TF_CPP_MIN_LOG_LEVEL": "2",
            "PYTHONUNBUFFERED": "1",
        }
    )
    return env


def run_airflow(
    env: dict[str, str], *args: str, timeout: float = 300, with_output: bool = False
) -> Any:
    """Run tests/dags/airflow_runner.py with `args`; return its JSON result (last line), or
    (result, everything the process wrote) with `with_output`, for assertions on task logs."""
    proc = subprocess.run(
        [sys.executable, str(RUNNER), *args],
        env=env,
        cwd=str(REPO),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    if proc.returncode != 0 or not lines:
        tail = (proc.stdout[-4000:] + "\n--- stderr ---\n" + proc.stderr[-6000:]).strip()
        raise AssertionError(
            f"airflow_runner {' '.join(args)} failed (rc={proc.returncode}):\n{tail}"
        )
    result = json.loads(lines[-1])
    return (result, proc.stdout + proc.stderr) if with_output else result


def migrated_airflow_home(home: Path) -> Path:
    """A fresh AIRFLOW_HOME with its SQLite metadata database migrated (`airflow db migrate`)."""
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        env=airflow_base_env(home),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"airflow db migrate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return home
