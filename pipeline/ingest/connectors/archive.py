"""Archive exports (JSONL or CSV, optionally gzip) from a local folder or `s3://`, for backfills.

Options: `path` (a file, a folder, or `s3://bucket/prefix`; required), `platform` (default
`archive`; a row's own `platform` column wins), `html` (`auto`|`always`|`never`: convert the
text from HTML), `fetch_images` (default true), and the caps `max_file_bytes`, `max_row_bytes`,
`max_gzip_ratio` (see `Limits`). Accepted files: `*.jsonl`, `*.ndjson` (JSON lines), `*.json`
(JSON lines, or one JSON array), `*.csv`, each optionally `.gz`. The accepted columns are
documented in `pipeline.ingest.normalize` (README copies them).

Why an index: a backfill asks for one day at a time, and re-reading a million-row export per
day would be quadratic. The first window of a run reads every file once and writes each row
to its UTC day's partition in the raw lake, `raw/source=NAME/dt=YYYY-MM-DD/archive.jsonl.gz`
(one line `{"ref": "file:line", "ts": UTC time in ISO 8601, "row": {...}}`; a line that is not valid JSON is
kept as it came, and quarantined by its window), then a manifest with the archive's
fingerprint (names, sizes, mtimes or ETags). Windows then read only their day partitions.
A changed archive (new, grown or replaced files) is re-indexed on the next window; `--force`
re-ingests windows already complete and rebuilds the index first (once per run), e.g. after
a partition was lost from the lake. Rows without a usable timestamp cannot be placed in a
day: they are quarantined while indexing (with `window_start` empty). A row's day is the one
`normalize.row_time` gives, the call its window's normaliser makes, so no row falls between two
windows. A file that cannot be read (on) is quarantined with the reason (ref: its name) and the
rest of the export goes in; every read is bounded (`Limits`), and nothing outside the export
folder is read (symlinks out of it, S3 keys with `..`). Indexing reports its progress (a bar on
a terminal, else a log line every 30 s).
"""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import hashlib
import io
import json
import logging
import os
import queue
import re
import sys
import tempfile
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import ConfigError, StorageError
from pipeline.ingest import lake
from pipeline.ingest.connectors.base import Connector, Page
from pipeline.ingest.normalize import (
    FUTURE_SLACK,
    MIN_TIME,
    TIME_KEYS,
    Normalizer,
    Reject,
    check_time,
    excerpt,
    parse_time,
    row_time,
)
from pipeline.objectstore import parse_storage_url
from pipeline.records import Post

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv")
INDEX_VERSION = 2  # 2: rows filed by `normalize.row_time`, bad files quarantined
CSV_FIELD_LIMIT = 64 * 1024 * 1024  # characters in one CSV field (at most `max_row_bytes`)
PROGRESS_EVERY_S = 30.0  # seconds between indexing progress log lines (without a terminal)

# Caps per export file (source options of the same names override them; README, Archive exports).
MAX_FILE_BYTES = 16 << 30  # bytes of one file's content, after gunzip
MAX_ROW_BYTES = 64 << 20  # bytes of one JSON line, CSV line or JSON array item
MAX_GZIP_RATIO = 200  # content bytes per gzip byte; checked once RATIO_AFTER bytes came out
RATIO_AFTER = 64 << 20
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark


class ArchiveFileError(Exception):
    """An export file that cannot be read (on): `str(exc)` is the quarantine reason. Re-running
    cannot help, so the file is quarantined and the rest of the export goes in."""


@dataclass(frozen=True)
class Limits:
    """The caps of one archive source (defaults above; the source options override them)."""

    max_file_bytes: int = MAX_FILE_BYTES
    max_row_bytes: int = MAX_ROW_BYTES
    max_gzip_ratio: int = MAX_GZIP_RATIO

    @classmethod
    def of(cls, source: Any) -> Limits:
        return cls(**{k: int(source.get(k, getattr(cls, k))) for k in ("max_file_bytes", "max_row_bytes", "max_gzip_ratio")})


def safe_name(name: str, limit: int = 400) -> str:
    """A file name or key fit for a quarantine reference: bytes that are not UTF-8 (a local
    name in another encoding) as \\xNN, control characters (a NUL in an S3 key, a newline)
    as escapes; Postgres and SQLite store any text but NUL and lone surrogates."""
    if name.isprintable():
        return name[:limit]
    try:
        raw = name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = name.encode("utf-8", "backslashreplace")
    text = raw.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)[:limit]


def _format_of(name: str) -> str | None:
    """"csv", "lines" (`.jsonl`, `.ndjson`), "json" (`.json`: JSON lines or one array), or None."""
    base = name[:-3] if name.endswith(".gz") else name
    for suffix in SUFFIXES:
        if base.endswith(suffix):
            return {".csv": "csv", ".json": "json"}.get(suffix, "lines")
    return None


def manifest_key(source: str) -> str:
    return f"{lake.source_prefix(source)}_index/manifest.json"


def partition_key(source: str, day: dt.date) -> str:
    return f"{lake.day_prefix(source, day)}archive.jsonl.gz"


class ArchiveFiles:
    """The export files under `path`: listing with a fingerprint, and streaming each file."""

    def __init__(self, path: str, endpoint_url: str | None) -> None:
        self.path = path
        loc = parse_storage_url(path)
        self.s3 = loc.scheme == "s3"
        if self.s3:
            import boto3

            self.bucket, self.prefix = loc.bucket, loc.prefix
            self._client = boto3.client("s3", endpoint_url=endpoint_url)
        else:
            self.root = (Path(loc.path) if loc.scheme == "file" else Path(path)).expanduser()

    def list(self) -> list[tuple[str, str]]:
        """[(name, version)] sorted by name; version changes when a file's content may have.
        Names `refusal` refuses are listed too (they are quarantined, and their changes count)."""
        out: list[tuple[str, str]] = []
        if self.s3:
            try:
                paginator = self._client.get_paginator("list_objects_v2")
                for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                    for obj in page.get("Contents", []):
                        if _format_of(obj["Key"]):
                            out.append((obj["Key"], f"{obj['Size']}:{obj.get('ETag', '')}"))
            except Exception as exc:
                raise StorageError(f"cannot list the archive s3://{self.bucket}/{self.prefix}: {type(exc).__name__}") from None
        else:
            if not self.root.exists():
                raise ConfigError(f"archive path {self.root} does not exist")
            if self.root.is_file():
                files = [self.root]
            else:  # files, and symlinks (even broken ones: `refusal` says why they are skipped)
                files = sorted(p for p in self.root.rglob("*") if p.is_symlink() or p.is_file())
            for p in files:
                if _format_of(p.name):
                    try:
                        st = p.stat()
                    except OSError:  # a broken symlink
                        st = p.lstat()
                    out.append((str(p), f"{st.st_size}:{st.st_mtime_ns}"))
        return sorted(out)

    def refusal(self, name: str) -> str | None:
        """Why the listed file `name` must not be read, or None. Reading stays inside the export:
        a symlink to a file outside the folder, or an S3 key with a `..` segment (a copy to a
        file system would land outside the folder), is refused."""
        if self.s3:
            if ".." in name.split("/"):
                return "key has a '..' segment (refused: it would leave the export folder)"
            return None
        path = Path(name)
        if path == self.root or not path.is_symlink() and all(not q.is_symlink() for q in path.parents if q != self.root and self.root in q.parents):
            return None
        try:
            target = path.resolve(strict=True)
        except (OSError, RuntimeError):  # missing target, or a loop
            return "broken symlink (its target does not exist or loops)"
        if not target.is_relative_to(self.root.resolve()):
            return "symlink to a file outside the export folder (refused)"
        if not target.is_file():
            return "symlink to something that is not a regular file"
        return None

    def changed(self, name: str, version: str) -> bool:
        """The file's version now differs from the listing's (it changed while read)."""
        if self.s3:
            return False  # read from a temporary copy of one object version
        try:
            st = os.stat(name)
        except OSError:
            return True
        return f"{st.st_size}:{st.st_mtime_ns}" != version

    @contextmanager
    def open_raw(self, name: str) -> Iterator[BinaryIO]:
        """The file's bytes as stored (not gunzipped); S3 objects go via a temp file."""
        with ExitStack() as stack:
            if self.s3:
                raw: BinaryIO = stack.enter_context(tempfile.TemporaryFile())  # type: ignore[assignment]
                try:
                    self._client.download_fileobj(self.bucket, name, raw)
                except Exception as exc:
                    raise StorageError(f"cannot read s3://{self.bucket}/{name}: {type(exc).__name__}") from None
                raw.seek(0)
            else:
                raw = stack.enter_context(open(name, "rb"))
            yield raw

    def short(self, name: str) -> str:
        if self.s3:
            return name[len(self.prefix) :].lstrip("/") or name
        return os.path.relpath(name, self.root if self.root.is_dir() else self.root.parent)


try:
    import msgspec

    _DECODE: Any = msgspec.json.Decoder().decode
    # An export row's time columns only, in `TIME_KEYS` order (`row_time` takes them so):
    # msgspec skips every other key without building it.
    _DECODE_TIME: Any = msgspec.json.Decoder(msgspec.defstruct("TimeColumns", [(k, Any, None) for k in TIME_KEYS])).decode
    _ASTUPLE: Any = msgspec.structs.astuple
except ImportError:  # pragma: no cover - msgspec comes with Airflow; json is the fallback
    _DECODE = _DECODE_TIME = _ASTUPLE = None

_FAST_TS = re.compile(
    r'"(?:created_at|posted_at|createdAt|timestamp|created_utc|date|time)"\s*:\s*'
    r'(?:"([^"\\]{1,64})"|(-?\d{1,16}(?:\.\d{1,9})?)(?=\s*[,}]))'
)


_FAST_TS_B = re.compile(_FAST_TS.pattern.encode())
_fromiso = dt.datetime.fromisoformat
_RAW_BLOCK = 2 << 20  # bytes read from an export file at once
_MAX_BLOCK = 16 << 20  # most bytes one inflate step yields
_PIECE = 1 << 20  # bytes of lines split and parsed at once


@contextmanager
def quick_gil_handoffs(interval_s: float = 0.001) -> Iterator[None]:
    """A shorter GIL switch interval (default 5 ms) for a block. Why: while indexing, the main
    thread parses rows without pause and the reader and compression threads need the GIL for a
    moment after each zlib call; at 5 ms a waiting helper falls behind (the compression thread
    ended a million-row index with ~0.6 s of work left), at 1 ms it keeps up."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(min(old, interval_s))
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def _head(raw: BinaryIO, gz: bool, size: int = 64) -> bytes:
    """The first bytes of a file's content (gunzipped if `gz`); the file is rewound."""
    data = raw.read(64 * 1024 if gz else size)
    raw.seek(0)
    if gz:
        try:
            data = zlib.decompressobj(31).decompress(data, size)
        except zlib.error:
            return b""  # reading it properly will say what is wrong
    return data[:size]


def file_blocks(raw: BinaryIO, gz: bool, done: list[int], size: int = _RAW_BLOCK, limits: Limits | None = None) -> Iterator[bytes]:
    """The content of `raw` in blocks, gunzipped if `gz` (every gzip member, as `gzip` reads
    them); `done[0]` counts the raw bytes read so far (progress, without a syscall).

    Bounded: more than `limits.max_file_bytes` of content, or a gzip file that expands more
    than `max_gzip_ratio` times (a gzip bomb), raises `ArchiveFileError`; so do an empty or
    truncated gzip file and one that is not gzip at all (EOFError/BadGzipFile/zlib.error from
    the reading itself are turned into it too), so the caller quarantines the file.

    Why not GzipFile: it inflates 128 KiB at a time in Python code, and on a helper thread (see
    `read_ahead`) each step waits for the GIL; one zlib call per 2 MiB read releases the GIL for
    the whole inflate and needs it back only once."""
    lim = limits or Limits()
    cap, ratio = lim.max_file_bytes, lim.max_gzip_ratio
    out_total = 0

    def check(n: int) -> None:
        if out_total > cap:
            raise ArchiveFileError(f"content over max_file_bytes ({cap:,} bytes{' after gunzip' if gz else ''})")
        if gz and out_total > RATIO_AFTER and out_total > ratio * done[0]:
            raise ArchiveFileError(f"gzip expands more than {ratio}x (max_gzip_ratio; a gzip bomb?): "
                                   f"{out_total:,} bytes from the first {done[0]:,}")

    z = zlib.decompressobj(31) if gz else None
    member = False  # inside a gzip member
    try:
        while True:
            data = raw.read(size)
            done[0] += len(data)
            if not data:
                break
            if z is None:
                out_total += len(data)
                check(out_total)
                yield data
                continue
            while data:
                if not member:
                    data = data.lstrip(b"\x00")  # gzip allows zero padding between and after members
                    if not data:
                        break
                    if not data.startswith(b"\x1f\x8b") and len(data) >= 2:
                        raise ArchiveFileError(f"not a gzip file (starts with {data[:8]!r})")
                    member = True
                out = z.decompress(data, _MAX_BLOCK)
                while True:
                    if out:
                        out_total += len(out)
                        check(out_total)
                        yield out
                    if not z.unconsumed_tail or z.eof:  # else a block that inflates to more than _MAX_BLOCK
                        break
                    out = z.decompress(z.unconsumed_tail, _MAX_BLOCK)
                if z.eof:
                    data, member = z.unused_data, False
                    z = zlib.decompressobj(31)
                else:
                    data = b""
    except zlib.error as exc:
        raise ArchiveFileError(f"corrupt gzip data ({exc})") from None
    if gz and done[0] == 0:
        raise ArchiveFileError("not a gzip file (empty)")
    if member:
        raise ArchiveFileError("truncated gzip file (it ends before its end-of-stream marker)")


class BlockReader(io.RawIOBase):
    """A readable binary stream over an iterator of blocks (for TextIOWrapper: CSV and JSON
    arrays read their content through `file_blocks` and its caps, as JSON lines do)."""

    def __init__(self, blocks: Iterable[bytes]) -> None:
        super().__init__()
        self._blocks = iter(blocks)
        self._buf = memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        while not self._buf:
            block = next(self._blocks, None)
            if block is None:
                return 0
            self._buf = memoryview(block)
        n = min(len(b), len(self._buf))
        b[:n] = self._buf[:n]
        self._buf = self._buf[n:]
        return n


def read_ahead(blocks: Iterator[bytes], depth: int = 4) -> Iterator[bytes]:
    """The items of `blocks`, produced by a helper thread up to `depth` ahead. Why: zlib and
    file reads release the GIL, so reading and gunzipping the export overlaps with parsing its
    rows on the other core. An error of the producer is raised here; leaving the loop early
    stops the thread."""
    box: queue.Queue[bytes | BaseException | None] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: bytes | BaseException | None) -> bool:
        while not stop.is_set():
            try:
                box.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for block in blocks:
                if not put(block):
                    return
            put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(exc)

    thread = threading.Thread(target=produce, name="archive-read", daemon=True)
    thread.start()
    try:
        while True:
            item = box.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _pieces(blocks: Iterable[bytes], size: int = _PIECE) -> Iterator[bytes]:
    """Big blocks cut into pieces of `size` bytes: the lines of a piece are parsed while it is
    still in the CPU cache, while the reader thread works (and waits for the GIL) per big block."""
    for block in blocks:
        if len(block) <= size:
            yield block
        else:
            for i in range(0, len(block), size):
                yield block[i : i + size]


def iter_json_lines(blocks: Iterable[bytes], on_block: Callable[[int], None] | None = None,
                    max_row: int = MAX_ROW_BYTES) -> Iterator[tuple[int, bytes | None]]:
    """(line number, line without surrounding ASCII whitespace) of a JSON-lines stream given as
    blocks of bytes, blank lines skipped. Why: a readline per row on a gzip stream, and
    decoding every row to str only to encode it again for the lake, cost more than the rest
    of indexing. Lines number as `enumerate(fh, 1)` numbers them (split on b"\\n").
    A line longer than `max_row` bytes comes as (line number, None), and is never held whole
    in memory (a gzip bomb of one endless line). `on_block(lines so far)` is called before
    each block (progress reports)."""
    parts: list[bytes] = []  # the pieces of the unfinished line
    held = 0  # their bytes
    skipping = False  # the unfinished line is over max_row: dropped up to its end
    lineno = 0
    for block in _pieces(blocks):
        if on_block is not None:
            on_block(lineno)
        lines = block.split(b"\n")
        tail = lines.pop()
        if lines:
            if skipping:
                lineno += 1
                yield lineno, None
                del lines[0]
                skipping = False
            elif parts:
                lines[0] = b"".join(parts) + lines[0]
            parts, held = [], 0
            for raw in lines:
                lineno += 1
                if len(raw) > max_row:
                    yield lineno, None
                    continue
                line = raw.strip()
                if line:
                    yield lineno, line
        if tail and not skipping:
            held += len(tail)
            if held > max_row:
                parts, held, skipping = [], 0, True
            else:
                parts.append(tail)
    if skipping:
        yield lineno + 1, None
    elif parts:
        line = b"".join(parts).strip()
        if line:
            yield lineno + 1, line


def _ts_bytes(values: Any, when: dt.datetime) -> bytes:
    """The partition's `ts` for a row: its own ISO text if that is plain UTC ("Z") and reads
    back as `when` (isoformat() per row cost more than the rest of placing it), else isoformat."""
    for v in values:
        if v is not None and v != "":
            if type(v) is str and v[-1:] == "Z" and v.isascii() and v.isprintable() and '"' not in v and "\\" not in v:
                try:
                    if _fromiso(v) == when:
                        return v.encode()
                except ValueError:
                    pass
            break
    return when.isoformat().encode()


def _loads_or_text(line: bytes) -> Any:
    """A line for an excerpt: parsed if it parses (so account keys are dropped), else its text."""
    text = line[:4096].decode("utf-8", "replace")
    try:
        return json.loads(line)
    except (ValueError, RecursionError):
        return text


def _file_reject(short: str, reason: str) -> dict[str, Any]:
    """A quarantine row for a whole export file (ref: its name)."""
    return {"record_ref": short, "reason": reason, "excerpt": ""}


def fast_time(line: str) -> str | None:
    """The value of the line's only timestamp-like key, or None (then the line gets parsed)."""
    matches = _FAST_TS.finditer(line)
    m = next(matches, None)
    if m is None or next(matches, None) is not None:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


def iter_rows(fh: BinaryIO, fmt: str, name: str, max_row: int = MAX_ROW_BYTES) -> Iterator[tuple[str, Any, str | None]]:
    """(ref, row or None, error) for every row of a CSV file or of a JSON file holding one
    array (JSON lines go through `iter_json_lines`). Bounded by `max_row` per row; a file that
    cannot be read on (an array that breaks off or never closes) raises `ArchiveFileError`
    after the rows before the fault."""
    # utf-8-sig: a byte order mark at the start (Excel's "CSV UTF-8") is not part of the first column's name
    text = io.TextIOWrapper(fh, encoding="utf-8-sig", errors="replace", newline="")  # type: ignore[arg-type]
    if fmt == "csv":
        yield from _csv_rows(text, name, max_row)
    else:
        yield from _array_items(text, name, max_row)


class _LineTooLong(Exception):
    pass


class _CappedLines:
    """The physical lines of a text stream, each read with a bounded `readline`; a line over
    `max_row` characters is skipped to its end and raises `_LineTooLong` (a class, not a
    generator: the csv reader asks again after the exception and reading goes on).
    `odd`: whether the lines read since it was last cleared hold an odd number of quote
    characters, i.e. end inside a quoted field (counted in skipped parts too)."""

    def __init__(self, text: io.TextIOBase, max_row: int) -> None:
        self.text, self.max_row, self.n, self.odd = text, max_row, 0, False

    def __iter__(self) -> _CappedLines:
        return self

    def __next__(self) -> str:
        line = self.text.readline(self.max_row + 1)
        if not line:
            raise StopIteration
        self.n += 1
        self.odd ^= bool(line.count('"') & 1)
        if len(line) > self.max_row:
            while line and not line.endswith(("\n", "\r")):
                line = self.text.readline(1 << 20)
                self.odd ^= bool(line.count('"') & 1)
            raise _LineTooLong
        return line

    def skip_quoted(self) -> None:
        """After a record that broke off inside a quoted field: read on (bounded per line) to
        the line that closes it, so the field's later lines are not read as rows of their own."""
        while self.odd:
            try:
                next(self)
            except _LineTooLong:
                continue
            except StopIteration:
                return


def _csv_rows(text: io.TextIOBase, name: str, max_row: int) -> Iterator[tuple[str, Any, str | None]]:
    """Rows of a CSV file as `iter_rows` yields them. A row the csv module cannot read (e.g. a
    field over `CSV_FIELD_LIMIT`, often a stray quote that swallowed the lines after it, or a
    line over `max_row`) is one error row, and reading goes on with the next line: one bad
    row must not cost the rest of the file. Refs number physical lines."""
    lines = _CappedLines(text, max_row)
    reader = csv.DictReader(lines)
    old_limit = csv.field_size_limit(min(CSV_FIELD_LIMIT, max_row))  # process-wide: put back after the file
    try:
        while True:
            lines.odd = False  # a record starts outside quotes
            try:
                row = next(reader)
            except StopIteration:
                return
            except (_LineTooLong, csv.Error) as exc:
                # The csv reader starts afresh at the next line: if the bad record broke off
                # inside a quoted field (a field over the limit, usually), skip to its closing
                # quote first, or every later line of the field would be read as a junk row
                # (and the row after it swallowed by the quote that closes the field).
                first = lines.n
                lines.skip_quoted()
                where = f"{first}" if lines.n == first else f"{first}-{lines.n}"
                reason = (f"CSV line longer than max_row_bytes ({max_row:,} characters)" if isinstance(exc, _LineTooLong)
                          else f"CSV error: {exc}")
                yield f"{name}:{where}", None, reason + (f" (skipped to the end of its quoted field, line {lines.n})" if lines.n != first else "")
                continue
            clean = {k: v for k, v in row.items() if k is not None and v is not None}
            yield f"{name}:{lines.n}", clean, None
    finally:
        csv.field_size_limit(old_limit)


def _array_items(text: io.TextIOBase, name: str, max_row: int) -> Iterator[tuple[str, Any, str | None]]:
    """The items of a JSON file holding one array, parsed one by one as the text streams in
    (bounded memory whatever the file's size; an item over `max_row` characters, a syntax
    error or an array that never closes stops the file with `ArchiveFileError`)."""
    decode = json.JSONDecoder().raw_decode
    buf, pos, eof = "", 0, False

    def more(at_least: int = 1 << 20) -> bool:
        nonlocal buf, pos, eof
        if eof:
            return False
        chunk = text.read(max(1 << 20, at_least))
        if not chunk:
            eof = True
            return False
        buf = buf[pos:] + chunk
        pos = 0
        return True

    def skip_ws() -> str:
        nonlocal pos
        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n":
                pos += 1
            if pos < len(buf):
                return buf[pos]
            if not more():
                return ""

    def closed() -> None:
        nonlocal pos
        pos += 1
        if skip_ws():
            raise ArchiveFileError(f"text after the JSON array (after item #{i})")

    i = 0
    if skip_ws() == "\ufeff":  # a byte order mark
        pos += 1
    if skip_ws() != "[":
        raise ArchiveFileError("not a JSON array")
    pos += 1
    if skip_ws() == "]":
        closed()
        return
    while True:
        if not skip_ws():
            raise ArchiveFileError(f"the JSON array never closes (the file ends after item #{i})")
        while True:
            try:
                item, end = decode(buf, pos)
            except RecursionError:
                raise ArchiveFileError(f"invalid JSON array: item #{i + 1} is nested too deeply") from None
            except ValueError as exc:
                if len(buf) - pos > max_row:
                    raise ArchiveFileError(f"JSON array item #{i + 1} longer than max_row_bytes ({max_row:,} characters)") from None
                if more(len(buf) - pos):  # maybe only cut off by the end of the buffer: read on
                    continue
                raise ArchiveFileError(f"invalid or unfinished JSON array at item #{i + 1} (cut short?): {exc}") from None
            if end == len(buf) and more(len(buf) - pos):  # a number at the end of the buffer may go on
                continue
            break
        if end - pos > max_row:
            raise ArchiveFileError(f"JSON array item #{i + 1} longer than max_row_bytes ({max_row:,} characters)")
        pos = end
        i += 1
        yield f"{name}:#{i}", item, None
        c = skip_ws()
        if c == ",":
            pos += 1
        elif c == "]":
            closed()
            return
        elif not c:
            raise ArchiveFileError(f"the JSON array never closes (the file ends after item #{i})")
        else:
            raise ArchiveFileError(f"invalid JSON array after item #{i}: expected ',' or ']', found {c!r}")


def decode_partition(data: bytes) -> list[dict[str, Any]]:
    """Lines `{"ref", "ts", "row"}` of a day partition; a row that is not valid JSON (kept raw in
    the lake) comes back as `{"ref", "ts", "error"}` so its window can quarantine it.

    Fast path: the whole partition decoded as one JSON array by msgspec (an Airflow dependency,
    about twice as fast as `json`); any doubt (a broken line, odd escapes) takes the line-by-line
    path with the standard library, whose results the fast path reproduces."""
    if _DECODE is not None:
        # Lines joined by commas in one replace (a blank line makes ",," and takes the careful path).
        body = gzip.decompress(data).rstrip(b"\n").replace(b"\n", b",")
        try:
            rows = _DECODE(b"[" + body + b"]")
        except Exception:  # noqa: BLE001 - any decode problem: the careful path below decides
            pass
        else:
            if all(type(r) is dict for r in rows):
                return rows
    out: list[dict[str, Any]] = []
    loads = json.loads
    # split on "\n" only: a row may hold U+2028 or \x1c unescaped (valid JSON), which splitlines() splits on
    for line in gzip.decompress(data).decode("utf-8", "replace").split("\n"):
        if not line:
            continue
        try:
            out.append(loads(line))
        except (ValueError, RecursionError):  # RecursionError: a row nested too deeply
            out.append({**_wrapper_head(line), "error": "invalid JSON line"})
    return out


def _wrapper_head(line: str) -> dict[str, Any]:
    """`ref` and `ts` from the start of a partition line whose row part is broken."""
    decoder = json.JSONDecoder()
    head: dict[str, Any] = {"ref": None, "ts": None}
    try:
        head["ref"], pos = decoder.raw_decode(line, len('{"ref":'))
        if line.startswith(',"ts":', pos):
            head["ts"], _ = decoder.raw_decode(line, pos + len(',"ts":'))
    except (ValueError, IndexError):
        pass
    return head


class IndexProgress:
    """Progress of indexing an export (rows, bytes of the files read): a tqdm bar on a terminal
    when progress is wanted, else a log line every `every_s` seconds. Why: indexing reads every
    row of a possibly huge export before the first window runs; it must not look hung."""

    def __init__(self, source: str, files: int, total_bytes: int, progress: bool, every_s: float | None = None) -> None:
        from tqdm import tqdm

        self.source, self.total = source, total_bytes
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self._done = 0  # bytes of the files finished
        self._next_log = time.monotonic() + self.every_s
        self.bar = tqdm(total=total_bytes, desc=f"index {source}", unit="B", unit_scale=True,
                        disable=not progress or not sys.stderr.isatty(), leave=False)
        log.info("indexing archive %s: %d file%s, %.1f MB", source, files, "" if files == 1 else "s", total_bytes / 1e6)

    def update(self, rows: int, file_bytes: int) -> None:
        """`rows` indexed in all, `file_bytes` read of the current file."""
        done = self._done + file_bytes
        if not self.bar.disable:
            self.bar.update(max(0, done - self.bar.n))
            self.bar.set_postfix(rows=f"{rows:,}", refresh=False)
        now = time.monotonic()
        if now >= self._next_log:
            self._next_log = now + self.every_s
            log.info("indexing archive %s: %s rows, %.0f%% of %.1f MB read", self.source, f"{rows:,}",
                     100.0 * done / max(1, self.total), self.total / 1e6)

    def file_done(self, size: int) -> None:
        self._done += size

    def close(self) -> None:
        self.bar.close()


def _size_of(version: str) -> int:
    """The byte size from a listing version (`size:mtime` or `size:etag`)."""
    head = version.split(":", 1)[0]
    return int(head) if head.isdigit() else 0


class ArchiveConnector(Connector):
    kind = "archive"
    platform = "archive"
    writes_raw = False  # its day partitions are the raw lake
    ties = "content"  # copies with one posted time in different exports: the greater content hash wins

    def __init__(self, source, network, *, endpoint_url: str | None = None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(source, network, **kwargs)
        path = source.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"source {source.name!r}: `path` must name the export file, folder or s3:// prefix")
        self.files = ArchiveFiles(path, endpoint_url)
        self.platform = str(source.get("platform", "archive"))
        self.html = str(source.get("html", "auto"))
        self.limits = Limits.of(source)
        self._manifest: dict[str, Any] | None = None
        self._store: Any = None

    # --- index ---------------------------------------------------------------------------------

    def fingerprint(self, listing: list[tuple[str, str]]) -> str:
        """Of `self.files.list()`: listed once per `prepare`, for the check and for indexing."""
        if not listing:
            raise ConfigError(f"source {self.source.name!r}: no .jsonl/.csv(.gz) files under {self.files.path}")
        doc = json.dumps([INDEX_VERSION, [(self.files.short(n), v) for n, v in listing]])
        return hashlib.sha256(doc.encode()).hexdigest()

    def prepare(self, ctx: Any, counts: dict[str, Any], *, force: bool = False, progress: bool = False) -> None:
        """Build (or reuse) the day index; rows that cannot be placed are quarantined.

        `force` (`--force`) rebuilds it even if the export looks unchanged (a partition lost
        from the lake, a changed parser), once per connector: the other windows of the same
        forced backfill reuse the fresh index (see `Connector.refreshed`)."""
        from pipeline.runlog import window_lock

        self._store = ctx.store
        rebuild = force and not self.refreshed
        listing = self.files.list()
        fp = self.fingerprint(listing)
        current = self._read_manifest()
        if not rebuild and current and current.get("fingerprint") == fp:
            self._manifest = current
            return
        with window_lock(ctx.engine, f"ingest-index:{self.source.name}", wait_s=3600):
            current = self._read_manifest()
            if not rebuild and current and current.get("fingerprint") == fp:
                self._manifest = current
                return
            self._manifest = self._build_index(ctx, fp, listing, current, counts, progress)
            self.refreshed = True

    def _read_manifest(self) -> dict[str, Any] | None:
        try:
            doc = json.loads(self._store.get(manifest_key(self.source.name)))
        except KeyError:
            return None
        except ValueError:
            return None
        return doc if isinstance(doc, dict) and doc.get("version") == INDEX_VERSION else None

    def _index_files(self, listing: list[tuple[str, str]], days: dict[dt.date, lake.GzipLines], rejects: list[dict[str, Any]],
                     now: dt.datetime, compressor: Executor, progress: bool = False) -> int:
        """Read every export row once into its UTC day's writer; unplaceable rows go to `rejects`,
        and so does a file that cannot be read (on), with the reason (ref: the file's name):
        the rows before the fault stay indexed, the other files go in."""
        rows_total = 0
        meter = IndexProgress(self.source.name, len(listing), sum(_size_of(v) for _, v in listing), progress)
        lim = self.limits
        try:
            for name, version in listing:
                short = safe_name(self.files.short(name))
                count = [0]
                try:
                    problem = self.files.refusal(name)
                    if problem is None and _size_of(version) > lim.max_file_bytes:
                        problem = f"{_size_of(version):,} bytes, over max_file_bytes ({lim.max_file_bytes:,})"
                    if problem is not None:
                        raise ArchiveFileError(problem)
                    self._index_file(name, short, days, rejects, now, compressor, meter, rows_total, count)
                    if self.files.changed(name, version):
                        rejects.append(_file_reject(short, "the file changed while it was read: its rows are indexed as read, "
                                                           "and the next run re-indexes it"))
                except (ArchiveFileError, OSError) as exc:
                    reason = str(exc) if isinstance(exc, ArchiveFileError) else f"cannot read the file ({type(exc).__name__}: {exc.strerror})"
                    kept = f"; its first {count[0]:,} rows were indexed" if count[0] else ""
                    rejects.append(_file_reject(short, f"file not read to its end: {reason}{kept}"))
                    log.warning("archive %s: file %s not read to its end: %s", self.source.name, short, reason)
                rows_total += count[0]
                meter.file_done(_size_of(version))
                meter.update(rows_total, 0)
        finally:
            meter.close()
        return rows_total

    def _index_file(self, name: str, short: str, days: dict[dt.date, lake.GzipLines], rejects: list[dict[str, Any]],
                    now: dt.datetime, compressor: Executor, meter: IndexProgress, base: int, count: list[int]) -> None:
        """One export file into the day writers; `count[0]` counts its rows as they go."""
        fmt = _format_of(name) or "json"
        ref_head = json.dumps(short, ensure_ascii=False)[:-1]  # '"name' (closing quote added per row)
        gz = name.endswith(".gz")
        lim = self.limits
        with self.files.open_raw(name) as raw:
            # `.json`: one array if it starts with "[" (read before the reader thread starts)
            lines = fmt == "lines" or fmt == "json" and not _head(raw, gz).lstrip().removeprefix(_BOM).lstrip().startswith(b"[")
            done = [0]
            blocks = read_ahead(file_blocks(raw, gz, done, limits=lim))
            try:
                if lines:

                    def on_block(rows: int) -> None:
                        meter.update(base + rows, done[0])

                    self._index_json_lines(blocks, short, days, rejects, now, compressor, on_block, count)
                else:
                    fh = io.BufferedReader(BlockReader(blocks), 1 << 20)
                    for ref, row, error in iter_rows(fh, fmt, short, lim.max_row_bytes):  # type: ignore[arg-type]
                        count[0] += 1
                        if not count[0] & 0x3FFF:
                            meter.update(base + count[0], done[0])
                        if error is not None:
                            rejects.append({"record_ref": ref, "reason": error, "excerpt": ""})
                        else:
                            self._place_row(ref, row, None, short, ref_head, days, rejects, now, compressor)
            finally:
                blocks.close()  # stops the reader thread if indexing failed

    def _index_json_lines(self, blocks: Iterable[bytes], short: str, days: dict[dt.date, lake.GzipLines], rejects: list[dict[str, Any]],
                          now: dt.datetime, compressor: Executor, on_block: Callable[[int], None] | None = None,
                          count: list[int] | None = None) -> int:
        """JSON lines, kept as bytes: each row's time columns are decoded by msgspec (every
        other key skipped, a fraction of a full parse) and given to `normalize.row_time`, the
        function the window's normaliser calls on the parsed row, so the day a row is filed
        under is the day its window judges it by. The row goes to its day as it came (no str
        round trip); a line msgspec cannot read as an object takes `_place_line`, the careful
        path (the standard library's parser, as `decode_partition` falls back to)."""
        ref_head = json.dumps(short, ensure_ascii=False)[:-1]
        ref_head_b = b'{"ref":' + ref_head.encode("utf-8", "surrogatepass")
        latest = now + FUTURE_SLACK
        decode, astuple = _DECODE_TIME, _ASTUPLE
        max_row = self.limits.max_row_bytes
        count = count if count is not None else [0]
        for lineno, line in iter_json_lines(blocks, on_block, max_row):
            count[0] += 1
            if line is None:
                rejects.append({"record_ref": f"{short}:{lineno}", "reason": f"line longer than max_row_bytes ({max_row:,} bytes)",
                                "excerpt": ""})
                continue
            try:
                values = astuple(decode(line))  # type: ignore[misc]
            except Exception:  # noqa: BLE001 - not an object msgspec reads (or no msgspec): the careful path decides
                self._place_line(f"{short}:{lineno}", line.decode("utf-8", "replace").strip(), short, ref_head, days, rejects,
                                 now, compressor)
                continue
            try:
                when = row_time(values)
                if not MIN_TIME <= when <= latest:
                    check_time(when, now)
            except Reject as exc:
                rejects.append({"record_ref": f"{short}:{lineno}", "reason": str(exc),
                                "excerpt": excerpt(_loads_or_text(line))})
                continue
            day = when.date()
            writer = days.get(day)
            if writer is None:
                writer = days[day] = lake.GzipLines(executor=compressor)
            writer.add_bytes(b'%s:%d","ts":"%s","row":%s}\n' % (ref_head_b, lineno, _ts_bytes(values, when), line))
        return count[0]

    def _place_line(self, ref: str, line: str, short: str, ref_head: str, days: dict[dt.date, lake.GzipLines],
                    rejects: list[dict[str, Any]], now: dt.datetime, compressor: Executor) -> None:
        """A JSON line the fast decoder did not take: parsed by the standard library, as the
        window's `decode_partition` will. A line that is not valid JSON but shows one plain
        timestamp goes to that day as it came, so its own window quarantines it (near the rows
        around it); without one it is quarantined now."""
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            raw_ts = fast_time(line)
            when = None
            if raw_ts is not None:
                try:
                    when = check_time(parse_time(raw_ts), now)
                except Reject:
                    when = None
            if when is None:
                rejects.append({"record_ref": ref, "reason": "invalid JSON line", "excerpt": excerpt(line)})
                return
            self._write(ref, when, line, short, ref_head, days, compressor)
            return
        self._place_row(ref, row, line, short, ref_head, days, rejects, now, compressor)

    def _place_row(self, ref: str, row: Any, line: str | None, short: str, ref_head: str, days: dict[dt.date, lake.GzipLines],
                   rejects: list[dict[str, Any]], now: dt.datetime, compressor: Executor) -> None:
        """One parsed row into its UTC day's writer (by `row_time`, as its normaliser will read
        it), or into `rejects` if it cannot be placed. `line`: the row's JSON text, if it has one."""
        if not isinstance(row, dict):
            rejects.append({"record_ref": ref, "reason": f"row is a {type(row).__name__}, expected an object",
                            "excerpt": excerpt(row if isinstance(row, list) else line or "")})
            return
        try:
            when = check_time(row_time(map(row.get, TIME_KEYS)), now)
        except Reject as exc:
            rejects.append({"record_ref": ref, "reason": str(exc), "excerpt": excerpt(row)})
            return
        if line is None:
            line = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
        self._write(ref, when, line, short, ref_head, days, compressor)

    @staticmethod
    def _write(ref: str, when: dt.datetime, line: str, short: str, ref_head: str, days: dict[dt.date, lake.GzipLines],
               compressor: Executor) -> None:
        day = when.date()
        writer = days.get(day)
        if writer is None:
            writer = days[day] = lake.GzipLines(executor=compressor)
        if ref.startswith(short):  # "name:line": only the name may need JSON escaping
            ref_json = ref_head + ref[len(short):] + '"'
        else:
            ref_json = json.dumps(ref, ensure_ascii=False)
        writer.add(f'{{"ref":{ref_json},"ts":"{when.isoformat()}","row":{line}}}\n')

    def _build_index(self, ctx: Any, fp: str, listing: list[tuple[str, str]], previous: dict[str, Any] | None,
                     counts: dict[str, Any], progress: bool = False) -> dict[str, Any]:
        from pipeline.ingest.loader import record_rejects

        now = dt.datetime.now(dt.UTC)
        days: dict[dt.date, lake.GzipLines] = {}
        rejects: list[dict[str, Any]] = []
        compressor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-gzip")
        try:
            with quick_gil_handoffs():
                rows_total = self._index_files(listing, days, rejects, now, compressor, progress)
            store = self._store
            manifest_days: dict[str, dict[str, Any]] = {}
            for day in sorted(days):
                key = partition_key(self.source.name, day)
                writer = days.pop(day)
                store.put(key, writer.finish(), content_type="application/gzip")
                manifest_days[day.isoformat()] = {"key": key, "rows": writer.count}
        finally:
            compressor.shutdown(wait=True, cancel_futures=True)
        for old_day, info in (previous or {}).get("days", {}).items():
            if old_day not in manifest_days:
                store.delete(info["key"])
        with ctx.engine.begin() as conn:
            record_rejects(conn, self.source.name, None, rejects)  # only changes are written
        manifest = {
            "version": INDEX_VERSION, "fingerprint": fp, "rows": rows_total, "rejected": len(rejects),
            "days": manifest_days, "built_at": now.isoformat(),
        }
        store.put(manifest_key(self.source.name), json.dumps(manifest, indent=1).encode(), content_type="application/json")
        counts["indexed_rows"] = counts.get("indexed_rows", 0) + rows_total
        counts["rejected"] = counts.get("rejected", 0) + len(rejects)
        log.info("indexed archive %s: %d rows into %d days, %d rejected", self.source.name, rows_total, len(manifest_days), len(rejects))
        return manifest

    # --- windows -------------------------------------------------------------------------------

    def pages(self, start: dt.datetime, end: dt.datetime, resume: dict[str, Any] | None = None) -> Iterator[Page]:
        if self._manifest is None:
            raise RuntimeError("ArchiveConnector.prepare() must run before pages()")
        day = start.astimezone(dt.UTC).date()
        last = (end - dt.timedelta(microseconds=1)).astimezone(dt.UTC).date()
        while day <= last:
            info = self._manifest["days"].get(day.isoformat())
            if info:
                day_start = dt.datetime.combine(day, dt.time(), dt.UTC)
                whole = start <= day_start and end >= day_start + dt.timedelta(days=1)
                try:
                    data = self._store.get(info["key"])
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
        return Normalizer(salt, now=now, default_platform=self.platform, html=self.html)

    def normalize(self, normalizer: Normalizer, record: Any) -> Post:
        if "error" in record:
            raise Reject(record["error"])
        return normalizer.archive(record["row"])

    def record_ref(self, record: Any) -> str | None:
        return str(record.get("ref"))[:200] if isinstance(record, dict) else None
