"""Alerts inside Airflow: destinations named by Airflow connections (AIRFLOW_CONN_* variables,
Airflow's own secrets backend) go through the Slack provider's SlackWebhookHook and the SMTP
provider's SmtpHook; the aggregate task's code path (`alert_transport()` + `aggregate_dirty`)
in process, and the real `brandmon_aggregate` DAG under dag.test()."""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

import pytest
from dags_helpers import airflow_base_env, run_airflow
from sqlalchemy import select

from pipeline.schema import alert_ledger
from tests.support.alert_data import SMTP_PASSWORD, SPIKE, add_history
from tests.support.servers import HttpSink, SmtpSink

SLACK_TOKEN = "T0AIR/B0AIR/airfl0wSlackT0ken"
HOOK_TOKEN = "airfl0wH00kT0ken"


def _config(*, max_age_days: int = 60) -> dict:
    return {
        "brands": [{"name": "Acme", "keywords": ["acme"]}, {"name": "Globex", "keywords": ["globex"]}],
        "alerts": {
            "destinations": {
                "slack": {"kind": "slack", "conn_id": "slack_alerts"},
                "mail": {"kind": "email", "conn_id": "smtp_alerts", "to": ["analysts@example.org"]},
                "hook": {"kind": "webhook", "conn_id": "hook_alerts"},
            },
            "rules": [{"name": "acme-spike", "kind": "spike", "brand": "Acme"}],
            "retries": 2, "backoff_s": 0.05, "max_total_s": 5, "timeout_s": 2, "max_age_days": max_age_days,
        },
    }


def _connections(slack: HttpSink, hook: HttpSink, smtp: SmtpSink) -> dict[str, str]:
    return {
        "AIRFLOW_CONN_SLACK_ALERTS": json.dumps(
            {"conn_type": "slackwebhook", "password": slack.url(f"/services/{SLACK_TOKEN}")}),
        "AIRFLOW_CONN_SMTP_ALERTS": json.dumps(
            {"conn_type": "smtp", "host": "127.0.0.1", "port": smtp.port, "login": "alerts", "password": SMTP_PASSWORD,
             "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "airflow@example.org",
                       "timeout": 5, "retry_limit": 0}}),
        "AIRFLOW_CONN_HOOK_ALERTS": json.dumps({"conn_type": "http", "host": hook.url(f"/in?token={HOOK_TOKEN}")}),
    }


def _check_delivered(ctx, slack: HttpSink, hook: HttpSink, smtp: SmtpSink) -> None:
    assert len(slack.received) == 1 and slack.received[0].path == f"/services/{SLACK_TOKEN}"
    assert slack.received[0].json()["text"].startswith("Spike: Acme (all products) on all platforms")
    assert [r.json()["rule"] for r in hook.received] == ["acme-spike"]
    (mail,) = smtp.messages
    assert mail["From"] == "airflow@example.org" and smtp.logins == ["alerts"]
    assert "30 posts vs a 28-day mean of 2.0" in mail.get_body(("html",)).get_content()
    with ctx.engine.connect() as conn:
        rows = list(conn.execute(select(alert_ledger)).mappings())
    assert Counter(r["status"] for r in rows) == Counter({"sent": 3})
    assert {r["day"] for r in rows} == {SPIKE}


def test_airflow_connections_go_through_the_providers_hooks(make_ctx, monkeypatch, caplog):
    caplog.set_level(logging.INFO)
    from pipeline.aggregate.jobs import aggregate_dirty
    from pipeline.airflow_support import alert_transport

    with HttpSink() as slack, HttpSink() as hook, SmtpSink(users={"alerts": SMTP_PASSWORD}) as smtp:
        for k, v in _connections(slack, hook, smtp).items():
            monkeypatch.setenv(k, v)
        ctx = make_ctx(_config())
        add_history(ctx)
        calls: list[str] = []
        from airflow.providers.slack.hooks.slack_webhook import SlackWebhookHook
        from airflow.providers.smtp.hooks.smtp import SmtpHook

        real_slack, real_smtp = SlackWebhookHook.get_conn, SmtpHook.send_email_smtp
        monkeypatch.setattr(SlackWebhookHook, "get_conn",  # the hook reads the connection; the POST is bounded
                            lambda self, *a, **k: (calls.append("slack"), real_slack(self, *a, **k))[1])
        monkeypatch.setattr(SmtpHook, "send_email_smtp",
                            lambda self, *a, **k: (calls.append("smtp"), real_smtp(self, *a, **k))[1])
        result = aggregate_dirty(ctx, alert_transport=alert_transport())
        assert result["alerts_sent"] == 3 and sorted(calls) == ["slack", "smtp"]
        _check_delivered(ctx, slack, hook, smtp)

        # a failing Slack endpoint behind the hook: recorded, scrubbed, retried by the next run
        slack.mode = "error"
        from pipeline.dirty import mark_days

        with ctx.engine.begin() as conn:
            conn.execute(alert_ledger.delete().where(alert_ledger.c.destination == "slack"))
            mark_days(conn, [SPIKE], "test")
        failed = aggregate_dirty(ctx, alert_transport=alert_transport())
        assert failed["alerts_failed"] == 1 and failed["alerts_sent"] == 0
        with ctx.engine.connect() as conn:
            row = conn.execute(select(alert_ledger).where(alert_ledger.c.destination == "slack")).mappings().one()
        assert row["status"] == "failed" and "Slack hook: HTTP 500" in row["last_error"]
        slack.mode = "ok"
        assert aggregate_dirty(ctx, alert_transport=alert_transport())["alerts_sent"] == 1
    text = caplog.text + repr(row)
    assert SLACK_TOKEN not in text and "airfl0wSlackT0ken" not in text and SMTP_PASSWORD not in text
    assert HOOK_TOKEN not in text


@pytest.mark.integration
def test_brandmon_aggregate_dag_sends_alerts_once(make_ctx, airflow_home: Path, tmp_path: Path):
    """dag.test() of the real DAG twice: one message per destination, the second run sends none."""
    with HttpSink() as slack, HttpSink() as hook, SmtpSink(users={"alerts": SMTP_PASSWORD}) as smtp:
        ctx = make_ctx(_config())
        add_history(ctx)
        s = ctx.settings
        env = {**airflow_base_env(airflow_home), **_connections(slack, hook, smtp),
               "BRANDMON_DATABASE_URL": s.database_url, "BRANDMON_STORAGE_URL": s.storage_url,
               "BRANDMON_CONFIG": str(s.config_path), "BRANDMON_HOME": str(s.home),
               "BRANDMON_AUTHOR_SALT": s.author_salt.get()}
        steps = tmp_path / "steps.json"
        steps.write_text(json.dumps([{"dag_id": "brandmon_aggregate", "conf": {"day": SPIKE.isoformat()}},
                                     {"dag_id": "brandmon_aggregate", "conf": {"day": SPIKE.isoformat()}}]))
        results, output = run_airflow(env, "run", str(steps), timeout=420, with_output=True)
        for r in results:
            assert r["state"] == "success", r
        first = results[0]["tasks"]["aggregate"]["xcom"]
        assert first["alerts_sent"] == 3 and results[1]["tasks"]["aggregate"]["xcom"].get("alerts_sent", 0) == 0
        _check_delivered(ctx, slack, hook, smtp)
        assert SLACK_TOKEN not in output and SMTP_PASSWORD not in output and HOOK_TOKEN not in output


def test_on_the_command_line_connections_are_read_and_sent_with_requests_and_smtplib(make_ctx, monkeypatch):
    """The same conn_id destinations outside Airflow (PlainTransport): the connection comes from
    AIRFLOW_CONN_* through Airflow's secrets backends, the send from requests/smtplib (text/plain)."""
    from pipeline.aggregate.jobs import aggregate_dirty

    with HttpSink() as slack, HttpSink() as hook, SmtpSink(users={"alerts": SMTP_PASSWORD}) as smtp:
        for k, v in _connections(slack, hook, smtp).items():
            monkeypatch.setenv(k, v)
        ctx = make_ctx(_config())
        add_history(ctx)
        assert aggregate_dirty(ctx)["alerts_sent"] == 3
        assert slack.received[0].path == f"/services/{SLACK_TOKEN}" and len(hook.received) == 1
        (mail,) = smtp.messages
        assert mail.get_content_type() == "text/plain" and mail["From"] == "airflow@example.org"
        assert smtp.logins == ["alerts"]
