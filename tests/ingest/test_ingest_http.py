"""The feed HTTP client against a local server: retries, rate limits, secret-free errors."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from pipeline.ingest.http import (
    FeedError,
    HttpClient,
    parse_rate_reset,
    parse_retry_after,
    safe_url,
)
from pipeline.settings import NetworkConfig
from tests.support.feeds import FakeServer, Response


@pytest.fixture
def server():
    with FakeServer() as s:
        s.add_json("/ok", {"hello": "world"})
        yield s


def client(sleeps: list[float] | None = None, **kw) -> HttpClient:
    net = NetworkConfig(max_retries=kw.pop("max_retries", 3), timeout_s=kw.pop("timeout_s", 5))
    record = sleeps if sleeps is not None else []
    return HttpClient(net, backoff_s=0.01, sleep=lambda s: record.append(s), jitter=lambda: 0.5, **kw)


def test_plain_get(server):
    body, resp = client().get_json(server.url + "/ok")
    assert body == {"hello": "world"}
    assert resp.status_code == 200


def test_user_agent_is_sent(server):
    client(user_agent="brandmon-test/1.0 (by /u/tester)").get_json(server.url + "/ok")
    assert server.requests[-1].headers["user-agent"] == "brandmon-test/1.0 (by /u/tester)"


def test_429_waits_retry_after_then_succeeds(server):
    server.fault("/ok", "status", status=429, retry_after="7", times=2)
    sleeps: list[float] = []
    c = client(sleeps)
    body, _ = c.get_json(server.url + "/ok")
    assert body == {"hello": "world"}
    assert sleeps == [7.0, 7.0]
    assert server.hits("/ok") == 3
    assert c.stats.throttled == 2


def test_retry_after_is_capped_by_max_wait(server):
    server.fault("/ok", "status", status=429, retry_after="100000")
    sleeps: list[float] = []
    client(sleeps, max_wait_s=30).get_json(server.url + "/ok")
    assert sleeps == [30.0]


def test_5xx_burst_is_retried_with_exponential_backoff(server):
    server.fault("/ok", "status", status=503, times=3)
    sleeps: list[float] = []
    body, _ = client(sleeps).get_json(server.url + "/ok")
    assert body == {"hello": "world"}
    assert sleeps == pytest.approx([0.01, 0.02, 0.04])


def test_gives_up_after_max_retries_with_clear_error(server):
    server.fault("/ok", "status", status=500, times=10)
    with pytest.raises(FeedError, match=r"GET http://127\.0\.0\.1:\d+/ok failed: HTTP 500 after 4 attempts") as err:
        client().get_json(server.url + "/ok", params={"a": "secret-value-123"})
    assert "secret-value-123" not in str(err.value)
    assert server.hits("/ok") == 4


def test_truncated_json_is_retried(server):
    server.fault("/ok", "truncate", times=1)
    body, _ = client().get_json(server.url + "/ok")
    assert body == {"hello": "world"}
    assert server.hits("/ok") == 2


def test_truncated_json_every_time_fails_cleanly(server):
    server.fault("/ok", "truncate", times=10)
    with pytest.raises(FeedError, match="not valid JSON"):
        client(max_retries=2).get_json(server.url + "/ok")


def test_timeout_is_retried(server):
    server.fault("/ok", "slow", delay_s=1.5, times=1)
    t0 = time.monotonic()
    body, _ = client(timeout_s=0.3).get_json(server.url + "/ok")
    assert body == {"hello": "world"}
    assert time.monotonic() - t0 < 5


def test_dropped_connection_is_retried(server):
    server.fault("/ok", "drop", times=2)
    body, _ = client().get_json(server.url + "/ok")
    assert body == {"hello": "world"}


def test_4xx_is_not_retried_and_error_hides_secrets(server):
    token = "tok-SUPERSECRET-42"
    server.route("GET", "/private", lambda req: Response(403, {"error": f"bad token {token}"}))
    c = client(secrets=[token])
    with pytest.raises(FeedError) as err:
        c.get_json(server.url + "/private", headers={"Authorization": f"Bearer {token}"})
    assert "HTTP 403" in str(err.value)
    assert token not in str(err.value)
    assert server.hits("/private") == 1


def test_rate_limit_remaining_zero_waits_until_reset(server):
    reset = (dt.datetime.now(dt.UTC) + dt.timedelta(seconds=20)).isoformat()
    server.route("GET", "/limited", lambda req: Response(200, [], {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": reset}))
    sleeps: list[float] = []
    c = client(sleeps)
    c.get_json(server.url + "/limited")
    assert sleeps == []
    c.get_json(server.url + "/limited")
    assert len(sleeps) == 1 and 15 < sleeps[0] <= 20


def test_unprefixed_ratelimit_headers_bluesky_style(server):
    """Bluesky sends `RateLimit-Remaining` / `RateLimit-Reset` (epoch seconds), without `X-`."""
    reset = str(int(time.time()) + 30)
    server.route("GET", "/bsky", lambda req: Response(200, [], {"RateLimit-Remaining": "0", "RateLimit-Reset": reset}))
    sleeps: list[float] = []
    c = client(sleeps)
    c.get_json(server.url + "/bsky")
    c.get_json(server.url + "/bsky")
    assert len(sleeps) == 1 and 25 < sleeps[0] <= 30
    assert c.stats.throttled == 1


def test_429_without_retry_after_waits_for_the_rate_limit_reset(server):
    calls = []

    def handler(req):
        calls.append(1)
        if len(calls) == 1:
            return Response(429, {"error": "RateLimitExceeded"}, {"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "12"})
        return Response(200, {"ok": True})

    server.route("GET", "/reddit", handler)
    sleeps: list[float] = []
    c = client(sleeps)
    body, _ = c.get_json(server.url + "/reddit")
    assert body == {"ok": True}
    assert len(calls) == 2
    assert sleeps and all(11 < s <= 12 for s in sleeps)  # Reddit style: seconds until reset, never the 0.01s backoff


def test_parse_helpers():
    assert parse_retry_after("5") == 5.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=dt.datetime(2015, 10, 21, 7, 27, 50, tzinfo=dt.UTC).timestamp()) == 10.0
    assert parse_retry_after("soon") is None
    assert parse_rate_reset("42") == 42.0  # Reddit: seconds
    assert parse_rate_reset("1700000100", now=1700000000) == 100.0  # epoch
    assert parse_rate_reset("2023-11-14T22:15:00Z", now=dt.datetime(2023, 11, 14, 22, 14, tzinfo=dt.UTC).timestamp()) == 60.0
    assert safe_url("https://u:p@h.example/x?access_token=abc&q=1") == "https://h.example/x?access_token=…&q=…"
