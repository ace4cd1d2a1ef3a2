"""Airflow test plumbing: a throwaway AIRFLOW_HOME with a migrated SQLite metadata database."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from dags_helpers import airflow_base_env


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh AIRFLOW_HOME whose SQLite metadata database is migrated (`airflow db migrate`)."""
    home = tmp_path_factory.mktemp("airflow_home")
    env = airflow_base_env(home)
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("airflow")), "db", "migrate"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, (
        f"airflow db migrate failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    yield home
