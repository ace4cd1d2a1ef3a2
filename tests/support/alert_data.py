"""Data and settings for the alert tests: a steady brand history with one burst, written
straight into `posts` (the aggregation then counts them), and an alerts config pointing at
servers on 127.0.0.1."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
from typing import Any

from sqlalchemy import insert

from pipeline.dirty import mark_days
from pipeline.schema import posts

# Relative to today, as alerts are: the burst is yesterday (sent on time), the late burst six
# days ago (sent marked late: older than late_after_days = 2).
TODAY = dt.datetime.now(dt.UTC).date()
START = TODAY - dt.timedelta(days=15)
DAYS = 15  # START .. yesterday
SPIKE = START + dt.timedelta(days=14)  # yesterday: 30 Acme posts against 2 a day before
LATE = START + dt.timedelta(days=9)  # a burst that arrives after the fact

BRANDS = [
    {"name": "Acme", "keywords": ["acme"]},
    {"name": "Globex", "keywords": ["globex"]},
]

_ids = itertools.count(1)

SLACK_SECRET = "T0FAKE/B0FAKE/sl4ckS3cretT0ken"
HOOK_SECRET = "h00kS3cretQueryToken"
SMTP_PASSWORD = "smtp-S3cret-pa55"


def _post(day: dt.date, text: str, platform: str, k: int) -> dict[str, Any]:
    pid = next(_ids)
    ext = f"x{pid}-{hashlib.sha1(f'{day}{k}{text}'.encode()).hexdigest()[:8]}"
    return {"platform": platform, "external_id": ext, "source": "test", "author_hash": f"a{k}",
            "text": text, "posted_at": dt.datetime(day.year, day.month, day.day, 8 + k % 12, k % 60, tzinfo=dt.UTC),
            "content_hash": hashlib.sha256(ext.encode()).hexdigest()}


def add_history(ctx: Any, days: int = DAYS, spike_day: dt.date | None = SPIKE, spike_posts: int = 30) -> None:
    """2 Acme posts (one per platform) and 1 Globex post a day; `spike_posts` Acme posts on `spike_day`."""
    rows = []
    for i in range(days):
        day = START + dt.timedelta(days=i)
        n = spike_posts if day == spike_day else 2
        rows += [_post(day, f"acme is here {k}", ("mastodon", "bluesky")[k % 2], k) for k in range(n)]
        rows.append(_post(day, "globex news", "mastodon", 99))
    with ctx.engine.begin() as conn:
        conn.execute(insert(posts), rows)
        mark_days(conn, {r["posted_at"].date() for r in rows}, "test")


def add_burst(ctx: Any, day: dt.date, n: int = 30) -> None:
    """`n` late Acme posts on a past `day` (marks it dirty, as ingestion would)."""
    rows = [_post(day, f"acme late {k}", ("mastodon", "bluesky")[k % 2], 200 + k) for k in range(n)]
    with ctx.engine.begin() as conn:
        conn.execute(insert(posts), rows)
        mark_days(conn, {day}, "test")


def alerts_config(hook_url: str, slack_url: str, smtp_port: int, *, extra_dests: dict[str, Any] | None = None,
                  extra_rules: list[dict[str, Any]] | None = None, **top: Any) -> dict[str, Any]:
    """A config with brands and the four rules of the tests. The URLs are NOT in it: they are
    in env variables (see `alert_env`)."""
    del hook_url, slack_url  # in the environment, never in the YAML
    dests = {
        "hook": {"kind": "webhook", "url_env": "TEST_ALERT_HOOK_URL"},
        "slack": {"kind": "slack", "url_env": "TEST_SLACK_WEBHOOK_URL"},
        "mail": {"kind": "email", "host": "127.0.0.1", "port": smtp_port, "starttls": False,
                 "username": "alerts", "password_env": "TEST_SMTP_PASSWORD", "from": "brandmon@example.org",
                 "to": ["analysts@example.org"]},
        **(extra_dests or {}),
    }
    rules = [
        {"name": "acme-spike", "kind": "spike", "brand": "acme", "destinations": ["hook", "slack", "mail"]},
        {"name": "acme-sov", "kind": "share_of_voice", "brand": "Acme", "above": 0.9, "destinations": ["hook"]},
        {"name": "acme-wow", "kind": "wow", "brand": "Acme", "above": 1.0, "destinations": ["slack"]},
        {"name": "acme-platforms", "kind": "spike", "brand": "Acme", "platform": "each", "destinations": ["hook"]},
        *(extra_rules or []),
    ]
    cfg = {"destinations": dests, "rules": rules, "retries": 3, "backoff_s": 0.05, "max_total_s": 3,
           "timeout_s": 1, "late_after_days": 2, "max_age_days": 60}
    cfg.update(top)
    return {"brands": BRANDS, "alerts": cfg}


def alert_env(hook_url: str, slack_url: str) -> dict[str, str]:
    return {"TEST_ALERT_HOOK_URL": f"{hook_url}?token={HOOK_SECRET}",
            "TEST_SLACK_WEBHOOK_URL": f"{slack_url}/services/{SLACK_SECRET}",
            "TEST_SMTP_PASSWORD": SMTP_PASSWORD}


def at(day: dt.date, hour: int = 6) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, tzinfo=dt.UTC)
