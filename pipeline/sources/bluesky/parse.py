"""Bluesky `app.bsky.feed.defs#postView` records -> `Post` (posted time = sortAt, as searchPosts filters)."""

from __future__ import annotations

from typing import Any

from pipeline.records import ImageRef, Post
from pipeline.sources.parsing import (
    Normalizer,
    Reject,
    clean_id,
    clean_lang,
    clean_text,
    image_refs,
    parse_time,
)


# Bluesky: an app.bsky.feed.defs#postView from app.bsky.feed.searchPosts
def parse_post_view(n: Normalizer, view: Any, platform: str = "bluesky") -> Post:
    if not isinstance(view, dict):
        raise Reject(f"post is a {type(view).__name__}, expected an object")
    uri = clean_id(view.get("uri"), "uri")
    if not uri.startswith("at://"):
        raise Reject("uri is not an at:// URI")
    record = view.get("record")
    if not isinstance(record, dict):
        raise Reject("missing record")
    author = view.get("author")
    if not isinstance(author, dict):
        raise Reject("missing author")
    did = author.get("did")
    author_hash = n.author(platform, did)
    created = parse_time(record.get("createdAt"), "createdAt")
    indexed_raw = view.get("indexedAt")
    if indexed_raw:
        # searchPosts' since/until filter on sortAt = the earlier of the two: use the same.
        created = min(created, parse_time(indexed_raw, "indexedAt"))
    text = clean_text(record.get("text") or "", "text")
    images: tuple[ImageRef, ...] = ()
    embed = view.get("embed")
    if isinstance(embed, dict):
        kind = embed.get("$type")
        if kind == "app.bsky.embed.recordWithMedia#view":
            embed = embed.get("media") if isinstance(embed.get("media"), dict) else {}
            kind = embed.get("$type")
        if kind == "app.bsky.embed.images#view":
            images = image_refs(embed.get("images"), ("fullsize", "thumb"), ("alt",))
    rkey = uri.rsplit("/", 1)[-1]
    url = f"https://bsky.app/profile/{did}/post/{rkey}" if isinstance(did, str) else None
    return n.post(
        platform, uri, author_hash, text, created,
        lang=clean_lang(record.get("langs")), url=url, images=images,
    )
