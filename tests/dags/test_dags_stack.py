"""The whole stack as users run it (docker-compose.yml's components, as local processes):
Postgres (Airflow metadata and brandmon data), Redis + CeleryExecutor with one worker, the FAB
auth manager, api-server, scheduler, dag-processor, triggerer, and the S3 API server for the
lake through the `brandmon_aws` connection.

It trains a quick model through the REST API, emits `brandmon://model` with `brandmon model
activate` against the real api-server, unpauses the DAGs and lets catch-up run the synthetic
source's 12 days through the asset chain (three waves of 4 concurrent ingest runs: what 30 days
would check, in 40% of the tasks); then asserts: no failed task, every asset event
consumed by a run with no manual trigger (the tail too), a cleared task and a backfill with
`--reprocess-behavior completed` change nothing, no secret in the task logs fetched through
the REST API, and `mention_daily` equal to the command line's on the same config and model.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import secrets
import shutil
import signal
import time
import urllib.error
import urllib.parse
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from sqlalchemy import create_engine, select
from sqlalchemy.engine import make_url
from stack import AIRFLOW, BRANDMON, Stack, stack_env

from pipeline import schema
from pipeline.database import upgrade
from pipeline.synthetic.catalogue import demo_config
from pipeline.synthetic.training import make_training_folders
from tests.support.services import create_bucket, create_database, drop_database, free_port

pytestmark = pytest.mark.integration

DAYS = 12  # > ingest's max_active_runs (4) twice over; >= 6 for the cleared run and the backfill below
TODAY = dt.datetime.now(dt.UTC).date()
START = TODAY - dt.timedelta(days=DAYS)  # catch-up: exactly the source's daily intervals
QUICK_MODEL = {"input_size": 75, "mode": "head", "head_epochs": 3, "synthetic_negatives": 0, "matcher": "off"}
PIPELINE_DAGS = ("brandmon_ingest", "brandmon_detect", "brandmon_aggregate")
DETECT_ASSETS = {"brandmon://posts", "brandmon://model", "brandmon://detect-backlog"}
AGGREGATE_ASSETS = {"brandmon://detections", "brandmon://aggregate-backlog"}
COMPARED = [t for t in schema.metadata.sorted_tables if t.name not in ("runs", "locks")]


def _cell(value: Any) -> Any:
    """Hashable and exact enough: floats to 9 digits, JSON columns as sorted JSON text."""
    if isinstance(value, float):
        return round(value, 9)
    if isinstance(value, dict | list):
        return json.dumps(value, sort_keys=True, default=str)
    return value


def snapshot(url: str, tables: list[Any] = COMPARED) -> dict[str, set[tuple]]:
    engine = create_engine(url)
    out = {}
    with engine.connect() as conn:
        for table in tables:
            out[table.name] = {tuple(_cell(v) for v in row) for row in conn.execute(select(table))}
    engine.dispose()
    return out


@pytest.fixture
def stack(tmp_path: Path, pg_admin_url: str, s3_endpoint: str):
    """Everything started; killed (process groups) and dropped afterwards, even on failure."""
    suffix = uuid.uuid4().hex[:10]
    names = {"meta": f"af_{suffix}", "data": f"bm_{suffix}", "cli": f"cli_{suffix}"}
    urls = {k: create_database(pg_admin_url, v) for k, v in names.items()}
    bucket = f"stack-{suffix}"
    create_bucket(s3_endpoint, bucket)
    secret = {
        "db": f"db-pw-{secrets.token_hex(8)}",
        "aws": f"aws-secret-{secrets.token_hex(8)}",
        "salt": f"salt-{secrets.token_hex(8)}",
        "admin": f"admin-pw-{secrets.token_hex(8)}",
    }
    config = demo_config()
    config["sources"] = [{"name": "demo", "kind": "synthetic", "seed": 7, "days": DAYS, "start": START.isoformat()}]
    config_path = tmp_path / "brandmon.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    data = make_url(urls["data"])
    api_port, redis_port = free_port(), free_port()
    env = stack_env(
        tmp_path, metadata_url=urls["meta"], redis_port=redis_port, api_port=api_port,
        extra={
            # the connections, as docker-compose.yml sets them (the test cluster trusts local
            # logins, so the password only has to stay out of every log)
            "AIRFLOW_CONN_BRANDMON_DB": json.dumps({
                "conn_type": "postgres", "host": data.host, "port": data.port, "schema": data.database,
                "login": data.username, "password": secret["db"]}),
            "AIRFLOW_CONN_BRANDMON_AWS": json.dumps({
                "conn_type": "aws", "login": "stack-key-id", "password": secret["aws"],
                "extra": {"endpoint_url": s3_endpoint, "region_name": "us-east-1"}}),
            "BRANDMON_STORAGE_URL": f"s3://{bucket}/lake",
            "BRANDMON_CONFIG": str(config_path),
            "BRANDMON_HOME": str(tmp_path / "brandmon-home"),
            "BRANDMON_AUTHOR_SALT": secret["salt"],
            "BRANDMON_INGEST_START": START.isoformat(),
            "BRANDMON_TF_POOL": "brandmon_tf",
            "BRANDMON_DETECT_BATCH_IMAGES": "4096",
            "BRANDMON_TASK_RETRIES": "2",
            "BRANDMON_RETRY_DELAY_S": "5",
            "STACK_ADMIN_USER": "admin",
            "STACK_ADMIN_PASSWORD": secret["admin"],
        },
    )
    redis = shutil.which("redis-server")
    assert redis, "redis-server not found: the stack test's Celery broker (Debian package redis-server; .ci/run installs it)"
    redis_dir = tmp_path / "redis"
    redis_dir.mkdir()
    s = Stack(tmp_path, env, api_port)
    s.secrets = secret  # type: ignore[attr-defined]
    s.urls = urls  # type: ignore[attr-defined]
    s.bucket = bucket  # type: ignore[attr-defined]
    s.s3_endpoint = s3_endpoint  # type: ignore[attr-defined]
    s.config_path = config_path  # type: ignore[attr-defined]
    # A SIGTERM (a CI timeout) ends the test through its teardown, not around it.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    try:
        s.spawn("redis", redis, "--bind", "127.0.0.1", "--port", str(redis_port),
                "--save", "", "--appendonly", "no", "--dir", str(redis_dir))
        t0 = time.monotonic()
        s.spawn("migrate", AIRFLOW, "db", "migrate", job=True)
        engine = create_engine(urls["data"])
        upgrade(engine)  # `brandmon db upgrade` (airflow-init does it in the compose file), meanwhile
        engine.dispose()
        s.wait_job("migrate", timeout=600)
        # What needs no user starts at once; the api-server after `users create` (both set up
        # FAB's roles at start).
        s.spawn("scheduler", AIRFLOW, "scheduler")
        s.spawn("dag-processor", AIRFLOW, "dag-processor")
        s.spawn("triggerer", AIRFLOW, "triggerer")
        s.spawn("worker", AIRFLOW, "celery", "worker", "--concurrency", "4")
        s.airflow("users", "create", "--username", "admin", "--password", secret["admin"], "--role", "Admin",
                  "--email", "admin@example.org", "--firstname", "A", "--lastname", "Dmin")
        s.spawn("api-server", AIRFLOW, "api-server", "--host", "127.0.0.1", "--port", str(api_port), "--workers", "1")
        s.wait_api()
        s.request("POST", "/api/v2/pools", {"name": "brandmon_tf", "slots": 1, "description": "TensorFlow work"})
        print(f"stack: metadata migrated, brandmon schema, admin, services up, pool in {time.monotonic() - t0:.0f}s")
        yield s
    finally:
        s.stop()
        signal.signal(signal.SIGTERM, previous)
        if os.environ.get("BRANDMON_STACK_KEEP"):  # debugging: keep the databases to inspect
            print(f"stack: kept databases {names} on {pg_admin_url}, bucket {bucket}, files in {tmp_path}")
        else:
            for name in names.values():
                drop_database(pg_admin_url, name)
            empty_bucket(s3_endpoint, bucket)


def _interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def empty_bucket(endpoint: str, bucket: str) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
    client.delete_bucket(Bucket=bucket)


def exact_rows(url: str, columns: list[Any]) -> set[tuple]:
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = {tuple(r) for r in conn.execute(select(*columns))}
    engine.dispose()
    assert rows, columns
    return rows


def daily_rows(url: str) -> dict[tuple, tuple]:
    """mention_daily by key: every value exactly, but `computed_at` (when the row last
    changed, a wall-clock time that two databases computed apart can never share)."""
    table = schema.mention_daily
    keys = [c.name for c in table.primary_key.columns]
    values = [c.name for c in table.columns if c.name not in keys and c.name != "computed_at"]
    engine = create_engine(url)
    with engine.connect() as conn:
        rows = conn.execute(select(table)).mappings().all()
    engine.dispose()
    return {tuple(r[k] for k in keys): tuple((v, r[v]) for v in values) for r in rows}


def consumed(s: Stack, dag_id: str) -> set[int]:
    ids: set[int] = set()
    for run in s.runs(dag_id):
        quoted = urllib.parse.quote(run["dag_run_id"], safe="")
        events = s.request("GET", f"/api/v2/dags/{dag_id}/dagRuns/{quoted}/upstreamAssetEvents")
        ids |= {e["id"] for e in events["asset_events"]}
    return ids


def all_events(s: Stack) -> list[dict[str, Any]]:
    """Every asset event, its `uri` as the DAGs wrote it (Airflow stores `brandmon://x/`)."""
    events = s.request("GET", "/api/v2/assets/events?limit=5000&order_by=timestamp")["asset_events"]
    return [{**e, "uri": e["uri"].rstrip("/")} for e in events]


def queued_events(s: Stack, dag_id: str) -> int:
    try:
        return int(s.request("GET", f"/api/v2/dags/{dag_id}/assets/queuedEvents")["total_entries"])
    except urllib.error.HTTPError as exc:
        if exc.code == 404:
            return 0
        raise


def task_instances(s: Stack) -> list[dict[str, Any]]:
    return s.request("GET", "/api/v2/dags/~/dagRuns/~/taskInstances?limit=5000")["task_instances"]


def wait_settled(s: Stack, ingest_runs: int, timeout: float) -> float:
    """Until every ingest interval ran, no run is queued or running and no asset event waits,
    twice in a row; a failed run ends the wait at once."""
    t0 = time.monotonic()
    calm = 0
    while time.monotonic() - t0 < timeout:
        s.check_alive()
        runs = {d: s.runs(d) for d in PIPELINE_DAGS}
        failed = [(d, r["dag_run_id"]) for d in runs for r in runs[d] if r["state"] == "failed"]
        assert not failed, (failed, s.log_tail("worker", 6000))
        busy = any(r["state"] in ("queued", "running") for rs in runs.values() for r in rs)
        done = sum(r["state"] == "success" for r in runs["brandmon_ingest"]) >= ingest_runs
        waiting = sum(queued_events(s, d) for d in ("brandmon_detect", "brandmon_aggregate"))
        calm = calm + 1 if done and not busy and not waiting else 0
        if calm >= 3:
            return time.monotonic() - t0
        time.sleep(1.5)  # 3 calm looks in a row span >= 3 s plus their REST calls
    raise AssertionError(f"stack not settled in {timeout}s: "
                         f"{ {d: [r['state'] for r in s.runs(d)] for d in PIPELINE_DAGS} }\n{s.log_tail('scheduler')}")


def wait_reprocessing(s: Stack, cleared_run: str, timeout: float = 60) -> None:
    """Until the cleared run and the backfill's runs are seen (not all runs succeeded, or the
    ingest tasks already ran again), so that `wait_settled` cannot return before they start."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = s.runs("brandmon_ingest")
        if any(r["state"] != "success" for r in runs) or sum(
                t["dag_id"] == "brandmon_ingest" and t["task_id"] == "ingest" and t["try_number"] > 1
                for t in task_instances(s)) >= 3:
            return
        time.sleep(0.5)
    raise AssertionError(f"the cleared run {cleared_run} and the backfill did not start in {timeout}s")


def test_stack_catch_up_on_celery_consumes_every_event_and_matches_the_cli(stack: Stack, tmp_path: Path):
    s = stack
    started = time.monotonic()
    timings: dict[str, float] = {}
    s.wait_dags({"brandmon_train", *PIPELINE_DAGS})
    timings["up"] = time.monotonic() - started

    # --- train (created unpaused: a triggered run starts at once) ---------------------------
    dags = {d["dag_id"]: d for d in s.request("GET", "/api/v2/dags?limit=100")["dags"]}
    assert dags["brandmon_train"]["is_paused"] is False
    assert all(dags[d]["is_paused"] for d in PIPELINE_DAGS)  # paused at creation, as configured
    train_dir = make_training_folders(tmp_path / "train", n_per_class=8, size=96, seed=1001)
    run = s.request("POST", "/api/v2/dags/brandmon_train/dagRuns", {
        "logical_date": None,
        "conf": {"dataset": str(train_dir), "weights": "none", "options": QUICK_MODEL}})
    run = s.wait_run("brandmon_train", run["dag_run_id"], timeout=400)
    assert run["state"] == "success", s.log_tail("worker", 6000)
    timings["train"] = time.monotonic() - started

    # --- `brandmon model activate` on the command line emits brandmon://model via the API -----
    engine = create_engine(s.urls["data"])
    with engine.connect() as conn:
        (version,) = conn.execute(select(schema.model_versions.c.version).where(schema.model_versions.c.active.is_(True))).one()
    engine.dispose()
    cli_env = {
        **{k: v for k, v in s.env.items() if not k.startswith(("AIRFLOW", "BRANDMON_", "STACK_"))},
        "BRANDMON_DATABASE_URL": s.urls["data"], "BRANDMON_STORAGE_URL": f"s3://{s.bucket}/lake",
        "BRANDMON_S3_ENDPOINT_URL": s.s3_endpoint, "BRANDMON_CONFIG": str(s.config_path),
        "BRANDMON_HOME": str(tmp_path / "cli-home"), "BRANDMON_AUTHOR_SALT": s.secrets["salt"],
        "AWS_ACCESS_KEY_ID": "cli-key", "AWS_SECRET_ACCESS_KEY": "cli-secret", "AWS_DEFAULT_REGION": "us-east-1",
        "BRANDMON_AIRFLOW_API_URL": s.api, "BRANDMON_AIRFLOW_USER": "admin",
        "BRANDMON_AIRFLOW_PASSWORD": s.secrets["admin"],
    }
    out = s.run(BRANDMON, "model", "activate", version, env=cli_env)
    assert "brandmon://model event" in out and "sent to Airflow" in out, out
    model_events = [e for e in all_events(s) if e["uri"] == "brandmon://model"]
    assert [e["extra"].get("version") for e in model_events] == [version, version]  # train's, then the CLI's
    assert model_events[-1]["extra"].get("from_rest_api") is True
    timings["train+activate"] = time.monotonic() - started

    # --- the command line, beside Airflow: the same config and model, its own database -----
    # and lake (it runs while Airflow catches up: both wait on each other's idle moments)
    start_cli_side(s, cli_env, version, tmp_path)

    # --- unpause: catch-up runs the DAYS intervals through the asset chain --------------------
    for dag_id in PIPELINE_DAGS:
        s.request("PATCH", f"/api/v2/dags/{dag_id}", {"is_paused": False})
    settle = wait_settled(s, DAYS, timeout=900)
    timings["catch-up"] = time.monotonic() - started
    print(f"catch-up settled in {settle:.0f}s ({timings})")

    ingest_runs = [r for r in s.runs("brandmon_ingest") if r["state"] == "success"]
    assert len(ingest_runs) == DAYS
    assert {r["logical_date"][:10] for r in ingest_runs} == {(START + dt.timedelta(days=i)).isoformat() for i in range(DAYS)}
    tis = task_instances(s)
    bad = [(t["dag_id"], t["task_id"], t["map_index"], t["state"], t["try_number"]) for t in tis
           if t["state"] not in ("success", "skipped")
           or t["try_number"] != 1 and not (t["state"] == "skipped" and t["try_number"] == 0)]
    # no failed task, and none needed a retry (a mapped task over zero batches, e.g. a detect run
    # whose images an earlier run already scored, is skipped without running: try 0)
    assert not bad, bad
    assert {t["dag_id"] for t in tis} == {"brandmon_train", *PIPELINE_DAGS}

    # every asset event was consumed by a run of the DAG scheduled on it: no tail left behind
    events = all_events(s)
    detect_runs, aggregate_runs = s.runs("brandmon_detect"), s.runs("brandmon_aggregate")
    assert all(r["run_type"] == "asset_triggered" for r in detect_runs + aggregate_runs)
    by_detect, by_aggregate = consumed(s, "brandmon_detect"), consumed(s, "brandmon_aggregate")
    left = [(e["uri"], e["id"]) for e in events
            if (e["uri"] in DETECT_ASSETS and e["id"] not in by_detect)
            or (e["uri"] in AGGREGATE_ASSETS and e["id"] not in by_aggregate)]
    assert not left, left
    assert sum(e["uri"] == "brandmon://posts" for e in events) == DAYS
    print(f"{len(detect_runs)} detect runs, {len(aggregate_runs)} aggregate runs for {len(events)} events; "
          f"late-event requeues: {sum('late_events' in (e['extra'] or {}) and e['extra']['late_events'] > 0 for e in events)}")

    engine = create_engine(s.urls["data"])
    with engine.connect() as conn:
        images = conn.execute(select(schema.images.c.sha256)).all()
        scored = conn.execute(select(schema.image_scores.c.image_sha256).where(schema.image_scores.c.model_version == version)).all()
        dirty = conn.execute(select(schema.dirty_days)).all()
    engine.dispose()
    assert images and len(scored) == len(images) and not dirty

    # --- a cleared task and a backfill that reprocesses completed runs change nothing --------
    before = snapshot(s.urls["data"])
    cleared_run = ingest_runs[5]["dag_run_id"]
    s.request("POST", "/api/v2/dags/brandmon_ingest/clearTaskInstances", {
        "dry_run": False, "task_ids": ["ingest"], "dag_run_id": cleared_run, "only_failed": False,
        "reset_dag_runs": True})
    s.airflow("backfill", "create", "--dag-id", "brandmon_ingest",
              "--from-date", (START + dt.timedelta(days=1)).isoformat(),
              "--to-date", (START + dt.timedelta(days=2)).isoformat(),
              "--reprocess-behavior", "completed")
    wait_reprocessing(s, cleared_run)
    wait_settled(s, DAYS, timeout=600)
    timings["clear+backfill"] = time.monotonic() - started
    tis = task_instances(s)
    assert not [t for t in tis if t["state"] not in ("success", "skipped")]
    rerun = [t for t in tis if t["dag_id"] == "brandmon_ingest" and t["task_id"] == "ingest" and t["try_number"] > 1]
    assert len(rerun) >= 3, rerun  # the cleared one and the two reprocessed intervals ran again
    assert snapshot(s.urls["data"]) == before

    # --- no secret in any task log, fetched through the REST API ---------------------------
    logs = []
    for t in task_instances(s):
        if t["state"] == "skipped" and not t["try_number"]:
            continue
        quoted = urllib.parse.quote(t["dag_run_id"], safe="")
        logs.append(s.request(
            "GET", f"/api/v2/dags/{t['dag_id']}/dagRuns/{quoted}/taskInstances/{t['task_id']}/logs/"
                   f"{max(1, t['try_number'])}?full_content=true&map_index={t['map_index']}", raw=True))
    text = "\n".join(logs)
    assert "database from Airflow connection 'brandmon_db'" in text  # the logs are really there
    assert "S3 from Airflow connection 'brandmon_aws'" in text
    leaked = [k for k, v in s.secrets.items() if v in text]
    assert not leaked, leaked
    timings["logs"] = time.monotonic() - started
    s.stop()  # the comparison below needs no Airflow

    # --- mention_daily equals the command line's, on every cell but computed_at ------------
    s.wait_job("cli", timeout=600)
    timings["cli"] = time.monotonic() - started
    # Same weights, same scores: fixed-size (padded) inference batches make a score independent
    # of which images share its batch (Airflow scores whatever is pending at each run).
    scored = [schema.image_scores.c.image_sha256, schema.image_scores.c.model_version, schema.image_scores.c.status,
              schema.image_scores.c.top_class, schema.image_scores.c.top_score]
    found = [schema.detections.c.image_sha256, schema.detections.c.class_name, schema.detections.c.score]
    assert exact_rows(s.urls["data"], scored) == exact_rows(s.urls["cli"], scored)
    assert exact_rows(s.urls["data"], found) == exact_rows(s.urls["cli"], found)
    airflow_daily, cli_daily = daily_rows(s.urls["data"]), daily_rows(s.urls["cli"])
    if airflow_daily != cli_daily:  # say which cells differ, by primary key
        a, c = airflow_daily, cli_daily
        diffs = [(k, {name: (x, y) for (name, x), (_, y) in zip(a[k], c[k], strict=True) if x != y})
                 for k in sorted(set(a) & set(c), key=str) if a[k] != c[k]]
        raise AssertionError(f"mention_daily differs: only Airflow {sorted(set(a) - set(c), key=str)[:10]}, "
                             f"only CLI {sorted(set(c) - set(a), key=str)[:10]}, {len(diffs)} keys differ: {diffs[:10]}")
    # ... and the comparison is not vacuous: all DAYS days, text, image and both mentions
    assert {k[0] for k in airflow_daily} == {START + dt.timedelta(days=i) for i in range(DAYS)}
    totals = {src: sum(dict(v)["posts"] for k, v in airflow_daily.items() if k[2:] == ("*", "*", src))
              for src in ("text", "image", "both")}
    assert all(totals.values()), totals
    print("stack timings (cumulative s): " + ", ".join(f"{k}={v:.0f}" for k, v in timings.items()))


def start_cli_side(s: Stack, cli_env: dict[str, str], version: str, tmp_path: Path) -> None:
    """`brandmon backfill demo` over the same DAYS days, `detect`, `aggregate` into the CLI
    database and lake, with the model Airflow trained (its row and artifact copied, so both
    sides score with the same weights), as a job `s.wait_job("cli")` collects."""
    import boto3

    env = {**cli_env, "BRANDMON_DATABASE_URL": s.urls["cli"], "BRANDMON_STORAGE_URL": f"s3://{s.bucket}/cli-lake",
           "BRANDMON_HOME": str(tmp_path / "cli-side-home")}
    env.pop("BRANDMON_AIRFLOW_API_URL")
    cli_engine, data_engine = create_engine(s.urls["cli"]), create_engine(s.urls["data"])
    upgrade(cli_engine)
    with data_engine.connect() as conn:
        model_row = dict(conn.execute(select(schema.model_versions).where(schema.model_versions.c.version == version)).mappings().one())
    key = model_row["artifact_key"]
    boto3.client("s3", endpoint_url=s.s3_endpoint).copy_object(
        Bucket=s.bucket, Key=f"cli-lake/{key}", CopySource={"Bucket": s.bucket, "Key": f"lake/{key}"})
    with cli_engine.begin() as conn:
        conn.execute(schema.model_versions.insert().values(**model_row))
    cli_engine.dispose()
    data_engine.dispose()
    last = TODAY - dt.timedelta(days=1)
    script = 'set -e; "$0" backfill demo --start "$1" --end "$2" --quiet; "$0" detect --quiet; "$0" aggregate --quiet'
    s.spawn("cli", "/bin/sh", "-c", script, BRANDMON, START.isoformat(), last.isoformat(), env=env, job=True)
