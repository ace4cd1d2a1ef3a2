"""Alerts against hostile servers and hostile configuration (found by an outside check): every
outcome is a clear one-line error or the right behaviour, no hang past the documented bound,
and no secret in any log, error, ledger row or `brandmon alerts list` output."""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
import time

import pytest
from sqlalchemy import select, text

from pipeline.aggregate.jobs import aggregate_dirty
from pipeline.alerts import ledger
from pipeline.alerts.cli import format_rows
from pipeline.alerts.config import AlertsConfig, Destination
from pipeline.alerts.jobs import list_alerts, render
from pipeline.alerts.rules import Alert
from pipeline.alerts.transport import (
    DeliveryError,
    Outgoing,
    PlainTransport,
    Smtp,
    deliver,
    send_smtp,
)
from pipeline.cli import main
from pipeline.errors import ConfigError
from pipeline.schema import alert_ledger
from pipeline.settings import load_settings
from tests.support.alert_data import add_history, alerts_config
from tests.support.servers import HttpSink, RawTcpServer, SmtpSink

SIG = "sigS3cretQueryValue77"
BASIC_PW = "b4sicS3cretPassw0rd"
SECRET_AS_NAME = "hunter2SMTPpassw0rd"  # the password itself pasted where a variable name goes
URL_AS_NAME = "T0FAKEB0FAKEsl4ckS3cret"
OUT = Outgoing(alert_id="r|2026-10-15|Acme|*|*|any", subject="s", text="t", slack={"text": "t"},
               webhook={"schema": "brandmon.alert/1"})


def test_no_part_of_a_webhook_url_nor_a_secret_pasted_as_a_variable_name_is_ever_shown(
        make_ctx, monkeypatch, caplog, backend):
    caplog.set_level(logging.INFO)
    with HttpSink() as echo:
        echo.mode = "echo"  # 403 whose body repeats the query values and the basic-auth password
        host = echo.url("").removeprefix("http://")
        monkeypatch.setenv("TEST_ECHO_URL", f"http://user:{BASIC_PW}@{host}/in?sig={SIG}&v=1")
        dests = {"echo": {"kind": "webhook", "url_env": "TEST_ECHO_URL"},
                 "pasted": {"kind": "email", "host": "127.0.0.1", "port": 25, "starttls": False, "username": "u",
                            "password_env": SECRET_AS_NAME, "from": "a@example.org", "to": "b@example.org"},
                 "pasted-url": {"kind": "slack", "url_env": URL_AS_NAME}}
        cfg = alerts_config("", "", 25, extra_dests=dests, retries=1)
        cfg["alerts"]["rules"] = [{"name": "acme-spike", "kind": "spike", "brand": "Acme",
                                   "destinations": ["echo", "pasted", "pasted-url"]}]
        ctx = make_ctx(cfg, backend=backend)
        add_history(ctx)
        result = aggregate_dirty(ctx)
        assert result["alerts_failed"] == 3 and len(echo.attempts) == 1
    with ctx.engine.connect() as conn:
        rows = [dict(r) for r in conn.execute(select(alert_ledger)).mappings()]
    errors = {r["destination"]: r["last_error"] for r in rows}
    assert errors["echo"].startswith("HTTP 403: bad credentials: *** ")
    assert "is not set" in errors["pasted"] and "password_env of destination pasted" in errors["pasted"]
    assert "url_env of destination pasted-url" in errors["pasted-url"]
    shown = caplog.text + repr(rows) + format_rows(list_alerts(ctx), "table") + format_rows(list_alerts(ctx), "json")
    assert not [s for s in (SIG, BASIC_PW, SECRET_AS_NAME, URL_AS_NAME) if s in shown]


def test_a_conventional_variable_name_is_still_named_in_the_error(monkeypatch):
    dest = Destination(name="team", kind="slack", url_env="SLACK_WEBHOOK_URL")
    try:
        PlainTransport({}).url(dest)
    except DeliveryError as exc:
        assert str(exc) == "environment variable SLACK_WEBHOOK_URL is not set (it should hold the slack URL)"
    else:
        raise AssertionError("no error")


@pytest.mark.parametrize(("mode", "message"), [
    ("drip", "SMTP exchange not complete within 1 s"),  # a greeting dripping a byte at a time
    # was "closed the connection"; the per-read timeout and the watchdog end it at the same time
    ("silent", "(no answer from the SMTP server|SMTP exchange not complete) within 1 s"),
    ("drop", "SMTP server closed the connection"),
])
def test_an_smtp_server_that_drips_stalls_or_drops_is_cut_at_the_time_bound(mode, message):
    smtp = Smtp(host="127.0.0.1", port=0, starttls=False, username=None, password=None, sender="a@example.org")
    with RawTcpServer(mode) as srv:
        smtp.port = srv.port
        t0 = time.monotonic()
        with pytest.raises(DeliveryError) as err:
            send_smtp(smtp, ["b@example.org"], OUT, timeout_s=1)
        assert time.monotonic() - t0 < 3
    assert re.fullmatch(message, str(err.value))


HOSTILE_BRAND = "Acme <!channel> <@U0123> <http://evil.example|click>"
HOSTILE_PRODUCT = "One\r\nBcc: victim@example.org\nSubject: injected"


def test_brand_names_with_mentions_markup_and_newlines_neither_ping_nor_inject(monkeypatch):
    alert = Alert(rule="r", kind="spike", day=dt.date(2026, 10, 15), brand=HOSTILE_BRAND, product=HOSTILE_PRODUCT,
                  platform="*", source="any", figures={"posts": 30, "baseline": 2.0, "zscore": 28.0},
                  threshold={"min_zscore": None, "min_posts": 5})
    out = render(alert, test=False, late=False, report_url=None, now=dt.datetime(2026, 10, 16, tzinfo=dt.UTC))
    cfg = AlertsConfig(retries=1, timeout_s=5, max_total_s=5)
    with HttpSink() as slack, SmtpSink() as smtp:
        monkeypatch.setenv("TEST_SLACK_URL", slack.url("/services/T/B/x"))
        ok = [deliver(PlainTransport(), Destination(name="s", kind="slack", url_env="TEST_SLACK_URL"), out, cfg),
              deliver(PlainTransport(), Destination(name="m", kind="email", host="127.0.0.1", port=smtp.port,
                                                    starttls=False, sender="a@example.org", to=("b@example.org",)),
                      out, cfg)]
        assert [o.ok for o in ok] == [True, True], [o.error for o in ok]  # was: ValueError on every try
        (body,) = [r.json() for r in slack.received]
        (mail,) = smtp.messages
        envelopes = smtp.envelopes
    # Slack: no mention or link syntax survives in the mrkdwn fields (text is what notifies)
    parts = [b["text"] for b in body["blocks"] if "text" in b] + [e for b in body["blocks"] for e in b.get("elements", [])]
    mrkdwn = [body["text"]] + [p["text"] for p in parts if p["type"] == "mrkdwn"]
    assert not [t for t in mrkdwn if "<!channel>" in t or "<@U0123>" in t or "<http://evil" in t]
    assert "&lt;!channel&gt;" in body["text"]
    assert "\n" not in body["blocks"][0]["text"]["text"]  # the header is one line
    # email: one recipient, one subject, the names on one line
    assert envelopes == [("a@example.org", ["b@example.org"])]
    assert mail["Bcc"] is None and len(mail.get_all("Subject")) == 1
    assert mail["Subject"] == ("[brandmon] Spike: Acme <!channel> <@U0123> <http://evil.example|click> "
                               "(One Bcc: victim@example.org Subject: injected) on all platforms, 2026-10-15")


_CATALOGUE = """
brands:
  - {name: Acme, keywords: [acme], products: [{name: Acme One, keywords: [acme one]}]}
  - {name: Globex, keywords: [globex]}
alerts:
  destinations: {team: {kind: slack, url_env: SLACK_WEBHOOK_URL}}
  rules: [%s]
"""


@pytest.mark.parametrize(("rule", "message"), [
    ("{name: r, kind: spike, brand: Globx}", "alerts.rules[0] (r).brand 'Globx' is not in the catalogue "
                                             "(brands: Acme, Globex; or `each`)"),
    ("{name: r, kind: spike, brand: '*'}", "brand '*' is not in the catalogue"),
    ("{name: r, kind: spike, brand: Acme, product: Acme Tw0}", "product 'Acme Tw0' is not a product of Acme "
                                                              "(products: Acme One; or `each`, or `*` for the total)"),
    ("{name: r, kind: spike, brand: Globex, product: Acme One}", "product 'Acme One' is not a product of Globex"),
    ("{name: r, kind: spike, product: Nope}", "product 'Nope' is not a product of any brand"),
])
def test_a_rule_naming_a_brand_or_product_not_in_the_catalogue_is_one_line_at_start(tmp_path, rule, message):
    """It could never fire (the day's rows carry catalogue names); it used to be a warning per run
    for a brand, nothing at all for a product, and `alerts test` sent a sample of another brand."""
    cfg = tmp_path / "b.yaml"
    cfg.write_text(_CATALOGUE % rule)
    with pytest.raises(ConfigError) as err:
        load_settings(env={"BRANDMON_CONFIG": str(cfg), "BRANDMON_HOME": str(tmp_path), "BRANDMON_AUTHOR_SALT": "x"})
    assert message in str(err.value) and "\n" not in str(err.value)


def test_rule_names_are_matched_ignoring_case_and_stored_as_the_catalogue_spells_them(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text(_CATALOGUE % "{name: r, kind: spike, brand: acme, product: ACME ONE}")
    s = load_settings(env={"BRANDMON_CONFIG": str(cfg), "BRANDMON_HOME": str(tmp_path), "BRANDMON_AUTHOR_SALT": "x"})
    rule = s.alerts.rule("r")
    assert (rule.brand, rule.product) == ("Acme", "Acme One")  # mention_daily.product is compared as stored


def test_alerts_list_shows_names_with_pipes_and_newlines_in_their_own_columns_on_one_line(make_ctx, backend):
    ctx = make_ctx({"brands": [{"name": "Pipe|Co", "keywords": ["pipe"]}]}, backend=backend)
    brand, product = "Pipe|Co", "Line\nBreak"
    row = {"rule": "r", "day": dt.date(2026, 10, 15), "key": f"{brand}|{product}|*|any", "destination": "hook",
           "late": False, "status": "skipped", "last_error": "day older than alerts.max_age_days (60)",
           "payload": {"kind": "spike", "brand": brand, "product": product, "platform": "*", "source": "any",
                       "figures": {}, "threshold": {}}}
    with ctx.engine.begin() as conn:
        assert ledger.claim_new(conn, [row], ledger.new_token(), dt.datetime(2026, 10, 16, tzinfo=dt.UTC)) == 1
    rows = list_alerts(ctx)
    (flat,) = json.loads(format_rows(rows, "json"))
    assert (flat["brand"], flat["product"], flat["platform"], flat["source"]) == (brand, product, "*", "any")
    table = format_rows(rows, "table").splitlines()
    assert len(table) == 5 and "Pipe|Co  Line Break  *" in table[1]  # header, row, blank, "errors:", error


def test_the_aggregate_summary_says_when_alerts_could_not_be_dispatched(make_ctx, monkeypatch, capsys):
    """The ledger unusable (here: dropped): the aggregation succeeds, and its summary line no
    longer reads '0 sent, 0 failed' as if nothing had been due."""
    with HttpSink() as hook:
        monkeypatch.setenv("TEST_ALERT_HOOK_URL", hook.url("/hook"))
        ctx = make_ctx(alerts_config("", "", 25, retries=1))
        s = ctx.settings
        for k, v in {"BRANDMON_DATABASE_URL": s.database_url, "BRANDMON_STORAGE_URL": s.storage_url,
                     "BRANDMON_CONFIG": str(s.config_path), "BRANDMON_HOME": str(s.home),
                     "BRANDMON_AUTHOR_SALT": s.author_salt.get()}.items():
            monkeypatch.setenv(k, v)
        add_history(ctx)
        with ctx.engine.begin() as conn:
            conn.execute(text("DROP TABLE alert_ledger"))
        assert main(["aggregate", "--quiet", "--no-forecast"]) == 0
    out = capsys.readouterr().out
    assert "1 error(s) stopped sending (logged above; the next run retries)" in out


def test_a_destination_not_set_up_is_not_retried_within_the_round_nor_said_to_have_been_requested():
    """An unset variable or a value that is not a URL: no request is made, so no backoff either
    (it was 3 'requests' and 1 + 2 s of sleep per destination and run)."""
    waits: list[float] = []
    cfg = AlertsConfig(retries=3, backoff_s=1, max_total_s=30)
    for env, message in (({}, "environment variable SLACK_WEBHOOK_URL is not set (it should hold the slack URL)"),
                         ({"SLACK_WEBHOOK_URL": "hooks.slack.com/x"}, "$SLACK_WEBHOOK_URL is not an http(s) URL")):
        r = deliver(PlainTransport(env), Destination(name="s", kind="slack", url_env="SLACK_WEBHOOK_URL"), OUT, cfg,
                    sleep=waits.append)
        assert (r.ok, r.requests, r.error) == (False, 0, message)
    assert waits == []


def test_alerts_list_says_when_it_shows_only_the_newest_rows(make_ctx, monkeypatch, capsys, backend):
    """Thousands of rules fill the ledger fast; the list used to stop at 10,000 rows silently."""
    monkeypatch.setattr("pipeline.alerts.cli.LIST_LIMIT", 3)
    ctx = make_ctx({"brands": [{"name": "Acme", "keywords": ["acme"]}]}, backend=backend)
    rows = [{"rule": f"r{i}", "day": dt.date(2026, 10, 15), "key": "Acme|*|*|any", "destination": "hook",
             "late": False, "status": "skipped", "last_error": None,
             "payload": {"kind": "spike", "brand": "Acme", "product": "*", "platform": "*", "source": "any"}}
            for i in range(4)]
    with ctx.engine.begin() as conn:
        ledger.claim_new(conn, rows, ledger.new_token(), dt.datetime(2026, 10, 16, tzinfo=dt.UTC))
    s = ctx.settings
    for k, v in {"BRANDMON_DATABASE_URL": s.database_url, "BRANDMON_STORAGE_URL": s.storage_url,
                 "BRANDMON_HOME": str(s.home), "BRANDMON_CONFIG": str(s.config_path), "BRANDMON_AUTHOR_SALT": s.author_salt.get()}.items():
        monkeypatch.setenv(k, v)
    assert main(["alerts", "list", "--format", "csv"]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1 + 3
    assert "note: only the newest 3 alerts are shown; narrow with --since or --status" in err
    assert main(["alerts", "list", "--status", "sent"]) == 0
    assert "note:" not in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["silent", "drip", "drop"])
def test_the_airflow_smtp_hook_is_held_to_the_rounds_time_bound(monkeypatch, mode):
    """SmtpHook's own defaults are a 30 s timeout per socket operation and 5 reconnects, and no
    bound on a dripping greeting: a round could take minutes to forever, not max_total_s."""
    from pipeline.alerts.transport import AirflowTransport

    with RawTcpServer(mode) as srv:
        monkeypatch.setenv("AIRFLOW_CONN_SMTP_BAD", json.dumps(
            {"conn_type": "smtp", "host": "127.0.0.1", "port": srv.port,
             "extra": {"disable_tls": True, "disable_ssl": True, "from_email": "a@example.org"}}))
        dest = Destination(name="m", kind="email", conn_id="smtp_bad", to=("b@example.org",))
        AirflowTransport().secrets(dest)  # Airflow's first import (seconds on a busy machine) is not the point
        from airflow.providers.smtp.hooks.smtp import SmtpHook  # noqa: F401
        t0 = time.monotonic()
        r = deliver(AirflowTransport(), dest, OUT, AlertsConfig(retries=2, backoff_s=0.1, timeout_s=1, max_total_s=3))
        elapsed = time.monotonic() - t0
    assert not r.ok and elapsed < 5, (elapsed, r.error)
    assert r.error.startswith("SMTP hook: ") and "\n" not in r.error


@pytest.mark.parametrize("mode", ["drip", "huge"])
def test_a_slack_connection_in_airflow_gets_the_same_time_and_byte_bounds(monkeypatch, mode):
    """SlackWebhookHook's client (slack_sdk) reads the whole answer with a per-read timeout: a
    dripping endpoint held the round for as long as it dripped (40 s measured for timeout_s 1)."""
    from pipeline.alerts.transport import AirflowTransport

    with HttpSink() as sink:
        sink.mode, sink.delay_s = mode, 30
        monkeypatch.setenv("AIRFLOW_CONN_SLACK_BAD", json.dumps(
            {"conn_type": "slackwebhook", "password": sink.url("/services/T0/B0/dr1pS3cretT0ken")}))
        dest = Destination(name="s", kind="slack", conn_id="slack_bad")
        AirflowTransport().secrets(dest)  # Airflow's first import is not the point
        t0 = time.monotonic()
        r = deliver(AirflowTransport(), dest, OUT, AlertsConfig(retries=2, backoff_s=0.1, timeout_s=1, max_total_s=3))
        elapsed = time.monotonic() - t0
    assert elapsed < 5, (elapsed, r.error)
    if mode == "drip":
        # the second request gets what is left of max_total_s (0.95 s on a busy machine, not 1 s)
        assert re.fullmatch(r"Slack hook: answer not complete within (1|0\.\d+) s \(after [12] request\(s\)\)", r.error), r.error
    else:  # 200 with 20 MB: delivered, 64 KiB of the answer read
        assert r.ok and r.requests == 1


def test_alerts_test_serves_the_destinations_in_parallel_within_one_round(make_ctx, monkeypatch):
    """Destinations were tried one after another: a round each (seven failing ones took 80 s with the
    defaults, two of them hanging); now one round for all."""
    from pipeline.alerts.jobs import send_test

    with HttpSink() as a, HttpSink() as b, HttpSink() as c:
        dests = {}
        for name, sink in (("a", a), ("b", b), ("c", c)):
            sink.mode, sink.delay_s = "slow", 10
            monkeypatch.setenv(f"TEST_HANG_{name.upper()}", sink.url("/hook"))
            dests[name] = {"kind": "webhook", "url_env": f"TEST_HANG_{name.upper()}"}
        cfg = alerts_config("", "", 25, extra_dests=dests, retries=1, timeout_s=1.5, max_total_s=1.5)
        cfg["alerts"]["rules"] = [{"name": "r", "kind": "spike", "brand": "Acme", "destinations": ["a", "b", "c"]}]
        ctx = make_ctx(cfg)
        t0 = time.monotonic()
        results = send_test(ctx, "r")
        elapsed = time.monotonic() - t0
    assert [(r["destination"], r["ok"]) for r in results] == [("a", False), ("b", False), ("c", False)]
    assert all(r["error"] == "no answer within 1.5 s (after 1 request(s))" for r in results)
    assert elapsed < 3.5, elapsed
