"""`mention_daily` for one UTC day, computed inside the database with set-based SQL.

The same three statements run on SQLite and Postgres (only ANSI SQL both accept: CTEs,
`INSERT ... SELECT ... ON CONFLICT DO UPDATE ... WHERE`, `UPDATE ... FROM`,
`IS DISTINCT FROM`, `CAST(... AS DOUBLE PRECISION)`); no post row travels to Python.

1. `upsert_counts`: the day's counts for every key of the grid
   catalogue brand x product ('*' + the brand's products) x platform ('*' + every platform
   in `posts`) x source (text | image | both | any). The grid is dense (zero rows too).
2. `delete_stale`: rows of the day whose key left the grid (brand removed from the catalogue).
3. `update_signals`: rolling means, week-over-week change, z-score/spike and its baseline,
   share of voice, from the counts of the day and of the 28 days before it (already in
   `mention_daily`). The calendar is dense from the first aggregated day on: a day without
   rows (no post at all, so never marked dirty) counts as zero, not as missing.

Rows are only written when a value changes, so `computed_at` says when a row last changed and
re-aggregating an unchanged day writes nothing. Signals depend only on counts, so after a day's
counts change, `update_signals` on the 28 following days brings their signals up to date.

Definitions (see `sql/README.md`):
* a post mentions a brand at most once; its source is `text` (text only), `image` (image only)
  or `both`; `any` = all three. Image mentions come from detections whose class
  `logo_class_map` maps to the brand or one of its products (a product logo also shows the
  brand). A product row counts posts whose text names the product or whose image shows the
  product's logo: source `text` (named, no brand image), `both` (named, and an image shows
  the brand), `image` (not named, its logo shown).
* `images` = distinct brand images first seen in that post (the same sha256 in an earlier
  post is a re-post, not a new image); `reposts` = posts that are reblogs (`repost_of`) or
  whose brand images were all seen before.
"""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Date, Float, String, bindparam, func, select, text

from pipeline.aggregate.mentions import ActiveModel, day_bounds, day_plan_settings
from pipeline.schema import UTCDateTime, mention_daily, utcnow

SOURCES = ("text", "image", "both", "any")
SPIKE_Z = 3.0  # z-score at or above which a day is a spike
SPIKE_MIN_POSTS = 5  # ... and at least this many posts (a quiet series going 0 -> 2 is no spike)
MIN_HISTORY_DAYS = 7  # z-score needs this many days of trailing history
SIGNAL_WINDOW = 28  # days whose signals depend on a day's counts

COUNT_COLUMNS = ("posts", "images", "unique_authors", "reposts", "expected_mentions", "model_version")
SIGNAL_COLUMNS = ("rolling_7", "rolling_28", "wow_change", "zscore", "baseline", "spike", "share_of_voice")

KNOWN_PLATFORMS_SQL = text(
    """
    WITH RECURSIVE pl(platform) AS (
        SELECT MIN(platform) FROM posts
        UNION ALL
        SELECT (SELECT MIN(p.platform) FROM posts p WHERE p.platform > pl.platform)
        FROM pl WHERE pl.platform IS NOT NULL
    )
    SELECT platform FROM pl WHERE platform IS NOT NULL
    """
)


def known_platforms(conn: Connection) -> list[str]:
    """Every platform in `posts` (a loose index scan: one index probe per platform)."""
    return [p for (p,) in conn.execute(KNOWN_PLATFORMS_SQL) if p and p != "*"]


def _grid_ctes(platforms: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """CTEs `grid(brand, product, platform, source)` and their bind values."""
    params: dict[str, Any] = {}
    plats = ["SELECT '*' AS platform"]
    for i, p in enumerate(sorted(set(platforms) - {"*"})):
        params[f"pl{i}"] = p
        plats.append(f"SELECT :pl{i}")
    sql = f"""
    keys AS (
        SELECT b.name AS brand, '*' AS product FROM brands b
        UNION ALL
        SELECT b.name, pr.name FROM products pr JOIN brands b ON b.id = pr.brand_id
        WHERE pr.name <> '' AND pr.name <> '*'
    ),
    plats AS ({" UNION ".join(plats)}),
    srcs AS (SELECT 'text' AS source UNION ALL SELECT 'image' UNION ALL SELECT 'both' UNION ALL SELECT 'any'),
    grid AS (
        SELECT k.brand, k.product, pl.platform, s.source
        FROM keys k CROSS JOIN plats pl CROSS JOIN srcs s
    )"""
    return sql, params


# Which brand (and product) each post of the day mentions, by text and by image: one row per
# post x brand x product ('*' for the brand), with has_text, has_image and the images new
# that day (an image posted earlier by another post is a re-post, not a new image).
_MENTIONS_CTES = """
    day_posts AS MATERIALIZED (
        SELECT id, platform, author_hash, posted_at, repost_of FROM posts
        WHERE posted_at >= :start AND posted_at < :end
    ),
    tm AS (
        SELECT t.post_id, t.brand, t.product
        FROM text_mentions t JOIN day_posts dp ON dp.id = t.post_id
    ),
    img AS (
        SELECT DISTINCT pi.post_id, pi.sha256, cm.brand, cm.product, dp.posted_at
        FROM day_posts dp
        JOIN post_images pi ON pi.post_id = dp.id
        JOIN detections d ON d.image_sha256 = pi.sha256
        JOIN logo_class_map cm ON cm.class_name = d.class_name
        WHERE pi.status = 'stored' AND d.model_version = :mv AND d.score >= :thr
    ),
    img_brand AS (
        SELECT DISTINCT post_id, sha256, brand, posted_at FROM img
    ),
    img_post AS (
        SELECT i.post_id, i.brand,
               SUM(CASE WHEN EXISTS (
                       SELECT 1 FROM post_images pi2 JOIN posts p2 ON p2.id = pi2.post_id
                       WHERE pi2.sha256 = i.sha256 AND pi2.post_id <> i.post_id
                         AND (p2.posted_at < i.posted_at OR (p2.posted_at = i.posted_at AND p2.id < i.post_id))
                   ) THEN 0 ELSE 1 END) AS new_images
        FROM img_brand i GROUP BY i.post_id, i.brand
    ),
    brand_level AS (
        SELECT post_id, brand, MAX(has_text) AS has_text, MAX(has_image) AS has_image,
               MAX(new_images) AS new_images
        FROM (
            SELECT post_id, brand, 1 AS has_text, 0 AS has_image, 0 AS new_images FROM tm WHERE product = ''
            UNION ALL
            SELECT post_id, brand, 0, 1, new_images FROM img_post
        ) u
        GROUP BY post_id, brand
    ),
    product_level AS (
        SELECT post_id, brand, product, MAX(has_text) AS has_text
        FROM (
            SELECT post_id, brand, product, 1 AS has_text FROM tm WHERE product <> ''
            UNION ALL
            SELECT DISTINCT post_id, brand, product, 0 FROM img WHERE product <> ''
        ) u
        GROUP BY post_id, brand, product
    ),
    mentions AS (
        SELECT bl.post_id, bl.brand, '*' AS product, bl.has_text, bl.has_image, bl.new_images
        FROM brand_level bl
        UNION ALL
        SELECT pl.post_id, pl.brand, pl.product, pl.has_text, bl.has_image, bl.new_images
        FROM product_level pl JOIN brand_level bl ON bl.post_id = pl.post_id AND bl.brand = pl.brand
    )"""

# The mentions counted per brand x product x platform x source, with the '*' platform and the
# 'any' source rolled up.
_COUNTS_CTES = """
    m AS (
        SELECT mn.brand, mn.product, dp.platform, dp.author_hash, mn.new_images,
               CASE WHEN mn.has_text = 1 AND mn.has_image = 1 THEN 'both'
                    WHEN mn.has_text = 1 THEN 'text' ELSE 'image' END AS src,
               CASE WHEN dp.repost_of IS NOT NULL OR (mn.has_image = 1 AND mn.new_images = 0)
                    THEN 1 ELSE 0 END AS is_repost
        FROM mentions mn JOIN day_posts dp ON dp.id = mn.post_id
    ),
    expanded AS (
        SELECT brand, product, platform, src AS source, author_hash, new_images, is_repost, src FROM m
        UNION ALL SELECT brand, product, '*', src, author_hash, new_images, is_repost, src FROM m
        UNION ALL SELECT brand, product, platform, 'any', author_hash, new_images, is_repost, src FROM m
        UNION ALL SELECT brand, product, '*', 'any', author_hash, new_images, is_repost, src FROM m
    ),
    counts AS (
        SELECT brand, product, platform, source,
               COUNT(*) AS posts, SUM(new_images) AS images,
               COUNT(DISTINCT author_hash) AS unique_authors, SUM(is_repost) AS reposts,
               SUM(CASE WHEN src = 'image' THEN 1 ELSE 0 END) AS image_posts
        FROM expanded GROUP BY brand, product, platform, source
    )"""


def _counts_sql(platforms: Sequence[str]) -> tuple[str, dict[str, Any]]:
    """The day's counts upserted over the full grid (zeros included); rows whose counts are
    unchanged are not written (their computed_at stays)."""
    grid, params = _grid_ctes(platforms)
    factor = "CAST(:factor AS DOUBLE PRECISION)"
    changed = " OR ".join(f"mention_daily.{c} IS DISTINCT FROM excluded.{c}" for c in COUNT_COLUMNS)
    sql = f"""
    WITH{_MENTIONS_CTES},{_COUNTS_CTES},{grid}
    INSERT INTO mention_daily (day, brand, product, platform, source, posts, images, unique_authors,
                               reposts, expected_mentions, model_version, spike, computed_at)
    SELECT :day, g.brand, g.product, g.platform, g.source,
           COALESCE(c.posts, 0), COALESCE(c.images, 0), COALESCE(c.unique_authors, 0),
           COALESCE(c.reposts, 0),
           CASE WHEN COALESCE(c.image_posts, 0) = 0 THEN CAST(COALESCE(c.posts, 0) AS DOUBLE PRECISION)
                ELSE CAST(c.posts - c.image_posts AS DOUBLE PRECISION) + c.image_posts * {factor} END,
           :mv, FALSE, :now
    FROM grid g
    LEFT JOIN counts c ON c.brand = g.brand AND c.product = g.product
                      AND c.platform = g.platform AND c.source = g.source
    WHERE TRUE
    ON CONFLICT (day, brand, product, platform, source) DO UPDATE SET
        posts = excluded.posts, images = excluded.images, unique_authors = excluded.unique_authors,
        reposts = excluded.reposts, expected_mentions = excluded.expected_mentions,
        model_version = excluded.model_version, computed_at = excluded.computed_at
    WHERE {changed}
    """
    return sql, params


def _delete_stale_sql(platforms: Sequence[str]) -> tuple[str, dict[str, Any]]:
    grid, params = _grid_ctes(platforms)
    sql = f"""
    WITH {grid}
    DELETE FROM mention_daily
    WHERE day = :day AND NOT EXISTS (
        SELECT 1 FROM grid g
        WHERE g.brand = mention_daily.brand AND g.product = mention_daily.product
          AND g.platform = mention_daily.platform AND g.source = mention_daily.source
    )
    """
    return sql, params


_SD = "SQRT(CASE WHEN h.var28 > 0 THEN h.var28 ELSE 0 END)"
_Z = f"(CAST(h.x AS DOUBLE PRECISION) - h.mean28) / (CASE WHEN {_SD} > 1 THEN {_SD} ELSE 1 END)"
_F = "CAST({} AS DOUBLE PRECISION)"

# One grouped pass over the 29 days [day-28, day] gives today's count (x) and the sums of the
# trailing windows; MATERIALIZED keeps it a single pass whatever the planner thinks of the
# table's size (a fresh table has no statistics while a year is being rebuilt).
# The calendar is dense: a day without rows counts as zero posts, so the windows' divisors are
# numbers of calendar days (:w7, :w28, :np, :n28, computed in Python from the first
# aggregated day), never numbers of rows.
SIGNALS_SQL = f"""
WITH raw AS MATERIALIZED (
    SELECT brand, product, platform, source,
           SUM(CASE WHEN day = :day THEN posts ELSE 0 END) AS x,
           SUM(CASE WHEN day = :day THEN 1 ELSE 0 END) AS today,
           SUM(CASE WHEN day >= :d6 AND day < :day THEN posts ELSE 0 END) AS s6,
           SUM(CASE WHEN day >= :d27 AND day < :day THEN posts ELSE 0 END) AS s27,
           SUM(CASE WHEN day >= :d13 AND day <= :d7 THEN posts ELSE 0 END) AS sp,
           SUM(CASE WHEN day < :day THEN posts ELSE 0 END) AS s28,
           SUM(CASE WHEN day < :day THEN CAST(posts AS BIGINT) * posts ELSE 0 END) AS q28
    FROM mention_daily
    WHERE day >= :d28 AND day <= :day
    GROUP BY brand, product, platform, source
),
h AS MATERIALIZED (
    SELECT brand, product, platform, source, x, s6, s27, sp,
           CAST(s28 AS DOUBLE PRECISION) / {_F.format(":n28")} AS mean28,
           CAST(q28 AS DOUBLE PRECISION) / {_F.format(":n28")}
               - (CAST(s28 AS DOUBLE PRECISION) / {_F.format(":n28")})
               * (CAST(s28 AS DOUBLE PRECISION) / {_F.format(":n28")}) AS var28
    FROM raw WHERE today = 1
),
t AS MATERIALIZED (
    SELECT platform, source, SUM(x) AS total FROM h WHERE product = '*' GROUP BY platform, source
),
s AS MATERIALIZED (
    SELECT h.brand, h.product, h.platform, h.source,
           CAST(h.x + h.s6 AS DOUBLE PRECISION) / {_F.format(":w7")} AS rolling_7,
           CAST(h.x + h.s27 AS DOUBLE PRECISION) / {_F.format(":w28")} AS rolling_28,
           CASE WHEN :has_prev = 0 OR h.sp = 0 THEN NULL
                ELSE (CAST(h.x + h.s6 AS DOUBLE PRECISION) / {_F.format(":w7")})
                     / (CAST(h.sp AS DOUBLE PRECISION) / {_F.format(":np")}) - 1
           END AS wow_change,
           CASE WHEN :has_history = 1 THEN {_Z} ELSE NULL END AS zscore,
           CASE WHEN :has_history = 1 THEN h.mean28 ELSE NULL END AS baseline,
           CASE WHEN :has_history = 1 AND h.x >= :spike_min AND {_Z} >= :spike_z
                THEN TRUE ELSE FALSE END AS spike,
           CASE WHEN h.product = '*' AND t.total > 0
                THEN CAST(h.x AS DOUBLE PRECISION) / t.total ELSE NULL END AS share_of_voice
    FROM h LEFT JOIN t ON t.platform = h.platform AND t.source = h.source
)
UPDATE mention_daily SET
    rolling_7 = s.rolling_7, rolling_28 = s.rolling_28, wow_change = s.wow_change,
    zscore = s.zscore, baseline = s.baseline, spike = s.spike, share_of_voice = s.share_of_voice,
    computed_at = :now
FROM s
WHERE mention_daily.day = :day AND mention_daily.brand = s.brand AND mention_daily.product = s.product
  AND mention_daily.platform = s.platform AND mention_daily.source = s.source
  AND ({" OR ".join(f"mention_daily.{c} IS DISTINCT FROM s.{c}" for c in SIGNAL_COLUMNS)})
"""


def calendar_days(day: dt.date, first: dt.date, lo: int, hi: int) -> int:
    """How many of the days [day - hi, day - lo] fall on or after `first` (the calendar start)."""
    oldest = max(day - dt.timedelta(days=hi), first)
    newest = day - dt.timedelta(days=lo)
    return max(0, (newest - oldest).days + 1)


def first_day(conn: Connection) -> dt.date | None:
    """The first aggregated day: where every series' calendar starts (an index probe)."""
    return conn.execute(select(func.min(mention_daily.c.day))).scalar()


_DATE_PARAMS = ("day", "d6", "d7", "d13", "d27", "d28")


def _typed(sql: str, names: Sequence[str]):
    """text() with the date/timestamp parameters typed (SQLite compares them as text)."""
    binds = []
    for n in names:
        if f":{n}" not in sql:
            continue
        if n in ("start", "end", "now"):
            binds.append(bindparam(n, type_=UTCDateTime()))
        elif n in _DATE_PARAMS:
            binds.append(bindparam(n, type_=Date()))
        elif n in ("thr", "factor", "w7", "w28", "np", "n28"):
            binds.append(bindparam(n, type_=Float()))
        elif n == "mv":
            binds.append(bindparam(n, type_=String()))
    return text(sql).bindparams(*binds)


_ALL_NAMES = ("start", "end", "now", "thr", "factor", "mv", "w7", "w28", "np", "n28", *_DATE_PARAMS)


def _ensure_sqrt(conn: Connection) -> None:
    """SQLite builds without math functions lack SQRT(): provide it on this connection."""
    if conn.dialect.name != "sqlite":
        return
    from sqlalchemy.exc import OperationalError

    try:
        conn.exec_driver_sql("SELECT sqrt(4.0)")
    except OperationalError:
        dbapi = conn.connection.dbapi_connection
        dbapi.create_function("sqrt", 1, lambda x: None if x is None else math.sqrt(x), deterministic=True)  # type: ignore[union-attr]


def _changes(conn: Connection, result) -> int:
    """Rows written by the last statement (pysqlite reports -1 for statements starting WITH)."""
    if result.rowcount is not None and result.rowcount >= 0:
        return int(result.rowcount)
    if conn.dialect.name == "sqlite":
        return int(conn.exec_driver_sql("SELECT changes()").scalar() or 0)
    return 0


def upsert_counts(
    conn: Connection, day: dt.date, platforms: Sequence[str], model: ActiveModel, now: dt.datetime | None = None,
) -> int:
    """Write the day's count columns for the whole grid; returns the number of rows changed."""
    day_plan_settings(conn)
    sql, params = _counts_sql(platforms)
    start, end = day_bounds(day)
    params.update(start=start, end=end, day=day, mv=model.version, thr=model.threshold, factor=model.factor(),
                  now=now or utcnow())
    return _changes(conn, conn.execute(_typed(sql, _ALL_NAMES), params))


def delete_stale(conn: Connection, day: dt.date, platforms: Sequence[str]) -> int:
    sql, params = _delete_stale_sql(platforms)
    params["day"] = day
    return _changes(conn, conn.execute(_typed(sql, _ALL_NAMES), params))


def update_signals(conn: Connection, day: dt.date, now: dt.datetime | None = None) -> int:
    """Recompute the signal columns of the day's rows from stored counts; rows changed.

    Days before the first aggregated day are outside the calendar; any later day without rows
    (nothing was posted, so it was never marked dirty) counts as zero.
    """
    _ensure_sqrt(conn)
    day_plan_settings(conn)
    first = min(first_day(conn) or day, day)
    n28 = calendar_days(day, first, 1, 28)
    np_ = calendar_days(day, first, 7, 13)
    params = {
        "day": day,
        "d6": day - dt.timedelta(days=6),
        "d7": day - dt.timedelta(days=7),
        "d13": day - dt.timedelta(days=13),
        "d27": day - dt.timedelta(days=27),
        "d28": day - dt.timedelta(days=28),
        "now": now or utcnow(),
        "w7": float(1 + calendar_days(day, first, 1, 6)),
        "w28": float(1 + calendar_days(day, first, 1, 27)),
        "np": float(max(np_, 1)),
        "has_prev": int(np_ > 0),
        "n28": float(max(n28, 1)),
        "has_history": int(n28 >= MIN_HISTORY_DAYS),
        "spike_min": SPIKE_MIN_POSTS,
        "spike_z": SPIKE_Z,
    }
    return _changes(conn, conn.execute(_typed(SIGNALS_SQL, _ALL_NAMES), params))


LATE_IMAGE_DAYS_SQL = text(
    """
    SELECT DISTINCT p2.posted_at
    FROM posts p
    JOIN post_images pi ON pi.post_id = p.id
    JOIN post_images pi2 ON pi2.sha256 = pi.sha256 AND pi2.post_id <> pi.post_id
    JOIN posts p2 ON p2.id = pi2.post_id
    WHERE p.posted_at >= :start AND p.posted_at < :end
      AND pi.sha256 IS NOT NULL
      AND p2.posted_at >= :end
      AND p2.ingested_at < p.ingested_at
    """
).bindparams(bindparam("start", type_=UTCDateTime()), bindparam("end", type_=UTCDateTime())).columns(
    posted_at=UTCDateTime()
)


def late_image_days(conn: Connection, day: dt.date) -> list[dt.date]:
    """Later days whose repost counts may predate a post of `day` that shares their images.

    A post that arrives late, carrying an image that later posts (ingested before it) also
    carry, becomes that image's first appearance: those later posts turn into re-posts, so
    their days must be recomputed too. In-order ingestion never triggers this.
    """
    day_plan_settings(conn)
    start, end = day_bounds(day)
    return sorted({ts.astimezone(dt.UTC).date() for (ts,) in conn.execute(LATE_IMAGE_DAYS_SQL, {"start": start, "end": end})})


def compute_day(
    conn: Connection, day: dt.date, platforms: Sequence[str], model: ActiveModel, now: dt.datetime | None = None,
) -> dict[str, int]:
    """Counts, stale rows and signals of one day, in the caller's transaction."""
    now = now or utcnow()
    counts = upsert_counts(conn, day, platforms, model, now)
    stale = delete_stale(conn, day, platforms)
    signals = update_signals(conn, day, now)
    return {"counts_changed": counts, "stale_deleted": stale, "signals_changed": signals}
