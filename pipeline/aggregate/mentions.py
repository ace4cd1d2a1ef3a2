"""Mentions: text mentions of a day's posts, and the active detector model for image mentions.

Text mentions need Unicode-aware matching, which SQL cannot do portably, so post texts are read
here, matched in Python (`textmatch`) and written to `text_mentions` inside the caller's
transaction. Matching is incremental: `text_match_state` records, per post, the
`content_hash` and catalogue fingerprint its mentions were matched from, and only posts whose
text changed, that were never matched, or were matched under another catalogue are matched
again. Recomputing a day where nothing changed is then one indexed query, not 27,000 regex
runs, and a catalogue change still re-matches every post of the days restated.

Image mentions stay in SQL (see `daily`): a stored image of a post mentions brand B (or its
product) when the *active* model version detected a class that `logo_class_map` maps to B
with a score at or above that version's `threshold`. `active_model` reads that version and
the precision/recall it measured, which turn raw image counts into expected true mentions.
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, delete, insert, or_, select

from pipeline.aggregate.textmatch import Matcher
from pipeline.database import upsert
from pipeline.detector.registry import active_row
from pipeline.schema import posts, text_match_state, text_mentions


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


def refresh_text_mentions(conn: Connection, matcher: Matcher, day: dt.date, fingerprint: str) -> dict[str, int]:
    """Match the day's posts that need it and bring their text_mentions rows up to date.

    A post needs matching when it has no `text_match_state` row, or one with another
    `content_hash` (edited) or catalogue `fingerprint`. Of those, only the posts whose matches
    changed are rewritten, so a re-run writes nothing (at 10M posts, deleting and re-inserting
    a day's 20,000 rows took 4 s). Returns {"posts_matched", "mentions_rewritten"}.
    """
    day_plan_settings(conn)
    start, end = day_bounds(day)
    st = text_match_state.c
    todo = (
        select(posts.c.id, posts.c.text, posts.c.content_hash)
        .select_from(posts.outerjoin(text_match_state, st.post_id == posts.c.id))
        .where(posts.c.posted_at >= start, posts.c.posted_at < end)
        .where(or_(st.post_id.is_(None), st.content_hash != posts.c.content_hash, st.catalogue != fingerprint))
    )
    new: dict[int, list[dict[str, Any]]] = {}
    state: list[dict[str, Any]] = []
    for post_id, body, chash in conn.execute(todo):
        state.append({"post_id": post_id, "content_hash": chash, "catalogue": fingerprint})
        rows = text_mention_rows(post_id, matcher.match(body))
        if rows:
            new[post_id] = rows
    if not state:
        return {"posts_matched": 0, "mentions_rewritten": 0}
    ids = [r["post_id"] for r in state]
    old: dict[int, list[dict[str, Any]]] = {}
    tm = text_mentions.c
    for i in range(0, len(ids), 5000):
        q = select(tm.post_id, tm.brand, tm.product, tm.terms).where(tm.post_id.in_(ids[i : i + 5000]))
        for r in conn.execute(q):
            old.setdefault(r.post_id, []).append({"brand": r.brand, "product": r.product, "terms": r.terms})
    changed, rows = diff_text_mentions(old, new)
    for i in range(0, len(changed), 5000):
        conn.execute(delete(text_mentions).where(tm.post_id.in_(changed[i : i + 5000])))
    for i in range(0, len(rows), 5000):
        conn.execute(insert(text_mentions), rows[i : i + 5000])
    upsert(conn, text_match_state, state, keys=["post_id"], chunk_size=5000)
    return {"posts_matched": len(state), "mentions_rewritten": len(changed)}


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
    classes: tuple[str, ...] = ()

    def factor(self) -> float | None:
        if self.version is None:
            return 1.0  # no model: there are no image mentions to correct
        return correction_factor(*precision_recall(self.metrics))


def active_model(conn: Connection) -> ActiveModel:
    """The active model version (`registry.active_row`), or an empty one."""
    row = active_row(conn)
    if row is None:
        return ActiveModel()
    return ActiveModel(version=row["version"], threshold=float(row["threshold"]), metrics=dict(row["metrics"] or {}),
                       classes=tuple(str(c) for c in (row["classes"] or ())))

