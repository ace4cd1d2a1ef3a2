"""The bulk loader on both backends: new / updated / unchanged counts, dirty days, image rows."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest
from ingest_helpers import config
from sqlalchemy import select

from pipeline.ingest.loader import load_posts, touch_source
from pipeline.records import ImageRef, Post
from pipeline.schema import post_images, posts

T = dt.datetime(2026, 10, 2, 12, tzinfo=dt.UTC)


def post(i: int, when: dt.datetime = T, text: str = "acme", images: tuple[ImageRef, ...] = ()) -> Post:
    return Post(platform="mastodon", external_id=str(i), author_hash="a" * 64, text=text, posted_at=when, lang="en",
                url=f"https://m.example/{i}", repost_of=None, images=images)


def load(ctx, items):
    with ctx.engine.begin() as conn:
        touch_source(conn, "src", "archive")
        return load_posts(conn, "src", [(p, "raw/k") for p in items])


@pytest.mark.integration
def test_counts_days_and_images_on_both_backends(make_ctx, backend):
    ctx = make_ctx(config([{"name": "src", "kind": "archive", "path": "/nonexistent"}]), backend)
    img = (ImageRef("https://i.example/1.jpg", "logo"), ImageRef("https://i.example/2.jpg", None))
    first = load(ctx, [post(1, images=img), post(2), post(3, T - dt.timedelta(days=3)), post(2, text="acme dup, last wins")])
    assert (first.new, first.updated, first.unchanged) == (3, 0, 0)
    assert first.days == {T.date(), (T - dt.timedelta(days=3)).date()}

    again = load(ctx, [post(1, images=img), post(2, text="acme dup, last wins"), post(3, T - dt.timedelta(days=3))])
    assert (again.new, again.updated, again.unchanged, again.days) == (0, 0, 3, set())

    # Post 3 is edited AND moved to another day: both its old and new days are dirty.
    moved = T + dt.timedelta(days=5)
    edit = load(ctx, [post(1, images=(dataclasses.replace(img[1], alt_text="now with alt"),)), post(3, moved, "edited"), post(4)])
    assert (edit.new, edit.updated, edit.unchanged) == (1, 2, 0)
    assert edit.days == {T.date(), (T - dt.timedelta(days=3)).date(), moved.date()}
    with ctx.engine.connect() as conn:
        pid = conn.execute(select(posts.c.id).where(posts.c.external_id == "1")).scalar()
        rows = conn.execute(select(post_images.c.position, post_images.c.url, post_images.c.alt_text)
                            .where(post_images.c.post_id == pid)).all()
        texts = dict(conn.execute(select(posts.c.external_id, posts.c.text)).all())
    assert rows == [(0, "https://i.example/2.jpg", "now with alt")]
    assert texts == {"1": "acme", "2": "acme dup, last wins", "3": "edited", "4": "acme"}


def plain_copy_lines(items):
    """copy_lines by its definition: every field through `_esc`, the hash from `content_hash`."""
    from pipeline.ingest.loader import _esc, content_hash

    post_lines, image_lines = [], []
    for p, raw_key in items:
        iso = p.posted_at.isoformat()
        post_lines.append("\t".join([_esc(p.platform), _esc(p.external_id), p.author_hash, _esc(p.text), _esc(p.lang), iso,
                                     _esc(p.url), _esc(p.repost_of), content_hash(p), _esc(raw_key)]) + "\n")
        for i, img in enumerate(p.images):
            image_lines.append(f"{_esc(p.platform)}\t{_esc(p.external_id)}\t{i}\t{_esc(img.url)}\t{_esc(img.alt_text)}\n")
    return post_lines, image_lines


def test_copy_lines_matches_the_plain_definitions():
    import random

    from pipeline.ingest.loader import copy_lines

    rnd = random.Random(5)
    odd = ["a\\b", "t\tb", "n\nx", "r\rx", "", "plain", "ünïcødé 😀", "\\N", "\x1f", None]
    items = []
    for i in range(4000):
        def pick():
            return rnd.choice(odd)
        images = tuple(ImageRef(f"https://i.example/{j}{pick() or ''}", pick()) for j in range(rnd.choice([0, 0, 0, 1, 2])))
        p = Post(rnd.choice(["mastodon", "p\tx"]), f"e{i}{pick() or ''}", "a" * 64, pick() or "", T + dt.timedelta(microseconds=i),
                 pick(), pick(), pick(), images)
        items.append((p, pick()))
    assert copy_lines(items) == plain_copy_lines(items)


def test_fast_post_equals_the_dataclass():
    from pipeline.sources.parsing import _fast_post, new_post

    args = ("mastodon", "1", "a" * 64, "text", T, "en", "https://m.example/1", None, (ImageRef("https://i.example/x.jpg", None),))
    fast, plain = _fast_post(*args), Post(*args)
    assert new_post is _fast_post  # the shortcut applies to today's Post
    assert fast == plain and hash(fast) == hash(plain) and type(fast) is Post
    assert dataclasses.asdict(fast) == dataclasses.asdict(plain) and repr(fast) == repr(plain)
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.text = "changed"  # type: ignore[misc]


@pytest.mark.integration
def test_batch_in_an_empty_time_span_with_a_known_key(make_ctx, backend, monkeypatch):
    """No post in the batch's time span (Postgres tries a plain INSERT), but one key exists at
    another time: the unique violation falls back to the upsert, counts and days are right."""
    import pipeline.ingest.loader as loader

    tried: list[bool] = []
    plain = loader._insert_new
    monkeypatch.setattr(loader, "_insert_new", lambda *a: tried.append(plain(*a)) or tried[-1])
    ctx = make_ctx(config([{"name": "src", "kind": "archive", "path": "/nonexistent"}]), backend)
    img = (ImageRef("https://i.example/1.jpg", "logo"),)
    assert load(ctx, [post(1, images=img)]).new == 1
    later = T + dt.timedelta(days=10)
    got = load(ctx, [post(1, later, "moved and edited", images=img), post(2, later, images=img)])
    assert (got.new, got.updated, got.unchanged) == (1, 1, 0)
    assert got.days == {T.date(), later.date()}
    fresh = load(ctx, [post(3, later + dt.timedelta(days=5), images=img), post(4, later + dt.timedelta(days=5))])
    assert (fresh.new, fresh.updated, fresh.days) == (2, 0, {(later + dt.timedelta(days=5)).date()})
    with ctx.engine.connect() as conn:
        rows = dict(conn.execute(select(posts.c.external_id, posts.c.text)).all())
        n_images = conn.execute(select(post_images.c.id)).all()
    assert rows == {"1": "moved and edited", "2": "acme", "3": "acme", "4": "acme"}
    assert len(n_images) == 3
    assert tried == ([True, False, True] if backend == "postgres" else [])  # plain, fallback, plain


@pytest.mark.integration
def test_two_loads_in_one_transaction(make_ctx, backend):
    """The staging tables live per connection (emptied at commit): a second load in the same
    transaction starts from empty ones."""
    ctx = make_ctx(config([{"name": "src", "kind": "archive", "path": "/nonexistent"}]), backend)
    img = (ImageRef("https://i.example/1.jpg", None),)
    with ctx.engine.begin() as conn:
        touch_source(conn, "src", "archive")
        first = load_posts(conn, "src", [(post(1, images=img), "k"), (post(2), "k")])
        second = load_posts(conn, "src", [(post(3, T + dt.timedelta(days=1), images=img), "k")])
    assert (first.new, second.new, second.updated, second.days) == (2, 1, 0, {(T + dt.timedelta(days=1)).date()})
    with ctx.engine.connect() as conn:
        assert len(conn.execute(select(post_images.c.id)).all()) == 2
    for _ in range(2):  # later windows on the same pooled connection
        assert load(ctx, [post(1, images=img), post(2), post(3, T + dt.timedelta(days=1), images=img)]).unchanged == 3


@pytest.mark.integration
@pytest.mark.parametrize("ties", ["incoming", "content"])
def test_the_later_copy_wins_in_any_order(make_ctx, backend, ties):
    """Two copies of a post at different times: whichever is loaded first, the later one is kept
    and the earlier one counts as superseded. Same time: `incoming` keeps the copy loaded last
    (a feed's edit), `content` the greater content hash (the same whatever the order)."""
    from pipeline.ingest.loader import content_hash

    early, late = post(1, T, "acme early"), post(1, T + dt.timedelta(days=1), "acme late")
    x, y = post(2, T, "acme x"), post(2, T, "acme y")
    big = max(x, y, key=content_hash)
    outcomes = []
    for order in ([early, late], [late, early]):
        for pair in ([x, y], [y, x]):
            ctx = make_ctx(config([{"name": "src", "kind": "archive", "path": "/nonexistent"}]), backend)
            results = []
            for one in zip(order, pair, strict=True):
                with ctx.engine.begin() as conn:
                    touch_source(conn, "src", "archive")
                    results.append(load_posts(conn, "src", [(p, "raw/k") for p in one], ties=ties))
            with ctx.engine.connect() as conn:
                texts = dict(conn.execute(select(posts.c.external_id, posts.c.text)).all())
            assert texts["1"] == "acme late"
            assert texts["2"] == (pair[1].text if ties == "incoming" else big.text)
            superseded = results[1].superseded
            assert superseded == (order[1] is early) + (ties == "content" and pair[1] is not big)
            outcomes.append(texts)
    if ties == "content":
        assert all(o == outcomes[0] for o in outcomes)
    with pytest.raises(ValueError, match="ties"):
        load_posts(None, "src", [], ties="newest")  # type: ignore[arg-type]
