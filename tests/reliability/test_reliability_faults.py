"""Faults against real Postgres and the S3 API server (moto): feed misbehaviour, object-store
errors, a database connection killed mid-transaction, two runs of one window at once.

Each scenario compares the tables (row sets, not counts) and the lake with those of an
uninterrupted run of the same input on a fresh database and bucket.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Iterator
from typing import Any

import boto3
import pytest
from rel_helpers import (
    DAY,
    compare,
    drop_connection_on,
    jpeg,
    shared_pg_ctx,
    snapshot,
    spawn,
)
from sqlalchemy import func, select

from pipeline.aggregate.jobs import aggregate_dirty, write_report
from pipeline.errors import BrandmonError, StorageError
from pipeline.ingest.jobs import fetch_images, ingest_window
from pipeline.schema import (
    dirty_days,
    images,
    locks,
    mention_daily,
    post_images,
    posts,
    quarantine,
    runs,
    text_mentions,
)
from tests.support.feeds import FakeMastodon, mastodon_media, mastodon_status

pytestmark = pytest.mark.integration

CLI = "import sys; from pipeline.cli import main; sys.exit(main(sys.argv[1:]))"

TAG = "/api/v1/timelines/tag/acme"
DAYS = 4
START, STOP = DAY, DAY + dt.timedelta(days=DAYS)
INGEST_TABLES = [posts, post_images, images, quarantine, dirty_days]
AGG_TABLES = [mention_daily, text_mentions, dirty_days]


def world(srv: FakeMastodon, per_day: int = 12) -> None:
    """Statuses over DAYS days (a few with images, one bad), under two hashtags."""
    for i in range(6):
        srv.add_bytes(f"/img/{i}.jpg", jpeg(i))
    statuses = []
    for i in range(DAYS * per_day):
        when = START + dt.timedelta(minutes=(24 * 60 // per_day) * i + 5)
        media = [mastodon_media(f"{srv.url}/img/{(i // 3) % 6}.jpg")] if i % 3 == 0 else []
        tags = ("acme", "acmefan") if i % 5 == 0 else ("acme",)
        statuses.append(mastodon_status(when, f"acme post {i}", seq=i, tags=tags, account=f"user{i % 7}", media=media))
    bad = mastodon_status(START + dt.timedelta(hours=30), "acme broken", seq=999, tags=("acme",))
    bad["account"] = None
    statuses.append(bad)
    srv.statuses = statuses


def source(srv: FakeMastodon, **extra: Any) -> dict[str, Any]:
    return {"name": "masto", "kind": "mastodon", "base_url": srv.url, "hashtags": ["acme", "acmefan"], "limit": 6,
            "backoff_s": 0.01, "part_pages": 1, **extra}


def cfg(srv: FakeMastodon, **extra: Any) -> dict[str, Any]:
    return {"brands": [{"name": "Acme", "keywords": ["acme"], "hashtags": ["acme"]}], "sources": [source(srv, **extra)],
            "network": {"max_retries": 3, "timeout_s": 5, "image_workers": 2, "per_host_connections": 2,
                        "allowed_private_hosts": ["127.0.0.1"]}}


@pytest.fixture(scope="module")
def feed() -> Iterator[FakeMastodon]:
    with FakeMastodon(max_limit=6) as s:
        world(s)
        yield s


@pytest.fixture
def srv(feed: FakeMastodon) -> FakeMastodon:
    """The module's feed server, without the faults and request log of earlier tests."""
    feed.clear_faults()
    feed.requests.clear()
    return feed


@pytest.fixture(scope="module")
def reference(feed, pg_admin_url, s3_endpoint, tmp_path_factory):
    """An uninterrupted ingest (+ aggregate) of the same feed, on its own database and bucket."""
    with shared_pg_ctx(cfg(feed), pg_admin_url, s3_endpoint, tmp_path_factory.mktemp("reference")) as ctx:
        ingest_window(ctx, "masto", START, STOP)
        ingest_snap = snapshot(ctx, INGEST_TABLES)
        aggregate_dirty(ctx)
        agg_snap = snapshot(ctx, AGG_TABLES, lake=False)
        write_report(ctx, DAY.date())
        yield {"ctx": ctx, "ingest": ingest_snap, "aggregate": agg_snap, "lake_with_report": set(ctx.store.list(""))}


def assert_same(tally, want: dict[str, set[Any]], got_ctx: Any, tables: list[Any], lake: bool = True) -> None:
    problems = compare(tally, want, snapshot(got_ctx, tables, lake=lake))
    assert not problems, "\n".join(problems)


def run_status(ctx: Any) -> list[str]:
    with ctx.engine.connect() as conn:
        return [s for (s,) in conn.execute(select(runs.c.status).where(runs.c.kind == "ingest").order_by(runs.c.id))]


def count(ctx: Any, table: Any) -> int:
    with ctx.engine.connect() as conn:
        return int(conn.execute(select(func.count()).select_from(table)).scalar() or 0)


# --- feed API faults -------------------------------------------------------------------------------

RECOVERABLE = {
    "429 + Retry-After": {"kind": "status", "status": 429, "retry_after": "1", "times": 2, "skip": 1},
    "500 burst": {"kind": "status", "status": 500, "times": 3, "skip": 2},
    "503 burst": {"kind": "status", "status": 503, "retry_after": "0", "times": 3, "skip": 4},
    "timeout": {"kind": "slow", "delay_s": 2.5, "times": 2, "skip": 1},
    "truncated JSON": {"kind": "truncate", "times": 2, "skip": 3},
    "dropped connection": {"kind": "drop", "times": 2, "skip": 2},
}


@pytest.mark.parametrize("name", list(RECOVERABLE))
def test_feed_fault_is_retried_and_window_completes(make_ctx, srv, reference, tally, name):
    ctx = make_ctx(cfg(srv, **({"timeout_s": 1.0} if name == "timeout" else {})), "postgres")
    fault = srv.fault(TAG, **RECOVERABLE[name])
    started = time.monotonic()
    counts = ingest_window(ctx, "masto", START, STOP)
    assert fault.hits >= fault.skip + fault.times, "the fault was never served"
    tally.fault(f"feed {name}", fault.times)
    if name.startswith("429"):
        assert time.monotonic() - started >= 2.0, "Retry-After was not honoured"
    assert counts["new"] == count(reference["ctx"], posts)
    assert_same(tally, reference["ingest"], ctx, INGEST_TABLES)
    assert run_status(ctx) == ["succeeded"]


FATAL = {
    "500 storm": ({"kind": "status", "status": 500, "times": 1000, "skip": 3}, "HTTP 500 after 4 attempts"),
    "repeating page": ({"kind": "repeat", "times": 1, "skip": 2}, "twice|backwards"),
    "backwards cursor": ({"kind": "backwards", "times": 1, "skip": 2}, "backwards"),
}


@pytest.mark.parametrize("name", list(FATAL))
def test_feed_fault_fails_cleanly_then_rerun_completes(make_ctx, srv, reference, tally, name):
    ctx = make_ctx(cfg(srv), "postgres")
    spec, message = FATAL[name]
    srv.fault(TAG, **spec)
    with pytest.raises(BrandmonError, match=message) as info:
        ingest_window(ctx, "masto", START, STOP)
    tally.fault(f"feed {name}")
    assert "\n" not in str(info.value)
    assert count(ctx, posts) == count(ctx, post_images) == count(ctx, quarantine) == 0  # no partial window
    srv.clear_faults()
    ingest_window(ctx, "masto", START, STOP)
    assert_same(tally, reference["ingest"], ctx, INGEST_TABLES)
    assert run_status(ctx) == ["failed", "succeeded"]


# --- object store faults: real S3 error answers from a proxy in front of moto_server -----------------
# boto3 retries throttling (503 SlowDown) and 500 InternalError itself (AWS_MAX_ATTEMPTS=3 here,
# so a persistent fault surfaces quickly); what gets past its retries must fail the window cleanly.

ATTEMPTS = 3


@pytest.fixture
def proxied(make_ctx, srv, s3_proxy, monkeypatch):
    """A fresh Postgres + S3 context whose S3 traffic goes through the fault proxy."""
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", str(ATTEMPTS))
    return make_ctx(cfg(srv), "postgres", env={"BRANDMON_S3_ENDPOINT_URL": s3_proxy.url})


@pytest.mark.parametrize("error", ["SlowDown", "InternalError"])
def test_lake_error_burst_is_retried_by_boto3(proxied, s3_proxy, reference, tally, error):
    ctx = proxied
    rule = s3_proxy.fault("PUT", r"/lake/raw/", code=error, skip=2, times=ATTEMPTS - 1)
    ingest_window(ctx, "masto", START, STOP)
    assert rule.fired == ATTEMPTS - 1
    tally.fault(f"object store {error} burst", rule.fired)
    assert_same(tally, reference["ingest"], ctx, INGEST_TABLES)
    assert run_status(ctx) == ["succeeded"]


@pytest.mark.parametrize("error", ["SlowDown", "InternalError"])
def test_lake_write_error_mid_window_commits_nothing(proxied, s3_proxy, reference, tally, error):
    ctx = proxied
    rule = s3_proxy.fault("PUT", r"/lake/raw/", code=error, skip=2, times=10**6)
    with pytest.raises(StorageError, match=f"S3 put on .* failed: {error}") as info:
        ingest_window(ctx, "masto", START, STOP)
    assert rule.fired == ATTEMPTS and "\n" not in str(info.value)
    tally.fault(f"object store {error}")
    assert count(ctx, posts) == count(ctx, post_images) == count(ctx, quarantine) == count(ctx, dirty_days) == 0
    s3_proxy.clear()
    ingest_window(ctx, "masto", START, STOP)
    assert_same(tally, reference["ingest"], ctx, INGEST_TABLES)
    assert run_status(ctx) == ["failed", "succeeded"]


def test_image_store_errors_leave_images_retryable(proxied, s3_proxy, reference, tally):
    ctx = proxied
    rule = s3_proxy.fault("PUT", r"/lake/images/", code="InternalError", skip=1, paths=3)  # 3 images, every attempt
    counts = ingest_window(ctx, "masto", START, STOP)
    assert len(rule.chosen) == 3 and rule.fired == 3 * ATTEMPTS and counts["images_failed"] >= 3
    tally.fault("object store InternalError (images)", len(rule.chosen))
    with ctx.engine.connect() as conn:
        reasons = {r for (r,) in conn.execute(select(post_images.c.reason).where(post_images.c.status == "failed"))}
    assert reasons and all(r.startswith("storage error") for r in reasons)
    assert compare(tally, {"posts": reference["ingest"]["posts"]}, snapshot(ctx, [posts], lake=False)) == []
    s3_proxy.clear()
    fetch_images(ctx, source="masto")
    assert_same(tally, reference["ingest"], ctx, INGEST_TABLES)


def test_bucket_disappears_mid_window(proxied, s3_proxy, s3_endpoint, reference, tally):
    ctx = proxied
    bucket = ctx.settings.storage_url.split("/")[2]
    s3 = boto3.client("s3", endpoint_url=s3_endpoint)

    def drop_bucket() -> None:
        for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=bucket)

    rule = s3_proxy.fault("PUT", r"/lake/raw/", kind="action", action=drop_bucket, skip=3)
    with pytest.raises(StorageError, match="NoSuchBucket"):
        ingest_window(ctx, "masto", START, STOP)
    assert rule.fired == 1
    tally.fault("object store missing bucket")
    assert count(ctx, posts) == 0
    s3.create_bucket(Bucket=bucket)
    ingest_window(ctx, "masto", START, STOP)
    assert_same(tally, reference["ingest"], ctx, INGEST_TABLES)


def test_report_write_error_after_aggregate(proxied, s3_proxy, reference, tally):
    """The aggregate DAG's last step writes the day's report into the lake; S3 failing there is
    one clear line from `brandmon report`, and the re-run writes it."""
    ctx = proxied
    ingest_window(ctx, "masto", START, STOP)
    aggregate_dirty(ctx)
    rule = s3_proxy.fault("PUT", r"/lake/reports/", code="InternalError", times=10**6)
    args = ["report", "--date", DAY.date().isoformat()]
    failed = spawn(ctx, CLI, *args, AWS_MAX_ATTEMPTS=str(ATTEMPTS))
    out, err = failed.communicate(timeout=120)
    assert failed.returncode == 2 and rule.fired == ATTEMPTS, err.decode()[-800:]
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "S3 put on" in lines[0] and "InternalError" in lines[0] and "Traceback" not in err.decode()
    tally.fault("object store InternalError (report)")
    s3_proxy.clear()
    again = spawn(ctx, CLI, *args)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err.decode()[-800:]
    assert_same(tally, reference["aggregate"], ctx, AGG_TABLES, lake=False)
    assert compare(tally, {"lake": reference["lake_with_report"]}, {"lake": set(ctx.store.list(""))}) == []


# --- a database connection dropped mid-transaction -------------------------------------------------


def test_db_connection_dropped_mid_ingest_transaction(make_ctx, srv, reference, tally):
    ctx = make_ctx(cfg(srv), "postgres")
    with drop_connection_on(ctx, "INSERT INTO post_images") as fired, pytest.raises(BrandmonError) as info:
        ingest_window(ctx, "masto", START, STOP)
    assert fired, "the statement never ran"
    tally.fault("db connection terminated (ingest)")
    assert "re-run the same window" in str(info.value)
    assert count(ctx, posts) == count(ctx, post_images) == count(ctx, quarantine) == count(ctx, dirty_days) == 0
    ingest_window(ctx, "masto", START, STOP)
    assert_same(tally, reference["ingest"], ctx, INGEST_TABLES)
    assert run_status(ctx) == ["failed", "succeeded"]


def test_db_connection_dropped_mid_aggregate_day(make_ctx, srv, reference, tally):
    ctx = make_ctx(cfg(srv), "postgres")
    ingest_window(ctx, "masto", START, STOP)
    with drop_connection_on(ctx, "mention_daily", nth=5) as fired, pytest.raises(Exception):  # noqa: B017 - any error
        aggregate_dirty(ctx)
    assert fired
    tally.fault("db connection terminated (aggregate)")
    with ctx.engine.connect() as conn:
        left = conn.execute(select(func.count()).select_from(dirty_days)).scalar()
    assert 0 < left <= DAYS  # the interrupted day is still queued
    aggregate_dirty(ctx)
    assert_same(tally, reference["aggregate"], ctx, AGG_TABLES, lake=False)


# --- two runs of the same window at once -----------------------------------------------------------

def test_two_ingest_runs_of_one_window(make_ctx, srv, reference, tally):
    ctx = make_ctx(cfg(srv), "postgres")
    srv.fault(TAG, "slow", delay_s=0.4, times=1000)  # keep the first run inside its lock for a while
    args = ["ingest", "masto", "--start", START.isoformat(), "--end", STOP.isoformat(), "--quiet"]
    first = spawn(ctx, CLI, *args)
    try:
        deadline = time.monotonic() + 60
        while count(ctx, locks) == 0:
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read().decode()[-800:]
            time.sleep(0.05)
        second = spawn(ctx, CLI, *args)
        out2, err2 = second.communicate(timeout=60)
        out1, err1 = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    tally.fault("concurrent run (ingest)")
    assert second.returncode == 75, err2.decode()
    assert err2.decode().strip().count("\n") == 0 and "another run is already processing" in err2.decode()
    assert first.returncode == 0, err1.decode()[-800:]
    assert run_status(ctx) == ["succeeded"]
    srv.clear_faults()
    assert_same(tally, reference["ingest"], ctx, INGEST_TABLES)


def test_two_aggregate_runs_at_once(make_ctx, srv, reference, tally):
    ctx = make_ctx(cfg(srv), "postgres")
    ingest_window(ctx, "masto", START, STOP)
    procs = [spawn(ctx, CLI, "aggregate", "--quiet") for _ in range(2)]
    results = [p.communicate(timeout=180) for p in procs]
    tally.fault("concurrent run (aggregate)")
    assert [p.returncode for p in procs] == [0, 0], [r[1].decode()[-500:] for r in results]
    with ctx.engine.connect() as conn:
        statuses = [s for (s,) in conn.execute(select(runs.c.status).where(runs.c.kind == "aggregate"))]
    assert statuses == ["succeeded", "succeeded"]  # the second waited for the lock, then found nothing to do
    assert_same(tally, reference["aggregate"], ctx, AGG_TABLES, lake=False)


# --- cursor faults of the other APIs ---------------------------------------------------------------


@pytest.mark.parametrize("api,kind", [("bluesky", "repeat"), ("bluesky", "backwards"), ("reddit", "repeat")])
def test_cursor_faults_of_other_apis(make_ctx, monkeypatch, tally, api, kind):
    from tests.support.feeds import FakeBluesky, FakeReddit, bluesky_post, reddit_post

    monkeypatch.setenv("REL_PW", "app-pass-1234")
    monkeypatch.setenv("REL_ID", "cid")
    monkeypatch.setenv("REL_SECRET", "csecret-1234")
    end = DAY + dt.timedelta(days=1)
    if api == "bluesky":
        fake, path = FakeBluesky(max_limit=4), "/xrpc/app.bsky.feed.searchPosts"
        fake.posts = [bluesky_post(DAY + dt.timedelta(minutes=50 * i), f"acme {i}", did=f"did:plc:u{i % 3}", rkey=f"3k{i:03d}") for i in range(20)]
        src = {"name": "s", "kind": "bluesky", "base_url": "{url}", "queries": ["acme"], "identifier": "brandmon.bsky.social",
               "password_env": "REL_PW", "limit": 4, "backoff_s": 0.01}
    else:
        fake, path = FakeReddit(client_id="cid", client_secret="csecret-1234", max_limit=4), "/r/brands/new.json"
        fake.posts = [reddit_post(DAY + dt.timedelta(minutes=50 * i), f"Acme {i}", pid=f"r{i:02d}") for i in range(20)]
        src = {"name": "s", "kind": "reddit", "oauth_base_url": "{url}", "auth_url": "{url}/api/v1/access_token",
               "subreddits": ["brands"], "client_id_env": "REL_ID", "client_secret_env": "REL_SECRET", "limit": 4, "backoff_s": 0.01}
    with fake:
        src = {k: v.format(url=fake.url) if isinstance(v, str) else v for k, v in src.items()}
        ctx = make_ctx({"brands": [{"name": "Acme", "keywords": ["acme"]}], "sources": [src],
                        "network": {"max_retries": 2, "allowed_private_hosts": ["127.0.0.1"]}}, "postgres")
        fake.fault(path, kind, times=1, skip=2)
        with pytest.raises(BrandmonError, match="twice|backwards") as info:
            ingest_window(ctx, "s", DAY, end)
        tally.fault(f"feed {kind} ({api})")
        assert "\n" not in str(info.value) and count(ctx, posts) == 0
        fake.clear_faults()
        counts = ingest_window(ctx, "s", DAY, end)
    assert counts["new"] == count(ctx, posts) == 20 and counts["updated"] == 0
