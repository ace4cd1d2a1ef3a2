"""Archive exports (JSONL or CSV, optionally gzip) from a local folder or `s3://`, for backfills.

Options: `path` (a file, a folder, or `s3://bucket/prefix`; required), `platform` (default
`archive`; a row's own `platform` column wins), `html` (`auto`|`always`|`never`: convert the
text from HTML), `fetch_images` (default true). Accepted files: `*.jsonl`, `*.ndjson`,
`*.json` (JSON lines, or one JSON array), `*.csv`, each optionally `.gz`. The accepted
columns are documented in `pipeline.ingest.normalize` (README copies them).

Why an index: a backfill asks for one day at a time, and re-reading a million-row export per
day would be quadratic. The first window of a run reads every file once and writes each row
to its UTC day's partition in the raw lake, `raw/source=NAME/dt=YYYY-MM-DD/archive.jsonl.gz`
(one line `{"ref": "file:line", "ts": UTC time in ISO 8601, "row": {...}}`; a line that is not valid JSON is
kept as it came, and quarantined by its window), then a manifest with the archive's
fingerprint (names, sizes, mtimes or ETags). Windows then read only their day partitions.
A changed archive (new, grown or replaced files) is re-indexed on the next window; `--force`
re-ingests windows already complete and rebuilds the index first (once per run), e.g. after
a partition was lost from the lake. Rows without a usable timestamp cannot be placed in a
day: they are quarantined while indexing (with `window_start` empty). Indexing reports its
progress (a bar on a terminal, else a log line every 30 s).
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
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import unquote, urlsplit

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
    first,
    parse_time,
)
from pipeline.records import Post

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv")
INDEX_VERSION = 1
CSV_FIELD_LIMIT = 64 * 1024 * 1024  # characters in one CSV field
PROGRESS_EVERY_S = 30.0  # seconds between indexing progress log lines (without a terminal)


def _format_of(name: str) -> str | None:
    base = name[:-3] if name.endswith(".gz") else name
    for suffix in SUFFIXES:
        if base.endswith(suffix):
            return "csv" if suffix == ".csv" else "json"
    return None


def manifest_key(source: str) -> str:
    return f"{lake.source_prefix(source)}_index/manifest.json"


def partition_key(source: str, day: dt.date) -> str:
    return f"{lake.day_prefix(source, day)}archive.jsonl.gz"


class ArchiveFiles:
    """The export files under `path`: listing with a fingerprint, and streaming each file."""

    def __init__(self, path: str, endpoint_url: str | None) -> None:
        self.path = path
        parts = urlsplit(path)
        self.s3 = parts.scheme == "s3"
        if self.s3:
            import boto3

            self.bucket, self.prefix = parts.netloc, unquote(parts.path).lstrip("/")
            self._client = boto3.client("s3", endpoint_url=endpoint_url)
        else:
            local = unquote(parts.path) if parts.scheme == "file" else path
            self.root = Path(local).expanduser()

    def list(self) -> list[tuple[str, str]]:
        """[(name, version)] sorted by name; version changes when a file's content may have."""
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
            files = [self.root] if self.root.is_file() else sorted(p for p in self.root.rglob("*") if p.is_file())
            for p in files:
                if _format_of(p.name):
                    st = p.stat()
                    out.append((str(p), f"{st.st_size}:{st.st_mtime_ns}"))
        return sorted(out)

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
except ImportError:  # pragma: no cover - msgspec comes with Airflow; json is the fallback
    _DECODE = None

_UNPARSED = object()  # a JSON line not parsed yet (see ArchiveConnector._build_index)
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


def file_blocks(raw: BinaryIO, gz: bool, done: list[int], size: int = _RAW_BLOCK) -> Iterator[bytes]:
    """The content of `raw` in blocks, gunzipped if `gz` (every gzip member, as `gzip` reads
    them); `done[0]` counts the raw bytes read so far (progress, without a syscall).

    Why not GzipFile: it inflates 128 KiB at a time in Python code, and on a helper thread (see
    `read_ahead`) each step waits for the GIL; one zlib call per 2 MiB read releases the GIL for
    the whole inflate and needs it back only once."""
    z = zlib.decompressobj(31) if gz else None
    member = False  # inside a gzip member
    while True:
        data = raw.read(size)
        done[0] += len(data)
        if not data:
            break
        if z is None:
            yield data
            continue
        while data:
            if not member:
                data = data.lstrip(b"\x00")  # gzip allows zero padding between and after members
                if not data:
                    break
                if not data.startswith(b"\x1f\x8b") and len(data) >= 2:
                    raise gzip.BadGzipFile(f"not a gzipped file ({data[:2]!r})")
                member = True
            out = z.decompress(data, _MAX_BLOCK)
            if out:
                yield out
            while z.unconsumed_tail and not z.eof:  # a block that inflates to more than _MAX_BLOCK
                out = z.decompress(z.unconsumed_tail, _MAX_BLOCK)
                if out:
                    yield out
            if z.eof:
                data, member = z.unused_data, False
                z = zlib.decompressobj(31)
            else:
                data = b""
    if member:
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")


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


def iter_json_lines(blocks: Iterable[bytes], on_block: Callable[[int], None] | None = None) -> Iterator[tuple[int, bytes]]:
    """(line number, line without surrounding ASCII whitespace) of a JSON-lines stream given as
    blocks of bytes, blank lines skipped. Why: a readline per row on a gzip stream, and
    decoding every row to str only to encode it again for the lake, cost more than the rest
    of indexing. Lines number as `enumerate(fh, 1)` numbers them (split on b"\\n").
    `on_block(lines so far)` is called before each block (progress reports)."""
    rest = b""
    lineno = 0
    for block in _pieces(blocks):
        if on_block is not None:
            on_block(lineno)
        lines = (rest + block).split(b"\n") if rest else block.split(b"\n")
        rest = lines.pop()
        for raw in lines:
            lineno += 1
            line = raw.strip()
            if line:
                yield lineno, line
    if rest:
        line = rest.strip()
        if line:
            yield lineno + 1, line


def fast_time(line: str) -> str | None:
    """The value of the line's only timestamp-like key, or None (then the line gets parsed)."""
    matches = _FAST_TS.finditer(line)
    m = next(matches, None)
    if m is None or next(matches, None) is not None:
        return None
    return m.group(1) if m.group(1) is not None else m.group(2)


def iter_rows(fh: BinaryIO, fmt: str, name: str) -> Iterator[tuple[str, str | None, Any, str | None]]:
    """(ref, None, row or None, error) for every row of a CSV file or of a JSON file holding one
    array (the caller tells them apart; JSON lines go through `iter_json_lines`)."""
    if fmt == "csv":
        yield from _csv_rows(fh, name)
        return
    try:
        items = json.loads(fh.read().decode("utf-8", "replace"))
    except (ValueError, RecursionError) as exc:  # RecursionError: nested too deeply
        yield f"{name}:1", None, None, f"invalid JSON array: {exc}"
        return
    for i, item in enumerate(items if isinstance(items, list) else [items], 1):
        yield f"{name}:#{i}", None, item, None


def _csv_rows(fh: BinaryIO, name: str) -> Iterator[tuple[str, str | None, Any, str | None]]:
    """Rows of a CSV file as `iter_rows` yields them. A row the csv module cannot read (e.g. a
    field over `CSV_FIELD_LIMIT`, often a stray quote that swallowed the lines after it) is
    one error row, and reading goes on with the next line: one bad row must not cost the rest
    of the file."""
    csv.field_size_limit(CSV_FIELD_LIMIT)
    text = io.TextIOWrapper(fh, encoding="utf-8", errors="replace", newline="")
    reader = csv.DictReader(text)
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # DictReader.line_num is only updated after a good row: ask the inner reader.
            yield f"{name}:{reader.reader.line_num}", None, None, f"CSV error: {exc}"
            continue
        clean = {k: v for k, v in row.items() if k is not None and v is not None}
        yield f"{name}:{reader.line_num}", None, clean, None


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
    for line in gzip.decompress(data).decode("utf-8", "replace").splitlines():
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

    def __init__(self, source, network, *, endpoint_url: str | None = None, **kwargs) -> None:  # type: ignore[no-untyped-def]
        super().__init__(source, network, **kwargs)
        path = source.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigError(f"source {source.name!r}: `path` must name the export file, folder or s3:// prefix")
        self.files = ArchiveFiles(path, endpoint_url)
        self.platform = str(source.get("platform", "archive"))
        self.html = str(source.get("html", "auto"))
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
        """Read every export row once into its UTC day's writer; unplaceable rows go to `rejects`."""
        rows_total = 0
        meter = IndexProgress(self.source.name, len(listing), sum(_size_of(v) for _, v in listing), progress)
        try:
            for name, version in listing:
                fmt = _format_of(name) or "json"
                short = self.files.short(name)
                ref_head = json.dumps(short, ensure_ascii=False)[:-1]  # '"name' (closing quote added per row)
                gz = name.endswith(".gz")
                with self.files.open_raw(name) as raw:
                    if fmt == "json" and not _head(raw, gz).lstrip().startswith(b"["):
                        base, done = rows_total, [0]

                        def on_block(rows: int, base: int = base, done: list[int] = done) -> None:
                            meter.update(base + rows, done[0])

                        blocks = read_ahead(file_blocks(raw, gz, done))
                        try:
                            rows_total += self._index_json_lines(blocks, short, days, rejects, now, compressor, on_block)
                        finally:
                            blocks.close()  # stops the reader thread if indexing failed
                    else:
                        fh: BinaryIO = gzip.GzipFile(fileobj=raw, mode="rb") if gz else raw  # type: ignore[assignment]
                        for ref_name_line, line, row, error in iter_rows(fh, fmt, short):
                            rows_total += 1
                            if not rows_total & 0x3FFF:
                                meter.update(rows_total, raw.tell())
                            self._place(ref_name_line, line, row, error, short, ref_head, days, rejects, now, compressor)
                meter.file_done(_size_of(version))
                meter.update(rows_total, 0)
        finally:
            meter.close()
        return rows_total

    def _index_json_lines(self, blocks: Iterable[bytes], short: str, days: dict[dt.date, lake.GzipLines], rejects: list[dict[str, Any]],
                          now: dt.datetime, compressor: Executor, on_block: Callable[[int], None] | None = None) -> int:
        """JSON lines, kept as bytes: a row with one timestamp-like key that reads as a plausible
        time goes to its day as it came (no JSON parse, no str round trip); any other row takes
        `_place`, the careful path, exactly as before."""
        ref_head = json.dumps(short, ensure_ascii=False)[:-1]
        ref_head_b = b'{"ref":' + ref_head.encode("utf-8", "surrogatepass")
        latest = now + FUTURE_SLACK
        search = _FAST_TS_B.search
        n = 0
        for lineno, line in iter_json_lines(blocks, on_block):
            n += 1
            when = ts_b = None
            # Only lines that are one plain object: anything else (e.g. unicode whitespace that
            # str.strip would have removed) goes the careful way.
            if line[0] == 0x7B and line[-1] == 0x7D:  # { ... }
                m = search(line)
                if m is not None and search(line, m.end()) is None:
                    raw_ts = m.group(1)
                    if raw_ts is not None and raw_ts[-1:] == b"Z" and raw_ts[4:5] == b"-" and len(raw_ts) >= 10 and raw_ts.isascii():
                        # ISO 8601 in UTC ("Z"): the row's own text is the partition's `ts` (read
                        # back by fromisoformat as the same instant); isoformat() per row cost more
                        # than the rest of placing it.
                        try:
                            when = _fromiso(raw_ts.decode())
                        except ValueError:
                            when = None
                        else:
                            ts_b = raw_ts
                    if when is None:
                        try:
                            when = parse_time((raw_ts if raw_ts is not None else m.group(2)).decode("utf-8", "replace"))
                        except Reject:
                            when = None
                    if when is not None and not MIN_TIME <= when <= latest:
                        when = None
            if when is None:
                self._place(f"{short}:{lineno}", line.decode("utf-8", "replace").strip(), _UNPARSED, None, short, ref_head,
                            days, rejects, now, compressor)
                continue
            day = when.date()
            writer = days.get(day)
            if writer is None:
                writer = days[day] = lake.GzipLines(executor=compressor)
            writer.add_bytes(b'%s:%d","ts":"%s","row":%s}\n' % (ref_head_b, lineno, ts_b or when.isoformat().encode(), line))
        return n

    def _place(self, ref_name_line: str, line: str | None, row: Any, error: str | None, short: str, ref_head: str,
               days: dict[dt.date, lake.GzipLines], rejects: list[dict[str, Any]], now: dt.datetime, compressor: Executor) -> None:
        """One row into its UTC day's writer, or into `rejects` if it cannot be placed."""
        latest = now + FUTURE_SLACK
        when = None
        if error is None and row is _UNPARSED:
            # Fast path: one timestamp-like key in the line, read without parsing the JSON.
            # Rows that turn out to be invalid JSON are rejected later, in their window.
            raw_ts = fast_time(line)
            if raw_ts is not None:
                try:
                    when = parse_time(raw_ts)
                except Reject:
                    when = None
                if when is not None and not MIN_TIME <= when <= latest:
                    when = None
            if when is None:
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    error = "invalid JSON line"
        if error is None and when is None:
            if not isinstance(row, dict):
                error = f"row is a {type(row).__name__}, expected an object"
            else:
                try:
                    when = check_time(parse_time(first(row, TIME_KEYS), "created_at"), now)
                except Reject as exc:
                    error = str(exc)
        if error is not None or when is None:
            # As a window's rejects: `record_rejects` fills in the other columns and truncates.
            rejects.append({"record_ref": ref_name_line, "reason": error or "no timestamp",
                            "excerpt": excerpt(row if isinstance(row, dict | list) else line or "")})
            return
        if line is None:
            line = json.dumps(row, ensure_ascii=False, separators=(",", ":"))
        day = when.date()
        writer = days.get(day)
        if writer is None:
            writer = days[day] = lake.GzipLines(executor=compressor)
        if ref_name_line.startswith(short):  # "name:line": only the name may need JSON escaping
            ref_json = ref_head + ref_name_line[len(short):] + '"'
        else:
            ref_json = json.dumps(ref_name_line, ensure_ascii=False)
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
