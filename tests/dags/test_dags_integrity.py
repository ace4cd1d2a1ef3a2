"""DAG integrity: every DAG parses, is tagged, retries with backoff, reports failures, has
the expected graph and schedule, and parses fast without heavy imports at top level."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

import pytest
from dags_helpers import DAGS, airflow_base_env, run_airflow

EXPECTED_DAGS = {"brandmon_ingest", "brandmon_detect", "brandmon_aggregate", "brandmon_train"}
ALLOWED_TOP_LEVEL = {"__future__", "airflow", "pendulum"}
FORBIDDEN_MODULES = {
    "pipeline",
    "tensorflow",
    "keras",
    "pandas",
    "boto3",
    "botocore",
    "sqlalchemy",
    "cv2",
    "PIL",
}


@pytest.fixture(scope="module")
def parsed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """DagBag of dags/ parsed in a fresh process (no metadata database needed)."""
    home = tmp_path_factory.mktemp("airflow_parse_home")
    return run_airflow(airflow_base_env(home), "parse", timeout=180)


def edges(dag: dict[str, Any]) -> set[tuple[str, str]]:
    return {(t, d) for t, info in dag["tasks"].items() for d in info["downstream"]}


def test_no_import_errors_and_all_dags_present(parsed):
    assert parsed["import_errors"] == {}
    assert set(parsed["dags"]) == EXPECTED_DAGS


def test_every_dag_has_tags_and_every_task_retries_with_backoff_and_failure_callback(parsed):
    for dag_id, dag in parsed["dags"].items():
        assert "brandmon" in dag["tags"] and len(dag["tags"]) >= 2, dag_id
        for task_id, task in dag["tasks"].items():
            where = f"{dag_id}.{task_id}"
            assert task["retries"] >= 2, where
            assert task["retry_exponential_backoff"] >= 2.0, where  # Airflow 3.3: a multiplier
            assert task["retry_delay_s"] > 0, where
            assert task["has_failure_callback"], where


def test_ingest_graph_and_schedule(parsed):
    dag = parsed["dags"]["brandmon_ingest"]
    assert edges(dag) == {("list_sources", "ingest"), ("ingest", "publish")}
    assert dag["tasks"]["ingest"]["mapped"] and not dag["tasks"]["list_sources"]["mapped"]
    assert dag["tasks"]["publish"]["outlets"] == ["brandmon://posts"]
    assert dag["catchup"] is True
    assert (
        dag["timetable"] == "CronDataIntervalTimetable"
    )  # real [start, end) intervals for backfills
    assert dag["params"]["sources"]["type"] == "array"


def test_detect_graph_pool_and_assets(parsed):
    dag = parsed["dags"]["brandmon_detect"]
    assert edges(dag) == {("list_batches", "detect"), ("detect", "publish")}
    assert dag["asset_schedule"] == ["brandmon://posts"]
    assert dag["tasks"]["detect"]["mapped"]
    assert dag["tasks"]["detect"]["pool"] == "brandmon_tf"
    assert dag["tasks"]["list_batches"]["pool"] == "default_pool"
    assert dag["tasks"]["publish"]["outlets"] == ["brandmon://detections"]
    # zero batches (nothing pending, or no model yet) must still emit the event for aggregation
    assert dag["tasks"]["publish"]["trigger_rule"].endswith("NONE_FAILED")


def test_aggregate_graph_and_schedule(parsed):
    dag = parsed["dags"]["brandmon_aggregate"]
    assert edges(dag) == {("aggregate", "report")}
    assert dag["asset_schedule"] == ["brandmon://detections"]
    assert set(dag["params"]["day"]["type"]) == {"null", "string"}


def test_train_is_manual_with_typed_params_in_the_tf_pool(parsed):
    dag = parsed["dags"]["brandmon_train"]
    assert dag["timetable"] == "NullTimetable"
    assert set(dag["tasks"]) == {"train"} and dag["tasks"]["train"]["pool"] == "brandmon_tf"
    params = dag["params"]
    assert set(params) == {
        "dataset",
        "format",
        "weights",
        "epochs",
        "target_precision",
        "profile",
        "options",
    }
    assert params["dataset"]["type"] == "string" and params["dataset"]["minLength"] == 1
    assert set(params["epochs"]["type"]) == {"null", "integer"}
    assert params["target_precision"]["type"] == "number"
    assert (params["target_precision"]["minimum"], params["target_precision"]["maximum"]) == (
        0.5,
        1.0,
    )
    assert "folders" in params["format"]["enum"]


def test_parsing_is_fast_and_imports_nothing_heavy(parsed):
    assert parsed["new_modules"] == [], "DAG files import heavy modules at parse time"
    assert parsed["parse_s"] < 2.0
    assert all(s["duration_s"] < 0.5 for s in parsed["stats"]), parsed["stats"]


@pytest.mark.parametrize("path", sorted(DAGS.glob("*.py")), ids=lambda p: p.name)
def test_dag_files_import_only_airflow_sdk_pendulum_and_stdlib_at_top_level(path: Path):
    import sys

    tree = ast.parse(path.read_text())
    for node in tree.body:  # module level only; task functions import lazily
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        for name in names:
            root = name.split(".")[0]
            assert root in ALLOWED_TOP_LEVEL or root in sys.stdlib_module_names, (
                f"{path.name}: import {name}"
            )
            if root == "airflow":
                assert name == "airflow.sdk", f"{path.name}: import {name} (only airflow.sdk)"
            assert root not in FORBIDDEN_MODULES
