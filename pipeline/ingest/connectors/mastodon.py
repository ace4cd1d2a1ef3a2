"""Mastodon: hashtag timelines and, optionally, account statuses.

Options: `base_url` (the instance, required), `hashtags` (list, without '#'), `accounts`
(list of account ids or `user@instance` names, looked up via `/api/v1/accounts/lookup`),
`token_env` (NAME of the env var with an access token; public timelines need none),
`limit` (page size, default 40), `snowflake_ids` (default true: bound the window with
Mastodon's time-based ids, see below).

Paging (https://docs.joinmastodon.org/api/guidelines/#pagination): newest first with
`max_id` ("older than"), the next `max_id` taken from the `Link: <...>; rel="next"` header.
Mastodon ids are snowflakes (`ms timestamp << 16 | sequence`), so with `snowflake_ids` the
window becomes an id range: the first request asks for `max_id = id(end)` (nothing newer than
the window) and EVERY request carries `since_id = id(start) - 1` ("newer than"), so the server
never returns a status older than the window start and the walk ends on the first empty page.
`since_id` is re-added by us because Mastodon's `Link` URLs carry only `max_id` (and `limit`).
Why `since_id` and not `min_id`: `min_id` ("immediately newer than") selects the page just
above it, oldest end first, i.e. it pages forward from the start; we page backwards from the
end, which keeps `max_id` the only cursor (stored for resume, checked to go down).
Without `snowflake_ids` (servers with other ids) the walk starts at the newest status and
stops at the first status older than the window start; that check also stays as a guard for
servers that ignore `since_id`. The next `max_id` must be lower than the current one, else the
walk fails (a cursor going backwards).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

from pipeline.errors import ConfigError
from pipeline.ingest.connectors.base import Connector, Step, Stream, env_secret, option_list
from pipeline.ingest.http import FeedError, safe_url
from pipeline.ingest.normalize import Normalizer, Reject, parse_time
from pipeline.records import Post

_LINK = re.compile(r"<([^>]*)>\s*;\s*rel=\"?([^\";]+)\"?")


def parse_link_header(value: str | None) -> dict[str, str]:
    """`Link: <url>; rel="next", <url>; rel="prev"` -> {"next": url, "prev": url}."""
    out: dict[str, str] = {}
    for url, rel in _LINK.findall(value or ""):
        for name in rel.split():
            out.setdefault(name, url)
    return out


def snowflake_for(when: dt.datetime) -> str:
    """The smallest Mastodon id a status created at `when` can have (ms timestamp << 16)."""
    return str(int(when.timestamp() * 1000) << 16)


def since_id_for(when: dt.datetime) -> str:
    """`since_id` is exclusive: one below the smallest id a status created at `when` can have."""
    return str(int(snowflake_for(when)) - 1)


def _id_lt(a: str, b: str) -> bool:
    if a.isdigit() and b.isdigit():
        return int(a) < int(b)
    return (len(a), a) < (len(b), b)


class MastodonConnector(Connector):
    kind = "mastodon"
    platform = "mastodon"

    def __init__(self, source, network, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(source, network, **kwargs)
        base = source.get("base_url")
        if not isinstance(base, str) or not base.startswith(("http://", "https://")):
            raise ConfigError(f"source {source.name!r}: `base_url` must be the instance URL, e.g. https://mastodon.social")
        self.base_url = base.rstrip("/")
        self.hashtags = [h.lstrip("#") for h in option_list(source, "hashtags")]
        self.accounts = option_list(source, "accounts")
        if not self.hashtags and not self.accounts:
            raise ConfigError(f"source {source.name!r}: give `hashtags` and/or `accounts` to follow")
        self.limit = int(source.get("limit", 40))
        self.snowflake = bool(source.get("snowflake_ids", True))
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
        first = {"max_id": snowflake_for(end)} if self.snowflake else {}
        since = since_id_for(start) if self.snowflake else None
        out = []
        for name, path in paths:
            out.append(Stream(name=name, fetch=self._fetcher(name, path, start, since), first_cursor=first, is_backwards=self._backwards))
        return out

    @staticmethod
    def _backwards(prev: Any, nxt: Any) -> bool:
        a = (prev or {}).get("max_id")
        b = (nxt or {}).get("max_id")
        return bool(a and b) and not _id_lt(str(b), str(a))

    def _fetcher(self, name: str, path: str | None, start: dt.datetime, since: str | None):  # type: ignore[no-untyped-def]
        def fetch(cursor: Any) -> Step:
            nonlocal path
            if path is None:
                path = f"/api/v1/accounts/{quote(self._account_id(name.split(':', 1)[1]), safe='')}/statuses"
            params: dict[str, Any] = {"limit": self.limit}
            if cursor and cursor.get("max_id"):
                params["max_id"] = cursor["max_id"]
            if since is not None:
                params["since_id"] = since
            url = f"{self.base_url}{path}"
            body, resp = self.client.get_json(url, params=params, headers=self._headers())
            if not isinstance(body, list):
                raise FeedError(f"{self.source.name}: {safe_url(url)} returned a {type(body).__name__}, expected a list of statuses")
            stop = False
            for status in body:
                try:
                    if parse_time(status.get("created_at")) < start:
                        stop = True
                        break
                except (Reject, AttributeError):
                    continue
            nxt = parse_link_header(resp.headers.get("Link")).get("next")
            next_cursor = None
            if nxt:
                max_id = parse_qs(urlsplit(nxt).query).get("max_id", [None])[0]
                next_cursor = {"max_id": max_id} if max_id else None
            return Step(request={"url": safe_url(url), "params": params, "stream": name}, body=body, records=body, next_cursor=next_cursor, stop=stop)

        return fetch

    def records_of(self, body: Any) -> list[Any]:
        return body if isinstance(body, list) else []

    def normalize(self, normalizer: Normalizer, record: Any) -> Post:
        return normalizer.mastodon(record, self.platform)
