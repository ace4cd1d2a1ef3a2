"""Each connector against a local server in its API's documented shape: paging, faults, auth."""

from __future__ import annotations

import datetime as dt

import pytest

from pipeline.errors import ConfigError
from pipeline.ingest.http import FeedError
from pipeline.settings import NetworkConfig, Settings, SourceConfig
from pipeline.sources.registry import make_connector
from tests.support.feeds import (
    FakeBluesky,
    FakeMastodon,
    FakeReddit,
    bluesky_post,
    mastodon_status,
    reddit_post,
)

DAY = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
END = DAY + dt.timedelta(days=1)


def settings(**net) -> Settings:
    return Settings(database_url="sqlite://", storage_url="/tmp/x", network=NetworkConfig(max_retries=3, timeout_s=5, **net))


def connector(kind: str, **options):
    return make_connector(settings(), SourceConfig(name="src", kind=kind, options={"backoff_s": 0.01, **options}), sleep=lambda s: None)


def records(conn, start=DAY, end=END, resume=None):
    pages = list(conn.pages(start, end, resume))
    return pages, [r for p in pages for r in (p.records or [])]


# --- Mastodon -------------------------------------------------------------------------------------


def mastodon_statuses() -> list[dict]:
    out = []
    for i in range(95):  # 95 statuses across three days, every ~45 minutes
        when = DAY - dt.timedelta(days=1) + dt.timedelta(minutes=45 * i)
        out.append(mastodon_status(when, f"post {i} about #acme", seq=i, tags=("acme",), account=f"user{i % 7}"))
    return out


def test_mastodon_pages_the_window_with_link_headers():
    statuses = mastodon_statuses()
    in_window = {s["id"] for s in statuses if DAY.isoformat()[:10] in s["created_at"]}
    with FakeMastodon(statuses, max_limit=10) as srv:
        c = connector("mastodon", base_url=srv.url, hashtags=["acme"], limit=10)
        pages, recs = records(c)
        # The window is an id range: max_id = id(end) first, since_id = id(start - slack) - 1 on
        # every request (the Link URLs carry only max_id), so nothing outside the window comes back.
        assert [r["id"] for r in recs] == sorted(in_window, key=int, reverse=True)
        since = int((DAY.timestamp() - 600) * 1000) << 16
        assert all(int(q.query["since_id"]) == since - 1 for q in srv.requests[:-1])
        assert int(srv.requests[0].query["max_id"]) >> 16 == int(END.timestamp() * 1000)
        # 32 statuses in 10s, then the empty page after the last Link, then the tail check: one
        # page just below the range, whose statuses are all older than the window, ends the walk.
        assert srv.hits("/api/v1/timelines/tag/acme") == 6 and len(pages) == 5 and pages[-1].records == []
        assert srv.requests[-1].query["max_id"] == str(since) and "since_id" not in srv.requests[-1].query
        assert pages[-1].request["tail_check"] and c.modes == {"tag:acme": "snowflake"}
        for p, req in zip(pages[1:-1], srv.requests[1:-2], strict=True):
            assert p.request["params"]["max_id"] == req.query["max_id"]


def test_fake_mastodon_honours_since_id_and_min_id_as_documented():
    """max_id: older than; since_id: newer than (newest page); min_id: immediately newer
    than (the page just above it, still newest first); Link next carries max_id only."""
    statuses = mastodon_statuses()[:30]
    ids = sorted((int(s["id"]) for s in statuses), reverse=True)
    import requests

    with FakeMastodon(statuses, max_limit=40) as srv:
        url = srv.url + "/api/v1/timelines/tag/acme"
        got = requests.get(url, params={"since_id": ids[10], "limit": 5}, timeout=5)
        assert [int(s["id"]) for s in got.json()] == ids[:5]
        got = requests.get(url, params={"min_id": ids[10], "limit": 5}, timeout=5)
        assert [int(s["id"]) for s in got.json()] == ids[5:10]
        got = requests.get(url, params={"max_id": ids[3], "since_id": ids[7], "limit": 40}, timeout=5)
        assert [int(s["id"]) for s in got.json()] == ids[4:7]
        assert "since_id" not in got.headers["Link"] and f"max_id={ids[6]}" in got.headers["Link"]
        assert requests.get(url, params={"since_id": ids[0]}, timeout=5).json() == []


def test_mastodon_without_snowflake_ids_stops_at_the_first_older_status():
    statuses = mastodon_statuses()
    with FakeMastodon(statuses, max_limit=10) as srv:
        c = connector("mastodon", base_url=srv.url, hashtags=["acme"], limit=10, snowflake_ids=False)
        pages, recs = records(c)
        assert all("since_id" not in q.query for q in srv.requests) and "max_id" not in srv.requests[0].query
        assert min(r["created_at"] for r in recs) < DAY.isoformat()[:10]  # the page that crossed the start
        assert {s["id"] for s in statuses if DAY.isoformat()[:10] in s["created_at"]} <= {r["id"] for r in recs}
        assert len(pages) == srv.hits("/api/v1/timelines/tag/acme")


def test_mastodon_account_statuses_via_lookup():
    statuses = mastodon_statuses()
    with FakeMastodon(statuses, max_limit=40) as srv:
        c = connector("mastodon", base_url=srv.url, accounts=["user3"], limit=40)
        _, recs = records(c)
        assert recs and {r["account"]["acct"] for r in recs} == {"user3"}
        assert srv.hits("/api/v1/accounts/lookup") == 1


def test_mastodon_survives_429_and_500s():
    with FakeMastodon(mastodon_statuses(), max_limit=10) as srv:
        srv.fault("/api/v1/timelines/tag/acme", "status", status=429, retry_after="0", skip=1)
        srv.fault("/api/v1/timelines/tag/acme", "status", status=502, times=2, skip=2)
        c = connector("mastodon", base_url=srv.url, hashtags=["acme"], limit=10)
        _, recs = records(c)
        assert len({r["id"] for r in recs}) == len(recs) > 30


def test_mastodon_backwards_cursor_fails_cleanly():
    with FakeMastodon(mastodon_statuses(), max_limit=10) as srv:
        srv.fault("/api/v1/timelines/tag/acme", "backwards", skip=1)
        c = connector("mastodon", base_url=srv.url, hashtags=["acme"], limit=10)
        with pytest.raises(FeedError, match="goes backwards"):
            records(c)


def test_mastodon_repeated_page_is_a_loop_and_fails_cleanly():
    with FakeMastodon(mastodon_statuses(), max_limit=10) as srv:
        srv.fault("/api/v1/timelines/tag/acme", "repeat", skip=1)
        c = connector("mastodon", base_url=srv.url, hashtags=["acme"], limit=10)
        with pytest.raises(FeedError, match="twice|backwards"):
            records(c)


def test_mastodon_resume_from_a_stored_cursor():
    with FakeMastodon(mastodon_statuses(), max_limit=10) as srv:
        c = connector("mastodon", base_url=srv.url, hashtags=["acme"], limit=10)
        pages, recs = records(c)
        before = srv.hits("/api/v1/timelines/tag/acme")
        _, rest = records(c, resume=pages[1].state)
        assert srv.hits("/api/v1/timelines/tag/acme") - before == len(pages) - 2 + 1  # + the tail check
        assert [r["id"] for r in rest] == [r["id"] for p in pages[2:] for r in p.records]


def test_mastodon_config_errors():
    with pytest.raises(ConfigError, match="base_url"):
        connector("mastodon", hashtags=["acme"])
    with pytest.raises(ConfigError, match="hashtags"):
        connector("mastodon", base_url="https://m.example")
    with pytest.raises(ConfigError, match="BRANDMON_TEST_UNSET_TOKEN"):
        connector("mastodon", base_url="https://m.example", hashtags=["a"], token_env="BRANDMON_TEST_UNSET_TOKEN")


# --- Bluesky --------------------------------------------------------------------------------------


def bsky_posts() -> list[dict]:
    posts = []
    for i in range(60):
        when = DAY - dt.timedelta(hours=6) + dt.timedelta(minutes=30 * i)
        imgs = [{"fullsize": f"https://cdn.example/{i}.jpg", "alt": "logo"}] if i % 3 == 0 else None
        posts.append(bluesky_post(when, f"Acme thing {i}", did=f"did:plc:u{i % 5}", rkey=f"3k{i:04d}", images=imgs, with_record=i % 6 == 0))
    return posts


def test_bluesky_search_with_session_and_cursor(monkeypatch):
    monkeypatch.setenv("BSKY_TEST_PASSWORD", "app-pass-1234")
    with FakeBluesky(bsky_posts(), max_limit=7) as srv:
        c = connector("bluesky", base_url=srv.url, queries=["acme"], identifier="brandmon.bsky.social", password_env="BSKY_TEST_PASSWORD", limit=7)
        pages, recs = records(c)
        expected = [p for p in bsky_posts() if DAY <= dt.datetime.fromisoformat(p["indexedAt"].replace("Z", "+00:00")) < END]
        assert sorted(r["uri"] for r in recs) == sorted(p["uri"] for p in expected)
        assert srv.sessions == 1
        q = srv.requests[-1].query
        assert q["since"] == "2026-10-02T00:00:00Z" and q["until"] == "2026-10-03T00:00:00Z"
        assert len(pages) == -(-len(expected) // 7)
        assert "app-pass-1234" not in repr([p.request for p in pages])


def test_bluesky_expired_token_creates_a_new_session(monkeypatch):
    monkeypatch.setenv("BSKY_TEST_PASSWORD", "app-pass-1234")
    with FakeBluesky(bsky_posts(), max_limit=7) as srv:
        c = connector("bluesky", base_url=srv.url, queries=["acme"], identifier="brandmon.bsky.social", password_env="BSKY_TEST_PASSWORD", limit=7)
        it = c.pages(DAY, END)
        next(it)
        srv.expire_tokens()
        rest = list(it)
        assert rest and srv.sessions == 2


def test_bluesky_wrong_password_is_a_clear_error_without_the_password(monkeypatch):
    monkeypatch.setenv("BSKY_TEST_PASSWORD", "wrong-password-999")
    with FakeBluesky(bsky_posts()) as srv:
        c = connector("bluesky", base_url=srv.url, queries=["acme"], identifier="brandmon.bsky.social", password_env="BSKY_TEST_PASSWORD")
        with pytest.raises(FeedError) as err:
            records(c)
        assert "HTTP 401" in str(err.value)
        assert "wrong-password-999" not in str(err.value)


# --- Reddit ---------------------------------------------------------------------------------------


def reddit_posts() -> list[dict]:
    out = []
    for i in range(50):
        when = DAY - dt.timedelta(hours=12) + dt.timedelta(minutes=45 * i)
        out.append(reddit_post(when, f"Acme post {i}", pid=f"p{i:03d}", subreddit="brands" if i % 4 else "other",
                               url=f"https://i.redd.it/{i}.jpg" if i % 5 == 0 else None))
    return out


def test_reddit_new_listing_pages_with_after_and_user_agent():
    with FakeReddit(reddit_posts(), max_limit=6) as srv:
        c = connector("reddit", base_url=srv.url, subreddits=["brands"], limit=6, user_agent="linux:brandmon:0.1 (by /u/brandmon)")
        pages, recs = records(c)
        ids = [r["data"]["id"] for r in recs]
        assert len(ids) == len(set(ids))
        in_window = {r["data"]["id"] for r in reddit_posts() if r["data"]["subreddit"] == "brands" and DAY.timestamp() <= r["data"]["created_utc"] < END.timestamp()}
        assert in_window <= set(ids)
        assert min(r["data"]["created_utc"] for r in recs) < DAY.timestamp()  # the page that crossed the start
        assert set(srv.user_agents) == {"linux:brandmon:0.1 (by /u/brandmon)"}
        assert srv.requests[1].query["after"].startswith("t3_")


def test_reddit_oauth_client_credentials(monkeypatch):
    monkeypatch.setenv("R_ID", "client-id-1")
    monkeypatch.setenv("R_SECRET", "client-secret-xyz")
    with FakeReddit(reddit_posts(), client_id="client-id-1", client_secret="client-secret-xyz") as srv:
        c = connector("reddit", oauth_base_url=srv.url, auth_url=srv.url + "/api/v1/access_token", subreddits=["brands"],
                      queries=["acme"], client_id_env="R_ID", client_secret_env="R_SECRET")
        _, recs = records(c)
        assert recs
        assert srv.hits("/api/v1/access_token") == 1
        assert srv.requests[-1].path == "/r/brands/search.json"
        assert "client-secret-xyz" in c.secrets


def test_reddit_not_a_listing_fails():
    from tests.support.feeds import FakeServer

    with FakeServer() as srv:
        srv.add_json("/r/brands/new.json", {"error": 403, "reason": "private"})
        c = connector("reddit", base_url=srv.url, subreddits=["brands"])
        with pytest.raises(FeedError, match="Listing"):
            records(c)


def oauth_reddit(monkeypatch, srv, **options):
    monkeypatch.setenv("R_ID", "client-id-1")
    monkeypatch.setenv("R_SECRET", "client-secret-xyz")
    return connector("reddit", oauth_base_url=srv.url, auth_url=srv.url + "/api/v1/access_token", subreddits=["brands"],
                     client_id_env="R_ID", client_secret_env="R_SECRET", **options)


def test_reddit_token_renewed_before_it_expires(monkeypatch):
    import time

    with FakeReddit(reddit_posts(), client_id="client-id-1", client_secret="client-secret-xyz", max_limit=6, token_ttl=1) as srv:
        c = oauth_reddit(monkeypatch, srv, limit=6)
        it = c.pages(DAY, END)
        first = next(it)
        time.sleep(1.05)  # the token's `expires_in` has passed
        rest = list(it)
        assert first.records and rest
        assert srv.issued == 2 and srv.refused == 0  # renewed before use, never sent expired


def test_reddit_401_gets_one_new_token_and_the_walk_goes_on(monkeypatch):
    with FakeReddit(reddit_posts(), client_id="client-id-1", client_secret="client-secret-xyz", max_limit=6) as srv:
        ref = [r["data"]["id"] for r in records(oauth_reddit(monkeypatch, srv, limit=6))[1]]
        srv.issued = srv.refused = 0
        c = oauth_reddit(monkeypatch, srv, limit=6)
        it = c.pages(DAY, END)
        got = list(next(it).records)
        srv.expire_tokens()  # revoked under the walk (expires_in says a day)
        got += [r for p in it for r in p.records]
        assert [r["data"]["id"] for r in got] == ref
        assert srv.issued == 2 and srv.refused == 1


def test_reddit_401_twice_is_a_clear_error(monkeypatch):
    with FakeReddit(reddit_posts(), client_id="client-id-1", client_secret="client-secret-xyz", token_ttl=0) as srv:
        c = oauth_reddit(monkeypatch, srv)
        with pytest.raises(FeedError, match="HTTP 401 twice") as err:
            records(c)
        assert srv.issued == 2 and srv.refused == 2
        assert "client-secret-xyz" not in str(err.value) and "reddit-token" not in str(err.value)
