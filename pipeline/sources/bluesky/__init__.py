"""Bluesky: `app.bsky.feed.searchPosts` over the window.

`connector.py` fetches, `parse.py` turns records into `Post`, `options.py` holds the typed options.
"""

from __future__ import annotations

from pipeline.sources.bluesky.options import BlueskyOptions as OPTIONS

CONNECTOR = "pipeline.sources.bluesky.connector:BlueskyConnector"
SUMMARY = "searches of Bluesky posts"
EXAMPLE = {"queries": ["acme"]}  # options of a working source (the registry test makes one)

__all__ = ["CONNECTOR", "EXAMPLE", "OPTIONS", "SUMMARY"]
