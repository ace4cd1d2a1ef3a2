"""pipeline.airflow_support: Airflow connections -> Settings, failure summaries, task helpers."""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
from types import SimpleNamespace

import pytest
from sqlalchemy.engine import make_url

from pipeline import airflow_support as af
from pipeline.errors import ConfigError

UTC = dt.UTC


@pytest.fixture
def brandmon_env(tmp_path, monkeypatch):
    """BRANDMON_* fallbacks in the process env (what load_settings reads), no connections."""
    for key in list(os.environ):
        if key.startswith(("BRANDMON_", "AIRFLOW_CONN_")):
            monkeypatch.delenv(key)
    env = {
        "BRANDMON_HOME": str(tmp_path / "var"),
        "BRANDMON_AUTHOR_SALT": "salt-for-tests",
        "BRANDMON_DATABASE_URL": f"sqlite:///{tmp_path / 'fallback.db'}",
        "BRANDMON_STORAGE_URL": "s3://lake/prefix",
        "BRANDMON_S3_ENDPOINT_URL": "http://fallback:9000",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return env


def test_without_connections_the_brandmon_env_applies(brandmon_env):
    settings = af.settings_from_airflow()
    assert settings.database_url == brandmon_env["BRANDMON_DATABASE_URL"]
    assert settings.s3_endpoint_url == "http://fallback:9000"
    assert settings.storage_url == "s3://lake/prefix"


def test_postgres_and_aws_connections_win_through_the_provider_hooks_and_no_secret_reaches_the_env(
    brandmon_env, monkeypatch, caplog
):
    db = {
        "conn_type": "postgres",
        "host": "db.internal",
        "port": 5433,
        "login": "brand mon",
        "password": "p@ss:w/rd",
        "schema": "brandmon",
        "extra": {"sslmode": "require", "cursor": "dictcursor"},
    }
    aws = {
        "conn_type": "aws",
        "login": "AKIATEST",
        "password": "s3cr3t-key-value",
        "extra": {"endpoint_url": "http://minio:9000", "region_name": "eu-west-1"},
    }
    monkeypatch.setenv("AIRFLOW_CONN_BRANDMON_DB", json.dumps(db))
    monkeypatch.setenv("AIRFLOW_CONN_BRANDMON_AWS", json.dumps(aws))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID", raising=False)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY", raising=False)
    environ_before = dict(os.environ)
    with caplog.at_level(logging.DEBUG):
        settings = af.settings_from_airflow()
    assert dict(os.environ) == environ_before  # nothing written into the environment
    url = make_url(settings.database_url)
    assert (url.drivername, url.host, url.port, url.database) == (
        "postgresql+psycopg2",
        "db.internal",
        5433,
        "brandmon",
    )
    assert (url.username, url.password) == (
        "brand mon",
        "p@ss:w/rd",
    )  # special characters survive quoting
    assert dict(url.query) == {"sslmode": "require"}  # provider-only extras are dropped
    assert settings.s3_endpoint_url == "http://minio:9000"
    assert settings.database_url_source == "the Airflow connection 'brandmon_db'"
    # the AWS hook's boto3 session carries the connection's keys and region
    credentials = settings.s3_session.get_credentials()
    assert (credentials.access_key, credentials.secret_key) == ("AKIATEST", "s3cr3t-key-value")
    assert settings.s3_session.region_name == "eu-west-1"
    assert "s3cr3t-key-value" not in repr(settings)
    assert "p@ss:w/rd" not in caplog.text and "s3cr3t-key-value" not in caplog.text
    assert "db.internal" in caplog.text  # the log says where it connects, without the password


def test_connection_ids_are_configurable(brandmon_env, monkeypatch):
    monkeypatch.setenv("BRANDMON_DB_CONN_ID", "warehouse")
    monkeypatch.setenv("AIRFLOW_CONN_BRANDMON_DB", "postgres://ignored:x@nowhere/db")
    monkeypatch.setenv("AIRFLOW_CONN_WAREHOUSE", "postgres://u:pw@wh.example:5432/analytics")
    settings = af.settings_from_airflow()
    url = make_url(settings.database_url)
    assert (url.host, url.database, url.username) == ("wh.example", "analytics", "u")
    assert settings.database_url_source == "the Airflow connection 'warehouse'"


def test_uri_style_connection_and_sqlite(brandmon_env, monkeypatch, tmp_path):
    monkeypatch.setenv(
        "AIRFLOW_CONN_BRANDMON_DB",
        json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "p.db")}),
    )
    monkeypatch.setenv(
        "AIRFLOW_CONN_BRANDMON_AWS",
        json.dumps(
            {
                "conn_type": "aws",
                "extra": {"service_config": {"s3": {"endpoint_url": "http://s3.local"}}},
            }
        ),
    )
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "from-the-default-chain")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "chain-secret")
    settings = af.settings_from_airflow()
    assert settings.database_url == f"sqlite:///{tmp_path / 'p.db'}"
    assert settings.s3_endpoint_url == "http://s3.local"
    # no keys in the connection: the hook's session uses boto3's chain (roles, profiles, env)
    assert settings.s3_session.get_credentials().access_key == "from-the-default-chain"


def test_wrong_connection_type_is_a_clear_config_error(brandmon_env, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_BRANDMON_DB", "mysql://u:topsecret@h/db")
    with pytest.raises(ConfigError) as err:
        af.settings_from_airflow()
    assert "postgres" in str(err.value) and "topsecret" not in str(err.value)


def test_scrub_removes_credentials():
    text = (
        "could not connect to postgresql+psycopg2://bm:hunter2@db:5432/x; "
        "token=abc123def password: 'pw0rd' Authorization=Bearer"
    )
    out = af.scrub(text, secrets=["AKIA-SECRET-XYZ"])
    for secret in ("hunter2", "abc123def", "pw0rd"):
        assert secret not in out
    assert "postgresql+psycopg2://bm:***@db:5432/x" in out
    assert af.scrub("key AKIA-SECRET-XYZ leaked", ["AKIA-SECRET-XYZ"]) == "key *** leaked"


def test_failure_summary_is_one_clear_paragraph_without_secrets(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-aws-key")
    ti = SimpleNamespace(dag_id="brandmon_ingest", task_id="ingest", map_index=1, try_number=3)
    context = {
        "ti": ti,
        "run_id": "scheduled__2026-01-02",
        "data_interval_start": dt.datetime(2026, 1, 1, tzinfo=UTC),
        "data_interval_end": dt.datetime(2026, 1, 2, tzinfo=UTC),
        "exception": RuntimeError(
            "S3 said no to very-secret-aws-key via postgresql://u:hunter2@db/x\nTraceback line two"
        ),
    }
    summary = af.log_failure(context)
    assert "\n" not in summary
    for part in (
        "dag=brandmon_ingest",
        "task=ingest[1]",
        "attempt 3",
        "2026-01-01T00:00:00+00:00 -> 2026-01-02T00:00:00+00:00",
        "RuntimeError: S3 said no",
    ):
        assert part in summary
    assert (
        "very-secret-aws-key" not in summary
        and "hunter2" not in summary
        and "line two" not in summary
    )


def test_failure_summary_without_exception_or_interval():
    summary = af.failure_summary(
        {"ti": SimpleNamespace(dag_id="d", task_id="t", map_index=-1, try_number=1)}
    )
    assert "task=t " in summary and "interval=none -> none" in summary and "no exception" in summary


def test_interval_helpers():
    start = dt.datetime(2026, 1, 1, tzinfo=UTC)
    assert af.require_interval(start, start + dt.timedelta(days=1)) == (
        start,
        start + dt.timedelta(days=1),
    )
    with pytest.raises(ConfigError, match="empty data interval"):
        af.require_interval(start, start)
    assert af.interval_days(start, start + dt.timedelta(days=2)) == [
        dt.date(2026, 1, 1),
        dt.date(2026, 1, 2),
    ]
    assert af.interval_days("2026-01-01T06:00:00+00:00", "2026-01-01T12:00:00+00:00") == [
        dt.date(2026, 1, 1)
    ]
    # a naive value is UTC; another zone is converted
    assert af.as_utc(dt.datetime(2026, 1, 1, 1)) == dt.datetime(2026, 1, 1, 1, tzinfo=UTC)
    plus2 = dt.timezone(dt.timedelta(hours=2))
    assert af.as_utc(dt.datetime(2026, 1, 1, 1, tzinfo=plus2)) == dt.datetime(
        2025, 12, 31, 23, tzinfo=UTC
    )


def _events(*windows):
    return {"asset": [SimpleNamespace(extra=w) for w in windows]}


def test_report_day_choice():
    run_after = dt.datetime(2026, 3, 10, 5, tzinfo=UTC)
    events = _events(
        {"start": "2026-01-01T00:00:00+00:00", "end": "2026-01-02T00:00:00+00:00"},
        {"start": "2026-01-02T00:00:00+00:00", "end": "2026-01-03T00:00:00+00:00"},
        {"unrelated": 1},
    )
    assert af.choose_report_day(None, events, run_after) == dt.date(2026, 1, 2)
    assert af.choose_report_day("2026-02-01", events, run_after) == dt.date(2026, 2, 1)
    assert af.choose_report_day(None, {}, run_after) == dt.date(2026, 3, 9)
    with pytest.raises(ConfigError):
        af.choose_report_day("yesterday", events, run_after)
    assert af.merge_windows(af.event_windows(events)) == {
        "start": "2026-01-01T00:00:00+00:00",
        "end": "2026-01-03T00:00:00+00:00",
    }
    assert af.merge_windows([]) == {}


def test_counts_for_xcom_are_small_integers():
    assert af.counts_only(
        {"new": 3, "ratio": 0.5, "days": ["2026-01-01", "2026-01-02"], "model": "v1", "ok": True}
    ) == {
        "new": 3,
        "ratio": 0,
        "days": 2,
        "ok": 1,
    }
    assert af.sum_counts([{"new": 1, "updated": 2}, None, {"new": 4}]) == {"new": 5, "updated": 2}
    summary = af.train_summary(
        {
            "version": "v3",
            "activated": 1,
            "metrics": {"precision": 0.93, "name": "x"},
            "model": b"x",
        }
    )
    assert summary == {"version": "v3", "activated": True, "metrics": {"precision": 0.93}}


def test_select_sources(tmp_path):
    from pipeline.settings import load_settings

    cfg = tmp_path / "c.yaml"
    cfg.write_text("sources:\n  - {name: a, kind: synthetic}\n  - {name: b, kind: synthetic}\n")
    settings = load_settings(
        env={
            "BRANDMON_HOME": str(tmp_path),
            "BRANDMON_CONFIG": str(cfg),
            "BRANDMON_AUTHOR_SALT": "s",
        }
    )
    assert af.select_sources(settings) == ["a", "b"]
    assert af.select_sources(settings, ["b"]) == ["b"]
    with pytest.raises(ConfigError, match="unknown source"):
        af.select_sources(settings, ["c"])
    empty = load_settings(env={"BRANDMON_HOME": str(tmp_path), "BRANDMON_AUTHOR_SALT": "s"})
    with pytest.raises(ConfigError, match="no sources configured"):
        af.select_sources(empty)


def test_train_options_are_checked_with_one_line_errors():
    assert af.check_train_options(None) == {}
    good = {"mode": "finetune:2", "input_size": 128, "learning_rate": 1e-4, "augment": None, "matcher": "off"}
    assert af.check_train_options(good) == good
    edges = {"epochs": 500, "input_size": 1024, "time_budget_s": None, "seed": 0, "fractions": [0.8, 0.1, 0.1],
             "samples": {"margin": 0.2, "whole_positive": False, "negatives_train": 3}}
    assert af.check_train_options(edges) == edges
    for bad, message in [
        ({"mode": "finetune:x"}, "train option mode='finetune:x' is not valid; use auto, head, full or finetune:N"),
        ({"mode": "finetune:0"}, "mode='finetune:0' is not valid"),
        ({"input_size": "128"}, "train option input_size='128' must be int or None"),
        ({"epochs": True}, "train option epochs=True must be int or None"),
        ({"learning_rate": "fast"}, "learning_rate='fast' must be float"),
        ({"matcher": "yes"}, "train option matcher='yes' is not valid; use auto, on or off"),
        ({"modes": "head"}, "unknown train option(s) modes; known: "),
        (["mode", "head"], "train options must be a JSON object of settings, got list"),
        # hostile sizes: each would hold the TF pool slot and exhaust the worker's memory/time
        ({"epochs": 10**9}, "train option epochs=1000000000 is out of range; use 0..500"),
        ({"input_size": 100000}, "train option input_size=100000 is out of range; use 32..1024"),
        ({"upsample": 1e9}, "train option upsample=1000000000.0 is out of range; use 0..10"),
        ({"synthetic_negatives": 10**9}, "synthetic_negatives=1000000000 is out of range; use 0..10000"),
        ({"batch_size": 0}, "train option batch_size=0 is out of range; use 1..1024"),
        ({"seed": -1}, "train option seed=-1 is out of range; use 0..4294967295"),
        ({"learning_rate": float("nan")}, "train option learning_rate=nan is out of range"),
        ({"time_budget_s": float("inf")}, "train option time_budget_s=inf is out of range; use 1..43200"),
        ({"samples": "lots"}, "train option samples='lots' must be an object"),
        ({"samples": {"margin": 1e9}}, "train option samples.margin=1000000000.0 is out of range; use 0..2"),
        ({"samples": {"negatives_train": 2.5}}, "samples.negatives_train=2.5 must be a whole number"),
        ({"samples": {"evil": 1}}, "unknown samples option(s) evil; known: margin"),
        ({"fractions": [0.5, 0.5]}, "train option fractions=[0.5, 0.5] must be [train, val, test] shares summing to 1"),
        ({"fractions": [1.5, -0.25, -0.25]}, "must be [train, val, test] shares summing to 1"),
    ]:
        with pytest.raises(ConfigError) as err:
            af.check_train_options(bad)
        assert message in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize(("key", "value", "use"), [
    ("threshold_rule", "Wilson", "use wilson or point"),
    ("threshold_rule", "median", "use wilson or point"),
    ("fusion", "Fitted", "use val or fitted"),
    ("fusion", "best", "use val or fitted"),
    ("crop_net", "OFF", "use auto or off"),
    ("matcher", "On", "use auto, on or off"),
])
def test_train_options_refuse_exactly_what_the_config_step_refuses(key, value, use):
    """Outside check (#14): `threshold_rule: "Wilson"` passed the options check and failed later,
    in resolve_config; now both refuse the same values (case matters), the check in one line."""
    from pipeline.detector.data import DataError
    from pipeline.detector.training.config import resolve_config

    with pytest.raises(ConfigError) as err:
        af.check_train_options({key: value})
    assert str(err.value) == f"train option {key}={value!r} is not valid; {use}"
    with pytest.raises(DataError, match=key):
        resolve_config("default", False, None, {key: value})
    good = value.lower() if value.lower() in use else use.split()[1].rstrip(",")
    assert af.check_train_options({key: good}) == {key: good}
    resolve_config("default", False, None, {key: good})  # and what the check lets through, the config takes


def test_train_option_errors_cut_a_long_value_short():
    """Outside check (#14): a 5000-character value was echoed whole in the one-line error."""
    long = "W" * 5000
    for bad in ({"threshold_rule": long}, {"mode": long}, {"learning_rate": long}, {long: 1},
                {"samples": {long: 1}}, {"samples": [long]}, {"fractions": [long]}, {"epochs": 10**50 + 7}):
        with pytest.raises(ConfigError) as err:
            af.check_train_options(bad)
        assert len(str(err.value)) < 900 and "…" in str(err.value) and "W" * 41 not in str(err.value), str(err.value)[:300]
    with pytest.raises(ConfigError) as err:  # over 4300 digits: Python has no repr for it, and no overflow here
        af.check_train_options({"epochs": 10**5000})
    assert str(err.value) == "train option epochs=<a number too long to show> is out of range; use 0..500"


def test_conditional_asset_events_skip_instead_of_emitting():
    """A skipped task emits no asset event: the model event only on activation, the detect
    backlog only when work is left and the run made progress."""
    from airflow.sdk.exceptions import AirflowSkipException

    assert af.activated_or_skip({"version": "v3", "activated": True}) == "v3"
    with pytest.raises(AirflowSkipException, match="v4 was registered but not activated"):
        af.activated_or_skip({"version": "v4", "activated": False})
    assert af.backlog_or_skip(3, {"scored": 10}) is None
    assert af.backlog_or_skip(1, {"scored": 0, "corrupt": 2}) is None
    with pytest.raises(AirflowSkipException, match="no image left"):
        af.backlog_or_skip(0, {"scored": 10})
    with pytest.raises(AirflowSkipException, match="no progress"):
        af.backlog_or_skip(5, {"scored": 0})


def test_a_database_from_a_connection_that_cannot_be_reached_names_the_connection(
    brandmon_env, monkeypatch, tmp_path
):
    """The error says which knob to turn: the connection id, not BRANDMON_DATABASE_URL."""
    from pipeline.context import Context
    from pipeline.errors import DatabaseError
    from tests.support.services import free_port

    port = free_port()  # nothing listens there
    monkeypatch.setenv(
        "AIRFLOW_CONN_BRANDMON_DB",
        json.dumps({"conn_type": "postgres", "host": "127.0.0.1", "port": port, "login": "bm",
                    "password": "wrong-pw-123", "schema": "brandmon", "extra": {"connect_timeout": 3}}),
    )
    ctx = Context(af.settings_from_airflow())
    with pytest.raises(DatabaseError) as err:
        ctx.ready()
    message = str(err.value)
    assert message.endswith("start it or fix the Airflow connection 'brandmon_db'"), message
    assert "BRANDMON_DATABASE_URL" not in message and "wrong-pw-123" not in message
    ctx.close()
    # the same failure from the variable names the variable
    monkeypatch.delenv("AIRFLOW_CONN_BRANDMON_DB")
    monkeypatch.setenv("BRANDMON_DATABASE_URL", f"postgresql+psycopg2://bm:pw@127.0.0.1:{port}/brandmon")
    ctx = Context(af.settings_from_airflow())
    with pytest.raises(DatabaseError, match="fix BRANDMON_DATABASE_URL$"):
        ctx.ready()
    ctx.close()


def test_an_endpoint_url_with_userinfo_is_never_logged_and_an_unreachable_one_names_the_connection(
    brandmon_env, monkeypatch
):
    """An `endpoint_url` extra carrying `user:password@` (a MinIO behind a proxy) is a secret:
    not in the settings log line, registered with Airflow's masker (task logs), not in the
    error when the endpoint cannot be reached; that error names the connection to fix."""
    from airflow.sdk._shared.secrets_masker import redact

    from pipeline.context import Context
    from pipeline.errors import StorageError
    from tests.support.services import free_port

    port = free_port()  # nothing listens there
    monkeypatch.setenv(
        "AIRFLOW_CONN_BRANDMON_AWS",
        json.dumps({"conn_type": "aws", "login": "AKIAX", "password": "aws-secret-1",
                    "extra": {"endpoint_url": f"http://proxy:Url%23Secret9@127.0.0.1:{port}",
                              "region_name": "us-east-1"}}),
    )
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    records: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: records.append(record.getMessage())  # type: ignore[method-assign]
    af.log.addHandler(handler)  # caplog misses it once Airflow has configured logging
    monkeypatch.setattr(af.log, "level", logging.INFO)
    try:
        settings = af.settings_from_airflow()
    finally:
        af.log.removeHandler(handler)
    text = "\n".join(records)
    assert "Url%23Secret9" not in text and "Url#Secret9" not in text
    assert f"endpoint http://proxy:***@127.0.0.1:{port}" in text, text
    assert "Url#Secret9" not in str(redact("dropped Url#Secret9 and Url%23Secret9"))
    ctx = Context(settings)
    with pytest.raises(StorageError) as err:
        ctx.store.check()
    message = str(err.value)
    assert "Secret9" not in message, message
    assert message.endswith("fix the Airflow connection 'brandmon_aws' (extra endpoint_url)"), message
    ctx.close()
