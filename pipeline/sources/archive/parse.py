"""Archive export rows (and the synthetic source's records) -> `Post`.

Archive rows (JSONL objects or CSV rows) accept these columns; the first alias present wins:

=============  ==========================================================================
field          accepted columns (aliases)
=============  ==========================================================================
id             ``id``, ``external_id``, ``post_id``, ``status_id``, ``uri``  (required)
platform       ``platform``, ``network``, ``site`` (default: the source's ``platform``
               option, else ``archive``)
author         ``author_id``, ``author``, ``account_id``, ``user_id``, ``username``,
               ``author_handle``, ``account``, ``user`` (required; only a salted hash is
               kept; a dict value uses its ``id``/``did``/``acct``/``username``)
text           ``text``, ``content``, ``body``, ``message``, ``full_text``; else ``title``
               + ``selftext``. HTML (``<p>``, ``<br>``, ...) is converted to text.
created_at     ``created_at``, ``posted_at``, ``createdAt``, ``timestamp``, ``created_utc``,
               ``date``, ``time`` (required): ISO 8601 (``Z`` or an offset; no zone means
               UTC) or Unix epoch seconds / milliseconds
lang           ``lang``, ``language``, ``langs`` (first of a list)
url            ``url``, ``permalink``, ``link``
images         ``images``, ``media``, ``media_attachments``, ``image_urls``, ``media_urls``:
               a list of ``{"url", "alt"}`` objects (``alt_text``/``description`` also
               read; ``remote_url``/``preview_url`` as fallbacks) or of URL strings; in CSV a
               JSON list, or URLs separated by ``|`` or whitespace; or a single
               ``image_url``/``image`` column (with ``image_alt``)
reblog_of      ``reblog_of``, ``repost_of``, ``reblogged_from``, ``retweeted_status_id``,
               ``crosspost_parent``
=============  ==========================================================================
Other columns are ignored (kept in the raw lake only). Empty strings count as missing.
"""

from __future__ import annotations

import functools
import json
import operator
import re
from collections.abc import Callable
from typing import Any

from pipeline.records import ImageRef, Post
from pipeline.sources.parsing import (
    AUTHOR_KEYS,
    ID_KEYS,
    IMAGES_KEYS,
    LANG_KEYS,
    MAX_TEXT_CHARS,
    MIN_TIME,
    PLATFORM_KEYS,
    REBLOG_KEYS,
    SINGLE_IMAGE_KEYS,
    TEXT_KEYS,
    TIME_KEYS,
    URL_KEYS,
    Normalizer,
    Reject,
    check_time,
    clean_id,
    clean_lang,
    clean_text,
    clean_url,
    html_to_text,
    image_refs,
    looks_like_html,
    new_post,
    row_time,
)


# Archive exports (and the synthetic source): see the module doc for the columns.
def parse_row(n: Normalizer, row: Any) -> Post:
    if not isinstance(row, dict):
        raise Reject(f"row is a {type(row).__name__}, expected an object")
    plan, pick = _archive_plan(tuple(row))
    raw_id, raw_platform, raw_author, raw_text, reblog, raw_lang, raw_url = pick(row)
    external_id = clean_id(raw_id, "id")
    if raw_platform is None:
        platform = n.default_platform
    else:
        platform = _platform(raw_platform) if isinstance(raw_platform, str) else ""
        if not platform:
            raise Reject(f"bad platform {str(raw_platform)[:32]!r}")
    posted_at = row_time(map(row.get, TIME_KEYS))  # the index files the row by the same call
    author_hash = n.author(platform, raw_author)
    if raw_text is None and row.get("title") is not None:
        title = clean_text(row.get("title"), "title")
        body = clean_text(row.get("selftext") or "", "selftext")
        raw_text = f"{title}\n\n{body}".strip() if body else title
    text = clean_text(raw_text, "text", MAX_TEXT_CHARS * 4)
    if n.html == "always" or (n.html == "auto" and looks_like_html(text)):
        text = clean_text(html_to_text(text))
    elif len(text) > MAX_TEXT_CHARS:
        raise Reject(f"text too long ({len(text)} characters > {MAX_TEXT_CHARS})")
    repost_of = clean_id(reblog.removeprefix("t3_") if isinstance(reblog, str) else reblog, "reblog_of") if reblog is not None else None
    lang, url, images = clean_lang(raw_lang), clean_url(raw_url), archive_images(row, plan)
    if not MIN_TIME <= posted_at <= n.latest:
        check_time(posted_at, n.now)
    return new_post(platform, external_id, author_hash, text, posted_at, lang, url, repost_of, images)

_FIELDS = {
    "id": ID_KEYS, "platform": PLATFORM_KEYS, "author": AUTHOR_KEYS, "text": TEXT_KEYS, "time": TIME_KEYS,
    "lang": LANG_KEYS, "url": URL_KEYS, "images": IMAGES_KEYS, "single": SINGLE_IMAGE_KEYS, "reblog": REBLOG_KEYS,
}


@functools.lru_cache(maxsize=512)
def _plan(keys: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """For one set of columns: which aliases of each field are present, in priority order."""
    present = set(keys)
    return {f: tuple(k for k in aliases if k in present) for f, aliases in _FIELDS.items()}


_PICKED = ("id", "platform", "author", "text", "reblog", "lang", "url")  # the time: `row_time`


@functools.lru_cache(maxsize=512)
def _archive_plan(keys: tuple[str, ...]) -> tuple[dict[str, tuple[str, ...]], Callable[[dict[str, Any]], Any]]:
    """The plan for one set of columns and a function that picks the `_PICKED` fields of a row
    at once, as `_pick` would one by one. Why: nine `_pick` calls were a sixth of normalising
    an archive row; with at most one alias present per field (the usual export), one C-level
    itemgetter fetches them all."""
    plan = _plan(keys)
    cands = [plan[f] for f in _PICKED]
    if any(len(c) > 1 for c in cands):
        return plan, lambda row: [_pick(row, c) for c in cands]
    cols = [c[0] for c in cands if c]
    if len(cols) == len(cands):
        get = operator.itemgetter(*cols)

        def pick_all(row: dict[str, Any]) -> Any:
            values = get(row)  # a tuple; rebuilt only if a value is "" (one C-level scan to know)
            return [None if v == "" else v for v in values] if "" in values else values

        return plan, pick_all
    slots = [(i, c[0]) for i, c in enumerate(cands) if c]

    def pick(row: dict[str, Any]) -> list[Any]:
        out: list[Any] = [None] * len(cands)
        for i, key in slots:
            value = row[key]
            if value != "":
                out[i] = value
        return out

    return plan, pick


def _pick(row: dict[str, Any], candidates: tuple[str, ...]) -> Any:
    for key in candidates:
        value = row[key]
        if value is not None and value != "":
            return value
    return None


@functools.lru_cache(maxsize=256)
def _platform(value: str) -> str:
    if len(value) > 32:
        return ""
    name = value.strip().lower()
    return name if re.fullmatch(r"[a-z0-9_.-]+", name) else ""


def _split_urls(value: str) -> list[Any]:
    value = value.strip()
    if value.startswith("["):
        try:
            parsed = json.loads(value)
        except ValueError:
            raise Reject("images column is not a valid JSON list") from None
        return parsed if isinstance(parsed, list) else []
    return [u for u in re.split(r"[|\s]+", value) if u]


def archive_images(row: dict[str, Any], plan: dict[str, tuple[str, ...]] | None = None) -> tuple[ImageRef, ...]:
    plan = plan or _plan(tuple(row))
    items = _pick(row, plan["images"])
    if items == []:
        return ()
    if isinstance(items, str):
        items = _split_urls(items)
    if items is None:
        single = _pick(row, plan["single"])
        if isinstance(single, str):
            alt = row.get("image_alt")
            items = [{"url": single, "alt": alt if isinstance(alt, str) else None}]
    if items is not None and not isinstance(items, list):
        raise Reject(f"images is a {type(items).__name__}, expected a list")
    return image_refs(items or [], ("url", "remote_url", "fullsize", "preview_url"), ("alt", "alt_text", "description"))
