"""dag.test() of the real DAGs on a SQLite Airflow metadata database: train -> ingest ->
detect -> aggregate on the synthetic source, rows land; a retrain that does not beat the
active model is registered but not activated; a second run of the same interval changes
nothing. The asset chain driven by real asset events (the scheduler's own run creation):
model + posts events start detection, its backlog re-triggers it, and the aggregate's report
day comes from the ingest window in the events. Plus the Airflow-connection path on
Postgres + S3."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

import pytest
from dags_helpers import airflow_base_env, migrated_airflow_home, run_airflow
from sqlalchemy import func, select

from pipeline import schema
from pipeline.synthetic.catalogue import demo_config
from pipeline.synthetic.training import make_training_folders

pytestmark = pytest.mark.integration

DAY0 = dt.date(2026, 10, 1)
UTC = dt.UTC
# Tables whose content a re-run must leave byte-for-byte alone (runs/locks are bookkeeping).
# A quick model (seconds, not the demo profile's minute): a small head on a frozen, randomly
# initialised base at 75 px; the test checks the wiring, not the model's quality.
QUICK_MODEL = {
    "input_size": 75,
    "mode": "head",
    "head_epochs": 3,
    "synthetic_negatives": 0,
    "matcher": "off",
}
COMPARED = [t for t in schema.metadata.sorted_tables if t.name not in ("runs", "locks")]


def synthetic_config(days: int = 3) -> dict[str, Any]:
    config = demo_config()
    config["sources"] = [
        {"name": "demo", "kind": "synthetic", "seed": 7, "days": days, "start": DAY0.isoformat()}
    ]
    return config


def brandmon_env(ctx: Any) -> dict[str, str]:
    s = ctx.settings
    return {
        "BRANDMON_DATABASE_URL": s.database_url,
        "BRANDMON_STORAGE_URL": s.storage_url,
        "BRANDMON_CONFIG": str(s.config_path),
        "BRANDMON_HOME": str(s.home),
        "BRANDMON_AUTHOR_SALT": s.author_salt.get(),
        **({"BRANDMON_S3_ENDPOINT_URL": s.s3_endpoint_url} if s.s3_endpoint_url else {}),
    }


def run_steps(env: dict[str, str], steps: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    path.write_text(json.dumps(steps))
    results = run_airflow(env, "run", str(path), timeout=420)
    for step, result in zip(steps, results, strict=True):
        assert result["dag_id"] == step["dag_id"]
        print(f"{result['dag_id']}: {result['seconds']:.1f}s")
        # a mapped task over an empty list is skipped; anything else must succeed
        failed = {
            k: v["state"]
            for k, v in result["tasks"].items()
            if v["state"] not in ("success", "skipped")
        }
        assert result["state"] == "success" and not failed, (result["dag_id"], failed)
    return results


def snapshot(ctx: Any) -> dict[str, list[tuple]]:
    out = {}
    with ctx.engine.connect() as conn:
        for table in COMPARED:
            order = list(table.primary_key.columns) or list(table.columns)
            out[table.name] = [tuple(r) for r in conn.execute(select(table).order_by(*order))]
    return out


def count(ctx: Any, table: Any, *where: Any) -> int:
    with ctx.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table).where(*where)).scalar_one()


def xcom_sizes(results: list[dict[str, Any]]) -> list[int]:
    return [len(json.dumps(ti["xcom"])) for r in results for ti in r["tasks"].values()]


def test_ingest_detect_aggregate_end_to_end_then_rerun_changes_nothing(
    make_ctx, airflow_home, tmp_path
):
    ctx = make_ctx(synthetic_config())
    env = {**airflow_base_env(airflow_home), **brandmon_env(ctx)}
    # A few synthetic scenes per class (demo brands + no_logo) to train on.
    train_dir = make_training_folders(tmp_path / "train", n_per_class=8, size=96, seed=1001)
    interval_end = dt.datetime(
        2026, 10, 2, tzinfo=UTC
    )  # dag.test: the interval is [DAY0, DAY0 + 1 day)
    pipeline_steps = [
        {"dag_id": "brandmon_ingest", "logical_date": interval_end.isoformat()},
        {"dag_id": "brandmon_detect"},
        {"dag_id": "brandmon_aggregate", "conf": {"day": DAY0.isoformat()}},
    ]
    train_step = {
        "dag_id": "brandmon_train",
        "conf": {
            "dataset": str(train_dir),
            "weights": "none",
            "target_precision": 0.9,
            "options": QUICK_MODEL,
        },
    }
    first = run_steps(env, [train_step, *pipeline_steps], tmp_path / "steps1.json")
    train, ingest, detect, aggregate = first

    # train: registered and (no model was active) activated, which emits brandmon://model
    assert train["tasks"]["train"]["xcom"]["activated"] is True
    assert train["tasks"]["publish"]["state"] == "success"
    assert count(ctx, schema.model_versions, schema.model_versions.c.active.is_(True)) == 1

    # ingest: one mapped task per configured source, over exactly the run's data interval
    assert ingest["data_interval"][0].startswith("2026-10-01") and ingest["data_interval"][
        1
    ].startswith("2026-10-02")
    assert ingest["tasks"]["ingest[0]"]["rendered_map_index"] == "demo"
    assert ingest["tasks"]["publish"]["xcom"]["new"] > 0
    posts = count(ctx, schema.posts)
    assert posts == ingest["tasks"]["publish"]["xcom"]["new"]
    with ctx.engine.connect() as conn:
        lo, hi = conn.execute(
            select(func.min(schema.posts.c.posted_at), func.max(schema.posts.c.posted_at))
        ).one()
    assert (
        dt.datetime(2026, 10, 1, tzinfo=UTC) <= lo and hi < interval_end
    )  # days 2 and 3 not touched

    # detect: every stored image scored by the active model
    images = count(ctx, schema.images)
    assert images > 0
    assert count(ctx, schema.image_scores) == images
    assert (
        detect["tasks"]["publish"]["xcom"]["scored"]
        + detect["tasks"]["publish"]["xcom"].get("corrupt", 0)
        == images
    )
    assert any(k.startswith("detect[") for k in detect["tasks"])

    # aggregate: mention_daily for the day, queue drained, report written into the lake
    assert count(ctx, schema.mention_daily, schema.mention_daily.c.day == DAY0) > 0
    assert count(ctx, schema.dirty_days) == 0
    report_key = aggregate["tasks"]["report"]["xcom"]
    assert DAY0.isoformat() in report_key and ctx.store.exists(report_key)

    # XCom carries keys and counts, never data
    assert max(xcom_sizes(first)) < 2000

    # Second round: a retrain that is not activated (`activate: never`, deterministic; whether a
    # model beats another is the registry's test) registers a new version, emits no model
    # event; then the same interval again changes nothing.
    with ctx.engine.begin() as conn:
        (v1,) = conn.execute(select(schema.model_versions.c.version)).one()
    before = snapshot(ctx)
    retrain_step = {**train_step, "conf": {**train_step["conf"], "activate": "never"}}
    retrain, *second = run_steps(env, [retrain_step, *pipeline_steps], tmp_path / "steps2.json")
    assert retrain["tasks"]["train"]["xcom"]["activated"] is False
    assert retrain["tasks"]["train"]["xcom"]["version"] != v1
    assert retrain["tasks"]["publish"]["state"] == "skipped"  # no brandmon://model event
    after = snapshot(ctx)
    # the active version's row untouched (still active), one new inactive version beside it
    old_rows, new_rows = before.pop("model_versions"), after.pop("model_versions")
    added = [r for r in new_rows if r not in old_rows]
    assert [r for r in new_rows if r in old_rows] == old_rows and len(added) == 1
    columns = [c.name for c in schema.model_versions.columns]
    assert dict(zip(columns, added[0], strict=True))["active"] is False
    # training may cache features of its own images; nothing cached before goes away
    cached_after = after.pop("feature_cache")
    assert all(row in cached_after for row in before.pop("feature_cache"))

    assert second[0]["tasks"]["ingest[0]"]["xcom"]["skipped"] == 1
    assert second[1]["tasks"]["detect"]["state"] == "skipped"  # nothing pending: zero mapped tasks
    assert second[1]["tasks"]["requeue"]["state"] == "skipped"  # and no backlog event
    assert (
        second[1]["tasks"]["publish"]["state"] == "success"
    )  # ... and aggregation still triggered
    assert after == before


def test_ingest_through_airflow_connections_on_postgres_and_s3(make_ctx, airflow_home, tmp_path):
    """The database and S3 endpoint/credentials come only from the two Airflow connections.
    Before it, in the same process, a run that fails: retried, then the failure callback's
    summary is logged once, and no credential reaches the output."""
    from sqlalchemy.engine import make_url

    ctx = make_ctx(synthetic_config(days=1), backend="postgres")
    url = make_url(ctx.settings.database_url)
    env = {**airflow_base_env(airflow_home), **brandmon_env(ctx)}
    # Wrong fallbacks: only the connections can make this run work.
    env["BRANDMON_DATABASE_URL"] = f"sqlite:///{tmp_path / 'nowhere' / 'wrong.db'}"
    env["BRANDMON_S3_ENDPOINT_URL"] = "http://127.0.0.1:9"
    for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        env.pop(key, None)
    env["AIRFLOW_CONN_BRANDMON_DB"] = json.dumps(
        {
            "conn_type": "postgres",
            "host": url.host,
            "port": url.port,
            "login": url.username,
            "password": url.password or "",
            "schema": url.database,
        }
    )
    env["AIRFLOW_CONN_BRANDMON_AWS"] = json.dumps(
        {
            "conn_type": "aws",
            "login": "conn-key-id",
            "password": "conn-secret",
            "extra": {"endpoint_url": ctx.settings.s3_endpoint_url, "region_name": "us-east-1"},
        }
    )
    # parse-time settings: the minimum of 2 retries, quick ones
    env.update({"BRANDMON_TASK_RETRIES": "2", "BRANDMON_RETRY_DELAY_S": "0.2"})
    failing = {
        "dag_id": "brandmon_ingest",
        "logical_date": "2026-10-05T00:00:00+00:00",
        "conf": {"sources": ["nope"]},  # list_sources raises ConfigError on every attempt
    }
    ok = {"dag_id": "brandmon_ingest", "logical_date": "2026-10-02T00:00:00+00:00"}
    steps_path = tmp_path / "steps.json"
    steps_path.write_text(json.dumps([failing, ok]))
    (failed, result), output = run_airflow(
        env, "run", str(steps_path), timeout=420, with_output=True
    )

    assert failed["state"] == "failed" and failed["tasks"]["list_sources"]["state"] == "failed"
    assert failed["tasks"]["publish"]["state"] == "upstream_failed"
    summaries = [ln for ln in output.splitlines() if "brandmon task failed:" in ln]
    assert len(summaries) == 1, summaries  # the callback runs once, after the last retry
    summary = summaries[0]
    assert "dag=brandmon_ingest task=list_sources (attempt 3)" in summary  # 1 try + 2 retries
    assert "interval=2026-10-04T00:00:00+00:00 -> 2026-10-05T00:00:00+00:00" in summary
    assert "ConfigError: unknown source(s) nope; configured: demo" in summary
    secrets = ["conn-secret", ctx.settings.author_salt.get(), url.password or "conn-secret"]
    assert not [s for s in secrets if s in output]

    assert result["state"] == "success", result
    new = result["tasks"]["publish"]["xcom"]["new"]
    assert new > 0 and count(ctx, schema.posts) == new
    assert ctx.store.list("")  # raw pages and images landed in the S3 bucket


def test_asset_chain_model_and_posts_trigger_detect_backlog_requeues_report_day_from_events(
    make_ctx, tmp_path
):
    """No hand-started detect or aggregate run: the scheduler's run creation turns the queued
    asset events into runs. Training activates a model (brandmon://model) and ingest lands a
    day (brandmon://posts, window in its extra): one detect run consumes both; at most one
    batch per run, so it re-triggers itself (brandmon://detect-backlog) until every image is
    scored; aggregation follows on brandmon://detections and reports on the ingest window's
    day, with no `day` param."""
    home = migrated_airflow_home(tmp_path / "airflow_home")  # no events from other tests
    ctx = make_ctx(synthetic_config())
    env = {**airflow_base_env(home), **brandmon_env(ctx)}
    env.update({"BRANDMON_DETECT_MAX_TASKS": "1", "BRANDMON_DETECT_BATCH_IMAGES": "4"})
    train_dir = make_training_folders(tmp_path / "train", n_per_class=8, size=96, seed=1001)
    steps = [
        {"unpause": ["brandmon_detect", "brandmon_aggregate"]},
        {"dag_id": "brandmon_train", "conf": {"dataset": str(train_dir), "weights": "none", "options": QUICK_MODEL}},
        {"dag_id": "brandmon_ingest", "logical_date": "2026-10-02T00:00:00+00:00"},
        {"assets": "brandmon_detect", "max_runs": 12},
        {"assets": "brandmon_aggregate", "max_runs": 12},
    ]
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(steps))
    train, ingest, *rest = run_airflow(env, "run", str(path), timeout=900)
    detects = [r for r in rest if r["dag_id"] == "brandmon_detect"]
    aggregates = [r for r in rest if r["dag_id"] == "brandmon_aggregate"]
    for r in rest:
        print(f"{r['dag_id']} ({r['run_type']}): {r['seconds']:.1f}s, consumed "
              f"{[e['asset'] for e in r['consumed_events']]}")
        assert r["state"] == "success" and r["run_type"].endswith("asset_triggered"), r

    assert train["tasks"]["publish"]["state"] == "success"  # activated: the model event
    assert ingest["tasks"]["publish"]["state"] == "success"
    images = count(ctx, schema.images)
    assert images > 4  # more than one batch, so more than one detect run

    # Detect: the first run consumed the model and the posts events; each later one the
    # backlog event of the run before; the last one found nothing left and requeued nothing.
    first = {e["asset"] for e in detects[0]["consumed_events"]}
    assert first == {"brandmon://model", "brandmon://posts"}
    posts_event = next(e for e in detects[0]["consumed_events"] if e["asset"] == "brandmon://posts")
    assert posts_event["extra"]["start"].startswith("2026-10-01") and posts_event["extra"]["end"].startswith("2026-10-02")
    assert len(detects) == -(-images // 4)  # one 4-image batch per run
    for run in detects[1:]:
        assert {e["asset"] for e in run["consumed_events"]} == {"brandmon://detect-backlog"}
    assert [r["tasks"]["requeue"]["state"] for r in detects] == ["success"] * (len(detects) - 1) + ["skipped"]
    assert count(ctx, schema.image_scores) == images

    # Aggregate: on the detections events, reporting on the ingest window's day.
    assert aggregates, "no aggregate run was triggered"
    # The first aggregate run is made from the first detections event's queue entry and
    # consumes only that one; its `requeue` sees the later ones (late events) and emits the
    # aggregate backlog, so the next run consumes them: every detections event is consumed.
    consumed = [e for r in aggregates for e in r["consumed_events"]]
    detections = [e for e in consumed if e["asset"] == "brandmon://detections"]
    assert {e["asset"] for e in consumed} <= {"brandmon://detections", "brandmon://aggregate-backlog"}
    assert len(detections) == len(detects)  # no tail left behind
    assert all(e["extra"]["start"].startswith("2026-10-01") for e in detections)
    assert [r["tasks"]["requeue"]["state"] for r in aggregates][-1] == "skipped"
    for run in aggregates:
        assert run["consumed_events"] and run["tasks"]["aggregate"]["state"] == "success"
        key = run["tasks"]["report"]["xcom"]
        assert "2026-10-01" in key and ctx.store.exists(key)
    assert count(ctx, schema.mention_daily, schema.mention_daily.c.day == DAY0) > 0
    assert count(ctx, schema.dirty_days) == 0
