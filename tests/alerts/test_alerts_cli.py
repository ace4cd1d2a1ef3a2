"""`brandmon alerts test RULE` and `brandmon alerts list` through the CLI entry point."""

from __future__ import annotations

import csv
import io
import json

import pytest
from sqlalchemy import func, select

from pipeline.cli import main
from pipeline.schema import alert_ledger
from tests.support.alert_data import SMTP_PASSWORD, SPIKE, add_history, alert_env, alerts_config
from tests.support.servers import HttpSink, SmtpSink, free_port


@pytest.fixture
def cli(make_ctx, monkeypatch):
    with HttpSink() as hook, HttpSink() as slack, SmtpSink(users={"alerts": SMTP_PASSWORD}) as smtp:
        for k, v in alert_env(hook.url("/hook"), slack.url("")).items():
            monkeypatch.setenv(k, v)
        ctx = make_ctx(alerts_config(hook.url("/hook"), slack.url(""), smtp.port))
        s = ctx.settings
        for k, v in {"BRANDMON_DATABASE_URL": s.database_url, "BRANDMON_STORAGE_URL": s.storage_url,
                     "BRANDMON_CONFIG": str(s.config_path), "BRANDMON_HOME": str(s.home),
                     "BRANDMON_AUTHOR_SALT": s.author_salt.get()}.items():
            monkeypatch.setenv(k, v)
        yield ctx, hook, slack, smtp


def _ledger_rows(ctx) -> int:
    with ctx.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(alert_ledger)).scalar_one()


def test_alerts_test_sends_a_marked_sample_to_each_destination_and_records_nothing(cli, capsys, monkeypatch):
    ctx, hook, slack, smtp = cli
    add_history(ctx)
    assert main(["aggregate", "--quiet", "--start", SPIKE.isoformat(), "--end", SPIKE.isoformat()]) == 0
    # one day alone has no history (no spike yet); its share of voice enters the level: 1 alert
    assert "alerts: 1 sent, 0 failed (retried by the next run), 0 too old to send" in capsys.readouterr().out
    before = _ledger_rows(ctx)
    capsys.readouterr()
    assert main(["alerts", "test", "acme-spike"]) == 0
    out = capsys.readouterr().out
    assert "hook (webhook): test message sent" in out and "mail (email): test message sent" in out
    body = hook.received[-1].json()
    assert body["test"] is True and body["rule"] == "acme-spike" and body["brand"] == "Acme"
    assert slack.received[-1].json()["text"].startswith("[TEST] ")
    assert smtp.messages[-1]["Subject"].startswith("[brandmon] [TEST] Spike: Acme")
    assert "not a real alert" in smtp.messages[-1].get_content()
    assert _ledger_rows(ctx) == before

    monkeypatch.setenv("TEST_ALERT_HOOK_URL", f"http://127.0.0.1:{free_port()}/gone?token=zzzSecretzzz")
    assert main(["alerts", "test", "acme-sov"]) == 2
    err = capsys.readouterr().err
    assert "hook (webhook): FAILED: cannot connect: connection refused" in err
    assert "brandmon: error: test message not delivered to hook" in err and "zzzSecretzzz" not in err
    assert main(["alerts", "test", "nope"]) == 2
    assert "unknown alert rule 'nope' (configured: acme-spike, acme-sov, acme-wow, acme-platforms)" in capsys.readouterr().err


def test_alerts_list_in_every_format(cli, capsys):
    ctx, hook, slack, smtp = cli
    add_history(ctx)
    assert main(["aggregate", "--quiet", "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert counts["alerts_sent"] == 7
    assert main(["alerts", "list"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["day", "rule", "brand", "product", "platform", "destination", "status", "late",
                                "attempts", "sent_at"]
    assert len(table) == 8 and all(SPIKE.isoformat() in line and " sent " in line for line in table[1:])
    assert main(["alerts", "list", "--format", "csv", "--status", "sent"]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert len(rows) == 7 and {r["destination"] for r in rows} == {"hook", "slack", "mail"}
    assert sorted(r["platform"] for r in rows if r["rule"] == "acme-platforms") == ["bluesky", "mastodon"]
    assert main(["alerts", "list", "--format", "json", "--since", "2099-01-01"]) == 0
    assert json.loads(capsys.readouterr().out) == []
    with pytest.raises(SystemExit) as exc:
        main(["alerts", "list", "--since", "yesterday"])
    assert exc.value.code == 2 and "not a date (YYYY-MM-DD): 'yesterday'" in capsys.readouterr().err
