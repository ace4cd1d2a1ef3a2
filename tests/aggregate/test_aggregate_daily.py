"""mention_daily against an independent recount, on SQLite and Postgres; incremental behaviour."""

from __future__ import annotations

import datetime as dt
import hashlib

import pytest
from agg_helpers import (
    CONFIG,
    FakePost,
    add_detections,
    add_model,
    add_posts,
    dataset_detections,
    dataset_posts,
    recount,
    sha,
    signals_oracle,
    ts,
)
from sqlalchemy import select, text, update

from pipeline.aggregate.daily import SOURCES
from pipeline.aggregate.jobs import AggregateError, aggregate_dirty, aggregate_range
from pipeline.aggregate.trends import daily_series
from pipeline.dirty import mark_days, pending_days
from pipeline.schema import mention_daily, model_versions
from pipeline.synthetic import demo_config, generate_dataset

START = dt.date(2026, 10, 1)
DAYS = 30
P, R = 0.8, 0.5  # the active model's measured logo precision / recall
COUNT_COLS = ("posts", "images", "unique_authors", "reposts")


def all_rows(ctx) -> dict[tuple, dict]:
    with ctx.engine.connect() as conn:
        rows = conn.execute(select(mention_daily)).mappings().all()
    return {(r["day"], r["brand"], r["product"], r["platform"], r["source"]): dict(r) for r in rows}


def load_dataset(make_ctx, backend: str):
    ds = generate_dataset(seed=7, days=DAYS, start=START)
    ctx = make_ctx(demo_config(), backend)
    tps = dataset_posts(ds)
    m1, m0 = dataset_detections(ds)
    with ctx.engine.begin() as conn:
        add_model(conn, "m0", active=False, created_at=dt.datetime(2026, 9, 1, tzinfo=dt.UTC))
        add_model(conn, "m1", metrics={"logo": {"precision": P, "recall": R}})
        add_posts(conn, tps)
        add_detections(conn, m1, "m1")
        add_detections(conn, m0, "m0")
    return ctx, ds, tps, m1


def oracle_for(ds, tps, detections_m1, threshold=0.5):
    catalogue = {b["name"]: {p["name"] for p in b.get("products", [])} for b in demo_config()["brands"]}
    product_brand = {p: b for b, ps in catalogue.items() for p in ps}
    by_ext = {p.external_id: p for p in tps}
    text_hits: dict[int, dict[str, set[str]]] = {}
    for ext, truth in ds.truth.items():
        hits = {b: set() for b in truth["text"]}
        for prod in ds.truth_products[ext]:
            hits.setdefault(product_brand[prod], set()).add(prod)
        if hits:
            text_hits[by_ext[ext].id] = hits
    image_brands: dict[str, set[str]] = {}
    for name, brand, score in detections_m1:
        if score >= threshold:
            image_brands.setdefault(sha(name), set()).add(brand)
    return recount(tps, text_hits, image_brands, catalogue), catalogue


@pytest.fixture
def dataset(make_ctx, backend):
    ctx, ds, tps, m1 = load_dataset(make_ctx, backend)
    result = aggregate_dirty(ctx)
    return ctx, ds, tps, m1, result


def test_counts_equal_independent_recount_every_day(dataset):
    ctx, ds, tps, m1, result = dataset
    assert result["days"] == DAYS and result["model_version"] == "m1"
    oracle, catalogue = oracle_for(ds, tps, m1)
    rows = all_rows(ctx)
    keys_per_day = sum(1 + len(ps) for ps in catalogue.values()) * 4 * len(SOURCES)  # platforms: * + 3
    assert len(rows) == DAYS * keys_per_day  # dense grid: zero rows included
    assert set(oracle) <= set(rows)
    mismatches = []
    for key, row in rows.items():
        want = oracle.get(key, {"posts": 0, "images": 0, "unique_authors": 0, "reposts": 0, "image_posts": 0})
        got = {c: row[c] for c in COUNT_COLS}
        if got != {c: want[c] for c in COUNT_COLS}:
            mismatches.append((key, got, want))
        expected = (want["posts"] - want["image_posts"]) + want["image_posts"] * P / R
        assert row["expected_mentions"] == pytest.approx(expected), key
        assert row["model_version"] == "m1"
    assert mismatches == []
    # Sanity: the oracle is not trivially empty, and the data has re-posts and new images.
    total = {c: sum(v[c] for k, v in oracle.items() if k[2:] == ("*", "*", "any")) for c in COUNT_COLS}
    assert total["posts"] > 1500 and total["reposts"] > 100 and total["images"] > 50


def test_brand_counts_match_the_generator_truth(dataset):
    """Text matching (diacritics, hashtags, near-misses) agrees with the generator's truth."""
    ctx, ds, _, _, _ = dataset
    rows = all_rows(ctx)
    for (brand, day), want in ds.daily_truth().items():
        if (day, brand, "*", "*", "any") not in rows:  # a product entry
            prod = rows[(day, next(b["name"] for b in demo_config()["brands"]
                                   if brand in {p["name"] for p in b["products"]}), brand, "*", "any")]
            assert prod["posts"] == want["posts"], (brand, day)
            continue
        got = {s: rows[(day, brand, "*", "*", s)]["posts"] for s in SOURCES}
        assert got["any"] == want["posts"], (brand, day)
        assert got["text"] + got["both"] == want["text"], (brand, day)
        assert got["image"] + got["both"] == want["image"], (brand, day)
        assert got["both"] == want["both"], (brand, day)


def test_signals_match_python_and_find_the_spike(dataset):
    ctx, ds, _, _, _ = dataset
    rows = all_rows(ctx)
    days = {START + dt.timedelta(days=i) for i in range(DAYS)}
    for brand in ("Acme", "Globex", "Initech"):
        for platform in ("*", "bluesky"):
            series = {d: rows[(d, brand, "*", platform, "any")]["posts"] for d in days}
            for d in sorted(days):
                want = signals_oracle(series, d, days)
                row = rows[(d, brand, "*", platform, "any")]
                for k in ("rolling_7", "rolling_28", "wow_change", "zscore"):
                    assert row[k] == pytest.approx(want[k]), (brand, platform, d, k)
                assert bool(row["spike"]) == want["spike"], (brand, platform, d)
    spike_brand, spike_day = ds.spike
    flagged = sorted(d for (d, b, pr, pl, s), r in rows.items()
                     if b == spike_brand and (pr, pl, s) == ("*", "*", "any") and r["spike"])
    assert flagged == [spike_day]
    assert not any(r["spike"] for (d, b, pr, pl, s), r in rows.items() if b == "Acme" and (pr, pl, s) == ("*", "*", "any"))
    # Share of voice over the brands sums to 1 on each day, platform and source with mentions.
    for d in days:
        for s in SOURCES:
            shares = [rows[(d, b, "*", "*", s)]["share_of_voice"] for b in ("Acme", "Globex", "Initech")]
            if any(v is not None for v in shares):
                assert sum(shares) == pytest.approx(1.0)
    # The rising brand's last week is up on the week before.
    last = rows[(START + dt.timedelta(days=DAYS - 1), ds.rising, "*", "*", "any")]
    assert last["wow_change"] > 0


def test_reaggregating_is_a_no_op(dataset):
    ctx, *_ = dataset
    before = all_rows(ctx)
    again = aggregate_range(ctx, START - dt.timedelta(days=0), START + dt.timedelta(days=DAYS - 1))
    assert again["days"] == DAYS
    assert again["rows_changed"] == 0 and again["signals_changed"] == 0 and again["followers"] == 0
    assert all_rows(ctx) == before  # computed_at included: unchanged rows are not rewritten
    nothing = aggregate_dirty(ctx)
    assert nothing["days"] == 0 and all_rows(ctx) == before


def test_late_post_changes_only_its_own_day(dataset):
    ctx, *_ = dataset
    before = all_rows(ctx)
    late_day = START + dt.timedelta(days=10)
    with ctx.engine.begin() as conn:
        add_posts(conn, [FakePost(id=900001, external_id="late-1", posted_at=ts(late_day, 9),
                                  text="Finally tried the Acmé One", platform="reddit", author="late-author")])
        assert pending_days(conn) == [late_day]
    res = aggregate_dirty(ctx)
    assert res["days"] == 1 and res["late_image_days"] == 0
    after = all_rows(ctx)
    assert set(after) == set(before)
    changed_counts = {k for k in after if any(after[k][c] != before[k][c] for c in COUNT_COLS)}
    assert changed_counts and {k[0] for k in changed_counts} == {late_day}
    for key in [(late_day, "Acme", "*", "*", "any"), (late_day, "Acme", "Acme One", "reddit", "text")]:
        assert after[key]["posts"] == before[key]["posts"] + 1
    changed_any = {k[0] for k in after if after[k] != before[k]}
    assert min(changed_any) == late_day
    assert max(changed_any) <= late_day + dt.timedelta(days=28)
    assert changed_any - {late_day}, "signals of the following days should move"
    for k in after:  # days before the late post are untouched, computed_at included
        if k[0] < late_day:
            assert after[k] == before[k]
    assert res["followers"] == DAYS - 11


def image_days(tps) -> set[dt.date]:
    return {p.day for p in tps if p.images}


def assert_counts_match(ctx, ds, tps, detections, version, threshold=0.5):
    oracle, _ = oracle_for(ds, tps, detections, threshold)
    rows = all_rows(ctx)
    for key, want in oracle.items():
        if key[0] in image_days(tps):
            assert {c: rows[key][c] for c in COUNT_COLS} == {c: want[c] for c in COUNT_COLS}, key
            assert rows[key]["model_version"] == version
    return oracle, rows


def test_activating_a_model_restates_image_counts(dataset):
    """`registry.activate` marks every day with an image the old or the new version scored,
    so the next `aggregate` restates them: nobody marks days by hand."""
    from pipeline.detector.registry import activate

    ctx, ds, tps, _, _ = dataset
    with ctx.engine.connect() as conn:
        assert pending_days(conn) == []
    activate(ctx, "m0")
    with ctx.engine.connect() as conn:
        assert set(pending_days(conn)) == image_days(tps)
        reasons = {r for (r,) in conn.execute(text("SELECT DISTINCT reason FROM dirty_days"))}
    assert reasons == {"activate m0"}
    res = aggregate_dirty(ctx)
    assert res["model_version"] == "m0" and res["days"] == len(image_days(tps))
    _, m0 = dataset_detections(ds)
    oracle, rows = assert_counts_match(ctx, ds, tps, m0, "m0")
    for key, want in oracle.items():
        # m0 has no measured precision/recall: image-bearing rows cannot be corrected.
        if key[0] in image_days(tps) and want["image_posts"]:
            assert rows[key]["expected_mentions"] is None
    # Re-activating the active version changes nothing and marks nothing.
    activate(ctx, "m0")
    with ctx.engine.connect() as conn:
        assert pending_days(conn) == []


def test_threshold_or_activation_outside_the_registry_is_caught_by_aggregate(dataset):
    """A threshold changed in the registry row (or a model flagged active by SQL) differs from
    what the last aggregation counted with: `aggregate` marks and restates those days itself."""
    ctx, ds, tps, m1, _ = dataset
    with ctx.engine.begin() as conn:
        conn.execute(update(model_versions).where(model_versions.c.version == "m1").values(threshold=0.95))
        assert pending_days(conn) == []
    res = aggregate_dirty(ctx)
    assert res["model_change_days"] == len(image_days(tps)) and res["days"] == len(image_days(tps))
    assert_counts_match(ctx, ds, tps, m1, "m1", threshold=0.95)
    rows = all_rows(ctx)
    assert sum(r["posts"] for k, r in rows.items() if k[2:] == ("*", "*", "image")) == 0  # 0.9 < 0.95
    assert aggregate_dirty(ctx)["days"] == 0  # counted with 0.95 now: nothing more to do
    with ctx.engine.begin() as conn:
        # the database holds at most one active model (migration 0008's unique index, checked row
        # by row): SQL switches models in two steps, as README says
        conn.execute(update(model_versions).where(model_versions.c.active).values(active=False))
        conn.execute(update(model_versions).where(model_versions.c.version == "m0").values(active=True))
    res = aggregate_dirty(ctx)
    assert res["model_version"] == "m0" and res["days"] == len(image_days(tps))
    assert_counts_match(ctx, ds, tps, dataset_detections(ds)[1], "m0")


def test_reposts_new_images_and_late_images(make_ctx):
    ctx = make_ctx(CONFIG)
    d1, d2, d3 = START, START + dt.timedelta(days=1), START + dt.timedelta(days=2)
    with ctx.engine.begin() as conn:
        add_model(conn, "m1")
        add_posts(conn, [
            FakePost(1, "p1", ts(d2, 10), "look", author="u1", images=["logo-a"]),
            FakePost(2, "p2", ts(d2, 11), "again", author="u2", images=["logo-a", "logo-b"]),
            FakePost(3, "p3", ts(d2, 11), "same time, lower id wins", author="u3", images=["logo-b"]),
            FakePost(4, "p4", ts(d3, 9), "acme", author="u1", repost_of="p1", images=["logo-a"]),
            FakePost(5, "p5", ts(d3, 9), "my acme", author="u4"),
        ])
        add_detections(conn, [("logo-a", "Acme", 0.9), ("logo-b", "Acme", 0.7)])
    aggregate_dirty(ctx)
    rows = all_rows(ctx)
    day2 = rows[(d2, "Acme", "*", "*", "image")]
    # p1: new logo-a; p2: logo-a seen, logo-b new -> not a repost; p3: logo-b seen in p2 (same
    # second, lower id) -> repost.
    assert (day2["posts"], day2["images"], day2["reposts"], day2["unique_authors"]) == (3, 2, 1, 3)
    day3 = rows[(d3, "Acme", "*", "*", "any")]
    assert (day3["posts"], day3["images"], day3["reposts"]) == (2, 0, 1)
    assert rows[(d3, "Acme", "*", "*", "both")]["posts"] == 1
    # A late post on day 1 carrying logo-a (ingested after p1): p1 becomes a repost, and day 2
    # is recomputed in the same run although only day 1 was marked.
    with ctx.engine.begin() as conn:
        # ingested now, i.e. after p1 and p4 although posted before them
        add_posts(conn, [FakePost(6, "p0", ts(d1, 8), "old photo", author="u9", images=["logo-a"])])
        assert pending_days(conn) == [d1]
    res = aggregate_dirty(ctx)
    assert res["late_image_days"] == 2 and res["days"] == 3
    rows = all_rows(ctx)
    assert (rows[(d1, "Acme", "*", "*", "image")]["images"], rows[(d1, "Acme", "*", "*", "image")]["reposts"]) == (1, 0)
    day2 = rows[(d2, "Acme", "*", "*", "image")]
    assert (day2["images"], day2["reposts"]) == (1, 2)
    with ctx.engine.connect() as conn:
        assert pending_days(conn) == []


def test_threshold_inactive_model_and_catalogue_filter(make_ctx):
    ctx = make_ctx(CONFIG)
    with ctx.engine.begin() as conn:
        add_model(conn, "m1", threshold=0.6)
        add_model(conn, "old", active=False)
        add_posts(conn, [
            FakePost(1, "p1", ts(START), "", images=["x"]),
            FakePost(2, "p2", ts(START), "", images=["y"]),
            FakePost(3, "p3", ts(START), "", images=["z"]),
        ])
        add_detections(conn, [("x", "Acme", 0.6), ("y", "Acme", 0.59), ("z", "Unlisted", 0.99)])
        add_detections(conn, [("y", "Globex", 0.99)], version="old")
    aggregate_dirty(ctx)
    rows = all_rows(ctx)
    assert rows[(START, "Acme", "*", "*", "image")]["posts"] == 1
    assert rows[(START, "Globex", "*", "*", "any")]["posts"] == 0
    assert not any(k[1] == "Unlisted" for k in rows)


def test_text_rules_exclusions_accounts_products(make_ctx):
    ctx = make_ctx(CONFIG)
    with ctx.engine.begin() as conn:
        add_posts(conn, [
            FakePost(1, "p1", ts(START, 1), "Acme ville is lovely, acme too"),  # excluded
            FakePost(2, "p2", ts(START, 2), "hi @acme_official and #Globex"),
            FakePost(3, "p3", ts(START, 3), "ACME-One or acme go? both!", platform="bluesky"),
            FakePost(4, "p4", ts(START, 4), "グロベックスの新製品"),
            FakePost(5, "p5", ts(START, 5), "acmes and superacme and #acmefans"),  # near misses
        ])
    aggregate_dirty(ctx)
    rows = all_rows(ctx)
    assert rows[(START, "Acme", "*", "*", "text")]["posts"] == 2
    assert rows[(START, "Acme", "Acme One", "bluesky", "text")]["posts"] == 1
    assert rows[(START, "Acme", "Acme Go", "*", "any")]["posts"] == 1
    assert rows[(START, "Globex", "*", "*", "text")]["posts"] == 2
    assert rows[(START, "Acme", "*", "*", "image")]["model_version"] is None
    with ctx.engine.connect() as conn:
        terms = dict(conn.execute(text("SELECT post_id, terms FROM text_mentions WHERE brand = 'Acme' AND product = ''")).all())
    assert set(terms) == {2, 3}


def test_catalogue_change_restates_only_the_requested_days(make_ctx):
    from pipeline.context import Context

    ctx = make_ctx(CONFIG)
    with ctx.engine.begin() as conn:
        add_posts(conn, [FakePost(1, "p1", ts(START), "initech and acme"),
                         FakePost(2, "p2", ts(START + dt.timedelta(days=1)), "initech!")])
    aggregate_dirty(ctx)
    smaller = tuple(b for b in ctx.settings.brands if b.name != "Initech")
    ctx2 = Context(ctx.settings.with_overrides(brands=smaller))
    res = aggregate_range(ctx2, START, START)
    assert res["catalogue_changes"] > 0 and res["rows_changed"] > 0
    rows = all_rows(ctx2)
    assert not any(k[1] == "Initech" and k[0] == START for k in rows)  # stale rows deleted
    assert rows[(START + dt.timedelta(days=1), "Initech", "*", "*", "any")]["posts"] == 1  # not restated
    ctx2.close()


def test_range_validation_and_series(make_ctx):
    ctx = make_ctx(CONFIG)
    with pytest.raises(AggregateError):
        aggregate_range(ctx, START, START - dt.timedelta(days=1))
    with ctx.engine.begin() as conn:
        add_posts(conn, [FakePost(1, "p1", ts(START), "acme")])
        mark_days(conn, [START], "test")
    aggregate_dirty(ctx)
    series = daily_series(ctx, "acme", START - dt.timedelta(days=1), START + dt.timedelta(days=1))
    assert [r["posts"] for r in series] == [0, 1, 0]
    assert [r["computed"] for r in series] == [False, True, False]
    assert series[1]["rolling_7"] == 1.0 and series[1]["spike"] is False


@pytest.mark.integration
def test_day_planner_settings_are_local_on_postgres(make_ctx):
    """Planner settings for the day (JIT off, SSD page costs): set for that transaction only."""
    from pipeline.aggregate.daily import compute_day
    from pipeline.aggregate.mentions import ActiveModel

    ctx = make_ctx(CONFIG, "postgres")
    with ctx.engine.connect() as conn:
        default = [conn.exec_driver_sql(f"SHOW {k}").scalar() for k in ("jit", "random_page_cost")]
    with ctx.engine.begin() as conn:
        compute_day(conn, START, ["mastodon"], ActiveModel())
        assert conn.exec_driver_sql("SHOW jit").scalar() == "off"
        assert conn.exec_driver_sql("SHOW random_page_cost").scalar() == "1.1"
    with ctx.engine.connect() as conn:
        assert [conn.exec_driver_sql(f"SHOW {k}").scalar() for k in ("jit", "random_page_cost")] == default


def test_text_mentions_diff_rewrites_only_changed_posts():
    from pipeline.aggregate.mentions import diff_text_mentions

    def row(pid, brand, product="", terms=("acme",)):
        return {"post_id": pid, "brand": brand, "product": product, "terms": list(terms)}

    old = {1: [row(1, "Acme")], 2: [row(2, "Acme"), row(2, "Globex", terms=["globex"])], 3: [row(3, "Acme")]}
    new = {1: [row(1, "Acme")], 2: [row(2, "Globex", terms=["globex"]), row(2, "Acme")],  # same, reordered
           3: [row(3, "Acme", terms=["#acme"])], 4: [row(4, "Initech")]}
    new_rows = {5: [row(5, "Acme")]}
    assert diff_text_mentions(old, new) == ([3, 4], [new[3][0], new[4][0]])
    assert diff_text_mentions(old, {}) == ([1, 2, 3], [])
    assert diff_text_mentions({}, new_rows) == ([5], new_rows[5])


def test_edited_post_text_updates_its_mentions(make_ctx):
    ctx = make_ctx(CONFIG)
    with ctx.engine.begin() as conn:
        add_posts(conn, [FakePost(1, "p1", ts(START), "acme and globex"), FakePost(2, "p2", ts(START), "acme")])
    aggregate_dirty(ctx)
    with ctx.engine.begin() as conn:
        # an edit, as the loader writes it: new text, new content_hash
        conn.execute(text("UPDATE posts SET text = 'initech only', content_hash = 'edited' WHERE id = 1"))
        mark_days(conn, [START], "edit")
    aggregate_dirty(ctx)
    rows = all_rows(ctx)
    assert [rows[(START, b, "*", "*", "any")]["posts"] for b in ("Acme", "Globex", "Initech")] == [1, 0, 1]
    with ctx.engine.connect() as conn:
        got = sorted(conn.execute(text("SELECT post_id, brand FROM text_mentions")).all())
    assert got == [(1, "Initech"), (2, "Acme")]


def text_mentions_of(ctx) -> set[tuple]:
    with ctx.engine.connect() as conn:
        return {(r.post_id, r.brand, r.product) for r in conn.execute(text("SELECT post_id, brand, product FROM text_mentions"))}


def rematch_all(ctx, brands) -> set[tuple]:
    """What matching every post from scratch gives (the oracle for incremental matching)."""
    from pipeline.aggregate.textmatch import compile_catalogue

    matcher = compile_catalogue(brands)
    with ctx.engine.connect() as conn:
        rows = conn.execute(text("SELECT id, text FROM posts")).all()
    return {(pid, h.brand, h.product or "") for pid, body in rows for h in matcher.match(body)}


def test_recomputing_a_day_matches_only_new_edited_or_unmatched_posts(make_ctx, backend):
    """Text matching is incremental (text_match_state): an unchanged day matches nothing, a
    late or edited post is the only one matched, and a catalogue change re-matches them all."""
    from pipeline.context import Context
    from pipeline.settings import Brand

    ctx = make_ctx(CONFIG, backend)
    words = ["acme", "globex max", "nothing here", "initech", "acme one and globex"]
    with ctx.engine.begin() as conn:
        add_posts(conn, [FakePost(i, f"p{i}", ts(START, i % 24, i % 60), words[i % 5]) for i in range(1, 51)])
    first = aggregate_range(ctx, START, START)
    assert first["posts_matched"] == 50 and first["mentions_rewritten"] > 0
    again = aggregate_range(ctx, START, START)
    assert (again["posts_matched"], again["mentions_rewritten"], again["rows_changed"]) == (0, 0, 0)

    with ctx.engine.begin() as conn:  # a late post, and an edit (the loader changes content_hash)
        add_posts(conn, [FakePost(51, "p51", ts(START, 23), "#globex")])
    late = aggregate_dirty(ctx)
    assert (late["posts_matched"], late["mentions_rewritten"]) == (1, 1)
    with ctx.engine.begin() as conn:
        conn.execute(text("UPDATE posts SET text = 'initech!', content_hash = 'e1' WHERE id = 1"))
        conn.execute(text("UPDATE posts SET content_hash = 'e2' WHERE id = 2"))  # same text, new hash
        mark_days(conn, [START], "edit")
    edited = aggregate_dirty(ctx)
    assert (edited["posts_matched"], edited["mentions_rewritten"]) == (2, 1)
    assert text_mentions_of(ctx) == rematch_all(ctx, ctx.settings.brands)

    # A catalogue change: `aggregate --start --end` re-matches every post of the range.
    brands = (*ctx.settings.brands, Brand("Nothing", keywords=("nothing",)))
    ctx2 = Context(ctx.settings.with_overrides(brands=brands))
    try:
        restated = aggregate_range(ctx2, START, START)
        assert restated["posts_matched"] == 51 and restated["mentions_rewritten"] == 10
        assert text_mentions_of(ctx2) == rematch_all(ctx2, brands)
        assert all_rows(ctx2)[(START, "Nothing", "*", "*", "text")]["posts"] == 10
        assert aggregate_range(ctx2, START, START)["posts_matched"] == 0
    finally:
        ctx2.close()


def test_signals_treat_days_without_rows_as_zero(make_ctx, backend):
    """A gap of five days with no post at all (never marked, so no rows): rolling means,
    week-over-week change, z-score and baseline count those days as zero, not as missing."""
    ctx = make_ctx(CONFIG, backend)
    gap = {START + dt.timedelta(days=k) for k in range(10, 15)}
    days = [START + dt.timedelta(days=k) for k in range(22) if START + dt.timedelta(days=k) not in gap]
    counts = {d: (20 if d == START + dt.timedelta(days=15) else 2 + (d - START).days % 3) for d in days}
    posts, pid = [], 1
    for d, n in counts.items():
        for k in range(n):
            posts.append(FakePost(pid, f"p{pid}", ts(d, k % 24), "acme", author=f"u{k}"))
            pid += 1
    with ctx.engine.begin() as conn:
        add_posts(conn, posts)
    aggregate_dirty(ctx)
    rows = all_rows(ctx)
    assert not {k[0] for k in rows} & gap  # the gap has no rows at all
    series = {d: rows[(d, "Acme", "*", "*", "any")]["posts"] for d in days}
    assert series == counts
    for d in days:
        want = signals_oracle(series, d, set(days))
        row = rows[(d, "Acme", "*", "*", "any")]
        for k in ("rolling_7", "rolling_28", "wow_change", "zscore", "baseline"):
            assert row[k] == pytest.approx(want[k]), (d, k)
        assert bool(row["spike"]) == want["spike"], d
    after = rows[(START + dt.timedelta(days=15), "Acme", "*", "*", "any")]
    # day 15's week: day 9, five zero days, day 15 (the old code divided by the 2 days with rows)
    assert after["rolling_7"] == pytest.approx((counts[START + dt.timedelta(days=9)] + 20) / 7)
    before_gap = sum(counts[START + dt.timedelta(days=k)] for k in range(10))
    assert after["baseline"] == pytest.approx(before_gap / 15)  # 10 days with posts + 5 zero days
    assert bool(after["spike"])


def _jpeg_bytes() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (48, 40), (200, 30, 30)).save(out, "JPEG")
    return out.getvalue()


def test_an_image_stored_after_its_day_was_aggregated_restates_its_day_and_later_ones(make_ctx, backend):
    """Regression (found by the Airflow stack test's comparison with the command line): ingest
    commits a window's posts, an aggregation runs before the window's images are stored, and
    the image's content was already scored (a repost), so detection never marks its day again.
    Storing the image must mark its post's day and the later days whose posts now re-post it."""
    from sqlalchemy import insert

    from pipeline.ingest.images import pending_rows, process, storage_key
    from pipeline.schema import detections, image_scores, images, post_images

    ctx = make_ctx(CONFIG, backend)
    d2, d3 = START + dt.timedelta(days=1), START + dt.timedelta(days=2)
    data = _jpeg_bytes()
    digest = hashlib.sha256(data).hexdigest()
    with ctx.engine.begin() as conn:
        add_model(conn, "m1")
        add_posts(conn, [FakePost(3, "p3", ts(d3, 9), "look", author="u3"),
                         FakePost(2, "p2", ts(d2, 9), "my acme", author="u2")])
        conn.execute(insert(images).values(sha256=digest, storage_key=storage_key(digest), mime="image/jpeg", size_bytes=len(data)))
        conn.execute(insert(post_images), [
            {"post_id": 3, "position": 0, "url": "https://img.example/a.jpg", "sha256": digest, "status": "stored"},
            {"post_id": 2, "position": 0, "url": "https://img.example/b.jpg", "sha256": None, "status": "pending"},
        ])
        conn.execute(insert(detections).values(image_sha256=digest, model_version="m1", class_name="Acme", score=0.9))
        conn.execute(insert(image_scores).values(image_sha256=digest, model_version="m1", status="ok", top_class="Acme",
                                                 top_score=0.9, scored_at=ts(d3)))
    aggregate_dirty(ctx)  # before day 2's image is stored: p2 is a text mention, p3 a new image
    rows = all_rows(ctx)
    assert rows[(d2, "Acme", "*", "*", "text")]["posts"] == 1 and rows[(d2, "Acme", "*", "*", "both")]["posts"] == 0
    assert (rows[(d3, "Acme", "*", "*", "image")]["images"], rows[(d3, "Acme", "*", "*", "image")]["reposts"]) == (1, 0)

    with ctx.engine.connect() as conn:
        todo = pending_rows(conn)
    got = process(ctx, todo, {"test": lambda _url: data})
    assert got["images_stored"] == 1
    with ctx.engine.connect() as conn:
        assert pending_days(conn) == [d2, d3]  # the post's own day, and the later re-post's
    aggregate_dirty(ctx)
    rows = all_rows(ctx)
    both2, image3 = rows[(d2, "Acme", "*", "*", "both")], rows[(d3, "Acme", "*", "*", "image")]
    assert rows[(d2, "Acme", "*", "*", "text")]["posts"] == 0
    assert (both2["posts"], both2["images"], both2["reposts"]) == (1, 1, 0)  # first appearance now
    assert (image3["posts"], image3["images"], image3["reposts"]) == (1, 0, 1)  # a re-post now
    incremental = {k: {c: v for c, v in r.items() if c != "computed_at"} for k, r in rows.items()}
    aggregate_range(ctx, d2, d3)  # a full restatement finds nothing left to change
    assert {k: {c: v for c, v in r.items() if c != "computed_at"} for k, r in all_rows(ctx).items()} == incremental


class _Recorder:
    """A Progress that keeps what the job reported: (desc, total, unit) and the updates."""

    def __init__(self) -> None:
        self.trackers: list[dict] = []

    def __call__(self, total, desc, unit="it"):
        rec = {"desc": desc, "total": total, "unit": unit, "done": 0, "closed": False}
        self.trackers.append(rec)

        class Tracker:
            def update(self, n: int = 1) -> None:
                rec["done"] += n

            def note(self, **fields) -> None:
                rec.update(fields)

            def close(self) -> None:
                rec["closed"] = True

        return Tracker()


def test_aggregation_reports_progress_through_the_callers_progress(make_ctx) -> None:
    """Progress is the caller's: one tracker per stage, every day counted, each closed; none
    given = silent (the other tests)."""
    ctx = make_ctx(CONFIG)
    with ctx.engine.begin() as conn:
        add_posts(conn, [FakePost(i, f"p{i}", ts(START + dt.timedelta(days=i % 3), 9), "acme") for i in range(1, 10)])
    progress = _Recorder()
    res = aggregate_range(ctx, START, START + dt.timedelta(days=2), progress=progress)
    stages = {t["desc"]: t for t in progress.trackers}
    assert set(stages) == {"aggregate", "signals"}
    assert stages["aggregate"] == {"desc": "aggregate", "total": 3, "unit": "day", "done": 3, "closed": True}
    assert stages["signals"]["done"] == stages["signals"]["total"] == res["followers"]
    assert all(t["closed"] for t in progress.trackers)
