"""Options of a Reddit source (README's options table is generated from these)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.sources.options import SourceOptions, option


@dataclass(frozen=True)
class RedditOptions(SourceOptions):
    subreddits: list[str] = option([], "subreddits without `r/` (this and/or `queries`)")
    queries: list[str] = option([], "searched within each subreddit, or site-wide without subreddits")
    client_id_env: str | None = option(None, "NAME of the env var with the OAuth client id")
    client_secret_env: str | None = option(None, "NAME of the env var with the OAuth client secret")
    base_url: str = option("https://www.reddit.com", "the public JSON API (without OAuth)")
    oauth_base_url: str = option("https://oauth.reddit.com", "the API with OAuth")
    auth_url: str = option("https://www.reddit.com/api/v1/access_token", "the OAuth token endpoint")
    limit: int = option(100, "posts per page", low=1)

    def check(self, name: str) -> None:
        """What a connector needs beyond the types (raised when the connector is made)."""
        if not self.subreddits and not self.queries:
            raise ConfigError(f"source {name!r}: give `subreddits` and/or `queries`")
