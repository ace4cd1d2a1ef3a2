"""ingest_window / backfill / fetch_images end to end, on SQLite + folder and Postgres + S3.

Every feed is a local HTTP server in the API's documented shape (tests/support/feeds.py);
images come from the same server (good, duplicate, corrupt, huge, missing, private).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import signal
import subprocess
import sys
import time

import pytest
from ingest_helpers import config, count, jpeg, png, png_header_only, snapshot, truncated_jpeg
from sqlalchemy import insert, select

from pipeline.dirty import clear_days, pending_days
from pipeline.errors import BrandmonError
from pipeline.ingest.http import FeedError
from pipeline.ingest.jobs import backfill, fetch_images, ingest_window
from pipeline.runlog import WindowBusy
from pipeline.schema import images, locks, post_images, posts, quarantine, runs, utcnow
from tests.support.feeds import (
    FakeBluesky,
    FakeMastodon,
    FakeReddit,
    bluesky_post,
    mastodon_media,
    mastodon_status,
    reddit_post,
)

DAY = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
END = DAY + dt.timedelta(days=1)
TAG = "/api/v1/timelines/tag/acme"


def mastodon_world(srv: FakeMastodon) -> None:
    """30 statuses in the window + some outside, under two hashtags, with all kinds of images."""
    srv.add_bytes("/img/good.jpg", jpeg())
    srv.add_bytes("/img/same-bytes-other-url.jpg", jpeg())
    srv.add_bytes("/img/other.png", png())
    srv.add_bytes("/img/corrupt.jpg", truncated_jpeg())
    srv.add_bytes("/img/bomb.png", png_header_only(50_000, 50_000), "image/png")
    srv.add_bytes("/img/page.jpg", b"<html><body>login</body></html>", "image/jpeg")
    srv.add_bytes("/img/huge.jpg", b"\xff\xd8\xff" + b"\x00" * 300_000)
    media_cycle = [
        [mastodon_media(srv.url + "/img/good.jpg", "red logo")],
        [mastodon_media(srv.url + "/img/same-bytes-other-url.jpg"), mastodon_media(srv.url + "/img/other.png", "green")],
        [mastodon_media(srv.url + "/img/corrupt.jpg")],
        [mastodon_media(srv.url + "/img/bomb.png")],
        [mastodon_media(srv.url + "/img/page.jpg")],
        [mastodon_media(srv.url + "/img/huge.jpg")],
        [],
    ]
    statuses = []
    for i in range(36):
        when = DAY - dt.timedelta(hours=3) + dt.timedelta(minutes=45 * i)
        tags = ("acme", "acmeone") if i % 4 == 0 else ("acme",)
        statuses.append(mastodon_status(when, f"Post {i} about <b>#acme</b>", seq=i, tags=tags, account=f"user{i % 5}",
                                        media=media_cycle[i % len(media_cycle)]))
    original = statuses[10]
    statuses.append(mastodon_status(DAY + dt.timedelta(hours=20), "", seq=99, account="booster", reblog=original, tags=("acme",)))
    bad = mastodon_status(DAY + dt.timedelta(hours=5, minutes=1), "bad", seq=98, tags=("acme",))
    bad["account"] = None
    statuses.append(bad)
    srv.statuses = statuses


def masto_source(srv, **extra) -> dict:
    return {"name": "masto", "kind": "mastodon", "base_url": srv.url, "hashtags": ["acme", "acmeone"], "limit": 5,
            "backoff_s": 0.01, **extra}


@pytest.fixture
def masto():
    with FakeMastodon(max_limit=5) as srv:
        mastodon_world(srv)
        yield srv


def in_window(srv) -> int:
    return sum(1 for s in srv.statuses if s["account"] and DAY.isoformat()[:10] <= s["created_at"][:10] < END.isoformat()[:10])


@pytest.mark.integration
def test_mastodon_window_end_to_end(make_ctx, backend, masto):
    masto.fault(TAG, "status", status=429, retry_after="0", skip=1)
    masto.fault(TAG, "status", status=503, times=2, skip=3)
    ctx = make_ctx(config([masto_source(masto)], max_image_bytes=200_000), backend)
    counts = ingest_window(ctx, "masto", DAY, END)

    expected = in_window(masto)
    assert counts["new"] == expected and counts["updated"] == 0 and counts["unchanged"] == 0
    assert counts["rejected"] == 1
    assert counts["duplicates"] > 0  # statuses under both hashtags
    assert counts["fetched"] == counts["new"] + counts["rejected"] + counts["duplicates"] + counts["out_of_window"]
    assert count(ctx, posts) == expected

    with ctx.engine.connect() as conn:
        statuses = dict(conn.execute(select(post_images.c.url, post_images.c.status).distinct()).all())
        reasons = dict(conn.execute(select(post_images.c.url, post_images.c.reason).distinct()).all())
        reblog = conn.execute(select(posts).where(posts.c.repost_of.is_not(None))).mappings().one()
        q = conn.execute(select(quarantine)).mappings().all()
        run = conn.execute(select(runs)).mappings().one()
    u = masto.url + "/img/"
    assert statuses[u + "good.jpg"] == statuses[u + "same-bytes-other-url.jpg"] == statuses[u + "other.png"] == "stored"
    assert statuses[u + "corrupt.jpg"] == "quarantined" and "corrupt JPEG" in reasons[u + "corrupt.jpg"]
    assert statuses[u + "bomb.png"] == "quarantined" and ("bomb" in reasons[u + "bomb.png"] or "too large" in reasons[u + "bomb.png"])
    assert statuses[u + "page.jpg"] == "quarantined" and "HTML" in reasons[u + "page.jpg"]
    assert statuses[u + "huge.jpg"] == "quarantined" and "too large" in reasons[u + "huge.jpg"]
    assert count(ctx, images) == 2  # same bytes under two URLs = one image
    assert counts["images_stored"] + counts["images_quarantined"] == count(ctx, post_images)
    assert reblog["text"] == "Post 10 about #acme" and reblog["repost_of"] == masto.statuses[10]["id"]
    assert [r["reason"] for r in q] == ["missing account"]
    assert run["status"] == "succeeded" and run["counts"]["new"] == expected
    keys = set(ctx.store.list(""))
    assert any(k.startswith("raw/source=masto/dt=2026-10-02/20261002T000000Z_20261003T000000Z-part") for k in keys)
    assert sum(k.startswith("images/sha256/") for k in keys) == 2
    with ctx.engine.connect() as conn:
        assert pending_days(conn) == [DAY.date()]
    # The raw lake holds the pages as gzip JSONL.
    part = next(k for k in keys if k.startswith("raw/"))
    lines = gzip.decompress(ctx.store.get(part)).decode().splitlines()
    assert json.loads(lines[0])["request"]["stream"] == "tag:acme"


@pytest.mark.integration
def test_rerun_leaves_identical_tables(make_ctx, backend, masto):
    ctx = make_ctx(config([masto_source(masto)], max_image_bytes=200_000), backend)
    ingest_window(ctx, "masto", DAY, END)
    before = snapshot(ctx, volatile=True)
    assert ingest_window(ctx, "masto", DAY, END)["skipped"] == 1
    again = ingest_window(ctx, "masto", DAY, END, force=True)
    assert again["new"] == again["updated"] == 0 and again["unchanged"] == in_window(masto)
    assert snapshot(ctx, volatile=True) == before


@pytest.mark.integration
def test_edit_updates_post_images_and_dirty_days(make_ctx, backend, masto):
    ctx = make_ctx(config([masto_source(masto)], max_image_bytes=200_000), backend)
    ingest_window(ctx, "masto", DAY, END)
    with ctx.engine.begin() as conn:
        clear_days(conn, pending_days(conn))
    target = masto.statuses[7]  # had one image (good.jpg); now two different ones
    target["content"] = "<p>edited acme text</p>"
    target["media_attachments"] = [mastodon_media(masto.url + "/img/other.png"), mastodon_media(masto.url + "/img/good.jpg", "moved")]
    counts = ingest_window(ctx, "masto", DAY, END, force=True)
    assert (counts["updated"], counts["new"]) == (1, 0)
    with ctx.engine.connect() as conn:
        row = conn.execute(select(posts.c.id, posts.c.text).where(posts.c.external_id == target["id"])).one()
        imgs = conn.execute(select(post_images.c.position, post_images.c.url, post_images.c.status)
                            .where(post_images.c.post_id == row.id).order_by(post_images.c.position)).all()
        assert row.text == "edited acme text"
        assert [(p, u.rsplit("/", 1)[1], s) for p, u, s in imgs] == [(0, "other.png", "stored"), (1, "good.jpg", "stored")]
        assert pending_days(conn) == [dt.date.fromisoformat(target["created_at"][:10])]


@pytest.mark.integration
def test_failing_source_fails_cleanly_and_rerun_resumes(make_ctx, backend, masto):
    source = masto_source(masto, part_pages=1)
    ref = make_ctx(config([source], max_image_bytes=200_000), backend)
    ingest_window(ref, "masto", DAY, END)
    full_requests = masto.hits(TAG)

    ctx = make_ctx(config([source], max_image_bytes=200_000), backend)
    masto.requests.clear()
    masto.fault(TAG, "status", status=500, times=50, skip=3)
    with pytest.raises(FeedError, match="HTTP 500 after 4 attempts"):
        ingest_window(ctx, "masto", DAY, END)
    assert count(ctx, posts) == 0 and count(ctx, post_images) == 0  # no half window
    with ctx.engine.connect() as conn:
        run = conn.execute(select(runs)).mappings().one()
    assert run["status"] == "failed" and "HTTP 500" in run["error"]
    masto.clear_faults()
    masto.requests.clear()
    counts = ingest_window(ctx, "masto", DAY, END)
    assert counts["resumed_pages"] == 3
    assert masto.hits(TAG) == full_requests - 3  # the three stored pages were not fetched again
    assert snapshot(ctx) == snapshot(ref)


KILL_SCRIPT = """
import datetime as dt, sys
from pipeline.context import open_context
from pipeline.ingest.jobs import ingest_window
ctx = open_context()
ingest_window(ctx, sys.argv[1], dt.datetime.fromisoformat(sys.argv[2]), dt.datetime.fromisoformat(sys.argv[3]))
print("finished")
"""


def ctx_env(ctx) -> dict[str, str]:
    s = ctx.settings
    env = {**os.environ, "BRANDMON_DATABASE_URL": s.database_url, "BRANDMON_STORAGE_URL": s.storage_url,
           "BRANDMON_CONFIG": str(s.config_path), "BRANDMON_HOME": str(s.home), "BRANDMON_AUTHOR_SALT": s.author_salt.get()}
    if s.s3_endpoint_url:
        env["BRANDMON_S3_ENDPOINT_URL"] = s.s3_endpoint_url
    return env


def run_and_kill(ctx, srv, path: str, hits: int, source: str = "masto") -> None:
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, source, DAY.isoformat(), END.isoformat()],
                            env=ctx_env(ctx), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while srv.hits(path) < hits:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "the run never reached the kill point"
            time.sleep(0.05)
        time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert proc.returncode == -signal.SIGKILL


@pytest.mark.integration
@pytest.mark.parametrize("point", ["fetch", "images"])
def test_sigkill_midway_then_rerun_equals_uninterrupted(make_ctx, backend, masto, point):
    source = masto_source(masto, part_pages=1)
    cfg = config([source], max_image_bytes=200_000, image_workers=1)
    ref = make_ctx(cfg, backend)
    ingest_window(ref, "masto", DAY, END)

    ctx = make_ctx(cfg, backend)
    masto.requests.clear()
    if point == "fetch":
        masto.fault(TAG, "slow", delay_s=60, skip=4)
        run_and_kill(ctx, masto, TAG, 5)
        assert count(ctx, posts) == 0
    else:
        masto.fault("/img/other.png", "slow", delay_s=60)
        run_and_kill(ctx, masto, "/img/other.png", 1)
        assert count(ctx, posts) == in_window(masto)
        assert count(ctx, post_images, post_images.c.status == "pending") > 0
    masto.clear_faults()
    counts = ingest_window(ctx, "masto", DAY, END)
    assert counts.get("skipped") is None
    assert snapshot(ctx) == snapshot(ref)


@pytest.mark.integration
def test_private_image_hosts_refused_without_allow_list(make_ctx, backend):
    with FakeMastodon() as srv:
        srv.add_bytes("/img/good.jpg", jpeg())
        srv.add_redirect("/img/hop.jpg", srv.url + "/img/good.jpg")
        srv.statuses = [
            mastodon_status(DAY + dt.timedelta(hours=1), "direct #acme", tags=("acme",), media=[mastodon_media(srv.url + "/img/good.jpg")]),
            mastodon_status(DAY + dt.timedelta(hours=2), "redirect #acme", tags=("acme",), seq=1,
                            media=[mastodon_media(f"http://localhost:{srv.port}/img/hop.jpg")]),
            mastodon_status(DAY + dt.timedelta(hours=3), "metadata #acme", tags=("acme",), seq=2,
                            media=[mastodon_media("http://169.254.169.254/latest/meta-data/")]),
        ]
        cfg = config([{"name": "masto", "kind": "mastodon", "base_url": srv.url, "hashtags": ["acme"]}], private=False)
        cfg["network"]["allowed_private_hosts"] = ["localhost"]  # the first hop only
        ctx = make_ctx(cfg, backend)
        counts = ingest_window(ctx, "masto", DAY, END)
        assert counts["new"] == 3 and counts["images_quarantined"] == 3 and counts["images_stored"] == 0
        with ctx.engine.connect() as conn:
            reasons = sorted(r for (r,) in conn.execute(select(post_images.c.reason)))
        assert all(r.startswith("refused: host") and "non-public" in r for r in reasons)
        assert srv.hits("/img/good.jpg") == 0 and srv.hits("/img/hop.jpg") == 1
        assert not any(k.startswith("images/") for k in ctx.store.list(""))


@pytest.mark.integration
def test_fetch_images_retries_failed(make_ctx, backend):
    with FakeMastodon() as srv:
        srv.add_bytes("/img/a.jpg", jpeg())
        srv.statuses = [mastodon_status(DAY + dt.timedelta(hours=1), "#acme", tags=("acme",), media=[mastodon_media(srv.url + "/img/a.jpg")])]
        srv.fault("/img/a.jpg", "status", status=503)
        ctx = make_ctx(config([{"name": "masto", "kind": "mastodon", "base_url": srv.url, "hashtags": ["acme"]}]), backend)
        assert ingest_window(ctx, "masto", DAY, END)["images_failed"] == 1
        with ctx.engine.connect() as conn:
            assert conn.execute(select(post_images.c.status, post_images.c.reason)).one() == ("failed", "HTTP 503")
        got = fetch_images(ctx, source="masto")
        assert got["images_stored"] == 1 and got["attempted"] == 1
        with ctx.engine.connect() as conn:
            assert conn.execute(select(post_images.c.status, post_images.c.attempts)).one() == ("stored", 2)
        assert fetch_images(ctx)["attempted"] == 0


@pytest.mark.integration
def test_bluesky_window(make_ctx, backend, monkeypatch):
    monkeypatch.setenv("BSKY_TEST_PASSWORD", "app-pass-1234")
    with FakeBluesky(max_limit=4) as srv:
        srv.add_bytes("/cdn/full.jpg", jpeg())
        srv.add_bytes("/cdn/corrupt.jpg", truncated_jpeg())
        imgs = [[{"fullsize": srv.url + "/cdn/full.jpg", "alt": "logo"}], [{"fullsize": srv.url + "/cdn/corrupt.jpg"}], None]
        srv.posts = [bluesky_post(DAY + dt.timedelta(minutes=50 * i), f"acme #{i}", did=f"did:plc:u{i % 3}", rkey=f"3k{i:03d}",
                                  images=imgs[i % 3], with_record=i % 2 == 0) for i in range(30)]
        srv.posts.append({"uri": "at://did:plc:x/app.bsky.feed.post/bad", "record": {"text": "acme", "createdAt": "garbage"}, "author": {"did": "did:plc:x"},
                          "indexedAt": (DAY + dt.timedelta(hours=2)).isoformat()})
        srv.fault("/xrpc/app.bsky.feed.searchPosts", "status", status=429, retry_after="0", skip=2)
        src = {"name": "sky", "kind": "bluesky", "base_url": srv.url, "queries": ["acme"], "identifier": "brandmon.bsky.social",
               "password_env": "BSKY_TEST_PASSWORD", "limit": 4, "backoff_s": 0.01}
        ctx = make_ctx(config([src]), backend)
        counts = ingest_window(ctx, "sky", DAY, END)
        assert counts["new"] == 29 and counts["rejected"] == 1  # 29 posts at 50-minute steps fit in the day
        assert counts["images_stored"] == 10 and counts["images_quarantined"] == 10
        assert count(ctx, images) == 1
        before = snapshot(ctx, volatile=True)
        again = ingest_window(ctx, "sky", DAY, END, force=True)
        assert again["unchanged"] == 29 and again["new"] == 0
        assert snapshot(ctx, volatile=True) == before  # every row, ids and timestamps included


@pytest.mark.integration
def test_reddit_window(make_ctx, backend, monkeypatch):
    monkeypatch.setenv("R_ID", "cid")
    monkeypatch.setenv("R_SECRET", "csecret-123456")
    with FakeReddit(client_id="cid", client_secret="csecret-123456", max_limit=5) as srv:
        srv.add_bytes("/i/1.jpg", jpeg())
        srv.add_bytes("/i/2.png", png())
        srv.posts = []
        for i in range(24):
            when = DAY - dt.timedelta(hours=2) + dt.timedelta(hours=1, minutes=7 * i)
            kw = {"gallery": [srv.url + "/i/1.jpg", srv.url + "/i/2.png"]} if i % 3 == 0 else ({"url": srv.url + "/i/1.jpg"} if i % 3 == 1 else {})
            srv.posts.append(reddit_post(when, f"Acme {i}", pid=f"r{i:02d}", **kw))
        srv.fault("/r/brands/new.json", "status", status=500, times=2, skip=1)
        src = {"name": "rd", "kind": "reddit", "oauth_base_url": srv.url, "auth_url": srv.url + "/api/v1/access_token",
               "subreddits": ["brands"], "client_id_env": "R_ID", "client_secret_env": "R_SECRET", "limit": 5, "backoff_s": 0.01,
               "user_agent": "test:brandmon:0.1 (by /u/brandmon)"}
        ctx = make_ctx(config([src]), backend)
        counts = ingest_window(ctx, "rd", DAY, END)
        in_day = sum(1 for p in srv.posts if DAY.timestamp() <= p["data"]["created_utc"] < END.timestamp())
        assert counts["new"] == in_day and counts["out_of_window"] > 0
        assert count(ctx, images) == 2
        assert count(ctx, post_images) == counts["images_stored"]
        assert set(srv.user_agents) == {"test:brandmon:0.1 (by /u/brandmon)"}
        before = snapshot(ctx, volatile=True)
        again = ingest_window(ctx, "rd", DAY, END, force=True)
        assert again["unchanged"] == in_day and again["new"] == again["updated"] == 0
        assert snapshot(ctx, volatile=True) == before  # every row, ids and timestamps included


# --- Bluesky and Reddit: resume, kills, duplicates across pages ------------------------------------

SEARCH = "/xrpc/app.bsky.feed.searchPosts"
LISTING = "/r/brands/new.json"


def bluesky_world(srv: FakeBluesky) -> None:
    srv.add_bytes("/cdn/a.jpg", jpeg())
    srv.posts = [bluesky_post(DAY + dt.timedelta(minutes=41 * i), f"acme #{i}", did=f"did:plc:u{i % 4}", rkey=f"3k{i:03d}",
                              images=[{"fullsize": srv.url + "/cdn/a.jpg", "alt": "a"}] if i % 4 == 0 else None) for i in range(34)]
    srv.posts.append({"uri": "at://did:plc:x/app.bsky.feed.post/bad", "record": {"text": "acme", "createdAt": "garbage"},
                      "author": {"did": "did:plc:x"}, "indexedAt": (DAY + dt.timedelta(hours=2)).isoformat()})


def reddit_world(srv: FakeReddit) -> None:
    srv.add_bytes("/i/1.jpg", jpeg())
    srv.posts = [reddit_post(DAY - dt.timedelta(hours=3) + dt.timedelta(minutes=43 * i), f"Acme {i}", pid=f"r{i:02d}", author=f"user{i % 5}",
                             **({"url": srv.url + "/i/1.jpg"} if i % 3 == 0 else {})) for i in range(40)]
    srv.posts.append({"kind": "t3", "data": {"id": "bad1", "name": "t3_bad1", "subreddit": "brands", "title": "acme " * 30_000,
                                             "selftext": "", "author": "mallory", "created_utc": (DAY + dt.timedelta(hours=5)).timestamp()}})


FEEDS = {
    "bluesky": (FakeBluesky, bluesky_world, SEARCH,
                lambda srv: {"name": "feed", "kind": "bluesky", "base_url": srv.url, "queries": ["acme"],
                             "identifier": "brandmon.bsky.social", "password_env": "BSKY_TEST_PASSWORD"}),
    "reddit": (FakeReddit, reddit_world, LISTING,
               lambda srv: {"name": "feed", "kind": "reddit", "base_url": srv.url, "subreddits": ["brands"]}),
}


@pytest.fixture(params=sorted(FEEDS))
def feed(request, monkeypatch):
    """(platform, server, listing path, source options) for Bluesky and for Reddit, 4 items a page."""
    monkeypatch.setenv("BSKY_TEST_PASSWORD", "app-pass-1234")
    cls, world, path, source = FEEDS[request.param]
    with cls(max_limit=4) as srv:
        world(srv)
        yield request.param, srv, path, {**source(srv), "limit": 4, "backoff_s": 0.01}


@pytest.mark.integration
def test_feed_fails_midway_then_rerun_resumes_from_the_stored_cursor(make_ctx, backend, feed):
    _platform, srv, path, source = feed
    cfg = config([{**source, "part_pages": 1}])
    ref = make_ctx(cfg, backend)
    ingest_window(ref, "feed", DAY, END)
    full = srv.hits(path)
    assert full > 6

    ctx = make_ctx(cfg, backend)
    srv.requests.clear()
    srv.fault(path, "status", status=500, times=50, skip=3)
    with pytest.raises(FeedError, match="HTTP 500 after 4 attempts"):
        ingest_window(ctx, "feed", DAY, END)
    assert count(ctx, posts) == count(ctx, post_images) == count(ctx, quarantine) == 0  # no half window
    srv.clear_faults()
    srv.requests.clear()
    counts = ingest_window(ctx, "feed", DAY, END)
    assert counts["resumed_pages"] == 3
    assert srv.hits(path) == full - 3  # the three stored pages were not fetched again
    assert snapshot(ctx) == snapshot(ref)


@pytest.mark.integration
def test_feed_killed_midway_then_rerun_equals_uninterrupted(make_ctx, backend, feed):
    _platform, srv, path, source = feed
    cfg = config([{**source, "part_pages": 1}])
    ref = make_ctx(cfg, backend)
    ingest_window(ref, "feed", DAY, END)
    full = srv.hits(path)

    ctx = make_ctx(cfg, backend)
    srv.requests.clear()
    srv.fault(path, "slow", delay_s=60, skip=4)
    run_and_kill(ctx, srv, path, 5, source="feed")
    assert count(ctx, posts) == 0
    srv.clear_faults()
    srv.requests.clear()
    counts = ingest_window(ctx, "feed", DAY, END)
    assert counts["resumed_pages"] == 4 and srv.hits(path) == full - 4
    assert snapshot(ctx) == snapshot(ref)


@pytest.mark.integration
def test_feed_duplicates_across_pages_land_once(make_ctx, backend, feed):
    """The server repeats the last item of each page at the top of the next one (new posts
    arrived between the requests): each post is stored once, as without the repeats."""
    _platform, srv, path, source = feed
    ref = make_ctx(config([source]), backend)
    plain = ingest_window(ref, "feed", DAY, END)
    plain_pages = srv.hits(path)

    srv.overlap = 1
    srv.requests.clear()
    ctx = make_ctx(config([source]), backend)
    counts = ingest_window(ctx, "feed", DAY, END)
    pages = srv.hits(path)
    assert pages > plain_pages  # 3 new items a page instead of 4
    assert counts["duplicates"] >= pages - 2 > 0  # a repeat on every page but the first (and the one crossing the start)
    assert counts["new"] == plain["new"] == count(ctx, posts)
    with ctx.engine.connect() as conn:
        ids = [r for (r,) in conn.execute(select(posts.c.external_id))]
    assert len(ids) == len(set(ids))
    assert snapshot(ctx) == snapshot(ref)


@pytest.mark.integration
def test_secrets_never_written(make_ctx, backend, monkeypatch, caplog):
    password, secret = "app-pass-1234", "csecret-ABCDEFGH"
    monkeypatch.setenv("BSKY_TEST_PASSWORD", password)
    monkeypatch.setenv("R_ID", "cid")
    monkeypatch.setenv("R_SECRET", secret)
    caplog.set_level("DEBUG")
    with FakeBluesky(password=password) as sky, FakeReddit(client_id="cid", client_secret=secret) as rd:
        sky.posts = [bluesky_post(DAY + dt.timedelta(hours=1), "acme")]
        rd.posts = [reddit_post(DAY + dt.timedelta(hours=1), "acme", pid="a1")]
        sources = [
            {"name": "sky", "kind": "bluesky", "base_url": sky.url, "queries": ["acme"], "identifier": "brandmon.bsky.social", "password_env": "BSKY_TEST_PASSWORD"},
            {"name": "rd", "kind": "reddit", "oauth_base_url": rd.url, "auth_url": rd.url + "/api/v1/access_token", "subreddits": ["brands"],
             "client_id_env": "R_ID", "client_secret_env": "R_SECRET", "backoff_s": 0.01},
        ]
        ctx = make_ctx(config(sources), backend)
        ingest_window(ctx, "sky", DAY, END)
        ingest_window(ctx, "rd", DAY, END)
        rd.fault("/r/brands/new.json", "status", status=500, times=20)
        with pytest.raises(BrandmonError):
            ingest_window(ctx, "rd", END, END + dt.timedelta(days=1))
        tokens = [t for t in sky.tokens] + [t for t in rd.tokens]
    salt = ctx.settings.author_salt.get()
    blobs = [gzip.decompress(ctx.store.get(k)) if k.endswith(".gz") else ctx.store.get(k) for k in ctx.store.list("")]
    with ctx.engine.connect() as conn:
        for table in (posts, runs, quarantine, post_images):
            blobs += [repr(tuple(r)).encode() for r in conn.execute(select(table))]
    blobs.append(caplog.text.encode())
    everything = b"\n".join(blobs)
    for s in [password, secret, salt, *tokens]:
        assert s.encode() not in everything, f"a secret leaked ({len(s)} chars)"


# --- archive ---------------------------------------------------------------------------------------


def write_archive(put, prefix: str) -> None:
    rows = []
    for i in range(60):  # three days, 20 a day
        when = DAY - dt.timedelta(days=1) + dt.timedelta(hours=1.2 * i)
        rows.append({"id": f"a{i}", "platform": "mastodon", "author_id": f"u{i % 9}", "text": f"<p>acme {i}</p>", "lang": "en",
                     "created_at": when.isoformat().replace("+00:00", "Z"), "url": f"https://m.example/{i}", "images": [], "reblog_of": None})
    jsonl = "\n".join(json.dumps(r) for r in rows[:40]) + "\n{not json\n" + json.dumps({"id": "x", "author_id": "u", "text": "no time"}) + "\n" \
        + json.dumps({"id": "y", "author_id": "u", "created_at": "9999-01-01T00:00:00Z"}) + "\n" \
        + json.dumps({"author_id": "u", "created_at": DAY.isoformat()}) + "\n"
    put(f"{prefix}export-1.jsonl.gz", gzip.compress(jsonl.encode()))
    lines = ["post_id,username,body,posted_at,language,image_urls"]
    for r in rows[40:]:
        lines.append(f"{r['id']},{r['author_id']},\"{r['text'].replace('<p>', '').replace('</p>', '')}, with comma\",{r['created_at']},en,")
    put(f"{prefix}export-2.csv", ("\n".join(lines) + "\n").encode())


@pytest.fixture
def archive_path(backend, make_ctx, tmp_path, request):
    if backend == "sqlite":
        folder = tmp_path / "exports"
        folder.mkdir()

        def put(name, data):
            (folder / name).write_bytes(data)

        write_archive(put, "")
        return str(folder), put
    import boto3

    endpoint = request.getfixturevalue("s3_endpoint")
    client = boto3.client("s3", endpoint_url=endpoint)
    bucket = f"exports-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)

    def put(name, data):
        client.put_object(Bucket=bucket, Key=name, Body=data)

    write_archive(put, "dump/")
    return f"s3://{bucket}/dump/", lambda name, data: put("dump/" + name, data)


@pytest.mark.integration
def test_archive_backfill(make_ctx, backend, archive_path):
    path, put = archive_path
    ctx = make_ctx(config([{"name": "arch", "kind": "archive", "path": path, "platform": "archive"}]), backend)
    first, last = (DAY - dt.timedelta(days=1)).date(), (DAY + dt.timedelta(days=1)).date()
    counts = backfill(ctx, "arch", first, last)
    assert counts["windows"] == 3 and counts["new"] == 60
    assert counts["rejected"] == 4  # bad JSON, no time, year 9999 (while indexing) + no id (in its window)
    keys = set(ctx.store.list("raw/source=arch/"))
    assert {f"raw/source=arch/dt={d}/archive.jsonl.gz" for d in ("2026-10-01", "2026-10-02", "2026-10-03")} <= keys
    assert "raw/source=arch/_index/manifest.json" in keys
    with ctx.engine.connect() as conn:
        plats = {r for (r,) in conn.execute(select(posts.c.platform).distinct())}
        csv_text = conn.execute(select(posts.c.text).where(posts.c.external_id == "a45")).scalar()
        q = {(r.window_start is None, r.reason.split(":")[0]) for r in conn.execute(select(quarantine))}
    assert plats == {"mastodon", "archive"}  # a row's platform column wins over the source default
    assert csv_text == "acme 45, with comma"
    assert q == {(True, "invalid JSON line"), (True, "missing created_at"), (True, "created_at out of range (9999-01-01T00"), (False, "missing id")}

    before = snapshot(ctx, volatile=True)
    again = backfill(ctx, "arch", first, last)
    assert again["skipped"] == 3 and again.get("new", 0) == 0
    forced = backfill(ctx, "arch", first, last, force=True)
    assert forced["unchanged"] == 60 and forced["new"] == forced["updated"] == 0
    assert snapshot(ctx, volatile=True) == before

    # The archive grows: one new file with a new row and a later copy of one -> re-indexed (the
    # copy with the later posted time wins, whichever window runs first).
    extra = [{"id": "a5", "platform": "mastodon", "author_id": "u5", "text": "edited acme", "created_at": "2026-10-01T06:30:00Z"},
             {"id": "b1", "platform": "mastodon", "author_id": "u1", "text": "new acme", "created_at": "2026-10-02T06:00:00Z"}]
    put("zz-export-3.jsonl", "\n".join(json.dumps(r) for r in extra).encode())
    third = backfill(ctx, "arch", first, last, force=True)
    assert (third["new"], third["updated"]) == (1, 1)


@pytest.mark.integration
def test_synthetic_source_uses_its_own_images(make_ctx, backend, monkeypatch):
    import pipeline.sources.synthetic.connector as syn

    class Dataset:
        def posts_between(self, start, end):
            out = []
            for i in range(48):
                when = DAY + dt.timedelta(minutes=30 * i)
                if start <= when < end:
                    out.append({"id": f"s{i}", "platform": "synthetic", "author_id": f"a{i % 4}", "text": f"Acme {i}", "lang": "en",
                                "created_at": when.isoformat().replace("+00:00", "Z"), "url": f"https://synthetic.example/{i}",
                                "images": [{"url": f"synthetic://images/{i % 3}.jpg", "alt": None}] if i % 2 else [],
                                "reblog_of": f"s{i - 1}" if i % 10 == 9 else None})
            return out

        def image_bytes(self, url):
            n = int(url.rsplit("/", 1)[1].split(".")[0])
            return jpeg(color=(n * 60, 10, 10)) if n < 2 else b"not an image"

    monkeypatch.setattr(syn, "dataset_for", lambda seed, days, start: Dataset())
    ctx = make_ctx(config([{"name": "demo", "kind": "synthetic", "seed": 7, "days": 30, "start": "2026-10-01"}], private=False), backend)
    counts = backfill(ctx, "demo", DAY.date(), DAY.date())
    assert counts["new"] == 48 and counts["images_stored"] == 16 and counts["images_quarantined"] == 8
    assert count(ctx, images) == 2
    assert count(ctx, posts, posts.c.repost_of.is_not(None)) == 4


def test_window_busy_and_bad_windows(make_ctx, masto):
    ctx = make_ctx(config([masto_source(masto)]))
    with ctx.engine.begin() as conn:  # another live run (on another host) holds the window
        conn.execute(insert(locks).values(name="ingest:masto:20261002T000000Z_20261003T000000Z", owner="otherhost:1",
                                          acquired_at=utcnow(), expires_at=utcnow() + dt.timedelta(hours=1)))
    with pytest.raises(WindowBusy, match="another run"):
        ingest_window(ctx, "masto", DAY, END)
    assert count(ctx, runs) == 0
    with pytest.raises(BrandmonError, match="empty window"):
        ingest_window(ctx, "masto", END, DAY)
    with pytest.raises(BrandmonError, match="unknown source"):
        ingest_window(ctx, "nope", DAY, END)
    with pytest.raises(BrandmonError, match="before its start"):
        backfill(ctx, "masto", END.date(), DAY.date())


@pytest.mark.integration
def test_parallel_archive_backfill_equals_serial(make_ctx, tmp_path):
    """workers=2 (spawned processes, one window each) leaves the same tables as one process; a
    broken JSON line whose timestamp is readable is quarantined by its own window."""
    folder = tmp_path / "exports"
    folder.mkdir()
    write_archive(lambda name, data: (folder / name).write_bytes(data), "")
    broken = '{"id": "z1", "author_id": "u", "created_at": "2026-10-02T05:00:00Z", "text": "cut off\n'
    (folder / "export-3.jsonl").write_text(broken)
    first, last = (DAY - dt.timedelta(days=1)).date(), (DAY + dt.timedelta(days=1)).date()
    src = [{"name": "arch", "kind": "archive", "path": str(folder), "platform": "archive", "fetch_images": False}]
    serial, parallel = make_ctx(config(src)), make_ctx(config(src))
    one = backfill(serial, "arch", first, last)
    two = backfill(parallel, "arch", first, last, workers=2)
    assert one["windows"] == two["windows"] == 3
    assert one["new"] == two["new"] == 60 and one["rejected"] == two["rejected"] == 5
    strip = {"lake"}
    assert {k: v for k, v in snapshot(serial).items() if k not in strip} == {k: v for k, v in snapshot(parallel).items() if k not in strip}
    assert {k.split("/", 2)[2] for k in snapshot(serial)["lake"]} == {k.split("/", 2)[2] for k in snapshot(parallel)["lake"]}
    with parallel.engine.connect() as conn:
        row = conn.execute(select(quarantine).where(quarantine.c.reason == "invalid JSON line", quarantine.c.window_start.is_not(None))).one()
        assert row.window_start == DAY and "export-3.jsonl:1" in row.record_ref
        assert conn.execute(select(runs.c.status).where(runs.c.source == "arch")).scalars().all() == ["succeeded"] * 3
    again = backfill(parallel, "arch", first, last, workers=2)
    assert again["skipped"] == 3 and again["windows"] == 3


def test_archive_fast_timestamp_and_partition_lines(monkeypatch):
    import pipeline.sources.archive.index as archive_mod
    from pipeline.sources.archive.index import decode_partition, fast_time

    assert fast_time('{"id": "1", "created_at": "2026-10-02T05:00:00Z", "text": "x"}') == "2026-10-02T05:00:00Z"
    assert fast_time('{"id": "1", "created_utc": 1790000000.5}') == "1790000000.5"
    assert fast_time('{"created_at": "2026-10-02", "date": "2026-10-03"}') is None  # two candidates: parse the JSON
    assert fast_time('{"id": "1", "text": "no time"}') is None
    assert fast_time('{"created_at": "with \\"escape\\""}') is None
    lines = ('{"ref":"a.jsonl:1","ts":"2026-10-02T05:00:00+00:00","row":{"id":"1"}}\n'
             '{"ref":"a.jsonl:2","ts":"2026-10-02T06:00:00+00:00","row":{"id": "2", "text": "cut\n')
    good = ('{"ref":"a.jsonl:1","ts":"2026-10-02T05:00:00+00:00","row":{"id":"1","n":12345678901234567890123,"f":0.1}}\n'
            '{"ref":"a.jsonl:2","ts":"2026-10-02T05:00:00+00:00","row":{"t":"caf\\u00e9 \\ud83d\\ude00","x":null,"k":[1,{}]}}\n')
    fast = decode_partition(gzip.compress(good.encode()))
    monkeypatch.setattr(archive_mod, "_DECODE", None)
    assert fast == decode_partition(gzip.compress(good.encode())) == [json.loads(x) for x in good.splitlines()]
    out = decode_partition(gzip.compress(lines.encode()))
    assert out[0] == {"ref": "a.jsonl:1", "ts": "2026-10-02T05:00:00+00:00", "row": {"id": "1"}}
    assert out[1] == {"ref": "a.jsonl:2", "ts": "2026-10-02T06:00:00+00:00", "error": "invalid JSON line"}


def test_archive_partial_window_reads_row_timestamps(make_ctx, tmp_path):
    """A "Z" timestamp is kept as the partition's `ts` (no isoformat per row) and still
    selects the right rows for a window shorter than a day."""
    from pipeline.sources.archive.index import decode_partition, partition_key

    folder = tmp_path / "exports"
    folder.mkdir()
    write_archive(lambda name, data: (folder / name).write_bytes(data), "")
    ctx = make_ctx(config([{"name": "arch", "kind": "archive", "path": str(folder), "fetch_images": False}]))
    start = DAY - dt.timedelta(days=1)
    got = ingest_window(ctx, "arch", start, start + dt.timedelta(hours=12))
    assert got["new"] == 10  # rows every 1.2 h from the day's start: 0 .. 10.8 h
    rows = decode_partition(ctx.store.get(partition_key("arch", start.date())))
    assert rows[0]["ts"].endswith("Z") and dt.datetime.fromisoformat(rows[0]["ts"]) == start


@pytest.mark.parametrize("name", ["a.json", "a.json.gz"])
def test_archive_json_array_files(make_ctx, tmp_path, name):
    """A .json file holding one (pretty-printed) array: its items are rows, `name:#i` refs."""
    folder = tmp_path / "exports"
    folder.mkdir()
    items = [{"id": f"j{i}", "author_id": "u", "text": "acme", "created_at": (DAY + dt.timedelta(hours=i)).isoformat()} for i in range(3)]
    items.append({"id": "j-bad", "author_id": "u", "text": "no time"})
    data = ("\n  " + json.dumps(items, indent=2)).encode()
    (folder / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    ctx = make_ctx(config([{"name": "arch", "kind": "archive", "path": str(folder), "fetch_images": False}]))
    counts = ingest_window(ctx, "arch", DAY, END)
    assert counts["new"] == 3 and counts["rejected"] == 1
    with ctx.engine.connect() as conn:
        assert [r for (r,) in conn.execute(select(quarantine.c.record_ref))] == [f"{name}:#4"]


def test_archive_csv_error_quarantines_the_row_and_reads_on(make_ctx, tmp_path, monkeypatch):
    """A row the csv module refuses (a field over the limit) is one quarantine row; the rows
    after it are still ingested."""
    import csv

    import pipeline.sources.archive.files as archive_mod

    folder = tmp_path / "exports"
    folder.mkdir()
    lines = ["id,author_id,text,created_at"]
    for i in range(6):
        text = "x" * 5000 if i == 2 else f"acme {i}"
        lines.append(f'c{i},u{i},"{text}",{(DAY + dt.timedelta(hours=i)).isoformat().replace("+00:00", "Z")}')
    (folder / "export.csv").write_text("\n".join(lines) + "\n")
    monkeypatch.setattr(archive_mod, "CSV_FIELD_LIMIT", 1000)
    limit = csv.field_size_limit()
    try:
        ctx = make_ctx(config([{"name": "arch", "kind": "archive", "path": str(folder), "fetch_images": False}]))
        counts = ingest_window(ctx, "arch", DAY, END)
    finally:
        csv.field_size_limit(limit)
    assert counts["new"] == 5 and counts["rejected"] == 1
    with ctx.engine.connect() as conn:
        ids = sorted(r for (r,) in conn.execute(select(posts.c.external_id)))
        q = conn.execute(select(quarantine)).mappings().one()
    assert ids == ["c0", "c1", "c3", "c4", "c5"]
    assert q["record_ref"] == "export.csv:4" and q["reason"] == "CSV error: field larger than field limit (1000)"
    assert q["window_start"] is None


def archive_folder(tmp_path) -> str:
    folder = tmp_path / "exports"
    folder.mkdir()
    write_archive(lambda name, data: (folder / name).write_bytes(data), "")
    return str(folder)


def manifest(ctx) -> dict:
    from pipeline.sources.archive.index import manifest_key

    return json.loads(ctx.store.get(manifest_key("arch")))


def test_archive_force_rebuilds_the_index_once(make_ctx, tmp_path):
    """A day partition lost from the lake: the window fails with the hint to use --force, and
    --force rebuilds the index (once for a whole forced backfill, not once per window)."""
    from pipeline.errors import StorageError
    from pipeline.sources.archive.index import partition_key

    ctx = make_ctx(config([{"name": "arch", "kind": "archive", "path": archive_folder(tmp_path), "fetch_images": False}]))
    first = ingest_window(ctx, "arch", DAY - dt.timedelta(days=1), DAY)
    rows = manifest(ctx)["rows"]
    assert first["indexed_rows"] == rows == 64
    ctx.store.delete(partition_key("arch", DAY.date()))
    with pytest.raises(StorageError, match="re-run with --force to re-index"):
        ingest_window(ctx, "arch", DAY, END)
    built = manifest(ctx)["built_at"]
    got = ingest_window(ctx, "arch", DAY, END, force=True)
    assert got["indexed_rows"] == rows and got["new"] == 20
    assert manifest(ctx)["built_at"] > built
    assert ctx.store.get(partition_key("arch", DAY.date()))

    before = snapshot(ctx, volatile=True)
    built = manifest(ctx)["built_at"]
    again = backfill(ctx, "arch", (DAY - dt.timedelta(days=1)).date(), (DAY + dt.timedelta(days=1)).date(), force=True)
    assert again["indexed_rows"] == rows  # one rebuild for the three forced windows
    assert again["new"] == 20 and again["unchanged"] == 40
    assert manifest(ctx)["built_at"] > built
    after = snapshot(ctx, volatile=True)
    assert after["quarantine"] == before["quarantine"]  # the rebuilt index rewrote no quarantine row


@pytest.mark.integration
def test_parallel_forced_backfill_rebuilds_the_index_once(make_ctx, tmp_path):
    ctx = make_ctx(config([{"name": "arch", "kind": "archive", "path": archive_folder(tmp_path), "fetch_images": False}]))
    first, last = (DAY - dt.timedelta(days=1)).date(), (DAY + dt.timedelta(days=1)).date()
    backfill(ctx, "arch", first, last, workers=2)
    built = manifest(ctx)["built_at"]
    forced = backfill(ctx, "arch", first, last, force=True, workers=2)
    assert forced["indexed_rows"] == manifest(ctx)["rows"]  # the parent rebuilt it; the workers did not
    assert forced["windows"] == 3 and forced["unchanged"] == 60
    assert manifest(ctx)["built_at"] > built


def test_archive_index_reports_progress(make_ctx, tmp_path, monkeypatch, caplog):
    """Indexing logs its start and reports bytes read and rows through the caller's Progress:
    a log line off a terminal (`terminal`), a tqdm bar on one, nothing by default."""
    import io
    import sys

    import pipeline.progress as prog

    monkeypatch.setattr(prog, "LOG_EVERY_S", 0.0)
    caplog.set_level("INFO")
    ctx = make_ctx(config([{"name": "arch", "kind": "archive", "path": archive_folder(tmp_path), "fetch_images": False}]))
    ingest_window(ctx, "arch", DAY, END, progress=prog.terminal)
    lines = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("indexing archive arch: 2 files,") for m in lines)
    total = next(m for m in lines if m.startswith("index arch: ")).split(" of ")[1].split(" ")[0]
    assert any(m.startswith(f"index arch: {total} of {total} B, rows 64") for m in lines), lines

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Tty()
    monkeypatch.setattr(sys, "stderr", tty)
    from pipeline.sources.archive.index import _Meter

    meter = _Meter(prog.terminal(2_000_000, "index arch", "B"))
    meter.update(1234, 1_000_000)
    meter.tracker.bar.refresh()  # tqdm redraws at most every 0.1 s by itself
    meter.close()
    assert "index arch" in tty.getvalue() and "50%" in tty.getvalue() and "rows=1,234" in tty.getvalue()
    caplog.clear()
    ingest_window(ctx, "arch", DAY, END, force=True)  # the default: silent
    assert not any(r.getMessage().startswith("index arch: ") for r in caplog.records)


def test_quarantine_rows_of_windows_sharing_a_start(make_ctx, tmp_path):
    """Quarantine rows are keyed on the whole window: a shorter window with the same start
    must not delete the rows of the longer one (and a window alone still replaces its own)."""
    folder = tmp_path / "exports"
    folder.mkdir()
    rows = [{"id": f"g{i}", "author_id": "u", "text": "acme", "created_at": (DAY + dt.timedelta(hours=i)).isoformat()} for i in range(24)]
    rows += [{"id": "bad-early", "text": "no author", "created_at": (DAY + dt.timedelta(hours=2)).isoformat()},
             {"id": "bad-late", "text": "no author", "created_at": (DAY + dt.timedelta(hours=20)).isoformat()}]
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ctx = make_ctx(config([{"name": "arch", "kind": "archive", "path": str(folder), "fetch_images": False}]))

    def refs() -> set[str]:
        with ctx.engine.connect() as conn:
            return {r.split(":")[1] for (r,) in conn.execute(select(quarantine.c.record_ref))}

    assert ingest_window(ctx, "arch", DAY, END)["rejected"] == 2
    assert refs() == {"25", "26"}
    half = ingest_window(ctx, "arch", DAY, DAY + dt.timedelta(hours=12))
    assert half["rejected"] == 1 and half["new"] == 0
    assert refs() == {"25", "26"}  # the late row belongs to the whole-day window: kept
    before = snapshot(ctx, volatile=True)
    ingest_window(ctx, "arch", DAY, END, force=True)
    ingest_window(ctx, "arch", DAY, DAY + dt.timedelta(hours=12), force=True)
    assert snapshot(ctx, volatile=True) == before

    # One window alone: a record fixed upstream leaves the quarantine on the forced re-run.
    other = make_ctx(config([{"name": "arch", "kind": "archive", "path": str(folder), "fetch_images": False}]))
    ingest_window(other, "arch", DAY, END)
    rows[-1]["author_id"] = "u"
    (folder / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fixed = ingest_window(other, "arch", DAY, END, force=True)
    assert fixed["rejected"] == 1 and fixed["new"] == 1
    with other.engine.connect() as conn:
        assert [r.split(":")[1] for (r,) in conn.execute(select(quarantine.c.record_ref))] == ["25"]


def bad_records_with_usernames(platform: str, srv) -> None:
    """Bad records of each platform whose author (zqxuser) and mentions (zqxfriend) sit in
    nested fields, uri/url paths and text; their window also holds a good record."""
    when = DAY + dt.timedelta(hours=3)
    if platform == "mastodon":
        bad = mastodon_status(when, "see @zqxfriend", account="zqxuser", tags=("acme",), seq=1)
        bad["content"] = {"html": "not text"}
        bad["mentions"] = [{"id": "7", "username": "zqxfriend", "acct": "zqxfriend@other.example", "url": "https://other.example/@zqxfriend"}]
        boost = mastodon_status(when, "", account="zqxbooster", tags=("acme",), seq=2,
                                reblog={**mastodon_status(when, "x", account="zqxorig"), "id": None})
        srv.statuses = [mastodon_status(when, "fine #acme", tags=("acme",)), bad, boost]
    elif platform == "bluesky":
        bad = bluesky_post(when, "acme hey @zqxfriend.bsky.social", did="did:plc:zqxdid", handle="zqxuser.bsky.social", rkey="3kbad")
        bad["record"]["createdAt"] = "garbage"
        bad["record"]["facets"] = [{"features": [{"$type": "app.bsky.richtext.facet#mention", "did": "did:plc:zqxfrienddid"}]}]
        srv.posts = [bluesky_post(when, "acme fine"), bad]
    else:
        bad = reddit_post(when, "acme, thanks u/zqxfriend", pid="bad1", author="zqxuser",
                          selftext="https://www.reddit.com/user/zqxfriend/comments/x/")
        bad["kind"] = "t1"
        bad["data"]["author_flair_text"] = "zqxuser fan club"
        srv.posts = [reddit_post(when, "acme fine", pid="good1"), bad]


@pytest.mark.parametrize("platform", ["mastodon", "bluesky", "reddit", "archive"])
def test_no_username_reaches_quarantine(make_ctx, tmp_path, monkeypatch, platform):
    monkeypatch.setenv("BSKY_TEST_PASSWORD", "app-pass-1234")
    servers = {"mastodon": FakeMastodon, "bluesky": FakeBluesky, "reddit": FakeReddit}
    if platform == "archive":
        folder = tmp_path / "exports"
        folder.mkdir()
        t = (DAY + dt.timedelta(hours=3)).isoformat()
        lines = [json.dumps({"id": "ok", "username": "zqxuser", "text": "fine", "created_at": t}),
                 json.dumps({"id": "a1", "username": "zqxuser", "user": {"handle": "zqxuser"}, "text": "cc @zqxfriend",
                             "url": "https://m.example/@zqxuser/1", "created_at": "never"}),
                 json.dumps({"id": "a2", "author": {"acct": "zqxuser"}, "text": "x" * 200_000, "created_at": t}),
                 '{"id": "a3", "author_id": "zqxuser", "text": "cut off @zqxfriend, created_at": "' + t]
        (folder / "a.jsonl").write_text("\n".join(lines) + "\n")
        source = {"name": "src", "kind": "archive", "path": str(folder), "fetch_images": False}
        srv = None
    else:
        srv = servers[platform]().start()
        bad_records_with_usernames(platform, srv)
        source = {"name": "src", "kind": platform, "base_url": srv.url, "backoff_s": 0.01, "fetch_images": False,
                  **{"mastodon": {"hashtags": ["acme"]}, "reddit": {"subreddits": ["brands"]},
                     "bluesky": {"queries": ["acme"], "identifier": "brandmon.bsky.social", "password_env": "BSKY_TEST_PASSWORD"}}[platform]}
    try:
        ctx = make_ctx(config([source]))
        counts = ingest_window(ctx, "src", DAY, END)
    finally:
        if srv is not None:
            srv.stop()
    assert counts["new"] == 1 and counts["rejected"] == {"mastodon": 2, "archive": 3}.get(platform, 1)
    with ctx.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(quarantine)).mappings()]
    assert len(rows) == counts["rejected"]
    text = repr(rows)
    assert "zqx" not in text.replace("did:plc:zqxdid", ""), text  # a Bluesky record_ref is its at:// URI (the DID)
    assert all("zqx" not in (r["excerpt"] or "") for r in rows)


def test_retry_hint_says_re_run_only_when_it_can_help():
    from sqlalchemy.exc import OperationalError

    from pipeline.ingest.jobs import _retry_hint

    assert "re-run the same window" in _retry_hint(OperationalError("SELECT 1", {}, Exception("server closed the connection")))
    assert "re-run the same window" in _retry_hint(ConnectionResetError())
    assert "re-run the same window" in _retry_hint(TimeoutError())
    for exc in (ValueError("bad"), KeyError("x"), RuntimeError("bug"), MemoryError()):
        assert "re-run the same window" not in _retry_hint(exc)
