"""Archive exports as a source: the windows read their days from the index (`index.py`),
built from the export files (`files.py`); rows become posts by `parse.py`'s rules.

Accepted files: `*.jsonl`, `*.ndjson` (JSON lines), `*.json` (JSON lines, or one JSON array),
`*.csv`, each optionally `.gz`. Every read is bounded (`Limits`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterator
from typing import Any

from pipeline.errors import StorageError
from pipeline.objectstore import ObjectStore
from pipeline.records import Post
from pipeline.settings import NetworkConfig, Settings, SourceConfig
from pipeline.sources.archive.files import ArchiveFiles, Limits
from pipeline.sources.archive.index import ArchiveIndex, decode_partition
from pipeline.sources.archive.options import ArchiveOptions
from pipeline.sources.archive.parse import parse_row
from pipeline.sources.connector import Connector, Page
from pipeline.sources.parsing import Normalizer, Reject


class ArchiveConnector(Connector):
    kind = "archive"
    platform = "archive"
    writes_raw = False  # its day partitions are the raw lake
    ties = "content"  # copies with one posted time in different exports: the greater content hash wins
    options: ArchiveOptions

    def __init__(self, source: SourceConfig, network: NetworkConfig, *, endpoint_url: str | None = None,
                 sleep: Callable[[float], None] | None = None) -> None:
        super().__init__(source, network, sleep=sleep)
        self.files = ArchiveFiles(str(self.options.path), endpoint_url)
        self.platform = self.options.platform
        self.limits = Limits.of(self.options)
        self.index = ArchiveIndex(source.name, self.files, self.limits)
        self.manifest: dict[str, Any] | None = None  # set by the job's index step
        self.store: ObjectStore | None = None

    @classmethod
    def from_settings(cls, settings: Settings, source: SourceConfig, *, sleep: Callable[[float], None] | None = None) -> Connector:
        return cls(source, settings.network, endpoint_url=settings.s3_endpoint_url, sleep=sleep)

    def use_index(self, store: ObjectStore, manifest: dict[str, Any]) -> None:
        """The index the windows read (the job's index step found or built it)."""
        self.store, self.manifest = store, manifest

    def pages(self, start: dt.datetime, end: dt.datetime, resume: dict[str, Any] | None = None) -> Iterator[Page]:
        if self.manifest is None:
            raise RuntimeError("the ingest job's index step must run before ArchiveConnector.pages()")
        day = start.astimezone(dt.UTC).date()
        last = (end - dt.timedelta(microseconds=1)).astimezone(dt.UTC).date()
        while day <= last:
            info = self.manifest["days"].get(day.isoformat())
            if info:
                day_start = dt.datetime.combine(day, dt.time(), dt.UTC)
                whole = start <= day_start and end >= day_start + dt.timedelta(days=1)
                try:
                    data = self.store.get(info["key"])
                except KeyError:
                    raise StorageError(f"archive partition {info['key']} is missing from the lake; re-run with --force to re-index") from None
                records = decode_partition(data)
                if not whole:
                    records = [r for r in records if r.get("ts") and start <= dt.datetime.fromisoformat(r["ts"]) < end]
                yield Page(
                    request={"archive": self.files.path, "day": day.isoformat()},
                    body=None, state=None, raw_key=info["key"], records=records,
                )
            day += dt.timedelta(days=1)

    def records_of(self, body: Any) -> list[Any]:
        return []

    def make_normalizer(self, salt: str, now: dt.datetime | None = None) -> Normalizer:
        return Normalizer(salt, now=now, default_platform=self.platform, html=self.options.html)

    def normalize(self, normalizer: Normalizer, record: Any) -> Post:
        if "error" in record:
            raise Reject(record["error"])
        return parse_row(normalizer, record["row"])

    def record_ref(self, record: Any) -> str | None:
        return str(record.get("ref"))[:200] if isinstance(record, dict) else None

