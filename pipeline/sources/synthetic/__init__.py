"""The synthetic demo source: `pipeline.synthetic`'s generated dataset as a feed.

`connector.py` serves the windows, `options.py` holds the typed options (records are archive rows).
"""

from __future__ import annotations

from pipeline.sources.synthetic.options import SyntheticOptions as OPTIONS

CONNECTOR = "pipeline.sources.synthetic.connector:SyntheticConnector"
SUMMARY = "the demo's generated feed"
EXAMPLE = {"days": 30}  # options of a working source (the registry test makes one)
SERVES_IMAGES = True  # image bytes come from the generator (`image_bytes`), not over HTTP

__all__ = ["CONNECTOR", "EXAMPLE", "OPTIONS", "SERVES_IMAGES", "SUMMARY"]
