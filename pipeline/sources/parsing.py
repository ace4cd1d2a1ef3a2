"""The shared rules for turning a platform's raw record into a `pipeline.records.Post`.

Each platform's own parsing lives in its folder (`pipeline.sources.<platform>.parse`) and
goes through these plain functions over plain dicts, so the rules (UTC timestamps, salted
author hashes, HTML to text, a reblog carries its original's content, no control characters,
sane sizes) are the same whatever the platform. A record that breaks a rule is rejected with a
one-line reason (`Reject`); the loader quarantines it and the window goes on. The column
aliases below are the archive's (`pipeline.sources.archive.parse` documents them); quarantine
excerpts keep the same fields.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import hmac
import json
import re
from collections.abc import Callable
from html.parser import HTMLParser
from typing import Any

from pipeline.records import ImageRef, Post
from pipeline.redact import scrub_emails

MAX_TEXT_CHARS = 100_000
MAX_ID_CHARS = 256
MAX_URL_CHARS = 4096
MAX_IMAGES = 50
MIN_TIME = dt.datetime(1990, 1, 1, tzinfo=dt.UTC)
FUTURE_SLACK = dt.timedelta(days=2)

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_LANG = re.compile(r"^[A-Za-z]{2,8}(?:[-_][A-Za-z0-9]{1,8})*$")
_HTMLISH = re.compile(r"<(?:p|br|a|span|div|em|strong|b|i)\b[^>]*>|</(?:p|a|span|div)>|&(?:amp|lt|gt|quot|#\d+);", re.I)

ID_KEYS = ("id", "external_id", "post_id", "status_id", "uri")
PLATFORM_KEYS = ("platform", "network", "site")
AUTHOR_KEYS = ("author_id", "author", "account_id", "user_id", "username", "author_handle", "account", "user")
TEXT_KEYS = ("text", "content", "body", "message", "full_text")
TIME_KEYS = ("created_at", "posted_at", "createdAt", "timestamp", "created_utc", "date", "time")
LANG_KEYS = ("lang", "language", "langs")
URL_KEYS = ("url", "permalink", "link")
IMAGES_KEYS = ("images", "media", "media_attachments", "image_urls", "media_urls")
SINGLE_IMAGE_KEYS = ("image_url", "image")
REBLOG_KEYS = ("reblog_of", "repost_of", "reblogged_from", "retweeted_status_id", "crosspost_parent")
AUTHOR_FIELDS = frozenset(AUTHOR_KEYS) | {"author_fullname", "account", "handle", "did", "creator"}


class Reject(Exception):
    """A record that cannot become a Post; `str(exc)` is the quarantine reason."""


# --- text ------------------------------------------------------------------------------------


def clean_text(value: Any, what: str = "text", limit: int = MAX_TEXT_CHARS) -> str:
    """A str without NULs/control characters or lone surrogates; Reject if over `limit`."""
    if type(value) is str and len(value) <= limit and value.isascii() and value.isprintable():
        return value  # the common case: nothing to clean
    if value is None:
        return ""
    if not isinstance(value, str):
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = str(value)
        else:
            raise Reject(f"{what} is a {type(value).__name__}, expected text")
    if len(value) > limit:
        raise Reject(f"{what} too long ({len(value)} characters > {limit})")
    if not value.isascii():
        value = value.encode("utf-8", "replace").decode("utf-8")
    if _CONTROL.search(value):
        value = _CONTROL.sub("", value)
    return value.replace("\r\n", "\n")


class _TextExtractor(HTMLParser):
    BLOCK = frozenset({"p", "div", "li", "blockquote", "h1", "h2", "h3", "h4", "h5", "h6", "pre"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.out: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag: str, attrs: Any) -> None:
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "br":
            self.out.append("\n")
        elif tag in self.BLOCK and self.out:
            self.out.append("\n\n")

    def handle_endtag(self, tag: str) -> None:
        if tag in ("script", "style"):
            self._skip = max(0, self._skip - 1)
        elif tag in self.BLOCK:
            self.out.append("\n\n")

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self.out.append(data)


def html_to_text(markup: str) -> str:
    """Visible text of an HTML fragment (Mastodon `content`): tags dropped, entities decoded."""
    if "<" not in markup and "&" not in markup:
        return markup
    parser = _TextExtractor()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.out)
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def looks_like_html(value: str) -> bool:
    return "<" in value and _HTMLISH.search(value) is not None or "&amp;" in value


# --- fields ----------------------------------------------------------------------------------


_NUMERIC = re.compile(r"\s*-?\d+(\.\d+)?\s*")
_fromiso = dt.datetime.fromisoformat


def parse_time(value: Any, what: str = "created_at") -> dt.datetime:
    """ISO 8601 or epoch seconds/ms -> aware UTC datetime; Reject if unparseable."""
    if type(value) is str and 10 <= len(value) <= 64 and value[4:5] == "-":
        try:  # the common case, fast: an ISO string (Python 3.11 reads "Z" itself)
            when = _fromiso(value)
        except ValueError:
            pass
        else:
            return _utc(when, what, value)
    if value is None or value == "":
        raise Reject(f"missing {what}")
    if isinstance(value, bool):
        raise Reject(f"{what} is a boolean")
    if isinstance(value, int | float) or (isinstance(value, str) and _NUMERIC.fullmatch(value)):
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise Reject(f"bad {what}: {str(value)[:40]!r}") from None
        if number != number or abs(number) > 1e14:
            raise Reject(f"{what} out of range: {str(value)[:40]!r}")
        if abs(number) > 1e11:  # milliseconds
            number /= 1000.0
        try:
            return dt.datetime.fromtimestamp(number, dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise Reject(f"{what} out of range: {str(value)[:40]!r}") from None
    if not isinstance(value, str):
        raise Reject(f"{what} is a {type(value).__name__}, expected a timestamp")
    text = value.strip()
    if len(text) > 64:
        raise Reject(f"bad {what}: too long")
    try:
        when = _fromiso(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise Reject(f"bad {what}: {text[:40]!r}") from None
    return _utc(when, what, text)


def _utc(when: dt.datetime, what: str, text: str) -> dt.datetime:
    """`when` in UTC (naive means UTC); Reject when the shift leaves datetime's range."""
    if when.tzinfo is None:
        return when.replace(tzinfo=dt.UTC)
    try:
        return when.astimezone(dt.UTC)
    except (OverflowError, ValueError):
        raise Reject(f"{what} out of range: {text[:40]!r}") from None


def row_time(values: Any) -> dt.datetime:
    """An archive row's posted time from the values of its `TIME_KEYS` columns, in that order
    (`map(row.get, TIME_KEYS)`): the first present and non-empty one, parsed; Reject if none.

    The ONE definition of an archive row's time: the normaliser calls it on the parsed row and
    the index on the same columns decoded from the row's bytes, so a row is always filed under
    the day its window will judge it by (a nested `user.created_at`, an escaped `\\u002B`
    offset or an epoch number cannot make the two disagree)."""
    for value in values:
        if value is not None and value != "":
            return parse_time(value, "created_at")
    raise Reject("missing created_at")


def check_time(when: dt.datetime, now: dt.datetime, what: str = "created_at") -> dt.datetime:
    if when < MIN_TIME:
        raise Reject(f"{what} out of range ({when.date().isoformat()} is before {MIN_TIME.year})")
    if when > now + FUTURE_SLACK:
        raise Reject(f"{what} out of range ({when.isoformat()} is in the future)")
    return when


def first(record: dict[str, Any], keys: tuple[str, ...]) -> Any:
    for key in keys:
        value = record.get(key)
        if value is not None and value != "":
            return value
    return None


def clean_id(value: Any, what: str = "id") -> str:
    if type(value) is str and 0 < len(value) <= MAX_ID_CHARS and value.isascii() and value.isprintable() and value[0] != " " and value[-1] != " ":
        return value
    if value is None or value == "":
        raise Reject(f"missing {what}")
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise Reject(f"{what} is a {type(value).__name__}, expected a string or integer")
    text = clean_text(str(value), what, MAX_ID_CHARS).strip()
    if not text:
        raise Reject(f"empty {what}")
    return text


def clean_lang(value: Any) -> str | None:
    if isinstance(value, list):
        value = value[0] if value else None
    if not isinstance(value, str) or len(value) > 64:
        return None
    return _lang(value)


@functools.lru_cache(maxsize=1024)
def _lang(value: str) -> str | None:
    if not _LANG.match(value.strip()):
        return None
    return value.strip().lower().replace("_", "-")[:16]


def clean_url(value: Any) -> str | None:
    if type(value) is str and 0 < len(value) <= MAX_URL_CHARS and value.isascii() and value.isprintable() and value[0] != " " and value[-1] != " ":
        return value
    if not isinstance(value, str):
        return None
    value = clean_text(value.strip(), "url", 100_000)
    if not value or len(value) > MAX_URL_CHARS:
        return None
    return value


# Excerpts keep an ALLOW-list of fields (a block-list of author keys let `name`, `email`,
# `screen_name` and whatever a new export calls its authors through). Kept, at any depth:
# ids, platform, times, language, texts (cut short, account names taken out), the host of
# URLs, counts and a few flags; lists of media become their length. Records nest (a Reddit
# listing's `data`, a Bluesky view's `record`, a Mastodon `reblog`), so those keys are followed.
EXCERPT_IDS = frozenset(ID_KEYS) | {"cid", "name_id", "parent_id", "in_reply_to_id", "link_id"}
EXCERPT_PLAIN = frozenset(PLATFORM_KEYS) | frozenset(TIME_KEYS) | frozenset(LANG_KEYS) | {
    "edited_at", "indexedAt", "indexed_at", "updated_at", "created", "kind", "type", "$type", "visibility",
    "sensitive", "over_18", "subreddit", "subreddit_name_prefixed", "is_self", "stickied"}
EXCERPT_TEXTS = frozenset(TEXT_KEYS) | {"title", "selftext", "spoiler_text", "alt", "alt_text", "description"}
EXCERPT_URLS = frozenset(URL_KEYS) | frozenset(SINGLE_IMAGE_KEYS) | {"remote_url", "preview_url"}
EXCERPT_MEDIA = frozenset(IMAGES_KEYS) | {"embed", "mentions", "tags", "emojis"}
EXCERPT_NESTED = frozenset({"data", "record", "post", "reblog", "status", "value", "children", "reply", "parent", "root"})
EXCERPT_COUNTS = frozenset({"score", "ups", "downs", "num_comments"})
# Account names inside strings: profile paths (Mastodon /@u and /users/u, Reddit /u/u and
# /user/u, Bluesky /profile/h), DIDs, @mentions, Reddit u/ and u_ names, e-mail addresses, and
# the values of author-like keys in JSON text (a raw line that did not parse).
_ACCOUNT_PATH = re.compile(r"(?i)(/@|/users/|/user/|/u/|/profile/|/accounts/)[^/\s\"'?#<>&]+")
_DID = re.compile(r"did:[a-z0-9]+:[A-Za-z0-9._:%-]+")
_MENTION = re.compile(r"(?<![\w@/.])@[A-Za-z0-9_][A-Za-z0-9_.-]*(?:@[A-Za-z0-9.-]+)?")
_REDDIT_USER = re.compile(r"\bu[_/][A-Za-z0-9_-]{2,}")
_AUTHOR_JSON = re.compile(
    r'"((?:author|user|account|acct|username|handle|did|display_?name|creator|owner|name|e-?mail|screen_?name|'
    r'full_?name|first_?name|last_?name|phone|login|nick)[A-Za-z_]*)"\s*:\s*'
    r'(?:"(?:[^"\\]|\\.)*"?|[^,}\]]*)', re.I)
_EXCERPT_DEPTH = 8
_EXCERPT_ITEMS = 40
_EXCERPT_CHARS = 600


def scrub_accounts(text: str) -> str:
    """`text` with account names replaced by "…" (see the patterns above)."""
    if not text:
        return text
    text = _AUTHOR_JSON.sub(lambda m: f'"{m.group(1)}": "…"', text)
    text = _ACCOUNT_PATH.sub(lambda m: f"{m.group(1)}…", text)
    text = _DID.sub("did:…", text)
    text = scrub_emails(text)
    text = _MENTION.sub("@…", text)
    return _REDDIT_USER.sub("u/…", text)


def _url_host(value: Any) -> str:
    """Only the scheme and host of a URL (its path may name an account)."""
    from urllib.parse import urlsplit

    text = str(value)[:_EXCERPT_CHARS]
    try:
        parts = urlsplit(text)
        host = parts.hostname
    except ValueError:
        return "…"
    return f"{parts.scheme}://{host}/…" if parts.scheme and host else "…"


def _scalar(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float):
        return value
    return scrub_accounts(str(value)[:_EXCERPT_CHARS])


def _allowed(value: Any, depth: int = 0) -> Any:
    """A bounded copy of a record with only the allowed fields (see above); depth, items and
    string lengths are capped (the record may be a 100,000-deep nesting or a 10 MB text)."""
    if depth >= _EXCERPT_DEPTH:
        return "…"
    if isinstance(value, list | tuple):  # a list of records
        items = [_allowed(v, depth + 1) for v in value[:_EXCERPT_ITEMS]]
        return items + ["…"] if len(value) > _EXCERPT_ITEMS else items
    if not isinstance(value, dict):
        return _scalar(value)
    out: dict[str, Any] = {}
    dropped = 0
    for i, (key, item) in enumerate(value.items()):
        if i >= 4 * _EXCERPT_ITEMS:
            dropped += len(value) - i
            break
        name = key if isinstance(key, str) else None
        if name is None:
            dropped += 1
        elif name in EXCERPT_IDS or name in EXCERPT_TEXTS or name in EXCERPT_PLAIN:
            out[name] = _scalar(item) if not isinstance(item, dict | list) else _allowed(item, depth + 1)
        elif name in EXCERPT_URLS:
            out[name] = _url_host(item) if isinstance(item, str) else "…"
        elif name in EXCERPT_MEDIA:
            out[name] = len(item) if isinstance(item, list | dict) else "…"
        elif name in EXCERPT_NESTED:
            out[name] = _allowed(item, depth + 1)
        elif (name in EXCERPT_COUNTS or name.lower().endswith("count")) and isinstance(item, int | float) \
                and not isinstance(item, bool):
            out[name] = item
        else:
            dropped += 1
        if len(out) >= _EXCERPT_ITEMS:
            dropped += len(value) - i - 1
            break
    if dropped:
        out["…"] = f"{dropped} other field(s) not kept"
    return out


def excerpt(record: Any, limit: int = 300) -> str:
    """A short view of a bad record for the quarantine table, without the accounts in it: only
    allowed fields are kept (ids, platform, times, language, texts, URL hosts, counts), and
    account names are cut out of the strings kept (`uri` paths, DIDs, mentions, e-mail
    addresses). A str is taken as the raw text of a record that did not parse: its author-like
    JSON values and account names are cut out."""
    try:
        if isinstance(record, str):
            text = scrub_accounts(record[: limit * 4])
        else:
            text = json.dumps(_allowed(record), ensure_ascii=False, default=str)
    except (TypeError, ValueError, RecursionError):
        text = scrub_accounts(repr(type(record)))
    text = clean_text(text[: limit * 2], "excerpt", 10**9)
    return text[:limit]


# --- per platform ----------------------------------------------------------------------------


def image_refs(items: Any, url_keys: tuple[str, ...], alt_keys: tuple[str, ...]) -> tuple[ImageRef, ...]:
    if not isinstance(items, list) or not items:
        return ()
    out: list[ImageRef] = []
    seen: set[str] = set()
    for item in items:
        if isinstance(item, str):
            url, alt = clean_url(item), None
        elif isinstance(item, dict):
            raw_url = item.get(url_keys[0])
            url = clean_url(raw_url if raw_url else first(item, url_keys[1:]))
            raw_alt = item.get(alt_keys[0])
            if not raw_alt:
                raw_alt = first(item, alt_keys[1:])
            alt = clean_text(raw_alt, "alt text", MAX_TEXT_CHARS) if isinstance(raw_alt, str) else None
        else:
            continue
        if url and url not in seen:
            seen.add(url)
            out.append(ImageRef(url=url, alt_text=alt or None))
        if len(out) >= MAX_IMAGES:
            break
    return tuple(out)


_POST_FIELDS = ("platform", "external_id", "author_hash", "text", "posted_at", "lang", "url", "repost_of", "images")
_new_object = object.__new__
_set_attr = object.__setattr__


def _fast_post(platform: str, external_id: str, author_hash: str, text: str, posted_at: dt.datetime, lang: str | None,
               url: str | None, repost_of: str | None, images: tuple[ImageRef, ...]) -> Post:
    """`Post(...)` for values already checked, filling the instance dict in one step. Why: the
    frozen dataclass `__init__` sets each of the nine fields through `object.__setattr__`,
    about 1 us per post, a sixth of normalising an archive row. Equal to `Post(...)` in every
    way (same class, same attribute dict); `new_post` falls back to it if `Post` changes."""
    post = _new_object(Post)
    _set_attr(post, "__dict__", {"platform": platform, "external_id": external_id, "author_hash": author_hash, "text": text,
                                 "posted_at": posted_at, "lang": lang, "url": url, "repost_of": repost_of, "images": images})
    return post


def _fast_post_ok() -> bool:
    """The shortcut is only taken for the `Post` it was written for (a plain frozen dataclass with
    these fields, no __slots__ or __post_init__)."""
    import dataclasses

    return (dataclasses.is_dataclass(Post) and tuple(f.name for f in dataclasses.fields(Post)) == _POST_FIELDS
            and "__slots__" not in Post.__dict__ and not hasattr(Post, "__post_init__"))


new_post: Callable[..., Post] = _fast_post if _fast_post_ok() else Post


_AUTHOR_CACHES: dict[bytes, dict[tuple[str, str], str]] = {}
_AUTHOR_CACHE_MAX = 500_000


def _author_cache(salt: str) -> dict[tuple[str, str], str]:
    """The process's author-hash cache for one salt, shared by its windows' normalisers.

    Why: a backfill worker runs many daily windows and the same authors post every day; a
    per-window cache missed ~90% of the time in the archive benchmark (an HMAC each). Keyed by
    a digest of the salt (a changed salt never reuses hashes); bounded by clearing when full."""
    key = hashlib.sha256(salt.encode()).digest()
    cache = _AUTHOR_CACHES.get(key)
    if cache is None or len(cache) > _AUTHOR_CACHE_MAX:
        _AUTHOR_CACHES.clear()
        cache = _AUTHOR_CACHES[key] = {}
    return cache


class Normalizer:
    """Per-window normaliser: holds the salt and caches author hashes (authors repeat a lot)."""

    def __init__(self, salt: str, now: dt.datetime | None = None, default_platform: str = "archive", html: str = "auto") -> None:
        if not salt:
            raise ValueError("author salt is empty")
        self._hmac = hmac.new(salt.encode(), digestmod=hashlib.sha256)  # copied per author: same as hash_author()
        self.now = now or dt.datetime.now(dt.UTC)
        self.latest = self.now + FUTURE_SLACK
        self.default_platform = default_platform
        self.html = html  # auto | always | never (archive text)
        self._authors = _author_cache(salt)

    def __repr__(self) -> str:
        return f"Normalizer(platform={self.default_platform!r})"

    def author(self, platform: str, author_id: Any) -> str:
        if type(author_id) is str and author_id:  # the common case: a cached id string
            cached = self._authors.get((platform, author_id))
            if cached is not None:
                return cached
        if isinstance(author_id, dict):
            author_id = first(author_id, ("id", "did", "acct", "username", "name", "url"))
        if author_id is None or author_id == "" or isinstance(author_id, bool) or not isinstance(author_id, str | int):
            raise Reject("missing author id")
        key = (platform, str(author_id))
        cached = self._authors.get(key)
        if cached is None:
            h = self._hmac.copy()
            h.update(f"{platform}:{key[1]}".encode())
            cached = self._authors[key] = h.hexdigest()
        return cached

    def post(self, platform: str, external_id: str, author: str, text: str, posted_at: dt.datetime, **kw: Any) -> Post:
        if not MIN_TIME <= posted_at <= self.latest:
            check_time(posted_at, self.now)
        return Post(platform=platform, external_id=external_id, author_hash=author, text=text, posted_at=posted_at, **kw)

