"""What the aggregate step, the DAG and the CLI call: dispatch, test, list.

`dispatch_alerts(ctx, days)` runs after the days' signals are stored: it evaluates the rules
on those days, claims the new (rule, day, key, destination) rows and the retryable old ones
in the ledger, sends them (one thread per destination, so a slow or dead destination delays
only its own alerts), and marks each outcome. It never raises: a broken destination, a
missing secret or even a ledger error becomes a count and a log line, and the aggregation
that called it succeeds.

A day more than `late_after_days` before the run date is sent marked late (a late post, a
backfill, a re-scored image changed it after the fact); one more than `max_age_days` before
is recorded as skipped and never sent (a first backfill of a year does not page anyone).
Once a destination has used up a delivery round on one alert in a run, its remaining alerts
of that run are left failed without a request (retried by the next run), so a dead endpoint
costs one bounded round per run, not one per alert.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import defaultdict
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipeline.alerts import ledger
from pipeline.alerts.config import AlertsConfig, Destination
from pipeline.alerts.message import email_subject, slack_body, text_of, webhook_body
from pipeline.alerts.rules import Alert, evaluate, sample_alert
from pipeline.alerts.transport import Outgoing, PlainTransport, deliver
from pipeline.context import Context
from pipeline.schema import utcnow

log = logging.getLogger(__name__)


def render(alert: Alert, *, test: bool, late: bool, report_url: str | None, now: dt.datetime) -> Outgoing:
    return Outgoing(
        alert_id=f"{alert.rule}|{alert.day.isoformat()}|{alert.key}",
        subject=email_subject(alert, test=test, late=late),
        text=text_of(alert, test=test, late=late, report_url=report_url),
        slack=slack_body(alert, test=test, late=late, report_url=report_url),
        webhook=webhook_body(alert, test=test, late=late, report_url=report_url, now=now),
    )


class _ReportLinks:
    """The day's report URL: under `report_base_url` if set, else in the lake if written."""

    def __init__(self, ctx: Context, cfg: AlertsConfig) -> None:
        self.ctx, self.cfg = ctx, cfg
        self.cache: dict[dt.date, str | None] = {}

    def __call__(self, day: dt.date) -> str | None:
        if day not in self.cache:
            from pipeline.aggregate.report import report_key

            key = report_key(day)
            url: str | None = None
            if self.cfg.report_base_url:
                url = f"{self.cfg.report_base_url}/{key}"
            else:
                try:
                    if self.ctx.store.exists(key):
                        url = f"{self.ctx.store.url.rstrip('/')}/{key}"
                except Exception as exc:  # the lake being down must not stop an alert
                    log.info("report link for %s unknown: %s", day, type(exc).__name__)
            self.cache[day] = url
        return self.cache[day]


def _rows_for(alerts: Iterable[Alert], cfg: AlertsConfig, today: dt.date) -> list[dict[str, Any]]:
    rows = []
    for a in alerts:
        rule = cfg.rule(a.rule)
        age = (today - a.day).days
        too_old = age > cfg.max_age_days
        for dest in rule.destinations:
            rows.append({"rule": a.rule, "day": a.day, "key": a.key, "destination": dest,
                         "late": age > cfg.late_after_days, "payload": a.payload(),
                         "status": "skipped" if too_old else "sending",
                         "last_error": f"day older than alerts.max_age_days ({cfg.max_age_days})" if too_old else None})
    return rows


def _send_destination(ctx: Context, transport: PlainTransport, cfg: AlertsConfig, dest: Destination,
                      rows: list[dict[str, Any]], token: str, links: _ReportLinks, now: dt.datetime) -> dict[str, int]:
    counts = {"sent": 0, "failed": 0, "not_tried": 0}
    broken: str | None = None
    for row in rows:
        alert = Alert.from_payload(row["rule"], row["day"], row["payload"])
        if broken is not None:
            with ctx.engine.begin() as conn:
                ledger.mark(conn, row["id"], token, utcnow(), ok=False, tried=False,
                            error=f"not tried: {dest.name} failed earlier in the same run ({broken})")
            counts["not_tried"] += 1
            continue
        out = render(alert, test=False, late=bool(row["late"]), report_url=links(alert.day), now=now)
        result = deliver(transport, dest, out, cfg)
        with ctx.engine.begin() as conn:
            ledger.mark(conn, row["id"], token, utcnow(), ok=result.ok, error=result.error)
        if result.ok:
            counts["sent"] += 1
            log.info("alert %s sent to %s%s", out.alert_id, dest.name, " (late)" if row["late"] else "")
        else:
            counts["failed"] += 1
            broken = result.error
            log.warning("alert %s to %s failed, attempt %d of %d: %s", out.alert_id, dest.name,
                        int(row["attempts"]) + 1, cfg.max_attempts, result.error)
    return counts


def dispatch_alerts(ctx: Context, days: Iterable[dt.date], *, transport: PlainTransport | None = None,
                    now: dt.datetime | None = None) -> dict[str, int]:
    """Evaluate the rules on `days`, send what is new or due for a retry; counts. Never raises."""
    cfg = ctx.settings.alerts
    if not cfg.rules:
        return {}
    counts = {"alerts_fired": 0, "alerts_new": 0, "alerts_skipped": 0, "alerts_sent": 0, "alerts_failed": 0,
              "alerts_not_tried": 0, "alerts_errors": 0}
    try:
        now = now or utcnow()
        transport = transport or PlainTransport()
        brands = [b.name for b in ctx.settings.brands]
        with ctx.engine.connect() as conn:
            alerts = evaluate(conn, cfg.rules, days, brands)
        counts["alerts_fired"] = len(alerts)
        rows = _rows_for(alerts, cfg, now.date())
        counts["alerts_skipped"] = sum(r["status"] == "skipped" for r in rows)
        token = ledger.new_token()
        with ctx.engine.begin() as conn:
            counts["alerts_new"] = ledger.claim_new(conn, rows, token, now)
            ledger.claim_retries(conn, [r.name for r in cfg.rules], [d.name for d in cfg.destinations],
                                 token, now, cfg.max_attempts, cfg.lease_s)
        with ctx.engine.connect() as conn:
            mine = ledger.claimed(conn, token)
        if not mine:
            return counts
        by_dest: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for row in mine:
            by_dest[row["destination"]].append(row)
        links = _ReportLinks(ctx, cfg)
        with ThreadPoolExecutor(max_workers=min(8, len(by_dest)), thread_name_prefix="alerts") as pool:
            futures = [pool.submit(_send_destination, ctx, transport, cfg, cfg.destination(name), rows_, token,
                                   links, now) for name, rows_ in by_dest.items()]
            for fut in futures:
                try:
                    c = fut.result()
                except Exception as exc:
                    counts["alerts_errors"] += 1
                    log.error("alerts: a destination's sender stopped: %s", type(exc).__name__)
                    continue
                counts["alerts_sent"] += c["sent"]
                counts["alerts_failed"] += c["failed"]
                counts["alerts_not_tried"] += c["not_tried"]
    except Exception as exc:  # alerts never fail the aggregation
        counts["alerts_errors"] += 1
        log.error("alerts not dispatched: %s (the aggregation itself succeeded; the next run retries)",
                  type(exc).__name__)
    return counts


def send_test(ctx: Context, rule_name: str, *, transport: PlainTransport | None = None,
              now: dt.datetime | None = None) -> list[dict[str, Any]]:
    """Send a sample of `rule_name`'s message, marked as a test, to each of its destinations.
    Nothing is written to the ledger. One result dict per destination."""
    cfg = ctx.settings.alerts
    rule = cfg.rule(rule_name)
    now = now or utcnow()
    transport = transport or PlainTransport()
    with ctx.engine.connect() as conn:
        alert = sample_alert(conn, rule, [b.name for b in ctx.settings.brands], now.date())
    out = render(alert, test=True, late=False, report_url=_ReportLinks(ctx, cfg)(alert.day), now=now)
    dests = cfg.rule_destinations(rule)
    # in parallel, as dispatch does: the command takes one round (max_total_s), not one per destination
    with ThreadPoolExecutor(max_workers=min(8, len(dests)), thread_name_prefix="alerts-test") as pool:
        outcomes = list(pool.map(lambda d: deliver(transport, d, out, cfg), dests))
    return [{"destination": d.name, "kind": d.kind, "ok": r.ok, "requests": r.requests,
             "seconds": round(r.seconds, 3), "error": r.error} for d, r in zip(dests, outcomes, strict=True)]


def list_alerts(ctx: Context, since: dt.date | None = None, status: str | None = None,
                limit: int = 10000) -> list[dict[str, Any]]:
    with ctx.engine.connect() as conn:
        return ledger.list_rows(conn, since=since, status=status, limit=limit)
