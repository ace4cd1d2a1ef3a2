"""DAG integrity: every DAG parses, is tagged, retries with backoff, reports failures, has
the expected graph and schedule, and parses fast without heavy imports at top level."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from dags_helpers import DAGS, REPO, airflow_base_env, run_airflow

EXPECTED_DAGS = {"brandmon_ingest", "brandmon_detect", "brandmon_aggregate", "brandmon_train"}
# pipeline: only its light `dag_assets` and `dag_support` modules (standard library only; checked below)
ALLOWED_TOP_LEVEL = {"__future__", "airflow", "pendulum", "pipeline"}
# what parsing may load of the package: the light module and the errors it raises
PARSE_TIME_PIPELINE = {"pipeline", "pipeline.dag_assets", "pipeline.dag_support", "pipeline.errors"}
LIGHT_MODULES = ["dag_assets", "dag_support"]
FORBIDDEN_MODULES = {
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
    assert edges(dag) == {("list_batches", "detect"), ("detect", "publish"), ("publish", "requeue")}
    # posts OR a newly activated model OR its own backlog (Airflow 3 asset expression)
    assert dag["asset_condition"] == "AssetAny"
    assert dag["asset_schedule"] == ["brandmon://detect-backlog", "brandmon://model", "brandmon://posts"]
    assert dag["max_active_runs"] == 1
    assert dag["tasks"]["detect"]["mapped"]
    assert dag["tasks"]["detect"]["pool"] == "brandmon_tf"
    assert dag["tasks"]["list_batches"]["pool"] == "default_pool"
    assert dag["tasks"]["publish"]["outlets"] == ["brandmon://detections"]
    # zero batches (nothing pending, or no model yet) must still emit the event for aggregation
    assert dag["tasks"]["publish"]["trigger_rule"].endswith("NONE_FAILED")
    assert dag["tasks"]["requeue"]["outlets"] == ["brandmon://detect-backlog"]


def test_aggregate_graph_and_schedule(parsed):
    dag = parsed["dags"]["brandmon_aggregate"]
    assert edges(dag) == {("aggregate", "report"), ("aggregate", "forecast"), ("report", "requeue")}
    # the detections OR its own tail event (late detections events, see late_events)
    assert dag["asset_condition"] == "AssetAny"
    assert dag["asset_schedule"] == ["brandmon://aggregate-backlog", "brandmon://detections"]
    assert dag["tasks"]["requeue"]["outlets"] == ["brandmon://aggregate-backlog"]
    assert set(dag["params"]["day"]["type"]) == {"null", "string"}
    assert dag["max_active_runs"] == 1


def test_train_is_manual_with_typed_params_in_the_tf_pool(parsed):
    dag = parsed["dags"]["brandmon_train"]
    assert dag["timetable"] == "NullTimetable"
    # manual only: created unpaused so a triggered run starts (a paused DAG's stays queued)
    assert dag["is_paused_upon_creation"] is False
    assert {d["is_paused_upon_creation"] for k, d in parsed["dags"].items() if k != "brandmon_train"} == {None}
    assert set(dag["tasks"]) == {"train", "publish"} and dag["tasks"]["train"]["pool"] == "brandmon_tf"
    assert edges(dag) == {("train", "publish")}
    assert dag["tasks"]["publish"]["outlets"] == ["brandmon://model"]  # emitted only on activation
    params = dag["params"]
    assert set(params) == {
        "dataset",
        "format",
        "weights",
        "epochs",
        "target_precision",
        "profile",
        "activate",
        "options",
    }
    assert params["activate"]["enum"] == ["if_better", "always", "never"]
    assert params["dataset"]["type"] == "string" and params["dataset"]["minLength"] == 1
    assert set(params["epochs"]["type"]) == {"null", "integer"}
    assert params["target_precision"]["type"] == "number"
    assert (params["target_precision"]["minimum"], params["target_precision"]["maximum"]) == (
        0.5,
        1.0,
    )
    assert "folders" in params["format"]["enum"]
    # `options` is validated when the run is triggered (UI form, `airflow dags trigger -c`)
    import jsonschema

    schema = params["options"]
    for ok in ({}, {"mode": "finetune:2", "input_size": 128}, {"mode": "head", "matcher": "off"}):
        jsonschema.validate(ok, schema)
    for bad in ({"mode": "finetune:x"}, {"mode": "finetune"}, {"mode": "finetune:12"}, {"input_size": "big"}, {"input_size": 100000}, {"matcher": "yes"}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)
    # the named choices are the ones resolve_config takes, case and all (outside check, #14: "Wilson" got through)
    from pipeline.detector.training.config import (
        CROP_NET_CHOICES,
        FUSION_CHOICES,
        MATCHER_CHOICES,
        THRESHOLD_RULES,
    )

    props = schema["properties"]
    assert props["threshold_rule"]["enum"] == list(THRESHOLD_RULES) and props["fusion"]["enum"] == list(FUSION_CHOICES)
    assert props["crop_net"]["enum"] == list(CROP_NET_CHOICES) and props["matcher"]["enum"] == list(MATCHER_CHOICES)
    jsonschema.validate({"threshold_rule": "point", "fusion": "fitted", "crop_net": "off"}, schema)
    for bad in ({"threshold_rule": "Wilson"}, {"fusion": "Val"}, {"crop_net": "OFF"}, {"threshold_rule": None}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def test_parsing_is_fast_and_imports_nothing_heavy(parsed):
    assert set(parsed["new_modules"]) <= PARSE_TIME_PIPELINE, "DAG files import heavy modules at parse time"
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
            if root == "pipeline":
                assert name == "pipeline" and [a.name for a in node.names] == LIGHT_MODULES, (
                    f"{path.name}: only `from pipeline import dag_assets, dag_support` at top level"
                )


def test_the_dags_folder_holds_only_dag_files_sharing_the_installed_light_module():
    assert sorted(p.name for p in DAGS.iterdir() if p.name != "__pycache__") == sorted(
        f"{d}.py" for d in EXPECTED_DAGS
    )
    for path in sorted(DAGS.glob("*.py")):
        assert "from pipeline import dag_assets, dag_support" in path.read_text(), path.name
        assert "Asset(" not in path.read_text(), f"{path.name}: assets are defined once, in dag_assets"


def test_the_light_module_imports_only_the_standard_library():
    """Imported in a fresh interpreter: nothing heavy (or the pipeline's settings) comes with it."""
    code = (
        "import json, sys; before = set(sys.modules); import pipeline.dag_assets, pipeline.dag_support; "
        "print(json.dumps(sorted(set(sys.modules) - before)))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    new = set(json.loads(proc.stdout.splitlines()[-1]))
    heavy = {"tensorflow", "keras", "pandas", "numpy", "sqlalchemy", "boto3", "botocore", "yaml", "airflow"}
    assert not {m for m in new if m.split(".")[0] in heavy}, sorted(new)
    assert {m for m in new if m.startswith("pipeline")} == PARSE_TIME_PIPELINE, sorted(new)
    assert all(m.split(".")[0] in sys.stdlib_module_names or m.startswith(("pipeline", "_")) for m in new), sorted(new)


def test_a_plain_dagbag_imports_every_dag(tmp_path):
    """The integrity test most CI setups use: DagBag(dag_folder="dags"), no bundle, no DAGs
    folder on sys.path, in a fresh process."""
    code = (
        "import json; from airflow.dag_processing.dagbag import DagBag; "
        "bag = DagBag(dag_folder='dags'); "
        "print(json.dumps({'errors': bag.import_errors, 'dags': sorted(bag.dag_ids)}))"
    )
    env = airflow_base_env(tmp_path)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.splitlines()[-1])
    assert result == {"errors": {}, "dags": sorted(EXPECTED_DAGS)}


def test_airflow_cli_lists_the_dags_without_import_errors(airflow_home):
    """`airflow dags list-import-errors --local` and `airflow dags list --local`, as a data
    engineer runs them on a fresh clone."""
    env = airflow_base_env(airflow_home)
    airflow = str(Path(sys.executable).with_name("airflow"))

    def cli(*args: str) -> str:
        proc = subprocess.run([airflow, *args], env=env, capture_output=True, text=True, timeout=180, cwd=REPO)
        assert proc.returncode == 0, (args, proc.stdout[-2000:], proc.stderr[-3000:])
        return proc.stdout

    errors = cli("dags", "list-import-errors", "--local", "-o", "json")
    assert json.loads(errors.strip().splitlines()[-1]) == [], errors
    listed = json.loads(cli("dags", "list", "--local", "-o", "json").strip().splitlines()[-1])
    assert {d["dag_id"] for d in listed} == EXPECTED_DAGS
    assert all(Path(d["fileloc"]).parent == DAGS for d in listed)


def parse_with(tmp_path_factory: pytest.TempPathFactory, **env: str) -> dict[str, Any]:
    home = tmp_path_factory.mktemp("airflow_parse_env")
    return run_airflow({**airflow_base_env(home), **env}, "parse", timeout=180)


def test_ingest_schedule_start_and_concurrency_come_from_the_environment(parsed, tmp_path_factory):
    default = parsed["dags"]["brandmon_ingest"]
    assert default["timetable_expression"] in ("@daily", "0 0 * * *")
    assert default["start_date"].startswith("2026-01-01") and default["max_active_runs"] == 4
    custom = parse_with(
        tmp_path_factory,
        BRANDMON_INGEST_SCHEDULE="0 6 * * *",
        BRANDMON_INGEST_START="2025-03-01",
        BRANDMON_INGEST_MAX_ACTIVE_RUNS="2",
        BRANDMON_TASK_RETRIES="5",
    )
    assert custom["import_errors"] == {}
    dag = custom["dags"]["brandmon_ingest"]
    assert dag["timetable"] == "CronDataIntervalTimetable" and dag["timetable_expression"] == "0 6 * * *"
    assert dag["catchup"] is True and dag["max_active_runs"] == 2
    assert dag["start_date"].startswith("2025-03-01")
    assert {t["retries"] for d in custom["dags"].values() for t in d["tasks"].values()} == {5}


def test_bad_settings_are_import_errors_that_name_the_variable(tmp_path_factory):
    """A non-numeric BRANDMON_* setting (or a bad schedule/start) fails the DAG import with
    one line saying which variable and what to set, not a bare `invalid literal for int()`."""
    result = parse_with(
        tmp_path_factory,
        BRANDMON_TASK_RETRIES="three",
        BRANDMON_DETECT_MAX_TASKS="lots",
        BRANDMON_INGEST_SCHEDULE="every day",
    )
    errors = {Path(k).name: v for k, v in result["import_errors"].items()}
    assert set(errors) == {f"{d}.py" for d in EXPECTED_DAGS}
    want = {
        "brandmon_aggregate.py": "BRANDMON_TASK_RETRIES='three' is not a whole number; set e.g. 3",
        "brandmon_train.py": "BRANDMON_TASK_RETRIES='three' is not a whole number; set e.g. 3",
        "brandmon_detect.py": "BRANDMON_DETECT_MAX_TASKS='lots' is not a whole number; set e.g. 256",
        "brandmon_ingest.py": "BRANDMON_INGEST_SCHEDULE='every day' is not a cron expression or preset",
    }
    for name, message in want.items():
        assert message in errors[name], errors[name]
        assert "invalid literal" not in errors[name]
    more = parse_with(
        tmp_path_factory, BRANDMON_RETRY_DELAY_S="2m", BRANDMON_DETECT_BATCH_IMAGES="0",
        BRANDMON_INGEST_START="yesterday",
    )
    errors = {Path(k).name: v for k, v in more["import_errors"].items()}
    assert "BRANDMON_RETRY_DELAY_S='2m' is not a number" in errors["brandmon_aggregate.py"]
    assert "BRANDMON_DETECT_BATCH_IMAGES='0' must be at least 1" in errors["brandmon_detect.py"]
    assert "BRANDMON_INGEST_START='yesterday' is not a date; use YYYY-MM-DD" in errors["brandmon_ingest.py"]


def test_out_of_range_and_non_finite_settings_are_import_errors_that_name_the_variable(tmp_path_factory):
    """NaN, infinities and values no Airflow column or api-server accepts fail the import with
    one line naming the variable, instead of an `OverflowError` from timedelta (no variable
    named) or an import that passes and breaks the scheduler later (`integer out of range`
    for retries / max_active_runs in Postgres, a map longer than max_map_length refused at
    run time)."""
    result = parse_with(
        tmp_path_factory,
        BRANDMON_RETRY_DELAY_S="1e99",
        BRANDMON_DETECT_MAX_TASKS="99999999999999999999999",
        BRANDMON_INGEST_MAX_ACTIVE_RUNS="99999999999999999999",
    )
    errors = {Path(k).name: v for k, v in result["import_errors"].items()}
    assert set(errors) == {f"{d}.py" for d in EXPECTED_DAGS}
    assert "BRANDMON_RETRY_DELAY_S='1e99' must be at most 86400.0" in errors["brandmon_train.py"]
    assert "OverflowError" not in "".join(errors.values())
    for value in ("nan", "inf", "-inf"):
        errors = {Path(k).name: v for k, v in parse_with(tmp_path_factory, BRANDMON_RETRY_DELAY_S=value)["import_errors"].items()}
        assert f"BRANDMON_RETRY_DELAY_S='{value}' is not a finite number" in errors["brandmon_ingest.py"], errors
    more = parse_with(
        tmp_path_factory,
        BRANDMON_TASK_RETRIES="999999999999",
        BRANDMON_DETECT_MAX_TASKS="2000",
        BRANDMON_INGEST_MAX_ACTIVE_RUNS="99999999999999999999",
    )
    errors = {Path(k).name: v for k, v in more["import_errors"].items()}
    assert "BRANDMON_TASK_RETRIES='999999999999' must be at most 100" in errors["brandmon_aggregate.py"]
    retries_ok = parse_with(
        tmp_path_factory, BRANDMON_DETECT_MAX_TASKS="2000", BRANDMON_INGEST_MAX_ACTIVE_RUNS="99999999999999999999"
    )
    errors = {Path(k).name: v for k, v in retries_ok["import_errors"].items()}
    assert set(errors) == {"brandmon_detect.py", "brandmon_ingest.py"}
    assert "BRANDMON_DETECT_MAX_TASKS='2000' must be at most 1024" in errors["brandmon_detect.py"]
    assert "BRANDMON_INGEST_MAX_ACTIVE_RUNS='99999999999999999999' must be at most 1024" in errors["brandmon_ingest.py"]
    # a larger [core] max_map_length raises the bound with it
    raised = parse_with(tmp_path_factory, BRANDMON_DETECT_MAX_TASKS="2000", AIRFLOW__CORE__MAX_MAP_LENGTH="4096")
    assert raised["import_errors"] == {}
    assert raised["dags"]["brandmon_detect"]["tasks"]["detect"]["mapped"]


def test_producers_and_consumers_share_the_one_asset_object_of_each_uri(parsed):
    """Every outlet and every asset schedule is the very `Asset` that `dag_assets.assets()`
    holds for its URI (not a second `Asset("...")` of the same string in another DAG file),
    and each asset one DAG emits is one another DAG (or the same, for a backlog) waits for."""
    from pipeline import dag_assets

    dags = parsed["dags"]
    for dag_id, dag in dags.items():
        assert dag["schedule_shared"], dag_id
        for task_id, task in dag["tasks"].items():
            assert task["outlets_shared"], f"{dag_id}.{task_id}"
    emitted = {o for d in dags.values() for t in d["tasks"].values() for o in t["outlets"]}
    scheduled = {a for d in dags.values() for a in d["asset_schedule"]}
    assert emitted == scheduled == set(dag_assets.URIS)
    assert [a.name for a in dag_assets.assets()] == list(dag_assets.URIS)
    assert dag_assets.assets() is dag_assets.assets()
    # producer -> consumer, as the module's comments say
    assert dags["brandmon_ingest"]["tasks"]["publish"]["outlets"] == [dag_assets.POSTS]
    assert dag_assets.POSTS in dags["brandmon_detect"]["asset_schedule"]
    assert dags["brandmon_detect"]["tasks"]["publish"]["outlets"] == [dag_assets.DETECTIONS]
    assert dag_assets.DETECTIONS in dags["brandmon_aggregate"]["asset_schedule"]
    assert dags["brandmon_train"]["tasks"]["publish"]["outlets"] == [dag_assets.MODEL]
    assert dag_assets.MODEL in dags["brandmon_detect"]["asset_schedule"]
    assert dags["brandmon_detect"]["tasks"]["detect"]["pool"] == dag_assets.TF_POOL

