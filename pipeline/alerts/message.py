"""The words and shapes of an alert: plain text (email), Slack blocks, webhook JSON.

Pure functions of an `Alert` plus three flags (test, late, report link), so a retry days
later rebuilds exactly the message the first try sent.

Webhook JSON (schema "brandmon.alert/1"): {"schema", "id" (rule|day|key: the receiver's
idempotency key, since a crash between send and ledger update can repeat a message),
"test", "late", "rule", "kind", "day", "brand", "product", "platform", "source", "figures"
{posts, baseline, zscore, rolling_7, wow_change, share_of_voice, unique_authors,
expected_mentions, previous?}, "threshold" {...}, "report_url" (or null), "title", "text"}.
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

from pipeline.alerts.rules import Alert

SCHEMA = "brandmon.alert/1"
KIND_TITLES = {"spike": "Spike", "share_of_voice": "Share of voice", "wow": "Week over week"}


def _f(v: Any, digits: int = 1) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def _pct(v: Any, signed: bool = False) -> str:
    if v is None:
        return "n/a"
    return f"{float(v) * 100:+.0f}%" if signed else f"{float(v) * 100:.1f}%"


_CONTROL = re.compile(r"[\x00-\x1f\x7f\u2028\u2029]+")


def one_line(value: str) -> str:
    """`value` with line breaks and other control characters as one space: names from the
    catalogue go into mail headers (where a newline is refused, or would add a header) and
    one-line titles."""
    return _CONTROL.sub(" ", value)


def slack_escape(value: str) -> str:
    """Slack's mrkdwn escaping: `<!channel>`, `<@U123>` or `<http://x|y>` in a brand name are
    shown as typed, never a mention that pings everyone or a disguised link."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def subject_of(alert: Alert) -> str:
    product = "all products" if alert.product == "*" else alert.product
    platform = "all platforms" if alert.platform == "*" else alert.platform
    return one_line(f"{KIND_TITLES.get(alert.kind, alert.kind)}: {alert.brand} ({product}) on {platform}, "
                    f"{alert.day.isoformat()}")


def figure_line(alert: Alert) -> str:
    f, t = alert.figures, alert.threshold
    if alert.kind == "spike":
        return (f"{f.get('posts')} posts vs a 28-day mean of {_f(f.get('baseline'))} "
                f"(z-score {_f(f.get('zscore'), 2)}); spike: z >= {t.get('min_zscore') or 3} with at least "
                f"{t.get('min_posts')} posts")
    if alert.kind == "share_of_voice":
        level = " / ".join(x for x in (f"above {_pct(t['above'])}" if t.get("above") is not None else "",
                                       f"below {_pct(t['below'])}" if t.get("below") is not None else "") if x)
        return (f"share of voice {_pct(f.get('share_of_voice'))} (the day before: {_pct(f.get('previous'))}); "
                f"level: {level}; {f.get('posts')} posts that day")
    bound = " / ".join(x for x in (f"rise {_pct(t['above'], True)}" if t.get("above") is not None else "",
                                   f"fall {_pct(-t['below'], True)}" if t.get("below") is not None else "") if x)
    return (f"7-day mean {_f(f.get('rolling_7'))} posts/day, {_pct(f.get('wow_change'), True)} on the week before "
            f"(the day before: {_pct(f.get('previous'), True)}); bound: {bound}")


def _flags(test: bool, late: bool) -> str:
    return ("[TEST] " if test else "") + ("[late] " if late else "")


def text_of(alert: Alert, *, test: bool = False, late: bool = False, report_url: str | None = None) -> str:
    """The plain-text message (email body; Slack fallback)."""
    lines = [f"{_flags(test, late)}brandmon alert {alert.rule}: {subject_of(alert)}", "", figure_line(alert),
             f"source: {alert.source} (text, image, both or any)"]
    if late:
        lines.append(f"Late: {alert.day.isoformat()} changed after the fact (posts arrived or were scored late).")
    if test:
        lines.append("This is a test message from `brandmon alerts test`; it is not a real alert.")
    lines.append(f"Report: {report_url}" if report_url else "Report: not written yet (brandmon report --date "
                 f"{alert.day.isoformat()})")
    return "\n".join(lines) + "\n"


def email_subject(alert: Alert, *, test: bool = False, late: bool = False) -> str:
    return f"[brandmon] {_flags(test, late)}{subject_of(alert)}"


def slack_body(alert: Alert, *, test: bool = False, late: bool = False, report_url: str | None = None) -> dict[str, Any]:
    """An incoming-webhook body: `text` (notifications, fallback) plus Block Kit blocks."""
    head = f"{_flags(test, late)}{subject_of(alert)}"
    context = [f"rule `{alert.rule}`", f"source {alert.source}"]
    if report_url:
        context.append(f"<{report_url}|daily report>")
    if late:
        context.append("late: the day changed after the fact")
    if test:
        context.append("test message, not a real alert")
    return {
        "text": slack_escape(f"{head}: {figure_line(alert)}"),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": head[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": slack_escape(figure_line(alert))}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": " · ".join(context)}]},
        ],
    }


def webhook_body(alert: Alert, *, test: bool = False, late: bool = False, report_url: str | None = None,
                 now: dt.datetime | None = None) -> dict[str, Any]:
    """The generic webhook's JSON document (schema in the module docstring)."""
    return {
        "schema": SCHEMA, "id": f"{alert.rule}|{alert.day.isoformat()}|{alert.key}", "test": test, "late": late,
        "rule": alert.rule, "kind": alert.kind, "day": alert.day.isoformat(), "brand": alert.brand,
        "product": alert.product, "platform": alert.platform, "source": alert.source,
        "figures": alert.figures, "threshold": alert.threshold, "report_url": report_url,
        "title": subject_of(alert), "text": text_of(alert, test=test, late=late, report_url=report_url),
        "sent_at": (now or dt.datetime.now(dt.UTC)).isoformat(),
    }
