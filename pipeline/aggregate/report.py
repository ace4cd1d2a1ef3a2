"""`brandmon report --date D`: a one-page HTML report of a day, written to the lake.

Self-contained (charts and thumbnails are inline base64 data: URIs, no scripts, no external
assets), so it can be mailed or opened straight from S3. Content: the day's posts, share of
voice and signals per brand, a chart per brand over the 8 weeks up to the day, the top spikes
of those weeks, and per brand with image mentions that day a gallery of the photos the
detector counted (box drawn over each as an SVG overlay) and of those waiting for review.
"""

from __future__ import annotations

import base64
import datetime as dt
import html
import io
from typing import Any

from sqlalchemy import select

from pipeline.aggregate.gallery import Evidence, day_evidence, thumbnail
from pipeline.aggregate.trends import daily_series, plot_series
from pipeline.context import Context
from pipeline.dates import MIN_DAY, BadDate, check_day
from pipeline.errors import BrandmonError
from pipeline.schema import mention_daily

WINDOW_DAYS = 56
TOP_SPIKES = 10


def report_key(day: dt.date) -> str:
    return f"reports/daily/{day.isoformat()}.html"


def _png(series: list[dict[str, Any]], title: str) -> str:
    buf = io.BytesIO()
    plot_series(series, buf, title)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _num(v: Any, digits: int = 1, pct: bool = False) -> str:
    if v is None:
        return "–"
    if pct:
        return f"{v * 100:.{digits}f}%"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def top_spikes(ctx: Context, start: dt.date, end: dt.date, limit: int = TOP_SPIKES) -> list[dict[str, Any]]:
    md = mention_daily.c
    q = (
        select(md.day, md.brand, md.product, md.platform, md.source, md.posts, md.baseline, md.zscore)
        .where(md.day >= start, md.day <= end, md.spike.is_(True))
        .order_by(md.zscore.desc(), md.day.desc(), md.brand, md.product, md.platform, md.source)
        .limit(limit)
    )
    with ctx.engine.connect() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def _link(url: str | None) -> str | None:
    """Only http(s) links from data reach the page (no javascript: or data: URLs)."""
    return url if url and url.lower().startswith(("https://", "http://")) else None


def _figure(ctx: Context, ev: Evidence) -> str:
    esc = html.escape
    thumb = thumbnail(ctx, ev)
    box_note = ""
    if thumb is None:
        pic = "<div class='missing'>no preview: the image is missing from the lake, too large or unreadable</div>"
    else:
        overlay = ""
        if ev.box is not None and ev.width and ev.height:
            x1, y1, x2, y2 = ev.box
            overlay = (f"<svg class='box' viewBox='0 0 {ev.width} {ev.height}' preserveAspectRatio='none' "
                       f"aria-label='detection box'><rect x='{x1}' y='{y1}' width='{x2 - x1}' height='{y2 - y1}' "
                       "vector-effect='non-scaling-stroke'/></svg>")
        else:
            box_note = "<br><span class='note'>no box: the classifier alone called it</span>"
        pic = (f"<div class='frame'><img class='thumb' alt='{esc(ev.class_name)} {ev.score:.2f}' "
               f"src='data:image/jpeg;base64,{base64.b64encode(thumb).decode('ascii')}'/>{overlay}</div>")
    url = _link(ev.post_url)
    if url:
        pic = f"<a class='post' href='{esc(url)}' target='_blank' rel='noopener noreferrer'>{pic}</a>"
    label = f"{esc(ev.class_name)} <b>{ev.score:.2f}</b> &middot; {esc(ev.platform)}"
    if url:
        label += f" &middot; <a href='{esc(url)}' target='_blank' rel='noopener noreferrer'>post</a>"
    if ev.posts_that_day > 1:
        label += f" &middot; in {ev.posts_that_day} posts"
    if ev.review_status != "counted":
        label += f"<br><span class='note'>review: {esc(ev.review_status)}</span>"
    return (f"<figure class='ev {ev.kind}' data-sha256='{ev.sha256}'>{pic}"
            f"<figcaption>{label}{box_note}</figcaption></figure>")


def gallery_html(ctx: Context, day: dt.date, brands: list[str]) -> str:
    """One section per brand with image mentions on `day`: counted photos, then review ones."""
    esc = html.escape
    parts = []
    for b in brands:
        items = day_evidence(ctx, b, day)
        counted = [e for e in items if e.kind == "counted"]
        review = [e for e in items if e.kind == "review"]
        if not items:
            continue
        sec = [f"<section class='gallery' data-brand='{esc(b)}'><h3>{esc(b)}</h3>"]
        if counted:
            sec.append(f"<div class='grid'>{''.join(_figure(ctx, e) for e in counted)}</div>")
        if review:
            sec.append(f"<h4>Near the threshold, waiting for review (model {esc(review[0].model_version)})</h4>"
                       f"<div class='grid'>{''.join(_figure(ctx, e) for e in review)}</div>")
        sec.append("</section>")
        parts.append("".join(sec))
    if not parts:
        return "<p class='note'>No image mentions on this day.</p>"
    return "".join(parts) + (
        "<p class='note'>Counted: the active model's best-scoring photos per brand (at or above its "
        "threshold), red box where the logo matcher located the logo. Waiting for review: photos just "
        "below the threshold (<code>brandmon review export</code> to label them). Export with "
        f"<code>brandmon evidence --brand B --date {day.isoformat()}</code>.</p>")


STYLE = """body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 960px; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border-bottom: 1px solid #ddd; padding: 4px 10px; text-align: right; }
th:first-child, td:first-child { text-align: left; }
figure { margin: 1em 0; } img { max-width: 100%; }
.note { color: #666; font-size: 0.9em; }
.grid { display: flex; flex-wrap: wrap; gap: 10px; }
.grid figure { margin: 0; width: 200px; font-size: 0.85em; }
.frame { position: relative; display: inline-block; line-height: 0; }
.frame img.thumb { width: 200px; height: auto; display: block; }
.frame svg.box { position: absolute; left: 0; top: 0; width: 100%; height: 100%; }
.frame svg.box rect { fill: none; stroke: #e41a1c; stroke-width: 3; }
figure.review .frame { outline: 2px dashed #e6a000; }
.missing { width: 200px; height: 120px; background: #eee; display: flex; align-items: center;
  justify-content: center; text-align: center; padding: 0 12px; box-sizing: border-box; color: #666; }
"""


def _report_brands(ctx: Context) -> list[str]:
    """The configured brands; without BRANDMON_CONFIG, the stored catalogue's."""
    brands = [b.name for b in ctx.settings.brands]
    if not brands and ctx.settings.config_path is None:
        from pipeline.aggregate.catalogue import stored_catalogue

        with ctx.engine.connect() as conn:
            brands = [b.name for b in stored_catalogue(conn)]
    return brands


def _brand_sections(ctx: Context, brands: list[str], start: dt.date, day: dt.date) -> tuple[str, str]:
    """Each brand's summary-table row and its daily-posts chart (HTML)."""
    esc = html.escape
    summary_rows, charts = [], []
    for b in brands:
        series = daily_series(ctx, b, start, day)
        today = series[-1]
        week = series[-7:]
        summary_rows.append(
            f"<tr><td>{esc(b)}</td><td>{today['posts']}</td><td>{_num(today['expected_mentions'])}</td>"
            f"<td>{_num(today['share_of_voice'], pct=True)}</td><td>{_num(today['rolling_7'])}</td>"
            f"<td>{_num(today['wow_change'], pct=True)}</td><td>{_num(today['zscore'], 2)}</td>"
            f"<td>{'spike' if today['spike'] else ''}</td><td>{sum(r['posts'] for r in week)}</td></tr>"
        )
        charts.append(
            f"<figure><img alt='daily posts mentioning {esc(b)}' src='data:image/png;base64,"
            f"{_png(series, f'{b}: posts per day (any source, all platforms)')}'/></figure>"
        )
    return "".join(summary_rows), "".join(charts)


def _spike_rows(ctx: Context, start: dt.date, day: dt.date) -> str:
    """The top spikes of the window as table rows (HTML)."""
    esc = html.escape
    return "".join(
        f"<tr><td>{s['day'].isoformat()}</td><td>{esc(s['brand'])}</td><td>{esc(s['product'])}</td>"
        f"<td>{esc(s['platform'])}</td><td>{esc(s['source'])}</td><td>{s['posts']}</td>"
        f"<td>{_num(s['baseline'])}</td><td>{_num(s['zscore'], 2)}</td></tr>"
        for s in top_spikes(ctx, start, day)
    ) or "<tr><td colspan='8'>no spikes in these weeks</td></tr>"


def render_report(ctx: Context, day: dt.date) -> str:
    """The report's HTML text."""
    try:
        check_day(day)
    except BadDate as exc:
        raise BrandmonError(f"report day: {exc}") from None
    start = max(day - dt.timedelta(days=WINDOW_DAYS - 1), MIN_DAY)
    brands = _report_brands(ctx)
    summary_rows, charts = _brand_sections(ctx, brands, start, day)
    spike_rows = _spike_rows(ctx, start, day)
    no_brands = "" if brands else "<p>The catalogue has no brands (add them under <code>brands:</code>).</p>"
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>brandmon report {day.isoformat()}</title>
<style>
{STYLE}</style></head><body>
<h1>Brand mentions on {day.isoformat()} (UTC)</h1>
{no_brands}
<h2>Share of voice and signals</h2>
<table>
<tr><th>brand</th><th>posts</th><th>expected</th><th>share of voice</th><th>7-day mean</th>
<th>week over week</th><th>z-score</th><th></th><th>posts, last 7 days</th></tr>
{summary_rows}
</table>
<p class="note">Posts mentioning the brand in text or image, all platforms. Expected: image
mentions corrected by the active model's measured precision and recall. Z-score against the
28 days before; a spike is z &ge; 3 with at least 5 posts.</p>
<h2>Top spikes, {start.isoformat()} to {day.isoformat()}</h2>
<table>
<tr><th>day</th><th>brand</th><th>product</th><th>platform</th><th>source</th><th>posts</th>
<th>mean of the 28 days before</th><th>z-score</th></tr>
{spike_rows}
</table>
<h2>The photos behind the image mentions of {day.isoformat()}</h2>
{gallery_html(ctx, day, brands)}
<h2>Daily posts, last {WINDOW_DAYS} days</h2>
{charts}
<p class="note">Generated by brandmon at {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M')} UTC
from the mention_daily, detections and review_queue tables.</p>
</body></html>
"""




def write_report(ctx: Context, day: dt.date) -> str:
    """Render and store the report of `day`; returns its lake key."""
    key = report_key(day)
    ctx.store.put(key, render_report(ctx, day).encode("utf-8"), content_type="text/html; charset=utf-8")
    return key
