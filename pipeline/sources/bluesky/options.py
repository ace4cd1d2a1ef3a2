"""Options of a Bluesky source (README's options table is generated from these)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.sources.options import SourceOptions, option


@dataclass(frozen=True)
class BlueskyOptions(SourceOptions):
    queries: list[str] = option([], "search strings, e.g. brand names or `#hashtag`", required=True)
    base_url: str = option("https://bsky.social", "the PDS that proxies app.bsky calls")
    identifier: str | None = option(None, "handle or DID of the app-password account")
    identifier_env: str | None = option(None, "NAME of the env var holding `identifier`")
    password_env: str | None = option(None, "NAME of the env var with the app password (without it: no session)")
    lang: str | None = option(None, "only posts in this language")
    limit: int = option(100, "posts per page", low=1)

    def check(self, name: str) -> None:
        """What a connector needs beyond the types (raised when the connector is made)."""
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"source {name!r}: `base_url` must be an http(s) URL")
        if not self.queries:
            raise ConfigError(f"source {name!r}: give `queries` (search strings) to follow")
