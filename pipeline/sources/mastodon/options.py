"""Options of a Mastodon-API source (README's options table is generated from these)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.sources.options import SourceOptions, option

ID_MODES = ("auto", "snowflake", "time")
DEFAULT_SLACK_S = 600.0


@dataclass(frozen=True)
class MastodonOptions(SourceOptions):
    base_url: str | None = option(None, "the instance, e.g. https://mastodon.social", required=True)
    hashtags: list[str] = option([], "hashtag timelines to follow, without '#' (this and/or `accounts`)")
    accounts: list[str] = option([], "account ids or `user@instance` names whose statuses to follow")
    token_env: str | None = option(None, "NAME of the env var with an access token (public timelines need none)")
    limit: int = option(40, "statuses per page", low=1)
    id_mode: str | None = option(None, "`auto`, `snowflake` or `time`: how the window is walked (default auto)",
                                 choices=ID_MODES)
    snowflake_ids: bool = option(True, "the old spelling of `id_mode`: false means `time`")
    time_slack_s: float = option(DEFAULT_SLACK_S, "how far a status's `created_at` may run ahead of its id's time")

    def check(self, name: str) -> None:
        """What a connector needs beyond the types (raised when the connector is made)."""
        if not isinstance(self.base_url, str) or not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(f"source {name!r}: `base_url` must be the instance URL, e.g. https://mastodon.social")
        if not self.hashtags and not self.accounts:
            raise ConfigError(f"source {name!r}: give `hashtags` and/or `accounts` to follow")

    @property
    def walk(self) -> str:
        """The `id_mode` in effect (`snowflake_ids: false` is `time`)."""
        return self.id_mode or ("auto" if self.snowflake_ids else "time")
