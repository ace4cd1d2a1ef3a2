"""Mentions: text mentions of a day's posts, and the active detector model for image mentions.

Text mentions need Unicode-aware matching, which SQL cannot do portably, so the day's post
texts are read here, matched in Python (`textmatch`) and written to `text_mentions` (delete +
insert for the day's posts, inside the caller's transaction: re-running gives the same rows).

Image mentions stay in SQL (see `daily`): a stored image of a post mentions brand B when the
*active* model version detected class B on it with a score at or above that version's
`threshold`. `active_model` reads that version and the precision/recall it measured, which
turn raw image counts into expected true mentions.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, bindparam, delete, insert, select, text

from pipeline.aggregate.textmatch import Matcher
from pipeline.schema import UTCDateTime, model_versions, posts, text_mentions


def day_bounds(day: dt.date) -> tuple[dt.datetime, dt.datetime]:
    """[start, end) of a UTC day as aware datetimes."""
    start = dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)
    return start, start + dt.timedelta(days=1)


def day_plan_settings(conn: Connection) -> None:
    """Postgres planner settings for the statements of one day, for this transaction only.

    A day touches a few thousand rows through index probes on hot pages, but with the default
    costs (random_page_cost 4, made for spinning disks) the planner sometimes prices 30,000
    probes of `post_images` above a hash join over the whole table, and the plan flips
    between days: at 10M posts a day took 0.7 s or 5 s depending on the plan. 1.1 is the
    usual setting for SSDs and cached data. The first-seen-image subquery's estimates also
    push the cost over `jit_above_cost`, and compiling the plan took 6 s of an 8 s day:
    JIT off. SET LOCAL ends with the transaction.
    """
    if conn.dialect.name == "postgresql":
        conn.exec_driver_sql("SET LOCAL jit = off")
        conn.exec_driver_sql("SET LOCAL random_page_cost = 1.1")


def text_mention_rows(post_id: int, hits) -> list[dict[str, Any]]:
    """text_mentions rows for one post: product '' is the brand itself."""
    return [
        {"post_id": post_id, "brand": h.brand, "product": h.product or "", "terms": list(h.terms)}
        for h in hits
    ]


def diff_text_mentions(
    old: dict[int, list[dict[str, Any]]], new: dict[int, list[dict[str, Any]]]
) -> tuple[list[int], list[dict[str, Any]]]:
    """Posts whose mention rows changed (their old rows go) and the rows to insert for them."""
    def key(rows: list[dict[str, Any]]) -> list[tuple]:
        return sorted((r["brand"], r["product"], tuple(r["terms"] or ())) for r in rows)

    changed = sorted(pid for pid in set(old) | set(new) if key(old.get(pid, [])) != key(new.get(pid, [])))
    return changed, [r for pid in changed for r in new.get(pid, [])]


def refresh_text_mentions(conn: Connection, matcher: Matcher, day: dt.date) -> int:
    """Re-match the texts of the posts of `day` and bring their text_mentions rows up to date.

    Only the posts whose matches changed are rewritten, so a re-run writes nothing (at 10M
    posts, deleting and re-inserting a day's 20,000 rows took 4 s; matching takes 0.4 s).
    Returns the number of the day's mention rows.
    """
    day_plan_settings(conn)
    start, end = day_bounds(day)
    in_day = (posts.c.posted_at >= start) & (posts.c.posted_at < end)
    new: dict[int, list[dict[str, Any]]] = {}
    for post_id, body in conn.execute(select(posts.c.id, posts.c.text).where(in_day)):
        rows = text_mention_rows(post_id, matcher.match(body))
        if rows:
            new[post_id] = rows
    old: dict[int, list[dict[str, Any]]] = {}
    existing = select(text_mentions.c.post_id, text_mentions.c.brand, text_mentions.c.product,
                      text_mentions.c.terms).join(posts, posts.c.id == text_mentions.c.post_id).where(in_day)
    for r in conn.execute(existing):
        old.setdefault(r.post_id, []).append({"brand": r.brand, "product": r.product, "terms": r.terms})
    changed, rows = diff_text_mentions(old, new)
    for i in range(0, len(changed), 5000):
        conn.execute(delete(text_mentions).where(text_mentions.c.post_id.in_(changed[i : i + 5000])))
    for i in range(0, len(rows), 5000):
        conn.execute(insert(text_mentions), rows[i : i + 5000])
    return sum(len(v) for v in new.values())


def _number(value: Any) -> float | None:
    try:
        f = float(value)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def precision_recall(metrics: dict[str, Any] | None) -> tuple[float | None, float | None]:
    """The logo precision and recall a model version measured on its held-out test split.

    Accepted shapes of `model_versions.metrics` (first complete pair wins):
    `logo_precision`/`logo_recall`, `logo: {precision, recall}`, and the plain top-level
    `precision`/`recall` that `pipeline.detector` stores (logo-vs-no-logo figures).
    """
    m = metrics or {}
    logo = m.get("logo") if isinstance(m.get("logo"), dict) else {}
    for p, r in (
        (m.get("logo_precision"), m.get("logo_recall")),
        (logo.get("precision"), logo.get("recall")),
        (m.get("precision"), m.get("recall")),
    ):
        p, r = _number(p), _number(r)
        if p is not None and r is not None:
            return p, r
    return None, None


def correction_factor(precision: float | None, recall: float | None) -> float | None:
    """Expected true image mentions per detected one: precision / recall (None if unknown).

    Of N detections, N*precision are true; they are `recall` of all true logo posts, so the
    expected number of true logo posts is N * precision / recall.
    """
    if precision is None or recall is None or recall <= 0 or precision < 0:
        return None
    return precision / recall


@dataclass(frozen=True)
class ActiveModel:
    """The model version whose detections count as image mentions (None fields: no model)."""

    version: str | None = None
    threshold: float = 1.0
    metrics: dict[str, Any] = field(default_factory=dict)

    def factor(self) -> float | None:
        if self.version is None:
            return 1.0  # no model: there are no image mentions to correct
        return correction_factor(*precision_recall(self.metrics))


def active_model(conn: Connection) -> ActiveModel:
    """The active model version (the newest one if several are flagged), or an empty one."""
    row = conn.execute(
        select(model_versions.c.version, model_versions.c.threshold, model_versions.c.metrics)
        .where(model_versions.c.active.is_(True))
        .order_by(model_versions.c.created_at.desc(), model_versions.c.version.desc())
        .limit(1)
    ).first()
    if row is None:
        return ActiveModel()
    return ActiveModel(version=row.version, threshold=float(row.threshold), metrics=dict(row.metrics or {}))


IMAGE_MENTIONS_SQL = text(
    """
    SELECT DISTINCT pi.post_id, pi.sha256, d.class_name AS brand
    FROM posts p
    JOIN post_images pi ON pi.post_id = p.id
    JOIN detections d ON d.image_sha256 = pi.sha256
    WHERE p.posted_at >= :start AND p.posted_at < :end
      AND pi.status = 'stored' AND d.model_version = :mv AND d.score >= :thr
    ORDER BY pi.post_id, pi.sha256, d.class_name
    """
).bindparams(bindparam("start", type_=UTCDateTime()), bindparam("end", type_=UTCDateTime()))


def image_mentions(conn: Connection, day: dt.date, model: ActiveModel) -> list[tuple[int, str, str]]:
    """(post_id, sha256, brand) image mentions of a day's posts, for inspection and reports."""
    if model.version is None:
        return []
    start, end = day_bounds(day)
    rows = conn.execute(IMAGE_MENTIONS_SQL, {"start": start, "end": end, "mv": model.version, "thr": model.threshold})
    return [(int(r.post_id), r.sha256, r.brand) for r in rows]
