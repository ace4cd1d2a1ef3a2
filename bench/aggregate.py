"""Daily aggregates at scale: 10,000,000 posts over a year in Postgres.

Loads a year of synthetic posts (text mentions, images with re-posts, detections of an
active model) with `INSERT ... SELECT generate_series` (no Python rows), then times:

* rebuild the year: `mention_daily` for all 365 days (counts + signals, one transaction per
  day, the set-based SQL of `pipeline.aggregate.daily`);
* recompute one day: unchanged (the normal no-op re-run), and after a late post (its day's
  counts change, then the signals of the 28 following days);
* one day through the job path (`aggregate_range(day, day)`, what `brandmon aggregate` and the
  DAG run): catalogue and class-map sync, text matching, the SQL, the late-image check. Timed
  three ways: cold (no post of the day matched yet: all of them go through the matcher),
  unchanged (the normal re-run: nothing to match), and after one late post (`aggregate_dirty`:
  one post matched, the day's counts, the signals of the 28 following days);
* baseline, same day, same run: the naive way, pulling the day's posts, mentions, images,
  detections and first-seen image data into Python, counting there, and writing the grid
  back with executemany; the ratio baseline / set-based is printed.

Counts of the set-based and the naive day are compared (they must be identical).

    nice -n 10 .venv/bin/python bench/aggregate.py --posts 1000000   # a smaller run first
    nice -n 10 .venv/bin/python bench/aggregate.py                   # 10M posts

Without --database-url it creates a fresh database on the server of BRANDMON_TEST_PG_URL, or
else starts a throwaway Postgres cluster (initdb/pg_ctl, a temp dir, a free port), and removes
it at the end. With --database-url of an earlier run (its posts already loaded) it reuses the
data: truncates `mention_daily` and times the rebuild again (loading 10M posts takes minutes).

Results: bench/results/aggregate.txt. Two fixes came out of this benchmark (see
`mentions.day_plan_settings`): JIT compilation took 6 of 8 s per day, and with the default
random_page_cost the plan of a day flipped to hash joins over all of `post_images` (5 s).
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url

# the checkout's root: its `pipeline` and the throwaway cluster in `tests.support.services`
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.aggregate.catalogue import sync_catalogue, sync_logo_classes  # noqa: E402
from pipeline.aggregate.daily import compute_day, known_platforms  # noqa: E402
from pipeline.aggregate.mentions import active_model, day_bounds  # noqa: E402
from pipeline.context import Context  # noqa: E402
from pipeline.database import make_engine, upgrade  # noqa: E402
from pipeline.settings import Brand, Product, load_settings  # noqa: E402

YEAR_START = dt.date(2025, 1, 1)
DAYS = 365
N_BRANDS = 5
PLATFORMS = ("mastodon", "bluesky", "reddit", "archive")


def brands() -> tuple[Brand, ...]:
    return tuple(
        Brand(
            f"Brand{i}",
            keywords=(f"brand{i}",),
            hashtags=(f"brand{i}",),
            products=(Product(f"Brand{i} One", keywords=(f"brand{i} one",)),),
        )
        for i in range(N_BRANDS)
    )


def say(msg: str) -> None:
    print(msg, flush=True)


def load(engine, n_posts: int) -> dict[str, int]:
    """A year of posts, images, detections and text mentions, generated inside Postgres.

    h = a multiplicative hash of the post id picks the text: 50% no mention, 25% "brandK fans
    unite", 25% "the brandK one is great" (brand + product). 30% of posts carry one image
    drawn from a pool of n/5 images (so about a third of image posts re-post a known image);
    5% of posts are reblogs. The active model detects a brand on a quarter of the images
    (score 0.9) and scores another quarter below its threshold (0.3).
    """
    n_images = max(10, n_posts // 5)
    secs = DAYS * 86400
    h = "((g::bigint * 2654435761) % 4294967296)"
    stmts = [
        (
            "posts",
            f"""
        INSERT INTO posts (id, platform, external_id, source, author_hash, text, lang, posted_at,
                           repost_of, content_hash, ingested_at, updated_at)
        SELECT g, (ARRAY['mastodon','bluesky','reddit','archive'])[1 + ({h} / 7) % 4], 'p' || g, 'bench',
               md5(((({h} / 13) % 200000))::text),
               CASE WHEN {h} % 20 < 10 THEN 'nice day out #weekend'
                    WHEN {h} % 20 < 15 THEN 'brand' || ({h} % 20 - 10) || ' fans unite'
                    ELSE 'the brand' || ({h} % 20 - 15) || ' one is great' END,
               'en',
               timestamptz '{YEAR_START.isoformat()} 00:00+00' + make_interval(secs => (g - 1)::double precision * {secs} / {n_posts}),
               CASE WHEN g % 20 = 7 AND g > 100 THEN 'p' || (g - 50) END,
               md5(g::text), now(), now()
        FROM generate_series(1, {n_posts}) g""",
        ),
        (
            "images",
            f"""
        INSERT INTO images (sha256, storage_key, mime, size_bytes, created_at)
        SELECT md5(i::text) || md5((i + 7)::text), 'images/' || i, 'image/jpeg', 50000, now()
        FROM generate_series(0, {n_images - 1}) i""",
        ),
        (
            "post_images",
            f"""
        INSERT INTO post_images (post_id, position, url, sha256, status, attempts, updated_at)
        SELECT g, 0, 'https://img.example/' || g, md5(k::text) || md5((k + 7)::text), 'stored', 1, now()
        FROM (SELECT g, (({h} / 3) % {n_images}) AS k FROM generate_series(1, {n_posts}) g
              WHERE g % 10 < 3) s""",
        ),
        (
            "model",
            """
        INSERT INTO model_versions (version, created_at, classes, base, weights, input_size, data_fingerprint,
                                    metrics, threshold, artifact_key, params, active)
        VALUES ('bench-m1', now(), '["Brand0","Brand1","Brand2","Brand3","Brand4"]', 'inception_v3', 'none', 299,
                'bench', '{"precision": 0.9, "recall": 0.75}', 0.5, 'models/bench-m1', '{}', true)""",
        ),
        (
            "detections",
            f"""
        INSERT INTO detections (image_sha256, model_version, class_name, score, created_at)
        SELECT md5(i::text) || md5((i + 7)::text), 'bench-m1', 'Brand' || ((i / 4) % {N_BRANDS}),
               CASE WHEN i % 4 = 0 THEN 0.9 ELSE 0.3 END, now()
        FROM generate_series(0, {n_images - 1}) i WHERE i % 4 < 2""",
        ),
        (
            "text_mentions",
            f"""
        INSERT INTO text_mentions (post_id, brand, product, terms)
        SELECT g, 'Brand' || ({h} % 5), '', CAST(CASE WHEN {h} % 20 < 15 THEN '["brand' || ({h} % 5) || '"]'
                                                ELSE '["brand' || ({h} % 5) || ' one"]' END AS json)
        FROM generate_series(1, {n_posts}) g WHERE {h} % 20 >= 10
        UNION ALL
        SELECT g, 'Brand' || ({h} % 5), 'Brand' || ({h} % 5) || ' One', CAST('["brand' || ({h} % 5) || ' one"]' AS json)
        FROM generate_series(1, {n_posts}) g WHERE {h} % 20 >= 15""",
        ),
    ]
    counts = {}
    for name, sql in stmts:
        t0 = time.perf_counter()
        with engine.begin() as conn:
            counts[name] = conn.execute(text(sql)).rowcount
        say(f"  loaded {name}: {counts[name]:,} rows in {time.perf_counter() - t0:.1f}s")
    t0 = time.perf_counter()
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    say(f"  ANALYZE in {time.perf_counter() - t0:.1f}s")
    return counts


# --- the naive baseline: pull the day's rows into Python ------------------------------------


def naive_day(
    engine, day: dt.date, platforms: list[str], model, catalogue: dict[str, list[str]]
) -> dict[tuple, tuple]:
    """Recompute the day's grid in Python from rows pulled out of the database, write it back."""
    start, end = day_bounds(day)
    with engine.begin() as conn:
        posts = conn.execute(
            text(
                "SELECT id, platform, author_hash, posted_at, repost_of FROM posts "
                "WHERE posted_at >= :s AND posted_at < :e"
            ),
            {"s": start, "e": end},
        ).all()
        ids = [p.id for p in posts]
        tm = conn.execute(
            text(
                "SELECT t.post_id, t.brand, t.product FROM text_mentions t JOIN posts p ON p.id = t.post_id "
                "WHERE p.posted_at >= :s AND p.posted_at < :e"
            ),
            {"s": start, "e": end},
        ).all()
        imgs = conn.execute(
            text(
                "SELECT pi.post_id, pi.sha256 FROM post_images pi JOIN posts p ON p.id = pi.post_id "
                "WHERE p.posted_at >= :s AND p.posted_at < :e AND pi.status = 'stored'"
            ),
            {"s": start, "e": end},
        ).all()
        shas = sorted({s for _, s in imgs})
        dets: dict[str, set[str]] = defaultdict(set)
        first: dict[str, tuple] = {}
        for i in range(0, len(shas), 5000):
            chunk = shas[i : i + 5000]
            for sha, cls in conn.execute(
                text(
                    "SELECT image_sha256, class_name FROM detections WHERE model_version = :mv AND score >= :thr "
                    "AND image_sha256 = ANY(:shas)"
                ),
                {"mv": model.version, "thr": model.threshold, "shas": chunk},
            ):
                dets[sha].add(cls)
            for sha, at, pid in conn.execute(
                text(
                    "SELECT pi.sha256, p.posted_at, p.id FROM post_images pi JOIN posts p ON p.id = pi.post_id "
                    "WHERE pi.sha256 = ANY(:shas)"
                ),
                {"shas": chunk},
            ):
                if sha not in first or (at, pid) < first[sha]:
                    first[sha] = (at, pid)
        texts: dict[int, dict[str, set[str]]] = defaultdict(lambda: defaultdict(set))
        for pid, b, prod in tm:
            texts[pid][b]  # noqa: B018 - touch: brand-level mention
            if prod:
                texts[pid][b].add(prod)
        by_post: dict[int, list[str]] = defaultdict(list)
        for pid, sha in imgs:
            by_post[pid].append(sha)
        acc: dict[tuple, list] = defaultdict(lambda: [0, 0, set(), 0, 0])
        for p in posts:
            th = texts.get(p.id, {})
            img_brands = {b for s in by_post.get(p.id, ()) for b in dets.get(s, ())}
            for b in (set(th) | img_brands) & set(catalogue):
                bshas = {s for s in by_post.get(p.id, ()) if b in dets.get(s, ())}
                in_text, in_img = b in th, bool(bshas)
                new = sum(1 for s in bshas if first[s] == (p.posted_at, p.id))
                repost = p.repost_of is not None or (in_img and not new)
                src = "both" if in_text and in_img else ("text" if in_text else "image")
                targets = [("*", src)] + [
                    (pr, "both" if in_img else "text") for pr in th.get(b, ())
                ]
                for prod, s in targets:
                    for plat in (p.platform, "*"):
                        for source in (s, "any"):
                            a = acc[(b, prod, plat, source)]
                            a[0] += 1
                            a[1] += new
                            a[2].add(p.author_hash)
                            a[3] += int(repost)
                            a[4] += int(s == "image")
        factor = model.factor()
        grid = {}
        for b, prods in catalogue.items():
            for prod in ["*", *prods]:
                for plat in ["*", *platforms]:
                    for source in ("text", "image", "both", "any"):
                        a = acc.get((b, prod, plat, source), [0, 0, set(), 0, 0])
                        grid[(b, prod, plat, source)] = (
                            a[0],
                            a[1],
                            len(a[2]),
                            a[3],
                            (a[0] - a[4]) + a[4] * factor,
                        )
        conn.execute(text("DELETE FROM bench_naive WHERE day = :d"), {"d": day})
        conn.execute(
            text(
                "INSERT INTO bench_naive (day, brand, product, platform, source, posts, images, unique_authors, "
                "reposts, expected_mentions) VALUES (:day, :brand, :product, :platform, :source, :posts, :images, "
                ":unique_authors, :reposts, :expected)"
            ),
            [
                {
                    "day": day,
                    "brand": k[0],
                    "product": k[1],
                    "platform": k[2],
                    "source": k[3],
                    "posts": v[0],
                    "images": v[1],
                    "unique_authors": v[2],
                    "reposts": v[3],
                    "expected": v[4],
                }
                for k, v in grid.items()
            ],
        )
        # Signals in Python too: the 28 days before, from the table.
        hist = conn.execute(
            text(
                "SELECT brand, product, platform, source, day, posts FROM mention_daily WHERE day >= :lo AND day < :d"
            ),
            {"lo": day - dt.timedelta(days=28), "d": day},
        ).all()
        series: dict[tuple, list[int]] = defaultdict(list)
        for r in hist:
            series[(r.brand, r.product, r.platform, r.source)].append(r.posts)
        for k, v in grid.items():
            h = series.get(k, [])
            if len(h) >= 7:
                mean = statistics.fmean(h)
                _ = (v[0] - mean) / max(statistics.pstdev(h), 1.0)
    del ids
    return {k: v[:4] for k, v in grid.items()}


def setbased_counts(engine, day: dt.date) -> dict[tuple, tuple]:
    with engine.connect() as conn:
        rows = conn.execute(
            text(
                "SELECT brand, product, platform, source, posts, images, unique_authors, reposts "
                "FROM mention_daily WHERE day = :d"
            ),
            {"d": day},
        ).all()
    return {
        (r.brand, r.product, r.platform, r.source): (r.posts, r.images, r.unique_authors, r.reposts)
        for r in rows
    }


def timed(fn, *args, repeat: int = 1) -> tuple[float, Any]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn(*args)
        best = min(best, time.perf_counter() - t0)
    return best, out


def run(url: str, n_posts: int, workdir: str) -> dict[str, Any]:
    engine = make_engine(url)
    say(f"schema on {make_url(url).render_as_string(hide_password=True)}")
    upgrade(engine)
    with engine.begin() as conn:
        conn.execute(
            text("CREATE TABLE IF NOT EXISTS bench_naive (LIKE mention_daily INCLUDING DEFAULTS)")
        )
        conn.execute(text("ALTER TABLE bench_naive ALTER COLUMN computed_at DROP NOT NULL"))
        conn.execute(text("ALTER TABLE bench_naive ALTER COLUMN spike DROP NOT NULL"))
    cat = brands()
    with engine.begin() as conn:
        sync_catalogue(conn, cat)
    with engine.connect() as conn:
        present = conn.execute(
            text("SELECT COUNT(*) FROM posts WHERE id <= :n"), {"n": n_posts}
        ).scalar()
    t0 = time.perf_counter()
    if (
        present == n_posts
    ):  # --database-url of an earlier run: reuse its data, rebuild the aggregates
        say(f"reusing the {n_posts:,} posts already loaded")
        with engine.begin() as conn:
            conn.execute(text("DELETE FROM text_mentions WHERE post_id > :n"), {"n": n_posts})
            conn.execute(text("DELETE FROM posts WHERE id > :n"), {"n": n_posts})
            conn.execute(text("TRUNCATE mention_daily, bench_naive"))
        loaded = {}
    else:
        say(f"loading {n_posts:,} posts over {DAYS} days")
        loaded = load(engine, n_posts)
    load_s = time.perf_counter() - t0
    with engine.begin() as conn:
        platforms = known_platforms(conn)
        model = active_model(conn)
        sync_logo_classes(conn, model.classes, cat)  # classes Brand0..4 -> the brands
    res: dict[str, Any] = {
        "posts": n_posts,
        "load_s": round(load_s, 1),
        **{f"rows_{k}": v for k, v in loaded.items()},
    }

    # Rebuild the year.
    days = [YEAR_START + dt.timedelta(days=i) for i in range(DAYS)]
    t0 = time.perf_counter()
    per_day = []
    for i, day in enumerate(days):
        t1 = time.perf_counter()
        with engine.begin() as conn:
            compute_day(conn, day, platforms, model)
        per_day.append(time.perf_counter() - t1)
        if (i + 1) % 73 == 0:
            say(f"  year rebuild: {i + 1}/{DAYS} days, {time.perf_counter() - t0:.1f}s")
    res["year_rebuild_s"] = round(time.perf_counter() - t0, 2)
    res["year_day_median_s"] = round(statistics.median(per_day), 3)
    with engine.connect() as conn:
        res["mention_daily_rows"] = conn.execute(
            text("SELECT COUNT(*) FROM mention_daily")
        ).scalar()

    day = YEAR_START + dt.timedelta(days=200)
    start, _ = day_bounds(day)
    with engine.connect() as conn:
        res["posts_that_day"] = conn.execute(
            text(
                "SELECT COUNT(*) FROM posts WHERE posted_at >= :s AND posted_at < :s + interval '1 day'"
            ),
            {"s": start},
        ).scalar()

    def one_day_sql() -> dict:
        with engine.begin() as conn:
            return compute_day(conn, day, platforms, model)

    res["one_day_sql_unchanged_s"], r = timed(one_day_sql, repeat=3)
    assert r["counts_changed"] == 0 and r["signals_changed"] == 0, r

    # A late post on that day: its counts change, then the signals of the 28 following days.
    def late_post() -> tuple[float, float]:
        with engine.begin() as conn:
            conn.execute(
                text(
                    "INSERT INTO posts (id, platform, external_id, source, author_hash, text, posted_at, content_hash, "
                    "ingested_at, updated_at) VALUES (:id, 'mastodon', :ext, 'bench', 'late', 'brand1 late', :at, 'x', now(), now())"
                ),
                {
                    "id": n_posts + 1,
                    "ext": f"late-{n_posts + 1}",
                    "at": start + dt.timedelta(hours=12),
                },
            )
            conn.execute(
                text(
                    "INSERT INTO text_mentions (post_id, brand, product, terms) VALUES (:id, 'Brand1', '', '[]')"
                ),
                {"id": n_posts + 1},
            )
        from pipeline.aggregate.daily import update_signals

        t0 = time.perf_counter()
        with engine.begin() as conn:
            changed = compute_day(conn, day, platforms, model)
        own = time.perf_counter() - t0
        assert changed["counts_changed"] > 0
        for k in range(1, 29):
            with engine.begin() as conn:
                update_signals(conn, day + dt.timedelta(days=k))
        return own, time.perf_counter() - t0

    own, with_followers = late_post()
    res["one_day_sql_late_post_s"] = round(own, 3)
    res["one_day_late_post_with_28_signal_days_s"] = round(with_followers, 3)

    # The job path for that day: catalogue and class-map sync, text matching, SQL, late images.
    from pipeline.aggregate.jobs import aggregate_dirty, aggregate_range
    from pipeline.dirty import mark_days

    settings = load_settings(
        env={
            "BRANDMON_DATABASE_URL": url,
            "BRANDMON_HOME": f"{workdir}/home",
            "BRANDMON_STORAGE_URL": f"file://{workdir}/lake",
            "BRANDMON_AUTHOR_SALT": "bench",
        }
    )
    ctx = Context(settings.with_overrides(brands=cat))
    res["one_day_job_cold_s"], cold = timed(lambda: aggregate_range(ctx, day, day))
    res["job_cold_posts_matched"] = cold["posts_matched"]
    res["one_day_job_unchanged_s"], warm = timed(lambda: aggregate_range(ctx, day, day), repeat=3)
    res["job_unchanged_posts_matched"] = warm["posts_matched"]
    assert warm["posts_matched"] == 0 and warm["rows_changed"] == 0, warm

    def job_late_post() -> dict:
        with engine.begin() as conn:  # as ingestion leaves it: a new post, its day marked
            conn.execute(
                text(
                    "INSERT INTO posts (id, platform, external_id, source, author_hash, text, posted_at, content_hash, "
                    "ingested_at, updated_at) VALUES (:id, 'reddit', :ext, 'bench', 'late2', 'brand3 one, late', :at, "
                    "'late2', now(), now())"
                ),
                {"id": n_posts + 2, "ext": f"late-{n_posts + 2}", "at": start + dt.timedelta(hours=13)},
            )
            mark_days(conn, [day], "bench")
        return aggregate_dirty(ctx)

    res["one_day_job_late_post_s"], late = timed(job_late_post)
    res["job_late_posts_matched"] = late["posts_matched"]
    res["job_late_followers"] = late["followers"]
    assert late["posts_matched"] == 1 and late["rows_changed"] > 0, late
    ctx.close()

    # Baseline: the same day pulled into Python.
    catalogue = {b.name: [p.name for p in b.products] for b in cat}
    res["one_day_naive_python_s"], naive = timed(
        naive_day, engine, day, platforms, model, catalogue, repeat=2
    )
    setb = setbased_counts(engine, day)
    res["naive_equals_setbased"] = naive == setb
    if naive != setb:
        diff = [k for k in setb if naive.get(k) != setb[k]][:5]
        say(f"  MISMATCH naive vs set-based, e.g. {[(k, naive.get(k), setb[k]) for k in diff]}")
    res["ratio_naive_over_setbased"] = round(
        res["one_day_naive_python_s"] / res["one_day_sql_unchanged_s"], 1
    )
    res["one_day_sql_unchanged_s"] = round(res["one_day_sql_unchanged_s"], 3)
    for k in ("one_day_job_cold_s", "one_day_job_unchanged_s", "one_day_job_late_post_s"):
        res[k] = round(res[k], 3)
    res["one_day_naive_python_s"] = round(res["one_day_naive_python_s"], 3)
    engine.dispose()
    return res


def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} {five:.2f} {fifteen:.2f} ({os.cpu_count()} CPUs)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument(
        "--posts", type=int, default=10_000_000, help="posts over the year (default 10,000,000)"
    )
    ap.add_argument(
        "--database-url",
        help="an empty Postgres database (default: a fresh database on BRANDMON_TEST_PG_URL's server, "
        "else on a throwaway cluster)",
    )
    args = ap.parse_args(argv)
    import shutil
    import tempfile
    import uuid

    from tests.support.services import PostgresCluster, create_database, drop_database

    workdir = tempfile.mkdtemp(prefix="brandmon-bench-agg-")
    cluster = None
    admin_url, db_name = None, None
    url = args.database_url
    if not url:
        admin_url = os.environ.get("BRANDMON_TEST_PG_URL")
        if not admin_url:
            cluster = PostgresCluster().start()
            admin_url = cluster.url
            say(f"throwaway Postgres cluster in {cluster.base} (port {cluster.port})")
        db_name = f"bench_aggregate_{uuid.uuid4().hex[:8]}"
        url = create_database(admin_url, db_name)
    say(f"started {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; load average {_load()}")
    try:
        res = run(url, args.posts, workdir)
    finally:
        if admin_url and db_name and not cluster:
            drop_database(admin_url, db_name)
        if cluster:
            create_engine(cluster.url).dispose()
            cluster.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    say(f"finished {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; load average {_load()}")
    say("")
    width = max(len(k) for k in res)
    for k, v in res.items():
        say(
            f"{k:<{width}}  {v:,}"
            if isinstance(v, int) and not isinstance(v, bool)
            else f"{k:<{width}}  {v}"
        )
    say("")
    say(
        f"one day, set-based SQL: {res['one_day_sql_unchanged_s']:.3f}s (target < 1s); "
        f"naive Python baseline: {res['one_day_naive_python_s']:.3f}s -> {res['ratio_naive_over_setbased']}x"
    )
    say(
        f"one day, job path: unchanged {res['one_day_job_unchanged_s']:.3f}s, one late post "
        f"{res['one_day_job_late_post_s']:.3f}s (with the 28 following days' signals), cold "
        f"{res['one_day_job_cold_s']:.3f}s ({res['job_cold_posts_matched']:,} posts matched)"
    )
    return 0 if res["naive_equals_setbased"] else 1


if __name__ == "__main__":
    sys.exit(main())
