"""Record normalisation: one Post model from every platform, bad records rejected with reasons."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json

import pytest

from pipeline.ingest.loader import content_hash
from pipeline.records import hash_author
from pipeline.sources.archive.parse import parse_row
from pipeline.sources.bluesky.parse import parse_post_view
from pipeline.sources.mastodon.parse import parse_status
from pipeline.sources.parsing import (
    Normalizer,
    Reject,
    excerpt,
    html_to_text,
    parse_time,
)
from pipeline.sources.reddit.parse import parse_child
from tests.support.feeds import bluesky_post, mastodon_media, mastodon_status, reddit_post

T = dt.datetime(2026, 10, 3, 12, 30, 15, 250000, tzinfo=dt.UTC)
SALT = "pepper-salt"


@pytest.fixture
def norm() -> Normalizer:
    return Normalizer(SALT, now=dt.datetime(2026, 11, 1, tzinfo=dt.UTC))


def test_html_to_text():
    html = '<p>Love my <a href="https://x/tags/acme" class="mention hashtag">#<span>Acme</span></a> &amp; more</p><p>line<br>two &lt;3</p>'
    assert html_to_text(html) == "Love my #Acme & more\n\nline\ntwo <3"
    assert html_to_text("<p>a</p><script>alert(1)</script>") == "a"
    assert html_to_text("plain") == "plain"


def test_parse_time_forms():
    assert parse_time("2026-10-03T12:30:15.250Z") == T
    assert parse_time("2026-10-03T14:30:15.250+02:00") == T
    assert parse_time("2026-10-03 12:30:15.250") == T  # no zone: UTC
    assert parse_time(T.timestamp()) == T
    assert parse_time(str(int(T.timestamp() * 1000))) == T.replace(microsecond=250000)
    for bad in ("yesterday", "", None, True, {"a": 1}, "9" * 80):
        with pytest.raises(Reject):
            parse_time(bad)


def test_mastodon_status(norm):
    status = mastodon_status(T, "I love #acme", tags=("acme",), account="bob",
                             media=[mastodon_media("https://files.example/a.jpg", "a red logo"),
                                    mastodon_media("https://files.example/v.mp4", kind="video"),
                                    mastodon_media(None, "remote only", remote_url="https://other.example/b.png")])
    post = parse_status(norm, status)
    assert post.platform == "mastodon"
    assert post.external_id == status["id"]
    assert post.text == "I love #acme"
    assert post.posted_at == T and post.posted_at.tzinfo is dt.UTC
    assert post.lang == "en"
    assert post.url == status["url"]
    assert [(i.url, i.alt_text) for i in post.images] == [
        ("https://files.example/a.jpg", "a red logo"),
        ("https://other.example/b.png", "remote only"),
    ]
    assert post.author_hash == hash_author(SALT, "mastodon", "https://social.example/@bob")
    assert "bob" not in post.author_hash


def test_mastodon_reblog_counts_as_its_original(norm):
    original = mastodon_status(T - dt.timedelta(days=2), "Acme rocks", account="carol",
                               media=[mastodon_media("https://files.example/o.jpg")], lang="fr")
    reblog = mastodon_status(T, "", account="dave", reblog=original, seq=1)
    post = parse_status(norm, reblog)
    assert post.external_id == reblog["id"]
    assert post.repost_of == original["id"]
    assert post.text == "Acme rocks"
    assert post.lang == "fr"
    assert [i.url for i in post.images] == ["https://files.example/o.jpg"]
    assert post.posted_at == T  # when it was shared
    assert post.author_hash == hash_author(SALT, "mastodon", "https://social.example/@dave")


def test_bluesky_post_with_images_and_record_with_media(norm):
    imgs = [{"fullsize": "https://cdn.example/full.jpg", "thumb": "https://cdn.example/t.jpg", "alt": "logo"}]
    a = parse_post_view(norm, bluesky_post(T, "acme news", images=imgs, rkey="3kabc"))
    assert a.external_id == "at://did:plc:alice/app.bsky.feed.post/3kabc"
    assert a.url == "https://bsky.app/profile/did:plc:alice/post/3kabc"
    assert [(i.url, i.alt_text) for i in a.images] == [("https://cdn.example/full.jpg", "logo")]
    b = parse_post_view(norm, bluesky_post(T, "quote with media", images=imgs, with_record=True, rkey="3kdef", langs=("de",)))
    assert [i.url for i in b.images] == ["https://cdn.example/full.jpg"]
    assert b.lang == "de"


def test_bluesky_future_created_at_uses_indexed_at(norm):
    view = bluesky_post(T, "from the future", created_at="9999-01-01T00:00:00Z")
    assert parse_post_view(norm, view).posted_at == T.replace(microsecond=250000)


def test_reddit_listing_children(norm):
    gallery = parse_child(norm, reddit_post(T, "Acme haul", pid="g1", gallery=["https://i.redd.it/1.jpg?a=1&amp;b=2", "https://i.redd.it/2.png"]))
    assert [i.url for i in gallery.images] == ["https://i.redd.it/1.jpg?a=1&b=2", "https://i.redd.it/2.png"]
    assert gallery.url == "https://www.reddit.com/r/brands/comments/g1/post/"
    assert gallery.posted_at == T
    link = parse_child(norm, reddit_post(T, "pic", pid="p1", url="https://i.redd.it/x.webp"))
    assert [i.url for i in link.images] == ["https://i.redd.it/x.webp"]
    prev = parse_child(norm, reddit_post(T, "article", pid="p2", url="https://news.example/story", preview="https://preview.redd.it/y.jpg"))
    assert [i.url for i in prev.images] == ["https://preview.redd.it/y.jpg"]
    text = parse_child(norm, reddit_post(T, "Title", pid="p3", selftext="Body about acme", crosspost_parent="t3_orig"))
    assert text.text == "Title\n\nBody about acme"
    assert text.repost_of == "orig"
    assert text.images == ()
    with pytest.raises(Reject, match="kind 't1'"):
        parse_child(norm, {"kind": "t1", "data": {}})


def test_archive_aliases(norm):
    row = {"post_id": 42, "network": "Mastodon", "username": "erin", "content": "<p>hello &amp; acme</p>",
           "timestamp": "1790000000", "language": "EN", "permalink": "https://m.example/42",
           "image_urls": "https://a.example/1.jpg|https://a.example/2.jpg", "repost_of": ""}
    post = parse_row(norm, row)
    assert (post.platform, post.external_id, post.text, post.lang) == ("mastodon", "42", "hello & acme", "en")
    assert post.posted_at == dt.datetime.fromtimestamp(1790000000, dt.UTC)
    assert [i.url for i in post.images] == ["https://a.example/1.jpg", "https://a.example/2.jpg"]
    assert post.repost_of is None
    synthetic = {"id": "s1", "platform": "synthetic", "author_id": "u1", "text": "Acme!", "lang": "en",
                 "created_at": "2026-10-01T08:00:00Z", "url": "https://synthetic.example/s1",
                 "images": [{"url": "synthetic://images/a.jpg", "alt": "a"}], "reblog_of": "s0"}
    s = parse_row(norm, synthetic)
    assert (s.platform, s.repost_of, s.images[0].url, s.images[0].alt_text) == ("synthetic", "s0", "synthetic://images/a.jpg", "a")
    csv_json = parse_row(norm, {"id": "c1", "author": "x", "text": "t", "created_at": "2026-10-01T00:00:00Z",
                             "images": '[{"url": "https://a.example/z.png", "alt_text": "zed"}]'})
    assert [(i.url, i.alt_text) for i in csv_json.images] == [("https://a.example/z.png", "zed")]
    reddit_export = parse_row(norm, {"id": "r1", "author": "x", "title": "T", "selftext": "S", "created_utc": 1790000000.5})
    assert reddit_export.text == "T\n\nS" and reddit_export.platform == "archive"


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"author": "a", "text": "t", "created_at": "2026-10-01T00:00:00Z"}, "missing id"),
        ({"id": "1", "text": "t", "created_at": "2026-10-01T00:00:00Z"}, "missing author"),
        ({"id": "1", "author": "a", "text": "t"}, "missing created_at"),
        ({"id": "1", "author": "a", "text": "t", "created_at": "not a date"}, "bad created_at"),
        ({"id": "1", "author": "a", "text": "t", "created_at": "9999-12-31T23:59:59Z"}, "in the future"),
        ({"id": "1", "author": "a", "text": "t", "created_at": "1970-01-02T00:00:00Z"}, "before 1990"),
        ({"id": "1", "author": "a", "text": "x" * 100_001, "created_at": "2026-10-01T00:00:00Z"}, "too long"),
        ({"id": {"a": 1}, "author": "a", "text": "t", "created_at": "2026-10-01T00:00:00Z"}, "id is a dict"),
        ({"id": "1", "author": "a", "text": ["t"], "created_at": "2026-10-01T00:00:00Z"}, "text is a list"),
        ({"id": "1", "author": "a", "text": "t", "created_at": "2026-10-01T00:00:00Z", "images": 5}, "images is a int"),
        ({"id": "1", "author": "a", "text": "t", "created_at": "2026-10-01T00:00:00Z", "platform": "x; DROP TABLE"}, "bad platform"),
        ({"id": "x" * 300, "author": "a", "text": "t", "created_at": "2026-10-01T00:00:00Z"}, "id too long"),
        ("just a string", "row is a str"),
    ],
)
def test_archive_rejects(norm, row, reason):
    with pytest.raises(Reject, match=reason):
        parse_row(norm, row)


def test_control_characters_and_bad_unicode_are_cleaned(norm):
    post = parse_row(norm, {"id": "1", "author": "a", "text": "a\x00b\x07c\ud800d\ne", "created_at": "2026-10-01T00:00:00Z"})
    assert post.text == "abc?d\ne"


def test_content_hash_changes_with_edits(norm):
    base = parse_row(norm, {"id": "1", "author": "a", "text": "t", "created_at": "2026-10-01T00:00:00Z"})
    assert content_hash(base) == content_hash(dataclasses.replace(base))
    assert content_hash(base) != content_hash(dataclasses.replace(base, text="t2"))
    assert len(content_hash(base)) == 64


def test_excerpt_drops_author_fields():
    ex = excerpt({"id": 1, "author": "secret-handle", "account": {"acct": "secret-handle"}, "text": "hi"})
    assert "secret-handle" not in ex and '"text": "hi"' in ex


def test_excerpt_drops_nested_author_fields_and_account_urls():
    from tests.support.feeds import bluesky_post, mastodon_status, reddit_post

    when = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
    status = mastodon_status(when, "hi @zqxfriend", account="zqxuser")
    status["mentions"] = [{"acct": "zqxfriend@other.example", "url": "https://other.example/@zqxfriend"}]
    status["reblog"] = mastodon_status(when, "orig", account="zqxorig")
    child = reddit_post(when, "thanks u/zqxfriend", pid="a1", author="zqxuser", selftext="see https://www.reddit.com/user/zqxother/")
    view = bluesky_post(when, "hey @zqxfriend.bsky.social", did="did:plc:zqxdid", handle="zqxuser.bsky.social")
    for record in (status, child, view, [child, {"user": {"name": "zqxuser"}}]):
        ex = excerpt(record, limit=10_000)
        assert "zqx" not in ex, ex
        json.loads(ex)  # still JSON (when it fits)
    assert '"uri": "https://social.example/users/…/statuses/' in excerpt(status, limit=10_000)
    assert '"uri": "at://did:…/app.bsky.feed.post/' in excerpt(view, limit=10_000)
    assert excerpt(child, limit=10_000).count('"title": "thanks u/…"') == 1


def test_excerpt_of_a_raw_line_and_of_hostile_shapes():
    raw = '{"id": "9", "author_id": "zqxuser", "username": 42, "userName": "zqxuser2", "text": "cut off @zqxfriend'
    ex = excerpt(raw)
    assert "zqx" not in ex and ex.startswith('{"id": "9", "author_id": "…"')
    deep: list = []
    node = deep
    for _ in range(100_000):
        node.append([])
        node = node[0]
    assert excerpt({"data": deep}) == '{"data": [[[[[[["…"]]]]]]]}'
    assert excerpt({"a": deep}) == '{"…": "1 other field(s) not kept"}'  # not on the allow-list
    assert len(excerpt({"text": "x" * 10_000_000})) == 300
    assert excerpt({str(i): i for i in range(1000)}, limit=10_000) == '{"…": "1000 other field(s) not kept"}'
    many = {**{f"{i}_count": i for i in range(1000)}, "id": "x"}
    assert excerpt(many, limit=10_000).endswith('"39_count": 39, "…": "961 other field(s) not kept"}')


def test_excerpt_keeps_an_allow_list_of_fields():
    """Author data under any name (name, email, screen_name, a new export's own words) is not
    kept: only ids, times, platform, language, texts, URL hosts and counts are."""
    record = {"id": "p1", "created_at": "2026-10-02T06:00:00Z", "platform": "x", "lang": "en",
              "text": "mail zqx1@example.org or @zqx2", "url": "https://social.example/@zqx3/1",
              "name": "zqx4", "email": "zqx5@example.org", "screen_name": "zqx6", "poster": {"nick": "zqx7"},
              "like_count": 3, "images": [{"url": "https://cdn/zqx8.jpg"}], "data": {"title": "t", "zqx9": 1}}
    ex = excerpt(record, limit=10_000)
    assert "zqx" not in ex, ex
    doc = json.loads(ex)
    assert doc["id"] == "p1" and doc["created_at"] == "2026-10-02T06:00:00Z" and doc["lang"] == "en"
    assert doc["url"] == "https://social.example/…" and doc["like_count"] == 3 and doc["images"] == 1
    assert doc["data"] == {"title": "t", "…": "1 other field(s) not kept"}
