"""The synthetic feed: deterministic, the right size, and every case the pipeline must handle."""

from __future__ import annotations

import datetime as dt
import io
import os
import re
import subprocess
import sys
import unicodedata
from collections import Counter

import pytest
from PIL import Image

from pipeline.synthetic import CATEGORIES, DEMO_BRANDS, build_dataset, generate_dataset

UTC = dt.UTC


@pytest.fixture(scope="module")
def ds():
    return build_dataset()


def _fold(text: str) -> str:
    nfkd = unicodedata.normalize("NFKD", text.casefold())
    return "".join(c for c in nfkd if not unicodedata.combining(c))


def _text_brands(text: str) -> set[str]:
    """A reference whole-word matcher over keywords, hashtags, aliases and product keywords."""
    folded, found = _fold(text), set()
    for b in DEMO_BRANDS:
        terms = list(b["keywords"]) + list(b["hashtags"]) + list(b.get("aliases", []))
        terms += [k for p in b["products"] for k in p["keywords"]]
        if any(re.search(rf"(?<!\w){re.escape(_fold(t))}(?!\w)", folded) for t in terms):
            found.add(b["name"])
    return found


def test_same_seed_same_posts_and_image_bytes(ds):
    again = build_dataset()
    assert again.posts == ds.posts
    assert again.truth == ds.truth
    assert again.image_urls == ds.image_urls
    for url in ds.image_urls[:5] + ds.image_urls[-3:]:
        assert again.image_bytes(url) == ds.image_bytes(url)
    other = build_dataset(seed=8)
    assert other.posts != ds.posts
    assert other.image_bytes(other.image_urls[0]) != ds.image_bytes(ds.image_urls[0])


def test_generate_dataset_is_cached_and_equals_build(ds):
    a = generate_dataset()
    assert a is generate_dataset(7, 30, "2026-10-01")
    assert a.posts == ds.posts


def test_sizes_and_shape(ds):
    assert 2500 <= len(ds.posts) <= 3500
    assert 250 <= len(ds.image_urls) <= 500
    assert 200 <= len({p["author_id"] for p in ds.posts}) <= 300
    keys = {
        "id",
        "platform",
        "author_id",
        "text",
        "lang",
        "created_at",
        "url",
        "images",
        "reblog_of",
    }
    created = [p["created_at"] for p in ds.posts]
    assert created == sorted(created)
    assert len({p["id"] for p in ds.posts}) == len(ds.posts)
    for p in ds.posts:
        assert set(p) == keys and p["platform"] == "synthetic"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", p["created_at"])
        t = dt.datetime.fromisoformat(p["created_at"])
        assert ds.first <= t < ds.end
        for img in p["images"]:
            assert img["url"].startswith("synthetic://images/") and img["url"].endswith(".jpg")
            assert img["url"] in ds.image_brand
    assert {p["lang"] for p in ds.posts} >= {"en", "fr", "de", "es", "pt", "ja"}


def test_every_category_present(ds):
    counts = Counter(ds.categories.values())
    assert set(counts) == set(CATEGORIES)
    assert all(counts[c] >= 50 for c in CATEGORIES), counts
    by_id = {p["id"]: p for p in ds.posts}
    for pid, cat in ds.categories.items():
        t = ds.truth[pid]
        if cat == "text":
            assert t["text"] and not t["image"]
        elif cat == "image":
            assert t["image"] and not t["text"]
        elif cat == "both":
            assert t["image"] and t["text"]
        elif cat in ("neither", "near_miss"):
            assert not t["image"] and not t["text"]
        else:
            assert by_id[pid]["reblog_of"] in by_id
    assert all(
        by_id[p["reblog_of"]]["created_at"] < p["created_at"]
        for p in by_id.values()
        if p["reblog_of"]
    )


def test_truth_matches_a_whole_word_matcher(ds):
    """Text truth is exactly what a case/diacritics-insensitive whole-word matcher finds."""
    for p in ds.posts:
        assert _text_brands(p["text"]) == ds.truth[p["id"]]["text"], p["text"]
    texts = " ".join(p["text"] for p in ds.posts)
    for tricky in ("Acmé", "ACME", "#acme", "Acme One", "Globex Max", "Initech Pro"):
        assert tricky in texts
    near = [p["text"] for p in ds.posts if ds.categories[p["id"]] == "near_miss"]
    assert any("acmes" in t for t in near) or any("Acmeville" in t for t in near)
    assert all(any(k in _fold(t) for k in ("acme", "globex", "initech")) for t in near)


def test_image_truth_and_reposts(ds):
    for p in ds.posts:
        assert ds.truth[p["id"]]["image"] == {ds.image_brand[i["url"]] for i in p["images"]} - {
            None
        }
    uses = Counter(i["url"] for p in ds.posts if not p["reblog_of"] for i in p["images"])
    assert sum(1 for n in uses.values() if n >= 3) >= 30  # the same image posted by many
    assert set(ds.image_brand.values()) == {None, "Acme", "Globex", "Initech"}


def test_volume_rhythm_spike_and_trend(ds):
    per: dict[str, Counter] = {b["name"]: Counter() for b in DEMO_BRANDS}
    for p in ds.posts:
        t = ds.truth[p["id"]]
        for b in t["text"] | t["image"]:
            per[b][p["created_at"][:10]] += 1
    totals = {b: sum(c.values()) for b, c in per.items()}
    assert totals["Acme"] > 1.4 * totals["Globex"]
    brand, day = ds.spike
    daily = per[brand]
    assert daily[day.isoformat()] > 3 * sorted(daily.values())[len(daily) // 2]
    rising = per[ds.rising]
    days = sorted(rising)
    assert sum(rising[d] for d in days[-7:]) > 2.5 * sum(rising[d] for d in days[:7])
    weekday = Counter()
    for p in ds.posts:
        weekday[dt.date.fromisoformat(p["created_at"][:10]).weekday() >= 5] += 1
    assert weekday[False] / 5 > 1.2 * weekday[True] / 2


def test_posts_between_is_half_open(ds):
    p = ds.posts[100]
    t = dt.datetime.fromisoformat(p["created_at"])
    assert p["id"] in {q["id"] for q in ds.posts_between(t, t + dt.timedelta(seconds=1))}
    assert p["id"] not in {q["id"] for q in ds.posts_between(t - dt.timedelta(hours=1), t)}
    day = dt.datetime(2026, 10, 5, tzinfo=UTC)
    days = [
        ds.posts_between(day + dt.timedelta(days=i), day + dt.timedelta(days=i + 1))
        for i in range(3)
    ]
    whole = ds.posts_between(day, day + dt.timedelta(days=3))
    assert [q["id"] for d in days for q in d] == [q["id"] for q in whole]
    assert len(ds.posts_between(ds.first, ds.end)) == len(ds.posts)
    assert ds.posts_between(ds.end, ds.end + dt.timedelta(days=5)) == []
    cest = dt.timezone(dt.timedelta(hours=2))
    assert (
        ds.posts_between(day.astimezone(cest), (day + dt.timedelta(days=1)).astimezone(cest))
        == days[0]
    )
    with pytest.raises(ValueError):
        ds.posts_between(dt.datetime(2026, 10, 5), dt.datetime(2026, 10, 6))
    copy = ds.posts_between(ds.first, ds.end)[0]
    copy["images"].append({"url": "x", "alt": None})
    assert ds.posts[0]["images"] != copy["images"]


def test_image_bytes(ds):
    url = ds.image_urls[0]
    img = Image.open(io.BytesIO(ds.image_bytes(url)))
    assert img.format == "JPEG" and img.size == (299, 299) and img.mode == "RGB"
    with pytest.raises(KeyError):
        ds.image_bytes("synthetic://images/nope.jpg")


def test_short_windows_and_bad_days():
    small = build_dataset(seed=3, days=2, start=dt.date(2026, 1, 5))
    assert small.posts and all(p["created_at"].startswith("2026-01-0") for p in small.posts)
    with pytest.raises(ValueError):
        build_dataset(days=0)


def test_daily_truth(ds):
    daily = ds.daily_truth()
    brand, day = ds.spike
    spike = daily[(brand, day)]
    assert spike["posts"] >= max(spike["text"], spike["image"]) and spike["both"] <= spike["image"]
    assert spike["posts"] == spike["text"] + spike["image"] - spike["both"]
    total = sum(r["posts"] for (name, _), r in daily.items() if name == "Acme")
    manual = sum(
        1 for p in ds.posts if "Acme" in ds.truth[p["id"]]["text"] | ds.truth[p["id"]]["image"]
    )
    assert total == manual
    assert sum(r["posts"] for (name, _), r in daily.items() if name == "Acme One") > 20
    no_rb = ds.daily_truth(include_reblogs=False)
    assert sum(r["posts"] for r in no_rb.values()) < sum(r["posts"] for r in daily.values())


_DIGEST = """
import hashlib, json
from pipeline.synthetic import build_dataset
ds = build_dataset(days=5)
h = hashlib.sha256(json.dumps(ds.posts).encode())
for u in ds.image_urls[:10]:
    h.update(ds.image_bytes(u))
print(h.hexdigest())
"""


def test_same_bytes_across_processes():
    """No dependence on PYTHONHASHSEED (set order, str hashing) or on process state."""
    digests = {
        subprocess.run(
            [sys.executable, "-c", _DIGEST],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert len(digests) == 1 and len(next(iter(digests))) == 64
