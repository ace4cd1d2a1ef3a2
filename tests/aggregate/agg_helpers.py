"""Helpers for the aggregate tests.

Load posts/images/detections straight into the tables (so these tests do not depend on the
ingestion and detector code), and recount mentions independently in plain Python from the
same inputs: the oracle every `mention_daily` row is checked against.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import insert, select

from pipeline.database import upsert
from pipeline.dirty import mark_days
from pipeline.schema import detections, image_scores, images, model_versions, post_images, posts

CONFIG: dict[str, Any] = {
    "brands": [
        {"name": "Acme", "keywords": ["acme"], "hashtags": ["acme"], "aliases": ["acme corp"],
         "accounts": ["acme_official"], "exclude": ["acme ville"],
         "products": [{"name": "Acme One", "keywords": ["acme one"]}, {"name": "Acme Go", "keywords": ["acme go"]}]},
        {"name": "Globex", "keywords": ["globex", "グロベックス"], "hashtags": ["globex"],
         "products": [{"name": "Globex Max", "keywords": ["globex max"]}]},
        {"name": "Initech", "keywords": ["initech"]},
    ],
}
PLATFORMS = ("mastodon", "bluesky", "reddit")


def sha(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def ts(day: dt.date, hour: int = 12, minute: int = 0) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, hour, minute, tzinfo=dt.UTC)


def add_model(conn, version: str = "m1", threshold: float = 0.5, active: bool = True,
              metrics: dict | None = None, classes: Sequence[str] = ("Acme", "Globex", "Initech"),
              created_at: dt.datetime | None = None) -> None:
    conn.execute(insert(model_versions).values(
        version=version, classes=list(classes), base="inception_v3", weights="none", input_size=299,
        data_fingerprint="x", metrics=metrics or {}, threshold=threshold, artifact_key=f"models/{version}",
        params={}, active=active, created_at=created_at or dt.datetime(2026, 1, 1, tzinfo=dt.UTC)))


@dataclass
class FakePost:
    """One post as the tests see it (the oracle's input too)."""

    id: int
    external_id: str
    posted_at: dt.datetime
    text: str = ""
    platform: str = "mastodon"
    author: str = "a1"
    repost_of: str | None = None
    images: list[str] = field(default_factory=list)  # image names; sha256 = sha(name)

    @property
    def day(self) -> dt.date:
        return self.posted_at.astimezone(dt.UTC).date()

    @property
    def shas(self) -> list[str]:
        return [sha(n) for n in self.images]


def add_posts(conn, rows: Iterable[FakePost], mark: bool = True) -> list[FakePost]:
    rows = list(rows)
    if not rows:
        return rows
    conn.execute(insert(posts), [
        {"id": p.id, "platform": p.platform, "external_id": p.external_id, "source": "test",
         "author_hash": p.author, "text": p.text, "posted_at": p.posted_at, "repost_of": p.repost_of,
         "content_hash": sha(f"{p.external_id}:{p.text}")}
        for p in rows
    ])
    have = {s for (s,) in conn.execute(select(images.c.sha256))}
    new_images, links = {}, []
    for p in rows:
        for pos, name in enumerate(p.images):
            h = sha(name)
            if h not in have:
                new_images[h] = {"sha256": h, "storage_key": f"images/{h}", "mime": "image/jpeg", "size_bytes": 10}
            links.append({"post_id": p.id, "position": pos, "url": f"https://img.example/{name}", "sha256": h,
                          "status": "stored"})
    if new_images:
        conn.execute(insert(images), list(new_images.values()))
    if links:
        conn.execute(insert(post_images), links)
    if mark:
        mark_days(conn, {p.day for p in rows}, "test")
    return rows


def add_detections(conn, rows: Iterable[tuple[str, str, float]], version: str = "m1") -> None:
    """rows: (image name, class name, score); each image also gets its `image_scores` row, as
    the detector writes one per scored image."""
    rows = list(rows)
    if rows:
        conn.execute(insert(detections), [
            {"image_sha256": sha(n), "model_version": version, "class_name": c, "score": s} for n, c, s in rows
        ])
        top: dict[str, tuple[float, str]] = {}
        for n, c, s in rows:
            top[n] = max(top.get(n, (s, c)), (s, c))
        upsert(conn, image_scores, [
            {"image_sha256": sha(n), "model_version": version, "status": "ok", "top_class": c, "top_score": s,
             "scored_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC)}
            for n, (s, c) in sorted(top.items())
        ], keys=["image_sha256", "model_version"], update=())


def dataset_posts(ds, start_id: int = 1) -> list[FakePost]:
    """The synthetic dataset's posts as FakePosts, spread over three platforms (by id hash)."""
    out = []
    for i, p in enumerate(ds.posts):
        plat = PLATFORMS[int(sha(p["id"])[:4], 16) % len(PLATFORMS)]
        out.append(FakePost(
            id=start_id + i, external_id=p["id"], text=p["text"], platform=plat, author=p["author_id"],
            posted_at=dt.datetime.fromisoformat(p["created_at"].replace("Z", "+00:00")),
            repost_of=p["reblog_of"], images=[im["url"] for im in p["images"]],
        ))
    return out


def dataset_detections(ds) -> tuple[list, list]:
    """(active m1 detections, inactive m0 detections): m1 sees each image's true brand at 0.9 and
    some logo-free images as Acme at 0.3 (below its 0.5 threshold); m0 sees Initech everywhere."""
    m1, m0 = [], []
    for i, (url, brand) in enumerate(sorted(ds.image_brand.items())):
        if brand is not None:
            m1.append((url, brand, 0.9))
        elif i % 3 == 0:
            m1.append((url, "Acme", 0.3))
        m0.append((url, "Initech", 0.99))
    return m1, m0


# --- the oracle --------------------------------------------------------------------------------


def recount(
    test_posts: Sequence[FakePost],
    text_hits: dict[int, dict[str, set[str]]],
    image_brands: dict[str, set[str]],
    catalogue: dict[str, set[str]],
) -> dict[tuple, dict[str, Any]]:
    """Independent count of mention_daily's count columns, keyed (day, brand, product, platform, source).

    text_hits: post id -> {brand: {products named}}; image_brands: sha256 -> brands detected
    (active model, above threshold); catalogue: brand -> its products.
    """
    first: dict[str, tuple] = {}
    for p in test_posts:
        for s in p.shas:
            key = (p.posted_at, p.id)
            if s not in first or key < first[s]:
                first[s] = key
    acc: dict[tuple, dict[str, Any]] = defaultdict(
        lambda: {"posts": 0, "images": 0, "authors": set(), "reposts": 0, "image_posts": 0})
    for p in test_posts:
        th = text_hits.get(p.id, {})
        img = {b for s in p.shas for b in image_brands.get(s, ())}
        for b in (set(th) | img) & set(catalogue):
            brand_shas = {s for s in p.shas if b in image_brands.get(s, ())}
            in_text, in_img = b in th, bool(brand_shas)
            new = {s for s in brand_shas if first[s] == (p.posted_at, p.id)}
            repost = p.repost_of is not None or (in_img and not new)
            src = "both" if in_text and in_img else ("text" if in_text else "image")
            targets = [("*", src)] + [(prod, "both" if in_img else "text") for prod in th.get(b, ()) if prod in catalogue[b]]
            for prod, s in targets:
                for plat in (p.platform, "*"):
                    for source in (s, "any"):
                        row = acc[(p.day, b, prod, plat, source)]
                        row["posts"] += 1
                        row["images"] += len(new)
                        row["authors"].add(p.author)
                        row["reposts"] += int(repost)
                        row["image_posts"] += int(s == "image")
    return {k: {"posts": v["posts"], "images": v["images"], "unique_authors": len(v["authors"]),
                "reposts": v["reposts"], "image_posts": v["image_posts"]} for k, v in acc.items()}


def signals_oracle(series: dict[dt.date, int], day: dt.date, days_present: set[dt.date]) -> dict[str, Any]:
    """rolling_7/28, wow_change, zscore, baseline, spike of `day` from a per-day count series
    (plain Python). The calendar is dense from the first present day: a missing day is 0."""
    import math

    first = min(days_present)

    def window(lo: int, hi: int) -> list[int]:
        ds = [day - dt.timedelta(days=k) for k in range(lo, hi + 1)]
        return [series.get(d, 0) for d in ds if d >= first]

    x = series.get(day, 0)
    w7, w28 = window(0, 6), window(0, 27)
    prev, hist = window(7, 13), window(1, 28)
    r7 = sum(w7) / len(w7)
    out: dict[str, Any] = {"rolling_7": r7, "rolling_28": sum(w28) / len(w28)}
    out["wow_change"] = (r7 / (sum(prev) / len(prev)) - 1) if prev and sum(prev) else None
    if len(hist) >= 7:
        mean = sum(hist) / len(hist)
        var = max(0.0, sum(v * v for v in hist) / len(hist) - mean * mean)
        z = (x - mean) / max(math.sqrt(var), 1.0)
        out["zscore"], out["spike"], out["baseline"] = z, bool(z >= 3 and x >= 5), mean
    else:
        out["zscore"], out["spike"], out["baseline"] = None, False, None
    return out
