"""Run Airflow work in a fresh process for the DAG tests; prints one JSON document.

Why a subprocess: Airflow reads AIRFLOW_HOME and its config at import time and keeps
process-wide state (ORM session, secrets backends, SecretCache), so each test gets a clean
interpreter whose environment the test controls. Not collected by pytest (no test_ prefix).

    python airflow_runner.py parse              # DagBag: DAGs, tasks, edges, parse time, modules
    python airflow_runner.py run STEPS.json     # dag.test() each step in order
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

WATCHED_MODULES = (
    "pipeline",
    "tensorflow",
    "keras",
    "pandas",
    "boto3",
    "botocore",
    "sqlalchemy",
    "cv2",
    "PIL",
)


WARMUP_DAG = """
import datetime as dt
import pendulum
from airflow.sdk import Asset, CronDataIntervalTimetable, Param, dag, get_current_context, task

A = Asset("warmup://a")


@dag(schedule=CronDataIntervalTimetable("@daily", timezone="UTC"), start_date=pendulum.datetime(2024, 1, 1),
     params={"p": Param(1, type="integer")}, default_args={"retry_delay": dt.timedelta(seconds=1)})
def warmup():
    @task(outlets=[A])
    def one(x):
        return x

    one.expand(x=[1])


@dag(schedule=[A], start_date=pendulum.datetime(2024, 1, 1))
def warmup_consumer():
    @task
    def two():
        return get_current_context()

    two()


warmup()
warmup_consumer()
"""


def _loaded(prefixes: tuple[str, ...]) -> set[str]:
    return {m.split(".")[0] for m in sys.modules if m.split(".")[0] in prefixes}


def parse() -> dict[str, Any]:
    from airflow.dag_processing.dagbag import DagBag

    # Warm-up: parse a trivial DAG using the same airflow.sdk features first, so that what
    # Airflow itself loads on first use (provider asset handlers pull in boto3) is not
    # blamed on our DAG files.

    with tempfile.TemporaryDirectory() as warm:
        Path(warm, "warmup_dag.py").write_text(WARMUP_DAG)
        warm_bag = DagBag(dag_folder=warm, safe_mode=False)
        assert not warm_bag.import_errors, warm_bag.import_errors
    before = _loaded(WATCHED_MODULES)
    t0 = time.perf_counter()
    bag = DagBag(
        dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"],
        safe_mode=False,
        known_pools={"default_pool"},
    )
    parse_s = time.perf_counter() - t0
    after = _loaded(WATCHED_MODULES)
    dags: dict[str, Any] = {}
    for dag_id, dag in bag.dags.items():
        tasks = {}
        for task in dag.tasks:
            tasks[task.task_id] = {
                "retries": task.retries,
                "retry_exponential_backoff": float(task.retry_exponential_backoff or 0),
                "retry_delay_s": task.retry_delay.total_seconds(),
                "has_failure_callback": bool(task.on_failure_callback),
                "pool": task.pool,
                "mapped": "MappedOperator" in {c.__name__ for c in type(task).__mro__},
                "downstream": sorted(task.downstream_task_ids),
                "outlets": sorted(getattr(o, "name", str(o)) for o in (task.outlets or [])),
                "trigger_rule": str(task.trigger_rule),
            }
        condition = getattr(dag.timetable, "asset_condition", None)
        dags[dag_id] = {
            "tags": sorted(dag.tags),
            "catchup": dag.catchup,
            "fileloc": Path(dag.fileloc).name,
            "timetable": type(dag.timetable).__name__,
            "asset_schedule": sorted(a.name for a in getattr(condition, "objects", []) or []),
            "params": {k: dag.params.get_param(k).schema for k in dag.params},
            "tasks": tasks,
        }
    return {
        "import_errors": bag.import_errors,
        "parse_s": parse_s,
        "new_modules": sorted(after - before),
        "dags": dags,
        "stats": [
            {"file": Path(s.file).name, "duration_s": s.duration.total_seconds()}
            for s in bag.dagbag_stats
        ],
    }


def _xcom(ti: Any, session: Any) -> Any:
    from airflow.models.xcom import XComModel

    row = (
        session.query(XComModel)
        .filter_by(
            dag_id=ti.dag_id,
            task_id=ti.task_id,
            run_id=ti.run_id,
            map_index=ti.map_index,
            key="return_value",
        )
        .one_or_none()
    )
    return None if row is None else row.value


def run(steps_path: str) -> list[dict[str, Any]]:
    import pendulum
    from airflow.dag_processing.dagbag import DagBag
    from airflow.settings import Session

    steps = json.loads(Path(steps_path).read_text())
    results = []
    for step in steps:
        # A fresh parse per step: an in-process dag.test() leaves the run's conf in the DAG
        # object's params, which would leak into the next run of the same DAG.
        bag = DagBag(dag_folder=os.environ["AIRFLOW__CORE__DAGS_FOLDER"], safe_mode=False)
        if bag.import_errors:
            raise SystemExit(f"import errors: {bag.import_errors}")
        dag = bag.dags[step["dag_id"]]
        logical = pendulum.parse(step["logical_date"]) if step.get("logical_date") else None
        t0 = time.perf_counter()
        dr = dag.test(logical_date=logical, run_conf=step.get("conf"))
        elapsed = time.perf_counter() - t0
        session = Session()
        tis = {}
        for ti in dr.get_task_instances(session=session):
            key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
            tis[key] = {
                "state": str(ti.state),
                "xcom": _xcom(ti, session),
                "rendered_map_index": ti.rendered_map_index,
            }
        results.append(
            {
                "dag_id": dag.dag_id,
                "state": str(dr.state),
                "seconds": elapsed,
                "data_interval": [str(dr.data_interval_start), str(dr.data_interval_end)],
                "tasks": tis,
            }
        )
        session.close()
    return results


def main() -> None:
    command = sys.argv[1]
    out = parse() if command == "parse" else run(sys.argv[2])
    # The last stdout line is the result; everything Airflow logs goes before it.
    sys.stdout.write("\n" + json.dumps(out, default=str) + "\n")


if __name__ == "__main__":
    main()
