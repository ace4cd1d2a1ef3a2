"""The `alerts:` YAML section: typed rules and destinations, one-line errors, no secrets;
plus the rule semantics (spike flag, entering a share-of-voice / week-over-week region)."""

from __future__ import annotations

import datetime as dt

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.alerts.config import EACH, Rule, parse_alerts
from pipeline.alerts.message import slack_body, text_of, webhook_body
from pipeline.alerts.rules import Alert, fires
from pipeline.errors import ConfigError
from pipeline.settings import load_settings

DESTS = {"team": {"kind": "slack", "url_env": "SLACK_WEBHOOK_URL"},
         "mail": {"kind": "email", "host": "smtp.example.org", "password_env": "SMTP_PASSWORD",
                  "username": "u", "from": "a@example.org", "to": "b@example.org"}}


def test_a_full_section_parses_into_typed_rules_and_destinations(tmp_path):
    cfg = tmp_path / "b.yaml"
    cfg.write_text("""
brands: [{name: Acme, keywords: [acme]}]
alerts:
  late_after_days: 3
  report_base_url: https://reports.example.org/lake/
  destinations:
    team: {kind: slack, url_env: SLACK_WEBHOOK_URL}
    ops: {kind: webhook, conn_id: ops_hook, headers: {X-Team: brand}}
    mail: {kind: email, host: smtp.example.org, port: 2525, starttls: false, username: u,
           password_env: SMTP_PASSWORD, from: alerts@example.org, to: [a@example.org, b@example.org]}
  rules:
    - {name: acme-spike, kind: spike, brand: Acme, platform: each, destinations: [team, mail]}
    - {name: sov, kind: share_of_voice, brand: Acme, above: 0.4, below: 0.1}
    - {name: wow, kind: wow, brand: Acme, product: each, source: image, above: 0.5, min_posts: 20}
""")
    s = load_settings(env={"BRANDMON_CONFIG": str(cfg), "BRANDMON_HOME": str(tmp_path), "BRANDMON_AUTHOR_SALT": "x"})
    a = s.alerts
    assert [r.name for r in a.rules] == ["acme-spike", "sov", "wow"]
    assert a.rule("acme-spike").platform == EACH and a.rule("acme-spike").destinations == ("team", "mail")
    assert a.rule("sov").destinations == ("team", "ops", "mail")  # default: every destination
    assert a.rule("wow").product == EACH and a.rule("wow").min_posts == 20 and a.rule("wow").source == "image"
    mail = a.destination("mail")
    assert (mail.port, mail.starttls, mail.to, mail.sender) == (2525, False, ("a@example.org", "b@example.org"),
                                                               "alerts@example.org")
    assert a.destination("ops").headers == {"X-Team": "brand"} and a.late_after_days == 3
    assert a.report_base_url == "https://reports.example.org/lake"
    assert s.describe()["alerts"] == {"rules": ["acme-spike", "sov", "wow"],
                                      "destinations": ["team (slack)", "ops (webhook)", "mail (email)"]}
    with pytest.raises(ConfigError, match="unknown alert rule 'nope'"):
        a.rule("nope")


@pytest.mark.parametrize("alerts, message", [
    ({"destinations": {"x": {"kind": "slack", "url": "https://hooks.slack.com/services/T/B/secret"}}},
     "`url` would put a secret in the YAML; put it in an environment variable and name it with `url_env:`"),
    ({"destinations": {"m": {**DESTS["mail"], "password": "hunter2"}}}, "`password` would put a secret"),
    ({"destinations": {"x": {"kind": "slack", "url_env": "https://hooks.slack.com/x"}}},
     "must name an environment variable"),
    ({"destinations": {"x": {"kind": "pager"}}}, "kind must be one of webhook, slack, email"),
    ({"destinations": {"x": {"kind": "slack"}}}, "needs `url_env:`"),
    ({"destinations": {"x": {"kind": "webhook", "url_env": "U", "headers": {"Authorization": "Bearer x"}}}},
     "looks like a secret"),
    ({"destinations": DESTS, "rules": [{"name": "r", "kind": "spike", "destinations": ["nope"]}]},
     "unknown destination(s) nope"),
    ({"destinations": DESTS, "rules": [{"name": "r", "kind": "surge"}]}, "kind must be one of spike"),
    ({"destinations": DESTS, "rules": [{"name": "r", "kind": "share_of_voice"}]}, "needs `above:` and/or `below:`"),
    ({"destinations": DESTS, "rules": [{"name": "r", "kind": "share_of_voice", "above": 40}]}, "between 0 and 1"),
    ({"destinations": DESTS, "rules": [{"name": "r", "kind": "spike", "treshold": 3}]}, "unknown key `treshold`"),
    ({"destinations": DESTS, "rules": [{"name": "r", "kind": "spike"}, {"name": "r", "kind": "spike"}]},
     "rule names must be unique"),
    ({"destinations": DESTS, "retries": 0}, "retries must be a whole number of at least 1"),
    ({"destinations": DESTS, "rules": [{"name": "r", "kind": "spike", "min_posts": "many"}]}, "min_posts must be"),
    ({"rules": [{"name": "r", "kind": "spike"}]}, "has no destination"),
    # YAML .nan / .inf: NaN compares false with every figure (a rule that silently never fires),
    # an infinite lease or timeout overflows the clock arithmetic at dispatch time
    ({"destinations": DESTS, "rules": [{"name": "r", "kind": "share_of_voice", "above": float("nan")}]},
     "above must be a number of at least 0, got nan"),
    ({"destinations": DESTS, "rules": [{"name": "r", "kind": "spike", "min_zscore": float("nan")}]},
     "min_zscore must be a number"),
    ({"destinations": DESTS, "rules": [{"name": "r", "kind": "wow", "below": float("inf")}]}, "below must be a number"),
    ({"destinations": DESTS, "lease_s": float("inf")}, "lease_s must be a number"),
    ({"destinations": DESTS, "timeout_s": float("nan")}, "timeout_s must be a number"),
    ({"destinations": DESTS, "max_total_s": float("inf")}, "max_total_s must be a number"),
    # a line break in an address or header would add a header of its own; mail refused it at
    # send time, so every alert to the destination failed with a ValueError
    ({"destinations": {"m": {**DESTS["mail"], "to": ["b@example.org\nBcc: evil@example.org"]}}},
     "destinations.m.to cannot hold a line break"),
    ({"destinations": {"m": {**DESTS["mail"], "from": "a@example.org\r\nBcc: evil@example.org"}}},
     "destinations.m.from cannot hold a line break"),
    ({"destinations": {"w": {"kind": "webhook", "url_env": "U", "headers": {"X-Team": "a\r\nX-Evil: 1"}}}},
     "headers.X-Team: a header name or value cannot hold a line break"),
    ("yes", "must be a mapping"),
])
def test_bad_sections_are_one_clear_line(alerts, message):
    with pytest.raises(ConfigError) as err:
        parse_alerts(alerts)
    assert message in str(err.value) and "\n" not in str(err.value)
    assert "hunter2" not in str(err.value) and "hooks.slack.com" not in str(err.value)  # no secret echoed


_values = st.recursive(st.none() | st.booleans() | st.integers(-5, 5) | st.floats(-2, 2) | st.text(max_size=8),
                       lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
                       max_leaves=12)
_keys = st.sampled_from(["name", "kind", "brand", "above", "below", "destinations", "url_env", "to", "host",
                         "from", "min_posts", "platform", "source", "retries", "timeout_s"])


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from(["rules", "destinations", "retries", "max_age_days", "report_base_url"]),
                       _values | st.lists(st.dictionaries(_keys, _values, max_size=6), max_size=3)
                       | st.dictionaries(st.text(max_size=6), st.dictionaries(_keys, _values, max_size=6), max_size=3),
                       max_size=4))
def test_any_section_parses_or_raises_a_one_line_config_error(raw):
    try:
        parse_alerts(raw)
    except ConfigError as exc:
        assert "\n" not in str(exc)


def _row(**kw):
    base = {"posts": 10, "spike": False, "zscore": 1.0, "rolling_7": 5.0, "share_of_voice": 0.3, "wow_change": 0.1}
    return base | kw


def test_rules_fire_on_the_spike_flag_and_on_entering_a_region():
    spike = Rule(name="s", kind="spike")
    assert fires(spike, _row(spike=True), None) and not fires(spike, _row(spike=False, zscore=9), None)
    assert not fires(Rule(name="s", kind="spike", min_posts=50), _row(spike=True), None)
    assert fires(Rule(name="s", kind="spike", min_zscore=2), _row(zscore=2.5), None)
    sov = Rule(name="v", kind="share_of_voice", above=0.4, below=0.1)
    assert fires(sov, _row(share_of_voice=0.45), _row(share_of_voice=0.3))
    assert not fires(sov, _row(share_of_voice=0.45), _row(share_of_voice=0.5))  # already above: no repeat
    assert fires(sov, _row(share_of_voice=0.08), _row(share_of_voice=0.2))
    assert fires(sov, _row(share_of_voice=0.5), None)  # no day before: entering
    assert not fires(sov, _row(share_of_voice=0.5, rolling_7=0.5), None)  # 4 posts in the week < min_posts
    wow = Rule(name="w", kind="wow", above=0.5, below=0.3)
    assert fires(wow, _row(wow_change=0.6), _row(wow_change=0.2))
    assert fires(wow, _row(wow_change=-0.35), _row(wow_change=-0.1))
    assert not fires(wow, _row(wow_change=-0.2), _row(wow_change=-0.1))
    assert not fires(wow, _row(wow_change=None), None)


def test_messages_carry_the_figures_flags_and_link():
    alert = Alert(rule="acme-spike", kind="spike", day=dt.date(2026, 10, 15), brand="Acme", product="Acme One",
                  platform="mastodon", source="any", figures={"posts": 30, "baseline": 2.0, "zscore": 28.0},
                  threshold={"min_zscore": None, "min_posts": 5})
    text = text_of(alert, late=True, report_url="https://r.example/reports/daily/2026-10-15.html")
    assert text.splitlines()[0] == "[late] brandmon alert acme-spike: Spike: Acme (Acme One) on mastodon, 2026-10-15"
    assert "30 posts vs a 28-day mean of 2.0 (z-score 28.00)" in text and "Report: https://r.example/" in text
    body = webhook_body(alert, test=True)
    assert body["test"] is True and body["late"] is False and body["report_url"] is None
    assert body["id"] == "acme-spike|2026-10-15|Acme|Acme One|mastodon|any"
    slack = slack_body(alert, report_url="https://r.example/x.html")
    assert "<https://r.example/x.html|daily report>" in slack["blocks"][2]["elements"][0]["text"]
