"""The raw lake: every feed response as gzip JSONL, partitioned by source and UTC day.

Keys: `raw/source=NAME/dt=YYYY-MM-DD/<window>-partNNNNN.jsonl.gz`, where `<window>` is
`YYYYmmddTHHMMSSZ_YYYYmmddTHHMMSSZ` (start, end) and `dt` the window's start day. One line is
one API page: `{"seq", "fetched_at", "request", "body"}` with a secret-free request description.
A window's parts are written before its database commit and rewritten by a re-run (stale parts
beyond the new count are deleted), so the lake never holds a window twice. Parts written so far
double as the resume point of an interrupted window (see `jobs`).
Gzip headers carry no timestamp, so the same content gives the same bytes.
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import re
import zlib
from collections.abc import Iterable, Iterator
from concurrent.futures import Executor, Future
from typing import Any

from pipeline.objectstore import ObjectStore

FLUSH_LINES = 3000  # lines compressed per zlib call (one task of the compression thread: ~1 MB)
_PART = re.compile(r"-part(\d{5})\.jsonl\.gz$")


def stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y%m%dT%H%M%SZ")


def source_prefix(source: str) -> str:
    return f"raw/source={source}/"


def day_prefix(source: str, day: dt.date) -> str:
    return f"{source_prefix(source)}dt={day.isoformat()}/"


def window_base(source: str, start: dt.datetime, end: dt.datetime) -> str:
    return f"{day_prefix(source, start.astimezone(dt.UTC).date())}{stamp(start)}_{stamp(end)}"


def part_key(source: str, start: dt.datetime, end: dt.datetime, part: int) -> str:
    return f"{window_base(source, start, end)}-part{part:05d}.jsonl.gz"


def encode_lines(lines: Iterable[Any]) -> bytes:
    """Objects -> gzip JSONL bytes (deterministic: no mtime in the gzip header)."""
    text = "".join(json.dumps(obj, ensure_ascii=False, separators=(",", ":"), default=str) + "\n" for obj in lines)
    return gzip.compress(text.encode("utf-8", "surrogatepass"), compresslevel=6, mtime=0)


def decode_lines(data: bytes) -> Iterator[Any]:
    for line in gzip.decompress(data).decode("utf-8", "surrogatepass").splitlines():
        if line.strip():
            yield json.loads(line)


def write_part(store: ObjectStore, key: str, pages: list[dict[str, Any]]) -> None:
    store.put(key, encode_lines(pages), content_type="application/gzip")


def read_part(store: ObjectStore, key: str) -> list[dict[str, Any]]:
    return list(decode_lines(store.get(key)))


def window_parts(store: ObjectStore, source: str, start: dt.datetime, end: dt.datetime) -> dict[int, str]:
    """Existing part objects of a window: part number -> key."""
    base = window_base(source, start, end)
    out: dict[int, str] = {}
    for key in store.list(base):
        m = _PART.search(key)
        if m and key.startswith(base + "-part"):
            out[int(m.group(1))] = key
    return out


def delete_parts_from(store: ObjectStore, source: str, start: dt.datetime, end: dt.datetime, first_stale: int) -> int:
    """Delete a window's parts numbered >= first_stale (left by a longer earlier run)."""
    n = 0
    for number, key in sorted(window_parts(store, source, start, end).items()):
        if number >= first_stale:
            store.delete(key)
            n += 1
    return n


class GzipLines:
    """An incremental gzip JSONL writer kept in memory (one per archive day partition).

    Lines are compressed in batches (one zlib call per `FLUSH_LINES` lines, not per line). With an
    `executor` (one thread), compression runs there: zlib releases the GIL, so it overlaps
    with the caller's parsing on another core. One thread keeps each stream's batches in order.
    """

    __slots__ = ("_z", "_chunks", "_pending", "_executor", "count")

    def __init__(self, level: int = 1, executor: Executor | None = None) -> None:
        self._z = zlib.compressobj(level, zlib.DEFLATED, 31)  # 31 = gzip container, mtime 0
        self._chunks: list[bytes | Future[bytes]] = []
        self._pending: list[bytes] = []
        self._executor = executor
        self.count = 0

    def add(self, line: str) -> None:
        self.add_bytes(line.encode("utf-8", "surrogatepass"))

    def add_bytes(self, line: bytes) -> None:
        """A line already encoded (e.g. an export row kept as the bytes it came as)."""
        self._pending.append(line)
        self.count += 1
        if len(self._pending) >= FLUSH_LINES:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            data = b"".join(self._pending)
            self._pending = []
            if self._executor is None:
                self._chunks.append(self._z.compress(data))
            else:
                self._chunks.append(self._executor.submit(self._z.compress, data))

    def finish(self) -> bytes:
        self._flush()
        parts = [c.result() if isinstance(c, Future) else c for c in self._chunks]
        parts.append(self._z.flush())
        self._chunks = []
        return b"".join(parts)
