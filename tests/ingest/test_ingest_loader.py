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
