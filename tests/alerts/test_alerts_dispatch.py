"""Alerts from the aggregate step to real servers on 127.0.0.1 (webhook, Slack-shaped endpoint,
SMTP): once per rule, day and key through re-runs, backfills and late posts; down, failing and
slow destinations never fail the run and are retried later; secrets appear nowhere."""

from __future__ import annotations

import datetime as dt
import json
import logging
import threading
import time
from collections import Counter

import pytest
from sqlalchemy import insert, select, update

from pipeline.aggregate.jobs import aggregate_dirty, aggregate_range
from pipeline.alerts.cli import format_rows
from pipeline.alerts.jobs import dispatch_alerts, list_alerts
from pipeline.schema import alert_ledger, utcnow
from tests.support.alert_data import (
    HOOK_SECRET,
    LATE,
    SLACK_SECRET,
    SMTP_PASSWORD,
    SPIKE,
    START,
    add_burst,
    add_history,
    alert_env,
    alerts_config,
)
from tests.support.servers import HttpSink, SmtpSink, free_port

SECRETS = (HOOK_SECRET, SLACK_SECRET, SMTP_PASSWORD, "sl4ckS3cretT0ken")


@pytest.fixture
def servers():
    with HttpSink() as hook, HttpSink() as slack, SmtpSink(users={"alerts": SMTP_PASSWORD}) as smtp:
        yield hook, slack, smtp


def _ctx(make_ctx, monkeypatch, servers, backend="sqlite", **kw):
    hook, slack, smtp = servers
    for k, v in alert_env(hook.url("/hook"), slack.url("")).items():
        monkeypatch.setenv(k, v)
    return make_ctx(alerts_config(hook.url("/hook"), slack.url(""), smtp.port, **kw), backend=backend)


def _keys(sink_posts, slack: bool = False):
    """(rule, day, key) of each webhook body; Slack bodies carry them in their text."""
    if slack:
        return [r.json()["text"] for r in sink_posts]
    return [(b["rule"], b["day"], f"{b['brand']}|{b['product']}|{b['platform']}|{b['source']}")
            for b in (r.json() for r in sink_posts)]


def _ledger(ctx):
    with ctx.engine.connect() as conn:
        return [dict(r) for r in conn.execute(select(alert_ledger).order_by(alert_ledger.c.id)).mappings()]


def test_once_per_rule_day_and_key_through_reruns_backfills_and_late_posts(make_ctx, monkeypatch, servers, backend,
                                                                           caplog):
    caplog.set_level(logging.INFO)
    hook, slack, smtp = servers
    ctx = _ctx(make_ctx, monkeypatch, servers, backend)
    add_history(ctx)

    first = aggregate_dirty(ctx)
    day = SPIKE.isoformat()
    expected_hook = {("acme-spike", day, "Acme|*|*|any"), ("acme-sov", day, "Acme|*|*|any"),
                     ("acme-platforms", day, "Acme|*|mastodon|any"), ("acme-platforms", day, "Acme|*|bluesky|any")}
    assert Counter(_keys(hook.received)) == Counter(expected_hook)
    assert len(slack.received) == 2 and len(smtp.messages) == 1
    assert first["alerts_sent"] == 7 and first["alerts_failed"] == 0 and first["alerts_new"] == 7

    body = next(r.json() for r in hook.received if r.json()["rule"] == "acme-spike")
    assert body["schema"] == "brandmon.alert/1" and body["late"] is False and body["test"] is False
    assert body["figures"]["posts"] == 30 and body["figures"]["baseline"] == pytest.approx(2.0)
    assert body["figures"]["zscore"] == pytest.approx(28.0)
    assert body["id"] == f"acme-spike|{day}|Acme|*|*|any"
    slack_texts = sorted(r.json()["text"] for r in slack.received)
    assert slack_texts[0].startswith("Spike: Acme (all products) on all platforms") and "30 posts" in slack_texts[0]
    assert slack_texts[1].startswith("Week over week: Acme") and "+200%" in slack_texts[1]
    assert all(r.path == f"/services/{SLACK_SECRET}" for r in slack.received)
    assert [b["type"] for b in slack.received[0].json()["blocks"]] == ["header", "section", "context"]
    mail = smtp.messages[0]
    assert mail["Subject"] == f"[brandmon] Spike: Acme (all products) on all platforms, {day}"
    assert mail.get_content_type() == "text/plain" and "30 posts vs a 28-day mean of 2.0" in mail.get_content()
    assert smtp.logins == ["alerts"]  # the password from TEST_SMTP_PASSWORD was used

    # re-run (nothing dirty), backfill the whole range twice, re-mark and re-aggregate: nothing new
    aggregate_dirty(ctx)
    again = aggregate_range(ctx, START, SPIKE)
    assert again["alerts_fired"] == 5 and again["alerts_new"] == 0 and again["alerts_sent"] == 0
    aggregate_range(ctx, START, SPIKE + dt.timedelta(days=1))
    with ctx.engine.begin() as conn:
        from pipeline.dirty import mark_days

        mark_days(conn, [SPIKE], "test")
    aggregate_dirty(ctx)
    assert len(hook.received) == 4 and len(slack.received) == 2 and len(smtp.messages) == 1

    # a late burst on a past day: its alerts go out once, marked late
    add_burst(ctx, LATE)
    late = aggregate_dirty(ctx)
    assert late["alerts_sent"] >= 4
    late_day = LATE.isoformat()
    new_hook = [r.json() for r in hook.received[4:]]
    assert {(b["rule"], b["day"]) for b in new_hook} >= {("acme-spike", late_day), ("acme-sov", late_day)}
    assert all(b["late"] for b in new_hook if b["day"] == late_day)
    assert any(m["Subject"].startswith("[brandmon] [late] Spike: Acme") and late_day in m["Subject"]
               for m in smtp.messages)
    aggregate_range(ctx, START, SPIKE)
    aggregate_dirty(ctx)

    # over everything: no (rule, day, key) twice at any destination
    for keys in (_keys(hook.received), _keys(slack.received, slack=True), [m["Subject"] for m in smtp.messages]):
        assert keys and max(Counter(keys).values()) == 1, Counter(keys).most_common(3)
    rows = _ledger(ctx)
    assert all(r["status"] == "sent" and r["attempts"] == 1 for r in rows)
    assert len(rows) == len(hook.received) + len(slack.received) + len(smtp.messages)
    assert {r["late"] for r in rows if r["day"] == LATE} == {True}
    assert {r["late"] for r in rows if r["day"] == SPIKE} == {False}

    listed = format_rows(list_alerts(ctx, since=LATE), "json")
    assert {r["day"] for r in json.loads(listed)} == {LATE.isoformat(), SPIKE.isoformat()}
    text = caplog.text + json.dumps(first) + repr(rows) + listed
    assert not [s for s in SECRETS if s in text]


def test_down_failing_and_slow_destinations_never_fail_the_run_and_are_retried(make_ctx, monkeypatch, servers,
                                                                                caplog, backend):
    caplog.set_level(logging.INFO)
    hook, slack, smtp = servers
    dead_port = free_port()
    monkeypatch.setenv("TEST_DEAD_URL", f"http://127.0.0.1:{dead_port}/dead/{HOOK_SECRET}")
    with HttpSink() as slow:
        slow.mode, slow.delay_s = "slow", 8.0
        monkeypatch.setenv("TEST_SLOW_URL", slow.url("/slow"))
        extra = {"dead": {"kind": "webhook", "url_env": "TEST_DEAD_URL"},
                 "slow": {"kind": "webhook", "url_env": "TEST_SLOW_URL"},
                 "unset": {"kind": "slack", "url_env": "TEST_NOT_SET_ANYWHERE"}}
        rules = [{"name": "acme-spike-everywhere", "kind": "spike", "brand": "Acme", "platform": "each",
                  "destinations": ["dead", "slow", "unset", "hook"]}]
        ctx = _ctx(make_ctx, monkeypatch, servers, backend, extra_dests=extra, extra_rules=rules,
                   timeout_s=2.5, max_total_s=6, max_attempts=3)
        slack.mode = "error"  # Slack answers 500
        add_history(ctx)
        t0 = time.monotonic()
        result = aggregate_dirty(ctx)
        elapsed = time.monotonic() - t0
        # destinations run in parallel; each is bounded by max_total_s (6 s) per run. The bounds
        # leave a loaded machine room: at 0.5 s a healthy hook answered late and got a second copy.
        assert elapsed < 30, elapsed
        assert result["days"] == 15 and result["alerts_errors"] == 0
        assert len(smtp.messages) == 1  # healthy destinations got theirs
        assert Counter(b["rule"] for b in (r.json() for r in hook.received)) == Counter(
            {"acme-spike": 1, "acme-sov": 1, "acme-platforms": 2, "acme-spike-everywhere": 2})
        rows = _ledger(ctx)
        by = {(r["destination"], r["rule"], r["key"]): r for r in rows}
        dead = [r for r in rows if r["destination"] == "dead"]
        assert [r["status"] for r in dead] == ["failed", "failed"]
        errors = sorted(r["last_error"] for r in dead)
        assert "connection refused" in errors[0] and "not tried" in errors[1]
        assert sorted(r["attempts"] for r in dead) == [0, 1]
        slow_rows = [r for r in rows if r["destination"] == "slow"]
        assert any("no answer within" in r["last_error"] for r in slow_rows), [r["last_error"] for r in slow_rows]
        assert len(slow.attempts) <= 3  # bounded: 3 requests at most, then the rest not tried
        assert "HTTP 500" in by[("slack", "acme-spike", "Acme|*|*|any")]["last_error"]
        assert "TEST_NOT_SET_ANYWHERE is not set" in by[("unset", "acme-spike-everywhere", "Acme|*|mastodon|any")]["last_error"]

        # the destinations recover: the next run (nothing dirty) sends every failed alert once
        slack.mode = "ok"
        slow.mode = "ok"
        with HttpSink(port=dead_port) as revived:
            monkeypatch.setenv("TEST_NOT_SET_ANYWHERE", slack.url("/late-env"))
            retry = aggregate_dirty(ctx)
            assert retry["days"] == 0 and retry["alerts_sent"] == 2 + 2 + 2 + 2
            assert len(revived.received) == 2 and len(slow.received) == 2
        assert len(slack.received) == 2 + 2
        rows = _ledger(ctx)
        assert {r["status"] for r in rows} == {"sent"}
        again = aggregate_dirty(ctx)
        assert again["alerts_sent"] == 0 and len(hook.received) == 6

    text = caplog.text + repr(rows) + format_rows(list_alerts(ctx), "table")
    assert not [s for s in SECRETS if s in text]


def test_a_dead_destination_is_given_up_after_max_attempts(make_ctx, monkeypatch, servers):
    hook, slack, smtp = servers
    monkeypatch.setenv("TEST_DEAD_URL", f"http://127.0.0.1:{free_port()}/x")
    ctx = _ctx(make_ctx, monkeypatch, servers, extra_dests={"dead": {"kind": "webhook", "url_env": "TEST_DEAD_URL"}},
               extra_rules=[{"name": "dead-spike", "kind": "spike", "brand": "Acme", "destinations": ["dead"]}],
               max_attempts=2, retries=1)
    add_history(ctx)
    for _ in range(4):
        aggregate_dirty(ctx)
    (row,) = [r for r in _ledger(ctx) if r["destination"] == "dead"]
    assert row["status"] == "failed" and row["attempts"] == 2 and "connection refused" in row["last_error"]


def test_concurrent_dispatches_send_each_alert_once_and_crashed_claims_are_retried_after_the_lease(
        make_ctx, monkeypatch, servers, backend):
    hook, slack, smtp = servers
    ctx = _ctx(make_ctx, monkeypatch, servers, backend, lease_s=60)
    add_history(ctx)
    # aggregate without alert rules taking part: dispatch is what this test drives
    from pipeline.alerts.config import AlertsConfig

    bare = ctx.settings
    ctx.settings = bare.with_overrides(alerts=AlertsConfig())
    aggregate_dirty(ctx)
    ctx.settings = bare
    hook.state.ok_delay_s = 0.2
    days = [START + dt.timedelta(days=i) for i in range(15)]
    results: list[dict] = []
    threads = [threading.Thread(target=lambda: results.append(dispatch_alerts(ctx, days))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sum(r["alerts_sent"] for r in results) == 7 and sum(r["alerts_errors"] for r in results) == 0
    assert Counter(Counter(_keys(hook.received)).values()) == Counter({1: 4})
    assert len(slack.received) == 2 and len(smtp.messages) == 1

    # a run that crashed after claiming (row left 'sending'): retried once the lease has passed
    now = utcnow()
    with ctx.engine.begin() as conn:
        conn.execute(update(alert_ledger).where(alert_ledger.c.rule == "acme-sov")
                     .values(status="sending", claim="deadbeef", claimed_at=now - dt.timedelta(seconds=30)))
        conn.execute(insert(alert_ledger).values(
            rule="acme-spike", day=SPIKE - dt.timedelta(days=1), key="Acme|*|*|any", destination="hook",
            status="sending", attempts=0, late=False, payload={}, claim="fresh", claimed_at=now,
            created_at=now, updated_at=now))
    assert dispatch_alerts(ctx, days, now=now)["alerts_sent"] == 0  # within the lease: left alone
    later = dispatch_alerts(ctx, days, now=now + dt.timedelta(seconds=45))
    assert later["alerts_sent"] == 1  # the crashed 'acme-sov' claim only; the fresh one is still leased
    assert Counter(b["rule"] for b in (r.json() for r in hook.received))["acme-sov"] == 2  # at-least-once
    statuses = {(r["rule"], r["day"]): r["status"] for r in _ledger(ctx)}
    assert statuses[("acme-sov", SPIKE)] == "sent"
    assert statuses[("acme-spike", SPIKE - dt.timedelta(days=1))] == "sending"


def test_days_older_than_max_age_are_recorded_as_skipped_not_sent(make_ctx, monkeypatch, servers):
    hook, slack, smtp = servers
    ctx = _ctx(make_ctx, monkeypatch, servers, max_age_days=0)
    add_history(ctx)
    result = aggregate_dirty(ctx)
    assert result["alerts_skipped"] == 7 and result["alerts_sent"] == 0
    assert not hook.received and not slack.received and not smtp.messages
    rows = _ledger(ctx)
    assert {r["status"] for r in rows} == {"skipped"} and "max_age_days" in rows[0]["last_error"]
    aggregate_range(ctx, START, SPIKE)
    assert not hook.received and len(_ledger(ctx)) == 7
