"""Mastodon and servers with the same API (GoToSocial, Akkoma/Pleroma): hashtag timelines, account statuses.

`connector.py` fetches, `parse.py` turns records into `Post`, `options.py` holds the typed options.
"""

from __future__ import annotations

from pipeline.sources.mastodon.options import MastodonOptions as OPTIONS

CONNECTOR = "pipeline.sources.mastodon.connector:MastodonConnector"
SUMMARY = "hashtag timelines and account statuses of a Mastodon-API server"
EXAMPLE = {"base_url": "https://mastodon.social", "hashtags": ["acme"]}  # options of a working source (the registry test makes one)

__all__ = ["CONNECTOR", "EXAMPLE", "OPTIONS", "SUMMARY"]
