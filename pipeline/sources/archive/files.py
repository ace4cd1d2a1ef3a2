"""Reading archive exports, every read bounded: listing a folder or an S3 prefix, opening a
file (gunzipped in steps, capped by `Limits`), and splitting it into rows (JSON lines, one JSON
array, CSV). Nothing outside the export folder is read (symlinks out of it, S3 keys with
`..`); a file that cannot be read (on) raises `ArchiveFileError` with the reason.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import os
import queue
import sys
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from pipeline.errors import ConfigError, StorageError
from pipeline.objectstore import parse_storage_url, s3_client
from pipeline.sources.archive.options import (
    MAX_FILE_BYTES,
    MAX_GZIP_RATIO,
    MAX_ROW_BYTES,
    ArchiveOptions,
)

SUFFIXES = (".jsonl", ".ndjson", ".json", ".csv")
CSV_FIELD_LIMIT = 64 * 1024 * 1024  # characters in one CSV field (at most `max_row_bytes`)
RATIO_AFTER = 64 << 20  # gunzipped bytes before the gzip ratio is checked
_BOM = b"\xef\xbb\xbf"  # UTF-8 byte order mark
_fromiso = dt.datetime.fromisoformat
_RAW_BLOCK = 2 << 20  # bytes read from an export file at once
_MAX_BLOCK = 16 << 20  # most bytes one inflate step yields
_PIECE = 1 << 20  # bytes of lines split and parsed at once


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
    def of(cls, opts: ArchiveOptions) -> Limits:
        return cls(opts.max_file_bytes, opts.max_row_bytes, opts.max_gzip_ratio)


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



class ArchiveFiles:
    """The export files under `path`: listing with a fingerprint, and streaming each file."""

    def __init__(self, path: str, endpoint_url: str | None) -> None:
        self.path = path
        loc = parse_storage_url(path)
        self.s3 = loc.scheme == "s3"
        if self.s3:
            self.bucket, self.prefix = loc.bucket, loc.prefix
            self._client = s3_client(endpoint_url)
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


