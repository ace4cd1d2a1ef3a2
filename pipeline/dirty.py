"""Dirty days: the queue of UTC days whose aggregates must be recomputed.

Ingestion marks the days of new or edited posts, storing an image the day of its post and
the later days of posts carrying the same image (their re-post counts may change), detection
the days of posts whose images were (re-)scored, and activating a model (or changing its threshold) the days whose images
either version scored; `brandmon aggregate` recomputes exactly those days and clears them in
the same transaction, so a crash in between leaves the day dirty and the re-run recomputes it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import Connection, bindparam, delete, select, text

from pipeline.database import upsert
from pipeline.schema import UTCDateTime, dirty_days, post_images, posts, utcnow


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


def mark_days_of_stored(conn: Connection, stored: Iterable[tuple[int, str]], reason: str = "image-stored") -> int:
    """Mark the days an image newly stored for some posts changes: each post's own day (its
    image mentions count now) and the days of later posts carrying the same image (they may
    turn into re-posts). `stored` holds (post id, sha256) pairs. Returns the days marked.

    Why: detection marks the days of the images it scores, but an image whose content was
    already scored (a repost, a retried download) is not scored again, so without this its
    day keeps the counts aggregated before the image was stored (a concurrent aggregation
    between ingest's commit and its image fetch, or `brandmon images` retrying a failure).
    """
    pairs = sorted(set(stored))
    if not pairs:
        return 0
    days: set[dt.date] = set()
    first: dict[str, dt.datetime] = {}
    for i in range(0, len(pairs), 500):
        part = pairs[i : i + 500]
        q = select(posts.c.id, posts.c.posted_at).where(posts.c.id.in_(sorted({pid for pid, _ in part})))
        when = {pid: ts.astimezone(dt.UTC) for pid, ts in conn.execute(q)}
        for pid, sha in part:
            if pid in when:
                days.add(when[pid].date())
                first[sha] = min(first.get(sha, when[pid]), when[pid])
    shas = sorted(first)
    for i in range(0, len(shas), 500):
        q = (
            select(post_images.c.sha256, posts.c.posted_at)
            .join(posts, posts.c.id == post_images.c.post_id)
            .where(post_images.c.sha256.in_(shas[i : i + 500]))
        )
        days.update(ts.astimezone(dt.UTC).date() for sha, ts in conn.execute(q) if ts.astimezone(dt.UTC) >= first[sha])
    return mark_days(conn, days, reason)


def _utc_day(conn: Connection, column: str) -> str:
    """SQL for the UTC calendar day of a timestamp column (SQLite stores naive UTC text)."""
    if conn.dialect.name == "postgresql":
        return f"CAST(({column} AT TIME ZONE 'UTC') AS DATE)"
    return f"DATE({column})"


def mark_days_of_model(conn: Connection, versions: Iterable[str | None], reason: str = "model-change") -> int:
    """Mark every posting day of a post carrying an image that one of `versions` scored.

    Called when the active model changes (both the old and the new version: their days count
    image mentions differently now) or its threshold does. One INSERT ... SELECT: at 10M posts
    the days of millions of images never travel to Python. Returns the days marked.
    """
    wanted = sorted({v for v in versions if v})
    if not wanted:
        return 0
    sql = f"""
    INSERT INTO dirty_days (day, reason, marked_at)
    SELECT DISTINCT {_utc_day(conn, "p.posted_at")}, :reason, :now
    FROM image_scores s
    JOIN post_images pi ON pi.sha256 = s.image_sha256
    JOIN posts p ON p.id = pi.post_id
    WHERE s.model_version IN :versions
    ON CONFLICT (day) DO UPDATE SET reason = excluded.reason, marked_at = excluded.marked_at
    """
    stmt = text(sql).bindparams(bindparam("versions", expanding=True), bindparam("now", type_=UTCDateTime()))
    # An INSERT (no leading WITH): pysqlite and psycopg both report its rowcount.
    return int(conn.execute(stmt, {"versions": wanted, "reason": reason[:64], "now": utcnow()}).rowcount)


def pending_days(conn: Connection) -> list[dt.date]:
    return [d for (d,) in conn.execute(select(dirty_days.c.day).order_by(dirty_days.c.day))]


def clear_days(conn: Connection, days: Iterable[dt.date]) -> None:
    days = list(days)
    if days:
        conn.execute(delete(dirty_days).where(dirty_days.c.day.in_(days)))
