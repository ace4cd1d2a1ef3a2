"""Bluesky: `app.bsky.feed.searchPosts` over the window (`since`/`until`, `cursor` paging).

Options: `options.py`.
Authentication: `com.atproto.server.createSession` once per run, the access JWT as a bearer
token; an `ExpiredToken` answer creates a new session once and repeats the request.
Images come from `app.bsky.embed.images#view` and `app.bsky.embed.recordWithMedia#view`.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

from pipeline.errors import ConfigError
from pipeline.ingest.http import FeedError, safe_url
from pipeline.records import Post
from pipeline.settings import NetworkConfig, SourceConfig
from pipeline.sources.bluesky.options import BlueskyOptions
from pipeline.sources.bluesky.parse import parse_post_view
from pipeline.sources.connector import Connector, Step, Stream, env_secret, iso_z
from pipeline.sources.parsing import Normalizer


class BlueskyConnector(Connector):
    kind = "bluesky"
    platform = "bluesky"

    options: BlueskyOptions

    def __init__(self, source: SourceConfig, network: NetworkConfig, *, sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(source, network, sleep=sleep)
        opts = self.options
        self.base_url = opts.base_url.rstrip("/")
        self.queries = list(opts.queries)
        self.limit = opts.limit
        self.lang = opts.lang
        self._password = env_secret(source, "password_env")
        ident = opts.identifier or (env_secret(source, "identifier_env") if opts.identifier_env else None)
        if self._password and not ident:
            raise ConfigError(f"source {source.name!r}: `password_env` needs `identifier` (the account handle)")
        self._identifier = ident
        self._jwt: str | None = None

    def _login(self) -> None:
        self.client.add_secret(self._password)
        body, _ = self.client.request_json(
            "POST",
            f"{self.base_url}/xrpc/com.atproto.server.createSession",
            json_body={"identifier": self._identifier, "password": self._password},
        )
        if not isinstance(body, dict) or not isinstance(body.get("accessJwt"), str):
            raise FeedError(f"{self.source.name}: createSession returned no access token")
        self._jwt = body["accessJwt"]
        self.client.add_secret(self._jwt)
        if isinstance(body.get("refreshJwt"), str):
            self.client.add_secret(body["refreshJwt"])

    def _search(self, params: dict[str, Any]) -> Any:
        url = f"{self.base_url}/xrpc/app.bsky.feed.searchPosts"
        for attempt in range(2):
            headers = {}
            if self._password:
                if self._jwt is None:
                    self._login()
                headers["Authorization"] = f"Bearer {self._jwt}"
            try:
                body, _ = self.client.get_json(url, params=params, headers=headers)
                return body
            except FeedError as exc:
                resp = getattr(exc, "response", None)
                expired = resp is not None and resp.status_code in (400, 401) and "ExpiredToken" in resp.text[:500]
                if expired and self._password and attempt == 0:
                    self._jwt = None
                    continue
                if resp is not None and resp.status_code in (401, 403):
                    raise FeedError(f"{self.source.name}: Bluesky refused the credentials (HTTP {resp.status_code}); check `identifier` and the app password env var") from None
                raise
        raise FeedError(f"{self.source.name}: session expired twice in a row")  # pragma: no cover

    def streams(self, start: dt.datetime, end: dt.datetime) -> list[Stream]:
        return [Stream(name=f"search:{q}", fetch=self._fetcher(q, start, end)) for q in self.queries]

    def _fetcher(self, query: str, start: dt.datetime, end: dt.datetime):  # type: ignore[no-untyped-def]
        def fetch(cursor: Any) -> Step:
            params: dict[str, Any] = {"q": query, "since": iso_z(start), "until": iso_z(end), "limit": self.limit, "sort": "latest"}
            if self.lang:
                params["lang"] = self.lang
            if cursor:
                params["cursor"] = cursor
            body = self._search(params)
            if not isinstance(body, dict) or not isinstance(body.get("posts"), list):
                raise FeedError(f"{self.source.name}: searchPosts returned an unexpected shape (no `posts` list)")
            nxt = body.get("cursor")
            return Step(
                request={"url": safe_url(f"{self.base_url}/xrpc/app.bsky.feed.searchPosts"), "params": params, "stream": f"search:{query}"},
                body=body,
                records=body["posts"],
                next_cursor=nxt if isinstance(nxt, str) and nxt else None,
            )

        return fetch

    def records_of(self, body: Any) -> list[Any]:
        return body.get("posts", []) if isinstance(body, dict) else []

    def normalize(self, normalizer: Normalizer, record: Any) -> Post:
        return parse_post_view(normalizer, record, self.platform)
