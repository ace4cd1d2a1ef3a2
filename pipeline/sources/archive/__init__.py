"""Archive exports (JSONL or CSV, optionally gzip) from a folder or `s3://`, for backfills.

`connector.py` fetches, `parse.py` turns records into `Post`, `options.py` holds the typed options.
"""

from __future__ import annotations

from pipeline.sources.archive.options import ArchiveOptions as OPTIONS

CONNECTOR = "pipeline.sources.archive.connector:ArchiveConnector"
SUMMARY = "JSONL/CSV exports (see [Archive exports](#archive-exports))"
EXAMPLE = {"path": "./exports/"}  # options of a working source (the registry test makes one)

__all__ = ["CONNECTOR", "EXAMPLE", "OPTIONS", "SUMMARY"]
