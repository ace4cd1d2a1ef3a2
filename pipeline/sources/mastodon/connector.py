"""Mastodon and servers with the same API (GoToSocial, Akkoma/Pleroma, ...): hashtag timelines
and, optionally, account statuses.

Options: `options.py`.

Paging (https://docs.joinmastodon.org/api/guidelines/#pagination): newest first with
`max_id` ("older than"), the next `max_id` taken from the `Link: <...>; rel="next"` header.
Ids are opaque strings to the API, and servers differ: Mastodon uses snowflakes
(`ms timestamp << 16 | sequence`, but statuses from before Mastodon 2.0 keep small integers),
GoToSocial ULIDs, Akkoma/Pleroma base62 flake ids. Two walks:
- `snowflake`: the window becomes an id range. The first request asks for
  `max_id = id(end)` and EVERY request carries `since_id = id(start - time_slack_s) - 1`
  ("newer than"; re-added by us, as the `Link` URLs carry only `max_id`), so the server returns
  only the window and the walk ends on the first empty page.
- `time`: no `since_id`; from the newest status down with `max_id` from the `Link` headers,
  until a page holds only statuses older than `start - time_slack_s`. Correct for any id
  scheme whose order follows time within the slack; it reads the statuses newer than the
  window too (counted `out_of_window`).
`auto` (the default) decides per stream and records the mode in each page's request (and the
log): the id-range request first; if it returns statuses whose ids decode to their
`created_at` (snowflake: `id >> 16` is the ms time, within the slack), the snowflake walk goes
on. Otherwise one plain newest-first page decides: empty = nothing to read; snowflake ids =
the server uses snowflakes and the window is empty by id; anything else = the time walk,
starting with that page. A snowflake walk ends with a tail check: one page just below
`since_id`; if it holds a status created inside the window (a pre-2.0 integer id on an
upgraded server), the walk continues by time from there. With `snowflake` every check is
skipped (the old behaviour; a non-snowflake server then returns nothing); `snowflake_ids:
false` is the old spelling of `id_mode: time`. The next `max_id` must be lower than the
current one, else the walk fails (a cursor going backwards).
"""

from __future__ import annotations

import datetime as dt
import logging
import re
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from pipeline.ingest.http import FeedError, safe_url
from pipeline.records import Post
from pipeline.settings import NetworkConfig, SourceConfig
from pipeline.sources.connector import Connector, Step, Stream, env_secret
from pipeline.sources.mastodon.options import DEFAULT_SLACK_S, MastodonOptions
from pipeline.sources.mastodon.parse import parse_status
from pipeline.sources.parsing import Normalizer, Reject, parse_time

log = logging.getLogger(__name__)

_LINK = re.compile(r"<([^>]*)>([^<]*)")
_REL = re.compile(r";\s*rel\s*=\s*(?:\"([^\"]*)\"|([^\s;,\"]+))", re.IGNORECASE)
SKEW_MS = 60_000  # a local status's id may be stamped a little after its created_at


def parse_link_header(value: str | None) -> dict[str, str]:
    """`Link: <url>; rel="next", <url>; rel="prev"` -> {"next": url, "prev": url}."""
    out: dict[str, str] = {}
    for url, params in _LINK.findall(value or ""):
        rel = _REL.search(params)
        if rel:
            for name in (rel.group(1) or rel.group(2) or "").split():
                out.setdefault(name.lower(), url)
    return out


def next_max_id(link: str | None) -> str | None:
    """The `max_id` of the `rel="next"` URL of a Link header, if any."""
    nxt = parse_link_header(link).get("next")
    if not nxt:
        return None
    try:
        value = parse_qs(urlsplit(nxt).query).get("max_id", [None])[0]
    except ValueError:
        return None
    return value or None


def snowflake_for(when: dt.datetime) -> str:
    """The smallest Mastodon id a status created at `when` can have (ms timestamp << 16)."""
    return str(int(when.timestamp() * 1000) << 16)


def since_id_for(when: dt.datetime) -> str:
    """`since_id` is exclusive: one below the smallest id a status created at `when` can have."""
    return str(int(snowflake_for(when)) - 1)


def _created(status: Any) -> dt.datetime | None:
    try:
        return parse_time(status.get("created_at"))
    except (Reject, AttributeError, TypeError, ValueError, OverflowError):
        return None


def is_snowflake(status: Any, slack_s: float = DEFAULT_SLACK_S) -> bool:
    """Whether the status's id is a Mastodon snowflake of its own `created_at`."""
    sid = status.get("id") if isinstance(status, dict) else None
    created = _created(status)
    if not isinstance(sid, str) or not sid.isascii() or not sid.isdigit() or len(sid) > 20 or created is None:
        return False
    lag = created.timestamp() * 1000 - (int(sid) >> 16)
    return -SKEW_MS <= lag <= slack_s * 1000


def snowflake_page(statuses: list[Any], slack_s: float = DEFAULT_SLACK_S) -> bool:
    """A non-empty page whose every status has a snowflake id of its own time."""
    return bool(statuses) and all(is_snowflake(s, slack_s) for s in statuses)


def lowest_id(statuses: list[Any]) -> str | None:
    """The lowest status id of a page (the documented `max_id` of the next page), or None.
    Why: some servers of the API send no `Link` header; the walk would stop after one page."""
    ids = [str(s["id"]) for s in statuses if isinstance(s, dict) and isinstance(s.get("id"), str | int) and not isinstance(s.get("id"), bool)]
    ids = [i for i in ids if i]
    if not ids:
        return None
    low = ids[0]
    for i in ids[1:]:
        if _id_lt(i, low):
            low = i
    return low


def _id_lt(a: str, b: str) -> bool:
    if a.isdigit() and b.isdigit():
        return int(a) < int(b)
    return (len(a), a) < (len(b), b)


class MastodonConnector(Connector):
    kind = "mastodon"
    platform = "mastodon"

    options: MastodonOptions

    def __init__(self, source: SourceConfig, network: NetworkConfig, *, sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(source, network, sleep=sleep)
        opts = self.options
        self.base_url = str(opts.base_url).rstrip("/")
        self.hashtags = [h.lstrip("#") for h in opts.hashtags]
        self.accounts = list(opts.accounts)
        self.limit = opts.limit
        self.id_mode = opts.walk
        self.slack_s = float(opts.time_slack_s)
        self.modes: dict[str, str] = {}  # stream -> the walk it used (auto: what it detected)
        self._token = env_secret(source, "token_env")
        self._account_ids: dict[str, str] = {}

    def _headers(self) -> dict[str, str]:
        if self._token:
            self.client.add_secret(self._token)
            return {"Authorization": f"Bearer {self._token}"}
        return {}

    def _account_id(self, account: str) -> str:
        account = account.lstrip("@")
        if account.isdigit():
            return account
        if account not in self._account_ids:
            body, _ = self.client.get_json(f"{self.base_url}/api/v1/accounts/lookup", params={"acct": account}, headers=self._headers())
            if not isinstance(body, dict) or not body.get("id"):
                raise FeedError(f"{self.source.name}: account {account!r} not found on {self.base_url}")
            self._account_ids[account] = str(body["id"])
        return self._account_ids[account]

    def streams(self, start: dt.datetime, end: dt.datetime) -> list[Stream]:
        paths = [(f"tag:{t}", f"/api/v1/timelines/tag/{quote(t, safe='')}") for t in self.hashtags]
        paths += [(f"account:{a}", None) for a in self.accounts]
        first = {"max_id": snowflake_for(end), "mode": "snowflake"} if self.id_mode == "snowflake" else {"mode": self.id_mode}
        out = []
        for name, path in paths:
            out.append(Stream(name=name, fetch=self._fetcher(name, path, start, end), first_cursor=first, is_backwards=self._backwards))
        return out

    @staticmethod
    def _backwards(prev: Any, nxt: Any) -> bool:
        a = (prev or {}).get("max_id")
        b = (nxt or {}).get("max_id")
        return bool(a and b) and not _id_lt(str(b), str(a))

    def _fetcher(self, name: str, path: str | None, start: dt.datetime, end: dt.datetime):  # type: ignore[no-untyped-def]
        since = since_id_for(start - dt.timedelta(seconds=self.slack_s))
        floor = start - dt.timedelta(seconds=self.slack_s)
        state = {"path": path}

        def get(params: dict[str, Any]) -> tuple[list[Any], dict[str, Any], str | None]:
            if state["path"] is None:
                state["path"] = f"/api/v1/accounts/{quote(self._account_id(name.split(':', 1)[1]), safe='')}/statuses"
            params = {"limit": self.limit, **params}
            url = f"{self.base_url}{state['path']}"
            body, resp = self.client.get_json(url, params=params, headers=self._headers())
            if not isinstance(body, list):
                raise FeedError(f"{self.source.name}: {safe_url(url)} returned a {type(body).__name__}, expected a list of statuses")
            nxt = next_max_id(resp.headers.get("Link"))
            if nxt is None and len(body) >= self.limit:
                nxt = lowest_id(body)  # a full page without a Link header: "older than" its last status
            return body, {"url": safe_url(url), "params": params, "stream": name}, nxt

        def step(body: list[Any], request: dict[str, Any], nxt: str | None, mode: str) -> Step:
            """A page of the snowflake or time walk (`tail`: the snowflake walk still to check below)."""
            self.modes[name] = "time" if mode == "time" else "snowflake"
            request = {**request, "id_mode": self.modes[name]}
            if mode == "time":
                times = [t for t in (_created(s) for s in body) if t is not None]
                stop = bool(times) and all(t < floor for t in times)
                return Step(request, body, body, {"max_id": nxt, "mode": "time"} if nxt else None, stop=stop)
            if body and nxt:
                return Step(request, body, body, {"max_id": nxt, "mode": mode})
            if mode == "snowflake":  # trusted (id_mode: snowflake): the window's id range is done
                return Step(request, body, body, None)
            if not body:
                return tail()
            return Step(request, body, body, {"mode": "tail"})

        def tail() -> Step:
            """One page just below the id range: statuses created in the window there mean ids
            that are not snowflakes of their time (pre-2.0 integers); walk on by time."""
            body, req, nxt = get({"max_id": str(int(since) + 1)})
            if any((t := _created(s)) is not None and t >= start for s in body):
                log.info("%s %s: statuses below the snowflake range were created in the window; walking by time", self.source.name, name)
                return step(body, req, nxt, "time")
            self.modes.setdefault(name, "snowflake")
            return Step({**req, "id_mode": "snowflake", "tail_check": True}, body, [], None)

        def auto() -> Step:
            body, req, nxt = get({"max_id": snowflake_for(end), "since_id": since})
            if snowflake_page(body, self.slack_s):
                return step(body, req, nxt, "checked")
            newest, nreq, nnxt = get({})
            if not newest:
                self.modes[name] = "empty"
                return Step({**nreq, "id_mode": "empty"}, newest, [], None)
            if not body and snowflake_page(newest, self.slack_s):
                self.modes[name] = "snowflake"
                return tail()
            log.info("%s %s: ids are not snowflakes of their created_at; walking by time", self.source.name, name)
            return step(newest, nreq, nnxt, "time")

        def fetch(cursor: Any) -> Step:
            cursor = dict(cursor or {})
            mode = cursor.get("mode") or ("time" if self.id_mode == "time" else "snowflake")
            if mode == "auto":
                return auto()
            if mode == "tail":
                return tail()
            params: dict[str, Any] = {}
            if cursor.get("max_id"):
                params["max_id"] = cursor["max_id"]
            if mode in ("snowflake", "checked"):
                params["since_id"] = since
            return step(*get(params), mode)

        return fetch

    def records_of(self, body: Any) -> list[Any]:
        return body if isinstance(body, list) else []

    def normalize(self, normalizer: Normalizer, record: Any) -> Post:
        return parse_status(normalizer, record, self.platform)
