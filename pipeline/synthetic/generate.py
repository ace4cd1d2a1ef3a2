"""A deterministic synthetic social feed: posts, images and the ground truth behind them.

The demo ingests it as a feed and the tests check the pipeline against `truth`: which brands
each post names in its text and shows in its images. Posts are cheap (plain dicts, built in
well under a second); images are rendered lazily from a per-image seed, so nothing touches
disk and the same seed always gives byte-identical posts and images.

Shape of the feed (defaults, demo brands): ~3,000 posts over 30 days, ~300 distinct images,
a weekday/weekend rhythm; brand 1 (Acme) is steady and largest, brand 2 (Globex) has one spike
day, brand 3 (Initech) rises steadily. Posts name brands in text only, image only, both or
neither; some contain near-miss words that must not match; some images are reposted in many
posts and some posts are reblogs (`reblog_of`) of earlier ones, carrying the same text/images.
"""

from __future__ import annotations

import bisect
import datetime as dt
import hashlib
import json
import math
import random
from dataclasses import dataclass, field
from typing import Any

from pipeline.synthetic import texts
from pipeline.synthetic.catalogue import DEMO_BRANDS
from pipeline.synthetic.marks import scene_jpeg

DEFAULT_START = dt.date(2026, 10, 1)
N_AUTHORS = 300
WEEKLY = (1.0, 1.05, 1.1, 1.05, 0.95, 0.65, 0.6)  # Monday .. Sunday
HOURS = tuple(0.25 + max(0.0, math.sin((h - 5) / 18 * math.pi)) for h in range(24))
PROFILES = (("steady", 32.0), ("spike", 14.0), ("rising", 4.0))  # brand 1, 2, 3; then steady 10
RISE_TO = 28.0
SPIKE_FACTOR = 6.0
NEUTRAL_PER_DAY = 30.0
NEAR_MISS_SHARE = 0.15
REUSE = 0.75  # chance a post's image is one already posted (same url, same bytes)
ALTS = ("photo", "a picture I took", "screenshot", "my desk this morning", "view from the window")
CATEGORIES = ("text", "image", "both", "neither", "near_miss", "reblog")


def image_seed(kind: str, *parts: Any) -> int:
    """Render seed for an image; dataset seeds are even, training seeds odd, so never shared."""
    h = int.from_bytes(
        hashlib.sha256(":".join(map(str, ("brandmon", kind, *parts))).encode()).digest()[:8], "big"
    )
    return (h & ~1) if kind == "dataset" else (h | 1)


def _as_date(value: dt.date | str) -> dt.date:
    if isinstance(value, dt.datetime):
        return value.date()
    return value if isinstance(value, dt.date) else dt.date.fromisoformat(str(value))


def _utc(value: dt.datetime, what: str) -> dt.datetime:
    if value.tzinfo is None:
        raise ValueError(f"{what} must be timezone-aware (got naive {value.isoformat()})")
    return value.astimezone(dt.UTC)


@dataclass
class SyntheticDataset:
    seed: int
    start: dt.date
    days: int
    posts: list[dict[str, Any]]
    truth: dict[str, dict[str, set[str]]]
    truth_products: dict[str, set[str]]
    categories: dict[str, str]
    image_brand: dict[str, str | None]
    image_seeds: dict[str, int]
    spike: tuple[str, dt.date] | None = None
    rising: str | None = None
    _times: list[dt.datetime] = field(default_factory=list, repr=False)
    _images: dict[str, bytes] = field(default_factory=dict, repr=False)

    @property
    def first(self) -> dt.datetime:
        return dt.datetime.combine(self.start, dt.time(), dt.UTC)

    @property
    def end(self) -> dt.datetime:
        return self.first + dt.timedelta(days=self.days)

    @property
    def image_urls(self) -> list[str]:
        return list(self.image_brand)

    def posts_between(self, start: dt.datetime, end: dt.datetime) -> list[dict[str, Any]]:
        """Copies of the posts with start <= created_at < end (tz-aware bounds)."""
        lo = bisect.bisect_left(self._times, _utc(start, "start"))
        hi = bisect.bisect_left(self._times, _utc(end, "end"))
        return [{**p, "images": [dict(i) for i in p["images"]]} for p in self.posts[lo:hi]]

    def daily_truth(
        self, include_reblogs: bool = True
    ) -> dict[tuple[str, dt.date], dict[str, int]]:
        """Expected per-(brand, UTC day) counts for aggregate tests.

        Keys of each entry: `posts` (text or image), `text`, `image`, `both`; plus one
        `(product, day)` entry per product named in text, with `posts` == `text`.
        """
        out: dict[tuple[str, dt.date], dict[str, int]] = {}

        def bump(name: str, day: dt.date, *keys: str) -> None:
            row = out.setdefault((name, day), {"posts": 0, "text": 0, "image": 0, "both": 0})
            for k in keys:
                row[k] += 1

        for p in self.posts:
            if p["reblog_of"] and not include_reblogs:
                continue
            day = dt.date.fromisoformat(p["created_at"][:10])
            t = self.truth[p["id"]]
            for b in t["text"] | t["image"]:
                in_text, in_image = b in t["text"], b in t["image"]
                keys = ["posts"] + ["text"] * in_text + ["image"] * in_image
                bump(b, day, *keys, *(["both"] if in_text and in_image else []))
            for product in self.truth_products[p["id"]]:
                bump(product, day, "posts", "text")
        return out

    def image_bytes(self, url: str) -> bytes:
        """JPEG bytes behind a `synthetic://images/...` url; KeyError for unknown urls."""
        if url not in self.image_brand:
            raise KeyError(url)
        data = self._images.get(url)
        if data is None:
            data = self._images[url] = scene_jpeg(self.image_seeds[url], self.image_brand[url])
        return data


@dataclass
class _Draft:
    created: dt.datetime
    author: str
    lang: str
    text: str
    images: list[str]
    brands: set[str]
    products: set[str]
    category: str
    alts: list[str | None] = field(default_factory=list)


class _Builder:
    def __init__(self, seed: int, days: int, start: dt.date, brands: list[dict[str, Any]]):
        self.seed, self.days, self.start, self.brands = seed, days, start, brands
        self.r = random.Random(f"brandmon-synthetic:{seed}:{days}:{start.isoformat()}")
        self.authors = [f"synth-{i:04d}" for i in range(N_AUTHORS)]
        self.author_weights = [1 / (i + 1) ** 0.8 for i in range(N_AUTHORS)]
        self.forms = {b["name"]: texts.mention_forms(b) for b in brands}
        self.near = {b["name"]: texts.near_miss_forms(b) for b in brands}
        self.pool: dict[str | None, list[str]] = {}
        self.image_brand: dict[str, str | None] = {}
        self.image_seeds: dict[str, int] = {}
        self.spike_day = min(days - 1, round(days * 0.6))

    def image(self, key: str | None) -> str:
        pool = self.pool.setdefault(key, [])
        if pool and self.r.random() < REUSE:
            return pool[int(len(pool) * self.r.random() ** 2)]  # early images go viral
        k = len(self.image_brand)
        url = f"synthetic://images/s{self.seed}-{k:04d}.jpg"
        self.image_brand[url] = key
        self.image_seeds[url] = image_seed("dataset", self.seed, k)
        pool.append(url)
        return url

    def form(self, brand: str) -> tuple[str, str | None]:
        forms = self.forms[brand]
        text, product, _ = self.r.choices(forms, weights=[f[2] for f in forms])[0]
        return text, product

    def when(self, day: dt.date) -> dt.datetime:
        hour = self.r.choices(range(24), weights=HOURS)[0]
        base = dt.datetime.combine(day, dt.time(), dt.UTC)
        return base + dt.timedelta(hours=hour, seconds=self.r.randrange(3600))

    def author(self) -> str:
        return self.r.choices(self.authors, weights=self.author_weights)[0]

    def brand_post(self, day: dt.date, brand: str) -> _Draft:
        r = self.r
        mode = r.choices(("text", "image", "both"), weights=(45, 25, 30))[0]
        lang = texts.pick_lang(r)
        names, products, images = set(), set(), []
        others = [b["name"] for b in self.brands if b["name"] != brand]
        if mode == "image":
            text = texts.neutral_text(r, lang)
        else:
            form, product = self.form(brand)
            names.add(brand)
            products.update([product] if product else [])
            second = None
            if others and r.random() < 0.05:
                other = r.choice(others)
                second, p2 = self.form(other)
                names.add(other)
                products.update([p2] if p2 else [])
            text = texts.mention_text(r, lang, form, second)
        key: str | None = None
        if mode == "text":
            if r.random() < 0.25:
                images.append(self.image(None))
        else:
            key = r.choice(others) if (mode == "both" and others and r.random() < 0.1) else brand
            images.append(self.image(key))
        if images and r.random() < 0.1:
            extra = self.image(r.choice([None, key]))
            if extra not in images:
                images.append(extra)
        return _Draft(self.when(day), self.author(), lang, text, images, names, products, mode)

    def neutral_post(self, day: dt.date) -> _Draft:
        r = self.r
        lang = texts.pick_lang(r)
        if r.random() < NEAR_MISS_SHARE:
            brand = r.choice(self.brands)["name"]
            text, category = texts.mention_text(r, lang, r.choice(self.near[brand])), "near_miss"
        else:
            text, category = texts.neutral_text(r, lang), "neither"
        images = [self.image(None)] if r.random() < 0.3 else []
        return _Draft(self.when(day), self.author(), lang, text, images, set(), set(), category)

    def rate(self, index: int, day_index: int) -> float:
        profile, base = PROFILES[index] if index < len(PROFILES) else ("steady", 10.0)
        if profile == "rising":
            return base + (RISE_TO - base) * day_index / max(1, self.days - 1)
        if profile == "spike" and day_index == self.spike_day:
            return base * SPIKE_FACTOR
        return base

    def count(self, mean: float) -> int:
        return max(0, round(mean * self.r.gauss(1.0, 0.08)))

    def drafts(self) -> list[_Draft]:
        out: list[_Draft] = []
        for i in range(self.days):
            day = self.start + dt.timedelta(days=i)
            week = WEEKLY[day.weekday()]
            for bi, b in enumerate(self.brands):
                out += [
                    self.brand_post(day, b["name"])
                    for _ in range(self.count(self.rate(bi, i) * week))
                ]
            out += [self.neutral_post(day) for _ in range(self.count(NEUTRAL_PER_DAY * week))]
        for d in out:
            d.alts = [None if self.r.random() < 0.5 else self.r.choice(ALTS) for _ in d.images]
        return out

    def reblogs(
        self, originals: list[tuple[str, _Draft]], end: dt.datetime
    ) -> list[tuple[str, str, _Draft]]:
        r, out = self.r, []
        for oid, o in originals:
            if r.random() >= (0.12 if o.images else 0.04):
                continue
            for _ in range(r.choice((1, 1, 1, 2, 3))):
                t = o.created + dt.timedelta(seconds=r.randint(300, 36 * 3600))
                author = self.author()
                if t >= end or author == o.author:
                    continue
                rb = _Draft(
                    t, author, o.lang, o.text, o.images, o.brands, o.products, "reblog", o.alts
                )
                out.append((f"syn{self.seed}-r{len(out):05d}", oid, rb))
        return out


def _post(pid: str, d: _Draft, reblog_of: str | None) -> dict[str, Any]:
    return {
        "id": pid,
        "platform": "synthetic",
        "author_id": d.author,
        "text": d.text,
        "lang": d.lang,
        "created_at": d.created.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "url": f"https://synthetic.example/@{d.author}/{pid}",
        "images": [{"url": u, "alt": a} for u, a in zip(d.images, d.alts, strict=True)],
        "reblog_of": reblog_of,
    }


def build_dataset(
    seed: int = 7,
    days: int = 30,
    start: dt.date | str = DEFAULT_START,
    brands: list[dict[str, Any]] | None = None,
) -> SyntheticDataset:
    """Build the dataset from scratch (no cache); see `generate_dataset`."""
    if days < 1:
        raise ValueError(f"days must be >= 1, got {days}")
    brands = DEMO_BRANDS if brands is None else brands
    start = _as_date(start)
    b = _Builder(seed, days, start, brands)
    drafts = sorted(b.drafts(), key=lambda d: d.created)  # stable: ties keep build order
    originals = [(f"syn{seed}-{i:05d}", d) for i, d in enumerate(drafts)]
    end = dt.datetime.combine(start + dt.timedelta(days=days), dt.time(), dt.UTC)
    rows = [(d.created, pid, d, None) for pid, d in originals]
    rows += [(d.created, pid, d, oid) for pid, oid, d in b.reblogs(originals, end)]
    rows.sort(key=lambda row: (row[0], row[1]))
    posts = [_post(pid, d, oid) for _, pid, d, oid in rows]
    truth = {
        pid: {"text": set(d.brands), "image": {k for u in d.images if (k := b.image_brand[u])}}
        for _, pid, d, _ in rows
    }
    names = [x["name"] for x in brands]
    return SyntheticDataset(
        seed=seed,
        start=start,
        days=days,
        posts=posts,
        truth=truth,
        truth_products={pid: set(d.products) for _, pid, d, _ in rows},
        categories={pid: d.category for _, pid, d, _ in rows},
        image_brand=b.image_brand,
        image_seeds=b.image_seeds,
        spike=(names[1], start + dt.timedelta(days=b.spike_day)) if len(names) > 1 else None,
        rising=names[2] if len(names) > 2 else None,
        _times=[row[0] for row in rows],
    )


_CACHE: dict[tuple[Any, ...], SyntheticDataset] = {}


def generate_dataset(
    seed: int = 7,
    days: int = 30,
    start: dt.date | str = DEFAULT_START,
    brands: list[dict[str, Any]] | None = None,
) -> SyntheticDataset:
    """The synthetic dataset for these arguments, cached per process (images render once).

    Same arguments, byte-identical posts and images. Treat the result as read-only;
    `posts_between` hands out copies.
    """
    key = (seed, days, _as_date(start), json.dumps(brands, sort_keys=True) if brands else None)
    if key not in _CACHE:
        if len(_CACHE) >= 8:
            _CACHE.pop(next(iter(_CACHE)))
        _CACHE[key] = build_dataset(seed, days, start, brands)
    return _CACHE[key]
