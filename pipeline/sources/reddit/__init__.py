"""Reddit: subreddit `new` listings and searches.

`connector.py` fetches, `parse.py` turns records into `Post`, `options.py` holds the typed options.
"""

from __future__ import annotations

from pipeline.sources.reddit.options import RedditOptions as OPTIONS

CONNECTOR = "pipeline.sources.reddit.connector:RedditConnector"
SUMMARY = "subreddit listings and searches"
EXAMPLE = {"subreddits": ["acme"]}  # options of a working source (the registry test makes one)

__all__ = ["CONNECTOR", "EXAMPLE", "OPTIONS", "SUMMARY"]
