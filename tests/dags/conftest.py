"""Airflow test plumbing: a throwaway AIRFLOW_HOME with a migrated SQLite metadata database."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from dags_helpers import migrated_airflow_home


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A fresh AIRFLOW_HOME whose SQLite metadata database is migrated (`airflow db migrate`)."""
    yield migrated_airflow_home(tmp_path_factory.mktemp("airflow_home"))
