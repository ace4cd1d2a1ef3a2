"""Mastodon-API statuses -> `Post` (a reblog counts as its original: same text, images, language)."""

from __future__ import annotations

from typing import Any

from pipeline.records import Post
from pipeline.sources.parsing import (
    MAX_TEXT_CHARS,
    Normalizer,
    Reject,
    clean_id,
    clean_lang,
    clean_text,
    clean_url,
    html_to_text,
    image_refs,
    parse_time,
)


# Mastodon: a Status entity (https://docs.joinmastodon.org/entities/Status/)
def parse_status(n: Normalizer, status: Any, platform: str = "mastodon") -> Post:
    if not isinstance(status, dict):
        raise Reject(f"status is a {type(status).__name__}, expected an object")
    external_id = clean_id(status.get("id"), "id")
    posted_at = parse_time(status.get("created_at"), "created_at")
    account = status.get("account")
    if not isinstance(account, dict):
        raise Reject("missing account")
    author = n.author(platform, account.get("url") or account.get("acct") or account.get("id"))
    inner = status.get("reblog")
    repost_of = None
    body = status
    if inner is not None:
        if not isinstance(inner, dict):
            raise Reject("reblog is not a status object")
        repost_of = clean_id(inner.get("id"), "reblog.id")
        body = inner  # a reblog counts as its original: same text, images and language
    content = body.get("content")
    if content is not None and not isinstance(content, str):
        raise Reject("content is not text")
    text = html_to_text(clean_text(content or "", "content", MAX_TEXT_CHARS * 4))
    spoiler = body.get("spoiler_text")
    if isinstance(spoiler, str) and spoiler.strip():
        text = f"{clean_text(spoiler, 'spoiler_text')}\n\n{text}".strip()
    text = clean_text(text)
    media = [m for m in (body.get("media_attachments") or []) if isinstance(m, dict) and m.get("type") == "image"] \
        if isinstance(body.get("media_attachments"), list) else []
    images = image_refs(media, ("url", "remote_url"), ("description",))
    url = clean_url(status.get("url")) or clean_url(body.get("url")) or clean_url(body.get("uri"))
    return n.post(
        platform, external_id, author, text, posted_at,
        lang=clean_lang(body.get("language")), url=url, repost_of=repost_of, images=images,
    )
