"""What the Airflow DAGs need from the pipeline: settings from Airflow connections, a task
context, the report days carried by asset events, when to emit the conditional asset events
(model activated, detection backlog), the train options check, and one-paragraph failure
summaries.

Why a module of its own: DAG files must stay cheap to parse (only `airflow.sdk`, pendulum and
the standard library at top level), so everything they do at run time is imported lazily from
here inside the task functions, and can be unit-tested without a scheduler.

Connections (ids configurable by environment variable):

- `BRANDMON_DB_CONN_ID` (default `brandmon_db`), a `postgres_default`-style connection
  (type postgres: host, port, login, password, schema = database; libpq options such as
  `sslmode` in extra) or type sqlite (host = the file path), becomes `Settings.database_url`.
- `BRANDMON_AWS_CONN_ID` (default `brandmon_aws`), an `aws_default`-style connection, read by
  the amazon provider's `AwsBaseHook`: its boto3 session (keys, or none for IAM roles and
  profiles, `role_arn` for assumed roles) becomes `Settings.s3_session`, extra `endpoint_url`
  `Settings.s3_endpoint_url`. Credentials stay in the session: never in the environment or
  a log line.

The postgres connection goes through the provider's `PostgresHook` (`sqlalchemy_url`), so the
settings carry the connection id: a database that cannot be reached names it.

Alert destinations name their own connections (`conn_id:` in the YAML `alerts:` section:
a `slackwebhook`, `smtp` or `http` connection); see `pipeline.alerts.transport`.

A connection that does not exist is not an error: the `BRANDMON_*` environment variables
(and the YAML file) apply, exactly as on the command line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from pipeline.dates import as_utc
from pipeline.errors import ConfigError, cut, shown
from pipeline.redact import redact_url, scrub_text, url_passwords
from pipeline.settings import (
    Settings,
    load_settings,
    secret_env_values,
)

log = logging.getLogger(__name__)


# libpq parameters a postgres connection's extra may carry into the SQLAlchemy URL; other
# extra keys (the provider's own `cursor`, `iam`, ...) mean nothing to psycopg2.
LIBPQ_OPTIONS = frozenset(
    {
        "sslmode",
        "sslcert",
        "sslkey",
        "sslrootcert",
        "sslcrl",
        "connect_timeout",
        "application_name",
        "options",
        "keepalives",
        "keepalives_idle",
        "target_session_attrs",
    }
)


def get_connection(conn_id: str) -> Any | None:
    """The Airflow connection `conn_id`, or None when no secrets backend defines it."""
    from airflow.sdk import BaseHook
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return BaseHook.get_connection(conn_id)
    except AirflowNotFoundException:
        return None


def _extra(conn: Any) -> dict[str, Any]:
    try:
        extra = conn.extra_dejson
    except Exception:  # malformed extra JSON: the fields alone still make a URL
        return {}
    return extra if isinstance(extra, dict) else {}


def database_url_from_connection(conn: Any) -> str:
    """A SQLAlchemy URL for a postgres (through the provider's `PostgresHook`, so IAM tokens
    and `sqlalchemy_query` work as for any Airflow task) or sqlite Airflow connection."""
    kind = (conn.conn_type or "").lower()
    if kind in ("postgres", "postgresql"):
        from airflow.providers.postgres.hooks.postgres import PostgresHook

        extra = _extra(conn)
        hook = PostgresHook(
            postgres_conn_id=conn.conn_id,
            connection=conn,  # the connection already fetched: one secrets-backend lookup
            # psycopg2 is what brandmon installs; a connection may name another driver
            sqlalchemy_scheme=None if extra.get("sqlalchemy_scheme") else "postgresql+psycopg2",
        )
        url = hook.sqlalchemy_url
        # libpq options kept in the extra (the way the provider's own get_conn passes them)
        libpq = {k: str(v) for k, v in extra.items() if k in LIBPQ_OPTIONS and v is not None}
        if libpq:
            url = url.update_query_dict({**libpq, **dict(url.query)})
        return url.render_as_string(hide_password=False)
    if kind == "sqlite":
        path = conn.host or conn.schema
        if not path:
            raise ConfigError(
                f"Airflow connection {conn.conn_id!r} (sqlite) needs the database file path as host"
            )
        return f"sqlite:///{path}"
    raise ConfigError(
        f"Airflow connection {conn.conn_id!r} has type {conn.conn_type!r}; brandmon needs a postgres "
        "(or sqlite) connection for its database"
    )


def aws_from_connection(conn_id: str) -> tuple[str | None, Any, str | None]:
    """(S3 endpoint URL, boto3 Session, region) from the amazon provider's `AwsBaseHook`.

    The hook resolves the connection the way every Airflow AWS operator does: keys in the
    connection, or none (boto3's default chain: instance/IAM roles, profiles), `role_arn`
    assumed roles, `profile_name`, `region_name`, `endpoint_url` or
    `service_config.s3.endpoint_url` (MinIO). Nothing is written into the environment.
    """
    from airflow.providers.amazon.aws.hooks.base_aws import AwsBaseHook

    hook = AwsBaseHook(aws_conn_id=conn_id, client_type="s3")
    config = hook.conn_config
    endpoint = config.get_service_endpoint_url("s3")
    session = hook.get_session(region_name=hook.region_name)
    return (str(endpoint) if endpoint else None), session, hook.region_name


def _mask(values: Iterable[str]) -> None:
    """Register values with Airflow's log masker (a no-op outside Airflow)."""
    try:
        from airflow.sdk.log import mask_secret
    except ImportError:  # pragma: no cover - Airflow is a dependency, but be safe
        return
    for value in values:
        if value:
            mask_secret(value)


def settings_from_airflow(env: Mapping[str, str] | None = None) -> Settings:
    """`load_settings(env)` with the database and the lake's S3 client taken from Airflow
    connections (through the postgres and amazon providers' hooks) when they exist; the
    settings remember the connection ids, so an error names the connection to fix."""
    settings = load_settings(env=None if env is None else dict(env))
    changes: dict[str, Any] = {}

    db_conn = get_connection(settings.db_conn_id)
    if db_conn is not None:
        _mask([db_conn.password or ""])
        source = f"the Airflow connection {db_conn.conn_id!r}"
        url = database_url_from_connection(db_conn)
        from pipeline.settings import check_database_url

        changes["database_url"] = check_database_url(url, source)
        changes["database_url_source"] = source
        log.info("database from Airflow connection %r: %s", db_conn.conn_id, redact_url(url))

    aws_conn = get_connection(settings.aws_conn_id)
    if aws_conn is not None:
        _mask([aws_conn.password or "", str(_extra(aws_conn).get("aws_session_token") or "")])
        endpoint, session, region = aws_from_connection(aws_conn.conn_id)
        changes["s3_session"] = session
        changes["s3_source"] = f"the Airflow connection {aws_conn.conn_id!r}"
        if endpoint:
            # userinfo in an endpoint_url is a secret too: masked in task logs, never logged
            _mask(url_passwords(endpoint))
            changes["s3_endpoint_url"] = endpoint
            changes["s3_endpoint_source"] = f"the Airflow connection {aws_conn.conn_id!r} (extra endpoint_url)"
        log.info(
            "S3 from Airflow connection %r: endpoint %s, region %s, credentials %s",
            aws_conn.conn_id,
            redact_url(endpoint) if endpoint else "AWS default",
            region or "default",
            "from the connection" if aws_conn.login else "from the hook's chain (role, profile, environment)",
        )
    return settings.with_overrides(**changes) if changes else settings


def alert_transport() -> Any:
    """How a task sends alerts: Airflow connections through the Slack and SMTP providers' hooks
    (SlackWebhookHook, SmtpHook); env-var destinations as on the command line."""
    from pipeline.alerts.transport import AirflowTransport

    return AirflowTransport()


@contextlib.contextmanager
def task_context(check: bool = True) -> Iterator[Any]:
    """A pipeline `Context` for one task run, built from Airflow connections, always closed."""
    from pipeline.context import open_context

    ctx = open_context(settings_from_airflow(), check=check)
    try:
        yield ctx
    finally:
        ctx.close()


def interval_days(start: Any, end: Any) -> list[dt.date]:
    """The UTC days a half-open interval [start, end) touches (a zero-width one: its day)."""
    s, e = as_utc(start), as_utc(end)
    last = (e - dt.timedelta(microseconds=1)).date() if e > s else s.date()
    days, day = [], s.date()
    while day <= last:
        days.append(day)
        day += dt.timedelta(days=1)
    return days


def report_day(windows: Iterable[Mapping[str, Any]], fallback: dt.date) -> dt.date:
    """The day to report on: the last UTC day covered by the ingest windows that led to this
    run (carried in asset-event extras as {"start", "end"} ISO strings), else `fallback`."""
    days = [
        d
        for w in windows
        if w.get("start") and w.get("end")
        for d in interval_days(w["start"], w["end"])
    ]
    return max(days) if days else fallback


# --- small pure helpers the DAG tasks use -------------------------------------------------


def select_sources(settings: Settings, wanted: Iterable[str] = ()) -> list[str]:
    """Source names to ingest: all configured ones, or the `wanted` subset (checked)."""
    names = [s.name for s in settings.sources]
    if not names:
        raise ConfigError(
            f"no sources configured in {settings.config_path or 'BRANDMON_CONFIG (unset)'}; "
            "add them under `sources:` (see README)"
        )
    wanted = list(wanted)
    unknown = sorted(set(wanted) - set(names))
    if unknown:
        raise ConfigError(f"unknown source(s) {', '.join(unknown)}; configured: {', '.join(names)}")
    return [n for n in names if not wanted or n in wanted]


def require_interval(start: Any, end: Any) -> tuple[dt.datetime, dt.datetime]:
    """The run's data interval, refusing an empty one (a trigger-style timetable)."""
    if start is None or end is None:
        raise ConfigError(
            "this task needs a data interval; run it from a scheduled or backfill DAG run"
        )
    s, e = as_utc(start), as_utc(end)
    if e <= s:
        raise ConfigError(
            f"empty data interval {s.isoformat()} -> {e.isoformat()}; brandmon_ingest needs a "
            "data-interval timetable (CronDataIntervalTimetable)"
        )
    return s, e


def counts_only(result: Mapping[str, Any] | None) -> dict[str, int]:
    """What goes into XCom from a job's result: integer counts (lists become their length)."""
    out: dict[str, int] = {}
    for key, value in (result or {}).items():
        if isinstance(value, bool | int | float):
            out[str(key)] = int(value)
        elif isinstance(value, list | tuple | set | frozenset):
            out[str(key)] = len(value)
    return out


def sum_counts(results: Iterable[Mapping[str, Any] | None]) -> dict[str, int]:
    """Totals over the mapped tasks' count dicts."""
    totals: dict[str, int] = {}
    for result in results:
        for key, value in counts_only(result).items():
            totals[key] = totals.get(key, 0) + value
    return totals


def event_windows(triggering_asset_events: Any) -> list[dict[str, Any]]:
    """The {"start", "end"} extras of the asset events that triggered this run."""
    windows: list[dict[str, Any]] = []
    if not triggering_asset_events:
        return windows
    for events in triggering_asset_events.values():
        for event in events:
            extra = getattr(event, "extra", None) or {}
            if isinstance(extra, Mapping) and extra.get("start") and extra.get("end"):
                windows.append({"start": str(extra["start"]), "end": str(extra["end"])})
    return windows


def merge_windows(windows: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """One window spanning them all (empty dict when there are none)."""
    spans = [
        (as_utc(w["start"]), as_utc(w["end"])) for w in windows if w.get("start") and w.get("end")
    ]
    if not spans:
        return {}
    return {
        "start": min(s for s, _ in spans).isoformat(),
        "end": max(e for _, e in spans).isoformat(),
    }


def choose_report_day(param: Any, triggering_asset_events: Any, run_after: Any) -> dt.date:
    """The `day` param, else the last day of the triggering windows, else the day before the run."""
    if param:
        from pipeline.dates import BadDate, parse_day

        try:
            return parse_day(param)
        except BadDate as exc:
            raise ConfigError(f"day={str(param)[:40]!r}: {exc}") from None
    base = as_utc(run_after) if run_after is not None else dt.datetime.now(dt.UTC)
    return report_day(event_windows(triggering_asset_events), (base - dt.timedelta(days=1)).date())


def train_summary(result: Mapping[str, Any]) -> dict[str, Any]:
    """The XCom of a training run: version, activated, and the numeric headline metrics."""
    metrics = result.get("metrics") or {}
    return {
        "version": result.get("version"),
        "activated": bool(result.get("activated")),
        "metrics": {
            str(k): float(v)
            for k, v in metrics.items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        },
    }


def _skip(message: str) -> None:
    """End the task as skipped: a skipped task emits no asset event (only success does)."""
    from airflow.sdk.exceptions import AirflowSkipException

    raise AirflowSkipException(message)


def activated_or_skip(summary: Mapping[str, Any]) -> str:
    """The version a training run activated; skips the task when it activated none."""
    version = str(summary.get("version") or "")
    if not summary.get("activated"):
        _skip(f"model {version or '?'} was registered but not activated (not better than the active "
              "one): no brandmon://model event")
    return version


LATE_EVENTS_LIMIT = 10  # enough to know there is a tail; never a long list over the API


def late_events(inlet_events: Any, assets: Iterable[Any], run_after: Any) -> int:
    """How many events of `assets` (at most LATE_EVENTS_LIMIT each) are newer than this run.

    Why: with one run at a time, Airflow's scheduler makes the next run from the queue entry
    of the first waiting event and consumes only events up to it; events that arrive while
    that run is being created are consumed by no run until something triggers the DAG again.
    A run that sees events newer than its own `run_after` re-triggers itself (the backlog
    event) so the next run consumes them. The events are read through the Task SDK's
    `inlet_events` (the assets must be the task's inlets), so no database access is needed.
    Terminates: the next run's `run_after` is later than every event it consumed.
    """
    if inlet_events is None or run_after is None:
        return 0
    since = as_utc(run_after)
    late = 0
    for asset in assets:
        for event in inlet_events[asset].after(since.isoformat()).limit(LATE_EVENTS_LIMIT):
            stamp = getattr(event, "timestamp", None)
            if stamp is not None and as_utc(stamp) > since:
                late += 1
    return late


def late_or_skip(late: int) -> None:
    """Let `requeue` emit the backlog event only when events newer than this run exist."""
    if late <= 0:
        _skip("no asset event newer than this run: no backlog event")


def backlog_or_skip(batches_left: int, totals: Mapping[str, Any], late: int = 0) -> None:
    """Let `requeue` emit the backlog event when work is left AND this run made progress, or
    when asset events newer than this run exist (`late_events`: they must be consumed).

    Requiring progress (images scored or found corrupt) means images that can never be scored
    cannot make the detect DAG trigger itself forever; they wait for the next ingest or model.
    """
    if late > 0:
        return
    if batches_left <= 0:
        _skip("no image left to score: no backlog event")
    if int(totals.get("scored", 0) or 0) + int(totals.get("corrupt", 0) or 0) <= 0:
        log.warning("%d batch(es) still pending but this run scored none: not re-triggering "
                    "(the next ingest or model activation will)", batches_left)
        _skip("pending work but no progress: no backlog event")


_TYPES = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}

# What a triggered run may ask for: a training run holds a TensorFlow pool slot and a worker's
# memory, so each numeric option is bounded (a typo of 10**9 epochs, a 100000 px input or a
# billion synthetic negatives fails the run at once instead of exhausting the worker).
TRAIN_OPTION_RANGES: dict[str, tuple[float, float]] = {
    "input_size": (32, 1024),
    "epochs": (0, 500),
    "head_epochs": (0, 1000),
    "batch_size": (1, 1024),
    "learning_rate": (1e-8, 1.0),
    "finetune_learning_rate": (1e-9, 1.0),
    "dropout": (0.0, 0.95),
    "bn_momentum": (0.0, 1.0),
    "upsample": (0.0, 10.0),
    "synthetic_negatives": (0, 10_000),
    "synthetic_size": (32, 1024),
    "matcher_workers": (1, 64),
    "time_budget_s": (1.0, 12 * 3600.0),  # the train task's execution_timeout
    "crop_net_budget_s": (0.0, 12 * 3600.0),
    "seed": (0, 2**32 - 1),  # numpy's seed range
}
SAMPLE_OPTION_RANGES: dict[str, tuple[float, float]] = {
    "margin": (0.0, 2.0),
    "negatives_train": (0, 50),
    "negatives_eval": (0, 50),
    "min_region": (8, 4096),
}


def _check_range(name: str, value: Any, bounds: tuple[float, float]) -> None:
    """A numeric option within `bounds` (and finite); None and bools are checked elsewhere."""
    if value is None or isinstance(value, bool) or not isinstance(value, int | float):
        return
    lo, hi = bounds
    if not lo <= value <= hi:  # also refuses nan and inf; exact for a huge int (math.isfinite would overflow)
        ends = [str(int(b)) if float(b).is_integer() else f"{b:g}" for b in bounds]
        raise ConfigError(f"train option {name}={shown(value)} is out of range; use {ends[0]}..{ends[1]}")


def _check_samples(value: Any) -> None:
    """The `samples` option: an object of SampleSpec fields with numbers in range."""
    if not isinstance(value, Mapping):
        raise ConfigError(f"train option samples={shown(value)} must be an object, e.g. {{\"margin\": 0.15}}")
    known = {**SAMPLE_OPTION_RANGES, "whole_positive": None}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ConfigError(f"unknown samples option(s) {', '.join(cut(str(k)) for k in unknown)}; known: {', '.join(sorted(known))}")
    for key, item in value.items():
        if key == "whole_positive":
            if not isinstance(item, bool):
                raise ConfigError(f"train option samples.whole_positive={shown(item)} must be true or false")
            continue
        if isinstance(item, bool) or not isinstance(item, int | float) or (key != "margin" and not isinstance(item, int)):
            raise ConfigError(f"train option samples.{key}={shown(item)} must be a {'number' if key == 'margin' else 'whole number'}")
        _check_range(f"samples.{key}", item, SAMPLE_OPTION_RANGES[key])


def _check_fractions(value: Any) -> None:
    """The `fractions` option: three shares (train, val, test) in [0, 1] that sum to 1."""
    import math

    ok = (
        isinstance(value, list | tuple)
        and len(value) == 3
        and all(isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v) and 0 <= v <= 1 for v in value)
        and abs(sum(value) - 1.0) < 1e-6
        and value[0] > 0
    )
    if not ok:
        raise ConfigError(f"train option fractions={cut(str(value))} must be [train, val, test] shares summing to 1, e.g. [0.7, 0.15, 0.15]")


def check_train_options(options: Any) -> dict[str, Any]:
    """The train DAG's `options` param, checked against `TrainConfig` (types and ranges:
    `TRAIN_OPTION_RANGES`) before anything loads; a bad one is a ConfigError of one line
    naming the option."""
    if options is None:
        return {}
    if not isinstance(options, Mapping):
        raise ConfigError(f"train options must be a JSON object of settings, got {type(options).__name__}")
    from pipeline.detector.data import DataError
    from pipeline.detector.metrics import THRESHOLD_RULES
    from pipeline.detector.training.config import (
        CROP_NET_CHOICES,
        FUSION_CHOICES,
        MATCHER_CHOICES,
        check_mode,
        option_fields,
    )

    fields = option_fields()
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(f"unknown train option(s) {', '.join(cut(str(k)) for k in unknown)}; known: {', '.join(sorted(fields))}")
    for key, value in options.items():
        names = [t.strip() for t in str(fields[key].type).split("|")]
        if not all(n in _TYPES for n in names):
            continue  # tuples and nested specs: TrainConfig itself checks them
        allowed = tuple(t for n in names for t in _TYPES[n])
        if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
            raise ConfigError(f"train option {key}={shown(value)} must be {' or '.join(names)}")
    for key, value in options.items():
        if key in TRAIN_OPTION_RANGES:
            _check_range(key, value, TRAIN_OPTION_RANGES[key])
    if "samples" in options:
        _check_samples(options["samples"])
    if "fractions" in options:
        _check_fractions(options["fractions"])
    mode = options.get("mode")
    if mode is not None and mode != "auto":
        try:
            check_mode(str(mode))
        except DataError:
            raise ConfigError(
                f"train option mode={shown(mode)} is not valid; use auto, head, full or finetune:N "
                "(N = 1..11: how many top Inception blocks also train, e.g. finetune:2)"
            ) from None
    # the named choices, exactly as resolve_config refuses them (case matters: `Wilson` is not `wilson`)
    for key, choices in (("matcher", MATCHER_CHOICES), ("crop_net", CROP_NET_CHOICES),
                         ("threshold_rule", THRESHOLD_RULES), ("fusion", FUSION_CHOICES)):
        value = options.get(key)
        if value is not None and value not in choices:
            said = ", ".join(choices[:-1]) + f" or {choices[-1]}"
            raise ConfigError(f"train option {key}={shown(value)} is not valid; use {said}")
    return dict(options)


# --- failure summaries -------------------------------------------------------------------



def scrub(text: str, secrets: Iterable[str] = ()) -> str:
    """Remove credentials from free text: URL passwords and secret parameters, key=value
    secrets, known values (`pipeline.redact.scrub_text`)."""
    return scrub_text(text, secrets)


def _when(value: Any) -> str:
    if value is None:
        return "none"
    try:
        return as_utc(value).isoformat()
    except (TypeError, ValueError):
        return str(value)


def failure_summary(context: Mapping[str, Any]) -> str:
    """One paragraph: which DAG/task/interval failed, with what, and where to look next."""
    ti = context.get("task_instance") or context.get("ti")
    dag = context.get("dag")
    dag_id = getattr(ti, "dag_id", None) or getattr(dag, "dag_id", None) or "?"
    task_id = getattr(ti, "task_id", None) or "?"
    map_index = getattr(ti, "map_index", -1)
    try_number = getattr(ti, "try_number", None)
    run_id = context.get("run_id") or getattr(context.get("dag_run"), "run_id", None) or "?"
    exc = context.get("exception")
    if exc is None:
        what = "no exception recorded (the task was marked failed or timed out)"
    else:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        secrets = secret_env_values()
        what = (
            f"{type(exc).__name__}: {scrub(message, secrets)[:500]}"
            if message
            else type(exc).__name__
        )
    where = f"{task_id}[{map_index}]" if isinstance(map_index, int) and map_index >= 0 else task_id
    attempt = f" (attempt {try_number})" if try_number else ""
    return (
        f"brandmon task failed: dag={dag_id} task={where}{attempt} run={run_id} "
        f"interval={_when(context.get('data_interval_start'))} -> {_when(context.get('data_interval_end'))}: "
        f"{what}. Every task is idempotent over its interval: fix the cause and clear the task "
        f"(or re-run the backfill) to retry."
    )


def log_failure(context: Mapping[str, Any]) -> str:
    """The `on_failure_callback` body: log the summary (and return it, for tests)."""
    summary = failure_summary(context)
    log.error("%s", summary)
    return summary
