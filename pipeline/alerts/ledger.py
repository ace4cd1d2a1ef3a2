"""The alert ledger: claim a row, send, mark it; what makes an alert go out once.

Protocol, per (rule, day, key, destination):

1. claim: `INSERT ... ON CONFLICT DO NOTHING` a row in state `sending` carrying this run's
   random token. Only one inserter wins (Postgres makes a concurrent second insert wait for
   the first to commit, then do nothing; SQLite serialises writers), so two aggregate runs
   never both own a row. Existing rows are claimed again by a conditional UPDATE only when
   `failed` with attempts left, or `sending` with a claim older than the lease (a crash).
2. send, outside any transaction.
3. mark: `sent` (with `sent_at`) or `failed` (with the scrubbed error), only if the row still
   carries our token.

Crash between send and mark: the row stays `sending` and is claimed again once the lease
(`alerts.lease_s`, default 10 min, far above the bounded send time) has passed, so the alert
can go out twice: at-least-once. The window is the few milliseconds between the receiver's
answer and the UPDATE; a lost spike alert costs more than a duplicate, and the webhook body
carries an `id` (rule|day|key) receivers can de-duplicate on. At-most-once would mean marking
before sending, and a crash would then lose the alert silently.
"""

from __future__ import annotations

import datetime as dt
import secrets
from collections.abc import Iterable, Sequence
from typing import Any

from sqlalchemy import Connection, and_, or_, select, update

from pipeline.database import _insert
from pipeline.schema import alert_ledger

STATUSES = ("sending", "sent", "failed", "skipped")


def new_token() -> str:
    return secrets.token_hex(16)


def claim_new(conn: Connection, rows: Iterable[dict[str, Any]], token: str, now: dt.datetime) -> int:
    """Insert the rows (rule, day, key, destination, late, payload, status) that are new;
    'sending' ones carry `token`. Returns how many were inserted."""
    inserted = 0
    for row in rows:
        values = {**row, "attempts": 0, "created_at": now, "updated_at": now,
                  "claim": token if row["status"] == "sending" else None,
                  "claimed_at": now if row["status"] == "sending" else None}
        stmt = _insert(conn, alert_ledger).values(values).on_conflict_do_nothing(
            index_elements=["rule", "day", "key", "destination"])
        inserted += max(0, conn.execute(stmt).rowcount or 0)
    return inserted


def claim_retries(conn: Connection, rules: Sequence[str], destinations: Sequence[str], token: str,
                  now: dt.datetime, max_attempts: int, lease_s: float) -> int:
    """Claim failed rows with attempts left and crashed 'sending' rows past the lease."""
    if not rules or not destinations:
        return 0
    t = alert_ledger.c
    stale = now - dt.timedelta(seconds=lease_s)
    res = conn.execute(
        update(alert_ledger)
        .where(t.rule.in_(list(rules)), t.destination.in_(list(destinations)),
               or_(and_(t.status == "failed", t.attempts < max_attempts),
                   and_(t.status == "sending", t.claimed_at < stale)))
        .values(status="sending", claim=token, claimed_at=now, updated_at=now)
    )
    return max(0, res.rowcount or 0)


def claimed(conn: Connection, token: str) -> list[dict[str, Any]]:
    t = alert_ledger.c
    q = select(alert_ledger).where(t.claim == token, t.status == "sending").order_by(t.day, t.rule, t.key, t.id)
    return [dict(r) for r in conn.execute(q).mappings()]


def mark(conn: Connection, row_id: int, token: str, now: dt.datetime, *, ok: bool, error: str | None,
         tried: bool = True) -> bool:
    """Record the outcome of our claim; False when the row is no longer ours."""
    t = alert_ledger.c
    values: dict[str, Any] = {"status": "sent" if ok else "failed", "claim": None, "updated_at": now,
                              "last_error": None if ok else (error or "failed")[:1000]}
    if tried:
        values["attempts"] = t.attempts + 1
    if ok:
        values["sent_at"] = now
    res = conn.execute(update(alert_ledger).where(t.id == row_id, t.claim == token).values(**values))
    return (res.rowcount or 0) == 1


def list_rows(conn: Connection, since: dt.date | None = None, status: str | None = None,
              limit: int = 10000) -> list[dict[str, Any]]:
    """Ledger rows (newest day first), for `brandmon alerts list`."""
    t = alert_ledger.c
    q = select(alert_ledger)
    if since is not None:
        q = q.where(t.day >= since)
    if status is not None:
        q = q.where(t.status == status)
    q = q.order_by(t.day.desc(), t.rule, t.key, t.destination).limit(limit)
    return [dict(r) for r in conn.execute(q).mappings()]
