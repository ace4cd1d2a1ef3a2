"""Property tests of the per-platform normalisers (Mastodon Status, Bluesky postView, Reddit
listing child, archive row): whatever JSON a server or an export sends, the result is a sane
`Post` or a `Reject` with a one-line reason, never another exception."""

from __future__ import annotations

import datetime as dt
import functools
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.records import Post
from pipeline.sources.archive.parse import parse_row
from pipeline.sources.bluesky.parse import parse_post_view
from pipeline.sources.mastodon.parse import parse_status
from pipeline.sources.parsing import FUTURE_SLACK, MIN_TIME, Normalizer, Reject
from pipeline.sources.reddit.parse import parse_child

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(allow_nan=True), st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
                           max_leaves=12)
plausible_times = st.datetimes(min_value=dt.datetime(1989, 1, 1), max_value=dt.datetime(2027, 1, 1), timezones=st.just(dt.UTC))
times = st.one_of(
    plausible_times.map(lambda d: d.isoformat().replace("+00:00", "Z")), plausible_times.map(lambda d: d.timestamp()),
    st.integers(-(10**15), 10**15), st.floats(allow_nan=True), st.text(max_size=30), st.none(),
)
ids = st.one_of(st.text("abc123-_:/", min_size=1, max_size=20), st.integers(0, 2**63), st.text(max_size=300),
                st.integers(-(2**70), 2**70), st.none(), st.booleans(), json_values)


def maybe(strategy: Any) -> Any:
    """Mostly the field's plausible value, else any JSON value at all."""
    return st.one_of(strategy, strategy, strategy, json_values)


def shaped(fields: dict[str, Any]) -> Any:
    """Dicts with these fields (a few dropped), each plausible or hostile, plus junk keys."""
    return st.tuples(st.fixed_dictionaries({k: maybe(v) for k, v in fields.items()}), st.sets(st.sampled_from(list(fields)), max_size=2),
                     st.dictionaries(st.text(max_size=8), json_values, max_size=2)).map(
        lambda t: {**t[2], **{k: v for k, v in t[0].items() if k not in t[1]}})


images = st.lists(st.fixed_dictionaries({}, optional={"type": st.sampled_from(["image", "video"]), "url": st.text(max_size=60),
                                                      "description": st.text(max_size=20)}), max_size=3)
account = st.fixed_dictionaries({"id": ids}, optional={"acct": st.text(max_size=20), "url": st.text(max_size=40)})
status_fields = {"id": ids, "created_at": times, "account": account, "content": st.text(max_size=80), "spoiler_text": st.text(max_size=10),
                 "media_attachments": images, "url": st.text(max_size=60), "uri": st.text(max_size=60), "language": st.text(max_size=8)}
mastodon_statuses = shaped({**status_fields, "reblog": shaped(status_fields)})
bluesky_views = shaped({
    "uri": st.text(max_size=10).map(lambda s: f"at://did:plc:x/app.bsky.feed.post/{s}"), "indexedAt": times,
    "author": st.fixed_dictionaries({"did": st.text(min_size=1, max_size=20)}),
    "record": st.fixed_dictionaries({"createdAt": times}, optional={ "text": st.text(max_size=60), "langs": st.lists(st.text(max_size=5))}),
    "embed": st.fixed_dictionaries({"$type": st.sampled_from(["app.bsky.embed.images#view", "app.bsky.embed.recordWithMedia#view"])},
                                   optional={"images": st.lists(st.fixed_dictionaries({}, optional={"fullsize": st.text(max_size=30),
                                                                                                    "alt": st.text(max_size=10)})),
                                             "media": json_values}),
})
reddit_children = st.fixed_dictionaries({"kind": maybe(st.just("t3")), "data": shaped({
    "id": ids, "created_utc": times, "author": st.text(max_size=10), "author_fullname": st.text(max_size=10), "title": st.text(max_size=40),
    "selftext": st.text(max_size=40), "permalink": st.text(max_size=30), "url": st.text(max_size=40), "crosspost_parent": st.text(max_size=10),
    "media_metadata": st.dictionaries(st.text(max_size=5), json_values, max_size=3), "gallery_data": json_values, "preview": json_values,
    "post_hint": st.sampled_from(["image", "link"]), "lang": st.text(max_size=5),
})})
archive_rows = shaped({
    "id": ids, "external_id": ids, "author_id": ids, "user": account, "created_at": times, "timestamp": times, "date": times,
    "text": st.text(max_size=60), "title": st.text(max_size=20), "selftext": st.text(max_size=20), "platform": st.text(max_size=12),
    "images": st.one_of(st.text(max_size=40), st.lists(st.text(max_size=30))), "image_url": st.text(max_size=30),
    "reblog_of": ids, "lang": st.text(max_size=8), "url": st.text(max_size=40),
})


def outcome(fn: Any, record: Any) -> Post | None:
    try:
        post = fn(record)
    except Reject as exc:
        reason = str(exc)
        assert reason and "\n" not in reason and len(reason) < 300, reason
        return None
    assert isinstance(post, Post)
    assert post.posted_at.tzinfo is not None and post.posted_at.utcoffset() == dt.timedelta(0)
    assert MIN_TIME <= post.posted_at <= NOW + FUTURE_SLACK
    assert post.external_id and post.author_hash and "\x00" not in post.text + post.external_id
    return post


SETTINGS = settings(max_examples=200, deadline=None)


@SETTINGS
@given(record=st.one_of(mastodon_statuses, json_values))
def test_mastodon_never_raises_but_reject(record):
    outcome(functools.partial(parse_status, Normalizer("salt", now=NOW)), record)


@SETTINGS
@given(record=st.one_of(bluesky_views, json_values))
def test_bluesky_never_raises_but_reject(record):
    outcome(functools.partial(parse_post_view, Normalizer("salt", now=NOW)), record)


@SETTINGS
@given(record=st.one_of(reddit_children, json_values))
def test_reddit_never_raises_but_reject(record):
    outcome(functools.partial(parse_child, Normalizer("salt", now=NOW)), record)


@SETTINGS
@given(record=st.one_of(archive_rows, json_values), html=st.sampled_from(["auto", "always", "never"]))
def test_archive_rows_never_raise_but_reject(record, html):
    outcome(functools.partial(parse_row, Normalizer("salt", now=NOW, html=html)), record)
