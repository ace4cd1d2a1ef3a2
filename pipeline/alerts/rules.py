"""Which alerts fire on which days: the rules evaluated against `mention_daily`.

Plain reads, no writes: the ledger decides what is new. A spike uses the table's own `spike`
flag (z >= 3 with at least 5 posts) or `min_zscore`; share-of-voice and week-over-week rules
fire on the day the value ENTERS the region (at or beyond the level, the day before not), so a
brand that stays above a level alerts once, not every day.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Connection, select

from pipeline.alerts.config import EACH, Rule
from pipeline.schema import mention_daily

log = logging.getLogger(__name__)

FIGURES = ("posts", "baseline", "zscore", "rolling_7", "wow_change", "share_of_voice", "unique_authors",
           "expected_mentions")


@dataclass(frozen=True)
class Alert:
    """One rule firing on one day for one key; `figures` are the day's numbers."""

    rule: str
    kind: str
    day: dt.date
    brand: str
    product: str
    platform: str
    source: str
    figures: dict[str, Any] = field(default_factory=dict)
    threshold: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return f"{self.brand}|{self.product}|{self.platform}|{self.source}"

    def payload(self) -> dict[str, Any]:
        """What the ledger stores (JSON): enough to rebuild the message on a retry."""
        return {"kind": self.kind, "brand": self.brand, "product": self.product, "platform": self.platform,
                "source": self.source, "figures": self.figures, "threshold": self.threshold}

    @classmethod
    def from_payload(cls, rule: str, day: dt.date, payload: dict[str, Any]) -> Alert:
        return cls(rule=rule, kind=payload["kind"], day=day, brand=payload["brand"], product=payload["product"],
                   platform=payload["platform"], source=payload["source"], figures=dict(payload.get("figures") or {}),
                   threshold=dict(payload.get("threshold") or {}))


def _num(v: Any) -> float | None:
    return None if v is None else float(v)


def _threshold(rule: Rule) -> dict[str, Any]:
    if rule.kind == "spike":
        return {"min_zscore": rule.min_zscore, "min_posts": rule.min_posts}
    return {"above": rule.above, "below": rule.below, "min_posts": rule.min_posts}


def _entered(value: float | None, prev: float | None, level: float, up: bool) -> bool:
    """`value` is at/beyond `level` and the day before was not (or is unknown)."""
    if value is None:
        return False
    if up:
        return value >= level and (prev is None or prev < level)
    return value <= level and (prev is None or prev > level)


def fires(rule: Rule, row: dict[str, Any], prev: dict[str, Any] | None) -> bool:
    """Whether `rule` fires on `row` (a mention_daily row), given the same key's previous day."""
    posts = int(row["posts"] or 0)
    week_posts = round((row.get("rolling_7") or 0.0) * 7)
    if rule.kind == "spike":
        if posts < rule.min_posts:
            return False
        if rule.min_zscore is None:
            return bool(row["spike"])
        return row["zscore"] is not None and row["zscore"] >= rule.min_zscore
    if week_posts < rule.min_posts:
        return False
    col = "share_of_voice" if rule.kind == "share_of_voice" else "wow_change"
    value, before = _num(row.get(col)), _num(prev.get(col)) if prev else None
    if rule.above is not None and _entered(value, before, rule.above, up=True):
        return True
    if rule.below is not None:
        level = rule.below if rule.kind == "share_of_voice" else -rule.below
        if _entered(value, before, level, up=False):
            return True
    return False


def _resolve_brand(rule: Rule, brands: Sequence[str]) -> str | None:
    if rule.brand == EACH:
        return EACH
    match = next((b for b in brands if b.casefold() == rule.brand.casefold()), None)
    if match is None:
        log.warning("alert rule %s names brand %r, which is not in the catalogue: it cannot fire", rule.name, rule.brand)
    return match


def evaluate(conn: Connection, rules: Sequence[Rule], days: Iterable[dt.date], brands: Sequence[str]) -> list[Alert]:
    """Every alert the rules raise on `days` (sorted by day, rule, key)."""
    wanted = sorted(set(days))
    if not wanted or not rules:
        return []
    md = mention_daily.c
    lo, hi = wanted[0] - dt.timedelta(days=1), wanted[-1]
    out: list[Alert] = []
    wanted_set = set(wanted)
    for rule in rules:
        brand = _resolve_brand(rule, brands)
        if brand is None:
            continue
        q = select(mention_daily).where(md.day >= lo, md.day <= hi, md.source == rule.source)
        if brand != EACH:
            q = q.where(md.brand == brand)
        q = q.where(md.product != "*") if rule.product == EACH else q.where(md.product == rule.product)
        q = q.where(md.platform != "*") if rule.platform == EACH else q.where(md.platform == rule.platform)
        if len(wanted) < 200:  # a backfill of years reads the range instead of a long IN list
            q = q.where(md.day.in_(sorted(wanted_set | {d - dt.timedelta(days=1) for d in wanted})))
        rows = {(r["day"], r["brand"], r["product"], r["platform"]): dict(r) for r in conn.execute(q).mappings()}
        for (day, b, p, pl), row in sorted(rows.items()):
            if day not in wanted_set:
                continue
            prev = rows.get((day - dt.timedelta(days=1), b, p, pl))
            if fires(rule, row, prev):
                figures = {k: row.get(k) for k in FIGURES}
                if prev is not None and rule.kind != "spike":
                    col = "share_of_voice" if rule.kind == "share_of_voice" else "wow_change"
                    figures["previous"] = prev.get(col)
                out.append(Alert(rule=rule.name, kind=rule.kind, day=day, brand=b, product=p, platform=pl,
                                 source=rule.source, figures=figures, threshold=_threshold(rule)))
    out.sort(key=lambda a: (a.day, a.rule, a.key))
    return out


def sample_alert(conn: Connection, rule: Rule, brands: Sequence[str], today: dt.date) -> Alert:
    """An alert for `brandmon alerts test`: the rule's latest stored figures, else made-up ones."""
    md = mention_daily.c
    brand = _resolve_brand(rule, brands)
    q = select(mention_daily).where(md.source == rule.source)
    if brand not in (None, EACH):
        q = q.where(md.brand == brand)
    q = q.where(md.product != "*") if rule.product == EACH else q.where(md.product == rule.product)
    q = q.where(md.platform != "*") if rule.platform == EACH else q.where(md.platform == rule.platform)
    row = conn.execute(q.order_by(md.day.desc(), md.posts.desc()).limit(1)).mappings().first()
    if row is not None:
        r = dict(row)
        return Alert(rule=rule.name, kind=rule.kind, day=r["day"], brand=r["brand"], product=r["product"],
                     platform=r["platform"], source=rule.source, figures={k: r.get(k) for k in FIGURES},
                     threshold=_threshold(rule))
    figures = {"posts": 42, "baseline": 6.5, "zscore": 5.3, "rolling_7": 12.0, "wow_change": 0.8,
               "share_of_voice": 0.45, "unique_authors": 37, "expected_mentions": 42.0, "previous": 0.3}
    name = brand if brand not in (None, EACH) else (brands[0] if brands else "Example")
    return Alert(rule=rule.name, kind=rule.kind, day=today, brand=name,
                 product="*" if rule.product == EACH else rule.product,
                 platform="*" if rule.platform == EACH else rule.platform, source=rule.source,
                 figures=figures, threshold=_threshold(rule))
