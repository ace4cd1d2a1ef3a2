"""Daily series for analysts: one brand (or product, platform, source) with its signals.

`daily_series` reads `mention_daily` and returns one dict per day of the range, days never
aggregated included (zero counts, no signals, `computed` False) so a chart has no holes that
look like data. The formatters (table, CSV, JSON) and the plot work on that list.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sqlalchemy import select

from pipeline.aggregate.daily import SOURCES
from pipeline.context import Context
from pipeline.dates import BadDate, check_day, check_span
from pipeline.errors import BrandmonError
from pipeline.schema import brands as brands_t
from pipeline.schema import mention_daily
from pipeline.schema import products as products_t

FIELDS = (
    "day", "posts", "images", "unique_authors", "reposts", "expected_mentions", "rolling_7",
    "rolling_28", "wow_change", "zscore", "baseline", "spike", "share_of_voice", "model_version", "computed",
)
MAX_DAYS = 3660


class TrendsError(BrandmonError):
    """An unknown brand/product/source or a bad date range."""


def resolve_key(ctx: Context, brand: str, product: str = "*") -> tuple[str, str]:
    """Catalogue spelling of brand (and product), matched case-insensitively; clear error if unknown."""
    configured = [b.name for b in ctx.settings.brands]
    with ctx.engine.connect() as conn:
        stored = {r.name: r.id for r in conn.execute(select(brands_t.c.id, brands_t.c.name))}
        names = list(dict.fromkeys([*configured, *stored]))
        match = next((n for n in names if n.casefold() == brand.casefold()), None)
        if match is None:
            raise TrendsError(f"unknown brand {brand!r}; the catalogue has: {', '.join(names) or 'no brands'}")
        if product == "*":
            return match, "*"
        prods = [p.name for b in ctx.settings.brands if b.name == match for p in b.products]
        if match in stored:
            prods += [p for (p,) in conn.execute(select(products_t.c.name).where(products_t.c.brand_id == stored[match]))]
        pmatch = next((p for p in prods if p.casefold() == product.casefold()), None)
        if pmatch is None:
            raise TrendsError(f"brand {match} has no product {product!r}; its products: {', '.join(dict.fromkeys(prods)) or 'none'}")
        return match, pmatch


def daily_series(
    ctx: Context,
    brand: str,
    start: dt.date,
    end: dt.date,
    product: str = "*",
    platform: str = "*",
    source: str = "any",
) -> list[dict]:
    """One dict per day from `start` to `end` inclusive (keys: `FIELDS`)."""
    try:
        check_day(start)
        check_day(end)
        check_span(start, end)
    except BadDate as exc:
        raise TrendsError(str(exc)) from None
    if (end - start).days >= MAX_DAYS:
        raise TrendsError(f"range too long ({(end - start).days + 1} days); ask for at most {MAX_DAYS}")
    if source not in SOURCES:
        raise TrendsError(f"unknown source {source!r}; use one of {', '.join(SOURCES)}")
    brand, product = resolve_key(ctx, brand, product)
    md = mention_daily.c
    q = (
        select(mention_daily)
        .where(md.brand == brand, md.product == product, md.platform == platform, md.source == source,
               md.day >= start, md.day <= end)
        .order_by(md.day)
    )
    with ctx.engine.connect() as conn:
        rows = {r["day"]: dict(r) for r in conn.execute(q).mappings()}
    out = []
    day = start
    while day <= end:
        r = rows.get(day)
        if r is None:
            out.append({"day": day, "posts": 0, "images": 0, "unique_authors": 0, "reposts": 0,
                        "expected_mentions": None, "rolling_7": None, "rolling_28": None,
                        "wow_change": None, "zscore": None, "baseline": None, "spike": False,
                        "share_of_voice": None,
                        "model_version": None, "computed": False})
        else:
            out.append({k: (bool(r[k]) if k == "spike" else r[k]) for k in FIELDS if k != "computed"}
                       | {"computed": True})
        day += dt.timedelta(days=1)
    return out


def _fmt(v: Any, digits: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else ""
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, dt.date):
        return v.isoformat()
    return str(v)


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (v.isoformat() if isinstance(v, dt.date) else v) for k, v in row.items()}


def format_series(series: Sequence[dict[str, Any]], fmt: str = "table") -> str:
    """The series as an aligned text table, CSV (header + one line per day) or a JSON array."""
    if fmt == "json":
        return json.dumps([_jsonable(r) for r in series], indent=2)
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(FIELDS), lineterminator="\n")
        w.writeheader()
        for r in series:
            w.writerow({k: ("" if r[k] is None else (r[k].isoformat() if isinstance(r[k], dt.date) else r[k]))
                        for k in FIELDS})
        return buf.getvalue().rstrip("\n")
    if fmt != "table":
        raise TrendsError(f"unknown format {fmt!r}; use table, csv or json")
    cols = ("day", "posts", "images", "unique_authors", "reposts", "expected_mentions", "rolling_7",
            "rolling_28", "wow_change", "zscore", "spike", "share_of_voice")
    heads = ("day", "posts", "images", "authors", "reposts", "expected", "avg7", "avg28", "wow", "z",
             "spike", "sov")
    cells = [[_fmt(r[c]) for c in cols] for r in series]
    widths = [max(len(h), *(len(row[i]) for row in cells)) if cells else len(h) for i, h in enumerate(heads)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(heads, widths, strict=True))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines.append("(avg7/avg28: rolling means of posts; wow: week-over-week change; z: z-score vs the "
                 "28 days before; sov: share of voice)")
    return "\n".join(lines)


def plot_series(series: Sequence[dict[str, Any]], path: str | Path | io.BytesIO, title: str = "") -> None:
    """A PNG: daily posts (bars), the 7-day rolling mean (line), spike days (red markers)."""
    from pipeline.aggregate.plots import LINE_COLOR, posts_chart

    days = [r["day"] for r in series]
    posts = [r["posts"] for r in series]
    with posts_chart(path, days, posts, title) as ax:
        roll = [r["rolling_7"] for r in series]
        if any(v is not None for v in roll):
            ax.plot(days, [float("nan") if v is None else v for v in roll], color=LINE_COLOR, lw=2,
                    label="7-day mean")
        exp = [r.get("expected_mentions") for r in series]
        if any(v is not None and v != p for v, p in zip(exp, posts, strict=True)):
            ax.plot(days, [float("nan") if v is None else v for v in exp], color="#7a7a7a", lw=1, ls="--",
                    label="expected (P/R-corrected)")
        spikes = [(r["day"], r["posts"]) for r in series if r.get("spike")]
        if spikes:
            ax.scatter([d for d, _ in spikes], [p for _, p in spikes], color="#d62728", zorder=3, s=40,
                       label="spike")
