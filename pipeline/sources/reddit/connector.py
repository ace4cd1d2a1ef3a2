"""Reddit: subreddit `new` listings and searches, paged with the `after` token.

Options: `options.py` (Reddit asks for a descriptive `user_agent`:
`<platform>:<app id>:<version> (by /u/<user>)`; default: `network.user_agent`).
Listings are newest first; a walk stops at the first post older than the window start.
Images come from galleries (`media_metadata`), image links (`url`) or `preview`.
OAuth tokens live `expires_in` seconds (a day at Reddit): a new one is fetched before that
(a tenth of the lifetime early, at most a minute), and a 401 on a listing (revoked, or the
clock was off) gets one new token and one repeat of the request; a second 401 fails the
window with a hint about the credentials.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

from pipeline.errors import ConfigError
from pipeline.ingest.http import FeedError, safe_url
from pipeline.records import Post
from pipeline.settings import NetworkConfig, SourceConfig
from pipeline.sources.connector import Connector, Step, Stream, env_secret
from pipeline.sources.parsing import Normalizer, Reject, parse_time
from pipeline.sources.reddit.options import RedditOptions
from pipeline.sources.reddit.parse import parse_child


class RedditConnector(Connector):
    kind = "reddit"
    platform = "reddit"

    options: RedditOptions

    def __init__(self, source: SourceConfig, network: NetworkConfig, *, sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(source, network, sleep=sleep)
        opts = self.options
        self.subreddits = [s.removeprefix("r/").strip("/") for s in opts.subreddits]
        self.queries = list(opts.queries)
        self.limit = opts.limit
        self._client_id = env_secret(source, "client_id_env")
        self._client_secret = env_secret(source, "client_secret_env")
        if bool(self._client_id) != bool(self._client_secret):
            raise ConfigError(f"source {source.name!r}: OAuth needs both `client_id_env` and `client_secret_env`")
        if self._client_id:
            self.base_url = opts.oauth_base_url.rstrip("/")
        else:
            self.base_url = opts.base_url.rstrip("/")
        self.auth_url = opts.auth_url
        self._token: str | None = None
        self._renew_at = 0.0  # monotonic time after which the token is renewed before use

    def _login(self) -> None:
        self.client.add_secret(self._client_secret)
        asked = time.monotonic()
        body, _ = self.client.request_json(
            "POST", self.auth_url, data={"grant_type": "client_credentials"}, auth=(self._client_id, self._client_secret or "")
        )
        token = body.get("access_token") if isinstance(body, dict) else None
        if not isinstance(token, str):
            raise FeedError(f"{self.source.name}: Reddit's token endpoint returned no access_token; check the client credentials")
        self.client.add_secret(token)
        ttl = body.get("expires_in")
        ttl = float(ttl) if isinstance(ttl, int | float) and not isinstance(ttl, bool) and ttl > 0 else 3600.0
        self._token = token
        self._renew_at = asked + ttl - min(60.0, ttl / 10)  # counted from the request: never late

    def _headers(self) -> dict[str, str]:
        if not self._client_id:
            return {}
        if self._token is None or time.monotonic() >= self._renew_at:
            self._login()
        return {"Authorization": f"bearer {self._token}"}

    def _get_listing(self, url: str, params: dict[str, Any]) -> Any:
        for attempt in range(2):
            try:
                body, _ = self.client.get_json(url, params=params, headers=self._headers())
                return body
            except FeedError as exc:
                resp = getattr(exc, "response", None)
                if resp is None or resp.status_code != 401 or not self._client_id:
                    raise
                if attempt == 0:
                    self._token = None  # revoked or expired early: one new token, one repeat
                    continue
                raise FeedError(f"{self.source.name}: Reddit refused a fresh OAuth token (HTTP 401 twice); check the client "
                                "credentials and that the app may read the listing") from None
        raise AssertionError("unreachable")  # pragma: no cover

    def streams(self, start: dt.datetime, end: dt.datetime) -> list[Stream]:
        out: list[Stream] = []
        for sub in self.subreddits:
            if self.queries:
                for q in self.queries:
                    out.append(Stream(f"search:r/{sub}:{q}", self._fetcher(f"/r/{quote(sub, safe='')}/search.json", {"q": q, "restrict_sr": 1, "sort": "new"}, start, f"search:r/{sub}:{q}")))
            else:
                out.append(Stream(f"new:r/{sub}", self._fetcher(f"/r/{quote(sub, safe='')}/new.json", {}, start, f"new:r/{sub}")))
        if not self.subreddits:
            for q in self.queries:
                out.append(Stream(f"search:{q}", self._fetcher("/search.json", {"q": q, "sort": "new"}, start, f"search:{q}")))
        return out

    def _fetcher(self, path: str, extra: dict[str, Any], start: dt.datetime, name: str):  # type: ignore[no-untyped-def]
        def fetch(cursor: Any) -> Step:
            params: dict[str, Any] = {**extra, "limit": self.limit, "raw_json": 1}
            if cursor:
                params["after"] = cursor
            url = f"{self.base_url}{path}"
            body = self._get_listing(url, params)
            if not isinstance(body, dict) or body.get("kind") != "Listing" or not isinstance(body.get("data"), dict):
                raise FeedError(f"{self.source.name}: {safe_url(url)} did not return a Listing")
            data = body["data"]
            children = data.get("children")
            if not isinstance(children, list):
                raise FeedError(f"{self.source.name}: {safe_url(url)} returned a Listing without children")
            # Stop once a page is wholly older than the window (the rule of Mastodon's time walk):
            # one stale child (a post approved late, a sticky) must not end the walk early.
            times = []
            for child in children:
                try:
                    times.append(parse_time(child["data"]["created_utc"]))
                except (Reject, KeyError, TypeError):
                    continue
            stop = bool(times) and all(t < start for t in times)
            after = data.get("after")
            return Step(
                request={"url": safe_url(url), "params": params, "stream": name},
                body=body,
                records=children,
                next_cursor=after if isinstance(after, str) and after else None,
                stop=stop,
            )

        return fetch

    def records_of(self, body: Any) -> list[Any]:
        try:
            children = body["data"]["children"]
        except (KeyError, TypeError):
            return []
        return children if isinstance(children, list) else []

    def record_ref(self, record: Any) -> str | None:
        if isinstance(record, dict) and isinstance(record.get("data"), dict):
            value = record["data"].get("name") or record["data"].get("id")
            if isinstance(value, str):
                return value[:200]
        return None

    def normalize(self, normalizer: Normalizer, record: Any) -> Post:
        return parse_child(normalizer, record, self.platform)
