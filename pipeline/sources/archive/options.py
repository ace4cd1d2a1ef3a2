"""Options of an archive source (README's options table is generated from these)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import ConfigError
from pipeline.sources.options import SourceOptions, option

MAX_FILE_BYTES = 16 << 30  # bytes of one file's content, after gunzip
MAX_ROW_BYTES = 64 << 20  # bytes of one JSON line, CSV line or JSON array item
MAX_GZIP_RATIO = 200  # content bytes per gzip byte; checked once RATIO_AFTER bytes came out


@dataclass(frozen=True)
class ArchiveOptions(SourceOptions):
    path: str | None = option(None, "a file, a folder or `s3://bucket/prefix`", required=True)
    platform: str = option("archive", "for rows without a platform column")
    html: str = option("auto", "`auto`, `always` or `never`: convert the text from HTML", choices=("auto", "always", "never"))
    max_file_bytes: int = option(MAX_FILE_BYTES, "content bytes per file, after gunzip", low=1)
    max_row_bytes: int = option(MAX_ROW_BYTES, "bytes per JSON line, CSV line or field, JSON array item", low=1)
    max_gzip_ratio: int = option(MAX_GZIP_RATIO, "content bytes per gzip byte (checked after 64 MiB)", low=1)

    def check(self, name: str) -> None:
        """What a connector needs beyond the types (raised when the connector is made)."""
        if not isinstance(self.path, str) or not self.path:
            raise ConfigError(f"source {name!r}: `path` must name the export file, folder or s3:// prefix")
