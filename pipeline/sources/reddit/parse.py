"""Reddit listing children (`t3` link posts) -> `Post`, with gallery, link or preview images."""

from __future__ import annotations

import html
import re
from typing import Any

from pipeline.records import ImageRef, Post
from pipeline.sources.parsing import (
    Normalizer,
    Reject,
    clean_id,
    clean_lang,
    clean_text,
    clean_url,
    image_refs,
    parse_time,
)

_IMAGE_EXT = re.compile(r"\.(?:jpe?g|png|gif|webp)(?:$|\?)", re.I)


# Reddit: a listing child {"kind": "t3", "data": {...}}
def parse_child(n: Normalizer, child: Any, platform: str = "reddit") -> Post:
    if not isinstance(child, dict):
        raise Reject(f"listing child is a {type(child).__name__}, expected an object")
    if child.get("kind") != "t3":
        raise Reject(f"listing child of kind {str(child.get('kind'))[:10]!r}, expected t3 (a link post)")
    data = child.get("data")
    if not isinstance(data, dict):
        raise Reject("listing child without data")
    external_id = clean_id(data.get("id"), "id")
    posted_at = parse_time(data.get("created_utc"), "created_utc")
    author_hash = n.author(platform, data.get("author_fullname") or data.get("author"))
    title = clean_text(data.get("title") or "", "title")
    body = clean_text(data.get("selftext") or "", "selftext")
    text = clean_text(f"{title}\n\n{body}".strip() if body else title)
    permalink = data.get("permalink")
    url = f"https://www.reddit.com{permalink}" if isinstance(permalink, str) and permalink.startswith("/") else clean_url(data.get("url"))
    parent = data.get("crosspost_parent")
    repost_of = clean_id(parent.removeprefix("t3_"), "crosspost_parent") if isinstance(parent, str) and parent else None
    return n.post(
        platform, external_id, author_hash, text, posted_at,
        lang=clean_lang(data.get("lang")), url=url, repost_of=repost_of, images=reddit_images(data),
    )


def reddit_images(data: dict[str, Any]) -> tuple[ImageRef, ...]:
    """Gallery images (`media_metadata` in `gallery_data` order), else the link or its preview."""
    urls: list[str] = []
    meta = data.get("media_metadata")
    if isinstance(meta, dict) and meta:
        order: list[Any] = []
        gallery = data.get("gallery_data")
        if isinstance(gallery, dict) and isinstance(gallery.get("items"), list):
            order = [it.get("media_id") for it in gallery["items"] if isinstance(it, dict)]
        order += [k for k in meta if k not in order]
        for media_id in order:
            item = meta.get(media_id) if isinstance(media_id, str) else None
            if not isinstance(item, dict) or item.get("status", "valid") != "valid" or item.get("e") not in ("Image", "AnimatedImage", None):
                continue
            source = item.get("s")
            if isinstance(source, dict):
                u = source.get("u") or source.get("gif")
                if isinstance(u, str):
                    urls.append(html.unescape(u))
    if not urls:
        link = data.get("url_overridden_by_dest") or data.get("url")
        is_image = isinstance(link, str) and (
            data.get("post_hint") == "image" or _IMAGE_EXT.search(link) or "i.redd.it/" in link
        )
        if is_image:
            urls.append(html.unescape(link))
        else:
            preview = data.get("preview")
            imgs = preview.get("images") if isinstance(preview, dict) else None
            if isinstance(imgs, list) and imgs and isinstance(imgs[0], dict):
                source = imgs[0].get("source")
                if isinstance(source, dict) and isinstance(source.get("url"), str):
                    urls.append(html.unescape(source["url"]))
    return image_refs(urls, (), ())
