"""SIGKILL at random points of ingest, detect and aggregate, then re-run: the tables must equal
those of an uninterrupted run (row sets), on Postgres + moto S3.

Kill points are drawn from a seeded RNG (`BRANDMON_REL_SEED`, default 7; the seed is in every
failure message). Each child sleeps a little *inside* its transactions (mark_days in ingest,
the dirty marks of a detect batch, a day's computation in aggregate), so kills land inside
open transactions as well as between them.
"""

from __future__ import annotations

import datetime as dt
import os
import random
from typing import Any

import pytest
from rel_helpers import (
    DAY,
    compare,
    drop_connection_on,
    jpeg,
    kill_when,
    shared_pg_ctx,
    snapshot,
    spawn,
)
from sqlalchemy import func, select

from pipeline.aggregate.jobs import aggregate_dirty
from pipeline.detector.jobs import detect_pending
from pipeline.errors import StorageError
from pipeline.ingest.jobs import ingest_window
from pipeline.schema import (
    detections,
    dirty_days,
    image_scores,
    images,
    mention_daily,
    post_images,
    posts,
    quarantine,
    review_queue,
    text_mentions,
)
from tests.support.feeds import FakeMastodon, mastodon_media, mastodon_status

pytestmark = pytest.mark.integration

SEED = int(os.environ.get("BRANDMON_REL_SEED", "7"))
DAYS = 6
START, STOP = DAY, DAY + dt.timedelta(days=DAYS)
STAGES = {
    "ingest": [posts, post_images, images, quarantine, dirty_days],
    "detect": [image_scores, detections, review_queue, dirty_days],
    "aggregate": [mention_daily, text_mentions, dirty_days],
}

CHILD = """
import datetime as dt, sys, time
stage, pause = sys.argv[1], float(sys.argv[2])

def slow(fn):
    def wrapper(*a, **k):
        time.sleep(pause)
        return fn(*a, **k)
    return wrapper

from pipeline.context import open_context
ctx = open_context()
if stage == "ingest":
    import pipeline.ingest.jobs as jobs
    jobs.mark_days = slow(jobs.mark_days)
    jobs.ingest_window(ctx, "masto", dt.datetime.fromisoformat(sys.argv[3]), dt.datetime.fromisoformat(sys.argv[4]))
elif stage == "detect":
    import pipeline.detector.infer as infer
    infer.mark_days_of_images = slow(infer.mark_days_of_images)
    from pipeline.detector.jobs import detect_pending
    detect_pending(ctx)
else:
    import pipeline.aggregate.jobs as agg
    agg.compute_day = slow(agg.compute_day)
    agg.aggregate_dirty(ctx)
print("finished")
"""


def world(srv: FakeMastodon, per_day: int = 8) -> None:
    statuses = []
    for i in range(DAYS * per_day):
        n = i if i % 4 else max(0, i - 5)  # every 4th post re-posts an earlier image
        srv.add_bytes(f"/img/{i}.jpg", jpeg(n))
        when = START + dt.timedelta(minutes=(24 * 60 // per_day) * i + 3)
        statuses.append(mastodon_status(when, f"acme post {i}", seq=i, tags=("acme",), account=f"user{i % 5}",
                                        media=[mastodon_media(f"{srv.url}/img/{i}.jpg")]))
    srv.statuses = statuses


def cfg(srv: FakeMastodon) -> dict[str, Any]:
    return {
        "brands": [{"name": "Acme", "keywords": ["acme"], "hashtags": ["acme"]}],
        "sources": [{"name": "masto", "kind": "mastodon", "base_url": srv.url, "hashtags": ["acme"], "limit": 5,
                     "backoff_s": 0.01, "part_pages": 1}],
        "network": {"max_retries": 3, "timeout_s": 5, "image_workers": 1, "per_host_connections": 1,
                    "allowed_private_hosts": ["127.0.0.1"]},
        "detector": {"batch_size": 4, "mixed_precision": "fp32", "review_margin": 0.1},
    }


@pytest.fixture(scope="module")
def tiny_model() -> tuple[Any, bytes]:
    """An untrained (weights=none) Inception v3 at 75 px: the machinery, not the accuracy, is tested."""
    from pipeline.detector import NO_LOGO
    from pipeline.detector.model import ModelSpec, build_network, save_artifact

    spec = ModelSpec(classes=[NO_LOGO, "Acme"], input_size=75, weights="none", threshold=0.3)
    return spec, save_artifact(spec, build_network(2, 75))


@pytest.fixture(scope="module")
def feed() -> Any:
    with FakeMastodon(max_limit=5) as srv:
        world(srv)
        yield srv


@pytest.fixture(scope="module")
def reference(feed, tiny_model, pg_admin_url, s3_endpoint, tmp_path_factory) -> Any:
    """The uninterrupted run: ingest, detect, aggregate, with a snapshot after each stage."""
    with shared_pg_ctx(cfg(feed), pg_admin_url, s3_endpoint, tmp_path_factory.mktemp("reference")) as ref:
        install(ref, tiny_model)
        want: dict[str, Any] = {}
        feed.requests.clear()
        ingest_window(ref, "masto", START, STOP)
        want["ingest"] = snapshot(ref, STAGES["ingest"])
        want["requests"] = len(feed.requests)
        detect_pending(ref)
        want["detect"] = snapshot(ref, STAGES["detect"], lake=False)
        aggregate_dirty(ref)
        want["aggregate"] = snapshot(ref, STAGES["aggregate"], lake=False)
        want["images"] = count(ref, images)
        assert want["images"] >= 30 and count(ref, detections) > 0 and count(ref, mention_daily) > 0
        yield want


def install(ctx: Any, model: tuple[Any, bytes]) -> None:
    from pipeline.detector import registry

    version = registry.register(ctx, model[0], model[1], "reliability-tiny", {}, {})
    registry.activate(ctx, version)


def count(ctx: Any, table: Any, distinct: Any = None) -> int:
    with ctx.engine.connect() as conn:
        q = select(func.count(func.distinct(distinct)) if distinct is not None else func.count()).select_from(table)
        return int(conn.execute(q).scalar() or 0)


def test_sigkill_at_random_points_then_rerun_equals_uninterrupted(make_ctx, feed, reference, tiny_model, tally):
    rng = random.Random(SEED)
    want, total_requests, n_images = reference, reference["requests"], reference["images"]
    srv = feed
    srv.clear_faults()
    ctx = make_ctx(cfg(srv), "postgres")
    install(ctx, tiny_model)
    kills: list[str] = []

    # Ingest: two kills at random request counts (feed pages or images), then a clean re-run.
    srv.fault("/", "slow", delay_s=0.05, times=10**6)
    for _ in range(2):
        k = rng.randint(1, total_requests - 5)
        srv.requests.clear()
        proc = spawn(ctx, CHILD, "ingest", "0.8", START.isoformat(), STOP.isoformat())
        if kill_when(proc, lambda k=k: len(srv.requests) >= k, settle=rng.uniform(0, 0.2)):
            kills.append(f"ingest after {k} requests")
    srv.clear_faults()
    ingest_window(ctx, "masto", START, STOP)
    problems = compare(tally, want["ingest"], snapshot(ctx, STAGES["ingest"]))
    assert not problems, f"seed {SEED}, kills {kills}: " + "\n".join(problems)

    # Detect: a kill once k images are scored (k random), then a clean re-run.
    k = rng.randint(1, n_images - 8)
    proc = spawn(ctx, CHILD, "detect", "0.3")
    if kill_when(proc, lambda: count(ctx, image_scores) >= k, timeout=300, settle=rng.uniform(0, 0.4)):
        kills.append(f"detect after {k} scores")
        assert count(ctx, image_scores) < n_images, "the detect child finished before the kill"
    detect_pending(ctx)
    problems = compare(tally, want["detect"], snapshot(ctx, STAGES["detect"], lake=False))
    assert not problems, f"seed {SEED}, kills {kills}: " + "\n".join(problems)

    # Aggregate: a kill once k days are written (k random), then a clean re-run.
    k = rng.randint(1, DAYS - 3)
    proc = spawn(ctx, CHILD, "aggregate", "0.25")
    if kill_when(proc, lambda: count(ctx, mention_daily, mention_daily.c.day) >= k, timeout=120,
                 settle=rng.uniform(0, 0.2)):
        kills.append(f"aggregate after {k} days")
        assert count(ctx, dirty_days) > 0, "the aggregate child finished before the kill"
    aggregate_dirty(ctx)
    problems = compare(tally, want["aggregate"], snapshot(ctx, STAGES["aggregate"], lake=False))
    assert not problems, f"seed {SEED}, kills {kills}: " + "\n".join(problems)

    tally.fault("SIGKILL", len(kills))
    assert len(kills) >= 3, f"seed {SEED}: only {kills} landed before the children finished"


def test_detect_survives_lake_errors_and_a_dropped_connection(make_ctx, feed, reference, tiny_model, tally, s3_proxy,
                                                             monkeypatch):
    feed.clear_faults()
    want = reference["detect"]
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "3")
    ctx = make_ctx(cfg(feed), "postgres", env={"BRANDMON_S3_ENDPOINT_URL": s3_proxy.url})  # S3 through the fault proxy
    install(ctx, tiny_model)
    ingest_window(ctx, "masto", START, STOP)
    n_images = count(ctx, images)

    # The connection is terminated inside a batch's transaction: that batch rolls back.
    with drop_connection_on(ctx, "INSERT INTO detections", nth=2) as fired, pytest.raises(Exception):  # noqa: B017
        detect_pending(ctx)
    assert fired
    tally.fault("db connection terminated (detect)")
    assert 0 < count(ctx, image_scores) < n_images  # the first batch committed, the second rolled back

    # Real S3 answers from the proxy: a burst of throttled image reads (503 SlowDown) is retried
    # by boto3; then every later image read stays throttled past its retries. The run fails,
    # no image is written off as corrupt, and detect stops reading at the first failure instead
    # of waiting out boto3's retries on each remaining image.
    burst = s3_proxy.fault("GET", r"/lake/images/", code="SlowDown", skip=1, times=2)
    stuck = s3_proxy.fault("GET", r"/lake/images/", code="SlowDown", skip=4, paths=1_000_000)
    unscored = n_images - count(ctx, image_scores)
    with pytest.raises(StorageError, match="S3 get on .* failed: SlowDown") as info:
        detect_pending(ctx)
    assert burst.fired == 2 and "\n" not in str(info.value)
    # at most the reads already in flight on the 8 reader threads when the first one failed
    assert 1 <= len(stuck.chosen) <= 8 < unscored, (len(stuck.chosen), unscored)
    tally.fault("object store SlowDown burst (detect)", burst.fired)
    tally.fault("object store SlowDown (detect)")
    s3_proxy.clear()
    with ctx.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(image_scores).where(image_scores.c.status == "corrupt")).scalar() == 0
    assert count(ctx, image_scores) < n_images

    detect_pending(ctx)
    problems = compare(tally, want, snapshot(ctx, STAGES["detect"], lake=False))
    assert not problems, "\n".join(problems)
