"""Run Airflow work in a fresh process for the DAG tests; prints one JSON document.

Why a subprocess: Airflow reads AIRFLOW_HOME and its config at import time and keeps
process-wide state (ORM session, secrets backends, SecretCache), so each test gets a clean
interpreter whose environment the test controls. Not collected by pytest (no test_ prefix).

    python airflow_runner.py parse              # DagBag: DAGs, tasks, edges, parse time, modules
    python airflow_runner.py run STEPS.json     # each step in order (see `run`)

Asset-triggered runs: dag.test() always makes a manual run, whose `triggering_asset_events`
is empty. A step {"assets": DAG_ID} instead lets the scheduler's own code
(`SchedulerJobRunner._create_dagruns_for_dags`) turn the queued asset events into a run
(the asset-triggered run with its consumed events, as in production), then executes it with
dag.test()'s minimal loop, repeatedly while the DAG keeps getting queued events (the detect
backlog). Only DAGs unpaused by an {"unpause": [...]} step get events queued.
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
    """Top-level names of the watched modules loaded; `pipeline` by full module name (the DAG
    files import the light `pipeline.dag_assets` and `pipeline.dag_support`, nothing else of
    the package)."""
    return {
        m if m.split(".")[0] == "pipeline" else m.split(".")[0]
        for m in sys.modules
        if m.split(".")[0] in prefixes
    }


def parse() -> dict[str, Any]:
    from airflow.dag_processing.dagbag import BundleDagBag, DagBag

    # Warm-up: parse a trivial DAG using the same airflow.sdk features first, so that what
    # Airflow itself loads on first use (provider asset handlers pull in boto3) is not
    # blamed on our DAG files.

    with tempfile.TemporaryDirectory() as warm:
        Path(warm, "warmup_dag.py").write_text(WARMUP_DAG)
        warm_bag = DagBag(dag_folder=warm, safe_mode=False)
        assert not warm_bag.import_errors, warm_bag.import_errors
    before = _loaded(WATCHED_MODULES)
    t0 = time.perf_counter()
    # The bundle-aware DagBag, as the dag-processor and task runner use (a plain DagBag, as
    # `airflow dags list --local` uses, is tested by test_dags_integrity.py).
    folder = os.environ["AIRFLOW__CORE__DAGS_FOLDER"]
    bag = BundleDagBag(dag_folder=folder, bundle_path=Path(folder), safe_mode=False, known_pools={"default_pool"})
    parse_s = time.perf_counter() - t0
    after = _loaded(WATCHED_MODULES)
    from pipeline import dag_assets

    shared = {id(a) for a in dag_assets.assets()}  # the one Asset object of each URI
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
                "outlets_shared": all(id(o) in shared for o in (task.outlets or [])),
                "trigger_rule": str(task.trigger_rule),
            }
        condition = getattr(dag.timetable, "asset_condition", None)
        dags[dag_id] = {
            "tags": sorted(dag.tags),
            "catchup": dag.catchup,
            "fileloc": Path(dag.fileloc).name,
            "timetable": type(dag.timetable).__name__,
            "timetable_expression": getattr(dag.timetable, "expression", None),
            "start_date": str(dag.start_date) if dag.start_date else None,
            "max_active_runs": dag.max_active_runs,
            "is_paused_upon_creation": dag.is_paused_upon_creation,
            "asset_condition": type(condition).__name__ if condition is not None else None,
            "asset_schedule": sorted(a.name for a in getattr(condition, "objects", []) or []),
            "schedule_shared": all(id(a) in shared for a in getattr(condition, "objects", []) or []),
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


def _run_result(dag_id: str, dr: Any, elapsed: float, session: Any) -> dict[str, Any]:
    from airflow.models.dagrun import DagRun

    dr = session.get(DagRun, dr.id)  # dag.test() returns it detached from this session
    tis = {}
    for ti in dr.get_task_instances(session=session):
        key = ti.task_id if ti.map_index < 0 else f"{ti.task_id}[{ti.map_index}]"
        tis[key] = {
            "state": str(ti.state),
            "xcom": _xcom(ti, session),
            "rendered_map_index": ti.rendered_map_index,
        }
    consumed = [
        {"asset": e.asset.name, "extra": e.extra, "source_dag_id": e.source_dag_id}
        for e in getattr(dr, "consumed_asset_events", []) or []
    ]
    return {
        "dag_id": dag_id,
        "state": str(dr.state),
        "run_type": str(dr.run_type),
        "seconds": elapsed,
        "data_interval": [str(dr.data_interval_start), str(dr.data_interval_end)],
        "consumed_events": consumed,
        "tasks": tis,
    }


def _sync_and_unpause(dag_ids: list[str], session: Any) -> None:
    """Write the DAGs to the metadata database (as the dag-processor does) and unpause some."""
    from airflow.dag_processing.bundles.manager import DagBundlesManager
    from airflow.dag_processing.dagbag import BundleDagBag, sync_bag_to_db
    from airflow.models.dag import DagModel
    from sqlalchemy import update

    manager = DagBundlesManager()
    manager.sync_bundles_to_db(session=session)
    session.commit()
    for bundle in manager.get_all_dag_bundles():
        if not bundle.is_initialized:
            bundle.initialize()
        bag = BundleDagBag(
            dag_folder=bundle.path, bundle_path=bundle.path, bundle_name=bundle.name
        )
        sync_bag_to_db(bag, bundle.name, bundle.version)
    session.execute(
        update(DagModel).where(DagModel.dag_id.in_(dag_ids)).values(is_paused=False)
    )
    session.commit()


def _execute(sdk_dag: Any, dr: Any, session: Any) -> None:
    """Run a created DagRun to its end with dag.test()'s loop (tasks in this process)."""
    from airflow.models.dagbag import DBDagBag
    from airflow.sdk import DagRunState
    from airflow.sdk.definitions.dag import _run_task
    from airflow.utils.state import TaskInstanceState

    dr.dag = DBDagBag().get_dag_for_run(dag_run=dr, session=session)
    dr.state = DagRunState.RUNNING
    session.commit()
    finished = {
        TaskInstanceState.SUCCESS,
        TaskInstanceState.FAILED,
        TaskInstanceState.SKIPPED,
        TaskInstanceState.UPSTREAM_FAILED,
        TaskInstanceState.REMOVED,
    }
    while dr.state == DagRunState.RUNNING:
        session.expire_all()
        schedulable, _ = dr.update_state(session=session)
        for ti in schedulable:
            if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                ti.try_number += 1
            ti.state = TaskInstanceState.SCHEDULED
        session.commit()
        tis = set(dr.get_task_instances(session=session))
        scheduled = [ti for ti in tis if ti.state == TaskInstanceState.SCHEDULED]
        if not scheduled and any(ti.state not in finished for ti in tis):
            time.sleep(0.5)  # e.g. a retry waiting for its delay
        for ti in scheduled:
            _run_task(ti=ti, task=sdk_dag.task_dict[ti.task_id], run_triggerer=True)


def _asset_triggered(bag: Any, dag_id: str, session: Any, max_runs: int) -> list[dict[str, Any]]:
    """Create (the scheduler's code) and execute asset-triggered runs of `dag_id` while its
    asset condition keeps being met, at most `max_runs`."""
    from airflow.jobs.job import Job
    from airflow.jobs.scheduler_job_runner import SchedulerJobRunner
    from airflow.models.dagrun import DagRun
    from airflow.utils.sqlalchemy import prohibit_commit
    from airflow.utils.types import DagRunType
    from sqlalchemy import select

    scheduler = SchedulerJobRunner(job=Job())
    results = []
    for _ in range(max_runs):
        with prohibit_commit(session) as guard:
            scheduler._create_dagruns_for_dags(guard, session)
        session.commit()
        dr = session.scalars(
            select(DagRun)
            .where(
                DagRun.dag_id == dag_id,
                DagRun.run_type == DagRunType.ASSET_TRIGGERED,
                DagRun.state == "queued",
            )
            .order_by(DagRun.id)
        ).first()
        if dr is None:
            break
        t0 = time.perf_counter()
        _execute(bag.dags[dag_id], dr, session)
        results.append(_run_result(dag_id, dr, time.perf_counter() - t0, session))
    return results


def run(steps_path: str) -> list[dict[str, Any]]:
    """Steps: {"dag_id", "logical_date"?, "conf"?} = dag.test(); {"unpause": [ids]};
    {"assets": id, "max_runs"?} = asset-triggered runs (each one result)."""
    import pendulum
    from airflow.dag_processing.dagbag import BundleDagBag
    from airflow.settings import Session

    steps = json.loads(Path(steps_path).read_text())
    results: list[dict[str, Any]] = []
    for step in steps:
        # A fresh parse per step: an in-process dag.test() leaves the run's conf in the DAG
        # object's params, which would leak into the next run of the same DAG.
        folder = os.environ["AIRFLOW__CORE__DAGS_FOLDER"]
        bag = BundleDagBag(dag_folder=folder, bundle_path=Path(folder), safe_mode=False)
        if bag.import_errors:
            raise SystemExit(f"import errors: {bag.import_errors}")
        session = Session()
        if "unpause" in step:
            _sync_and_unpause(list(step["unpause"]), session)
        elif "assets" in step:
            results += _asset_triggered(bag, step["assets"], session, int(step.get("max_runs", 10)))
        else:
            dag = bag.dags[step["dag_id"]]
            logical = pendulum.parse(step["logical_date"]) if step.get("logical_date") else None
            t0 = time.perf_counter()
            dr = dag.test(logical_date=logical, run_conf=step.get("conf"))
            results.append(_run_result(dag.dag_id, dr, time.perf_counter() - t0, session))
        session.close()
    return results


def main() -> None:
    command = sys.argv[1]
    out = parse() if command == "parse" else run(sys.argv[2])
    # The last stdout line is the result; everything Airflow logs goes before it.
    sys.stdout.write("\n" + json.dumps(out, default=str) + "\n")


if __name__ == "__main__":
    main()
