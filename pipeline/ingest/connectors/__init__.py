"""Feed connectors, one module per source kind; `make_connector` picks one from the config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pipeline.ingest.connectors.base import Connector, Page
from pipeline.settings import Settings, SourceConfig


def make_connector(settings: Settings, source: SourceConfig, *, sleep: Callable[[float], None] | None = None) -> Connector:
    """The connector for `source` (its `kind` picks the class); config errors raise ConfigError."""
    kwargs: dict[str, Any] = {"sleep": sleep}
    if source.kind == "mastodon":
        from pipeline.ingest.connectors.mastodon import MastodonConnector as cls
    elif source.kind == "bluesky":
        from pipeline.ingest.connectors.bluesky import BlueskyConnector as cls
    elif source.kind == "reddit":
        from pipeline.ingest.connectors.reddit import RedditConnector as cls
    elif source.kind == "archive":
        from pipeline.ingest.connectors.archive import ArchiveConnector as cls

        kwargs["endpoint_url"] = settings.s3_endpoint_url
    elif source.kind == "synthetic":
        from pipeline.ingest.connectors.synthetic import SyntheticConnector as cls
    else:  # settings validation makes this unreachable
        raise ValueError(f"unknown source kind {source.kind!r}")
    return cls(source, settings.network, **kwargs)


__all__ = ["Connector", "Page", "make_connector"]
