"""Dirty days: the queue of UTC days whose aggregates must be recomputed.

Ingestion marks the days of new or edited posts, detection the days of posts whose images
were (re-)scored; `brandmon aggregate` recomputes exactly those days and clears them in the
same transaction, so a crash in between leaves the day dirty and the re-run recomputes it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import Connection, delete, select

from pipeline.database import upsert
from pipeline.schema import dirty_days, post_images, posts, utcnow


def mark_days(conn: Connection, days: Iterable[dt.date], reason: str) -> int:
    rows = [{"day": d, "reason": reason[:64], "marked_at": utcnow()} for d in sorted(set(days))]
    return upsert(conn, dirty_days, rows, keys=["day"], update=["reason", "marked_at"])


def mark_days_of_images(conn: Connection, shas: Iterable[str], reason: str = "rescored") -> int:
    """Mark the posting days of every post that carries one of these images."""
    shas = list(set(shas))
    days: set[dt.date] = set()
    for i in range(0, len(shas), 500):
        q = (
            select(posts.c.posted_at)
            .join(post_images, post_images.c.post_id == posts.c.id)
            .where(post_images.c.sha256.in_(shas[i : i + 500]))
            .distinct()
        )
        days.update(ts.astimezone(dt.UTC).date() for (ts,) in conn.execute(q))
    return mark_days(conn, days, reason)


def pending_days(conn: Connection) -> list[dt.date]:
    return [d for (d,) in conn.execute(select(dirty_days.c.day).order_by(dirty_days.c.day))]


def clear_days(conn: Connection, days: Iterable[dt.date]) -> None:
    days = list(days)
    if days:
        conn.execute(delete(dirty_days).where(dirty_days.c.day.in_(days)))
