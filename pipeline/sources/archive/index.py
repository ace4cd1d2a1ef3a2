"""The archive's day index: every export row filed once under its UTC day in the raw lake.

Why an index: a backfill asks for one day at a time, and re-reading a million-row export per
day would be quadratic. The ingest job (`pipeline.ingest.jobs.index_step`, before its first
window, under a lock) brings the index up to date: it reads every file once and writes each row
to its UTC day's partition in the raw lake, `raw/source=NAME/dt=YYYY-MM-DD/archive.jsonl.gz`
(one line `{"ref": "file:line", "ts": UTC time in ISO 8601, "row": {...}}`; a line that is not
valid JSON is kept as it came, and quarantined by its window), then a manifest with the
archive's fingerprint (names, sizes, mtimes or ETags). Windows then read only their day
partitions. A changed archive (new, grown or replaced files) is re-indexed on the next run;
`--force` rebuilds the index first (once per run), e.g. after a partition was lost from the
lake. Rows without a usable timestamp cannot be placed in a day: they are quarantined while
indexing (with `window_start` empty). A row's day is the one `parsing.row_time` gives, the call
its window's normaliser makes, so no row falls between two windows. A file that cannot be read
(on) is quarantined with the reason (ref: its name) and the rest of the export goes in.
Indexing reports its progress through the caller's `Progress` (bytes read, rows so far).
"""

from __future__ import annotations

import datetime as dt
import gzip
import hashlib
import io
import json
import logging
import re
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from pipeline.errors import ConfigError
from pipeline.ingest import lake
from pipeline.objectstore import ObjectStore
from pipeline.progress import Progress, Tracker, of
from pipeline.sources.archive.files import (
    _BOM,
    ArchiveFileError,
    ArchiveFiles,
    BlockReader,
    Limits,
    _format_of,
    _head,
    file_blocks,
    iter_json_lines,
    iter_rows,
    quick_gil_handoffs,
    read_ahead,
    safe_name,
)
from pipeline.sources.parsing import (
    FUTURE_SLACK,
    MIN_TIME,
    TIME_KEYS,
    Reject,
    check_time,
    excerpt,
    parse_time,
    row_time,
)

log = logging.getLogger(__name__)

INDEX_VERSION = 2  # 2: rows filed by `parsing.row_time`, bad files quarantined

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


def manifest_key(source: str) -> str:
    return f"{lake.source_prefix(source)}_index/manifest.json"


def partition_key(source: str, day: dt.date) -> str:
    return f"{lake.day_prefix(source, day)}archive.jsonl.gz"



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


def _size_of(version: str) -> int:
    """The byte size from a listing version (`size:mtime` or `size:etag`)."""
    head = version.split(":", 1)[0]
    return int(head) if head.isdigit() else 0



class _Meter:
    """Bytes read of the whole export and rows so far, into a progress tracker."""

    def __init__(self, tracker: Tracker) -> None:
        self.tracker = tracker
        self.files_done = 0  # bytes of the files finished
        self.shown = 0

    def update(self, rows: int, file_bytes: int) -> None:
        """`rows` indexed in all, `file_bytes` read of the current file."""
        done = self.files_done + file_bytes
        self.tracker.note(rows=f"{rows:,}")
        if done > self.shown:
            self.tracker.update(done - self.shown)
            self.shown = done

    def file_done(self, size: int) -> None:
        self.files_done += size

    def close(self) -> None:
        self.tracker.close()


class ArchiveIndex:
    """The day index of one archive source: is it current, build it, where a day's rows are."""

    def __init__(self, name: str, files: ArchiveFiles, limits: Limits) -> None:
        self.name, self.files, self.limits = name, files, limits

    def listing(self) -> list[tuple[str, str]]:
        """(name, version) of every export file: listed once per run."""
        return self.files.list()

    def fingerprint(self, listing: list[tuple[str, str]]) -> str:
        """Of `self.listing()` (listed once per run, for the check and for indexing)."""
        if not listing:
            raise ConfigError(f"source {self.name!r}: no .jsonl/.csv(.gz) files under {self.files.path}")
        doc = json.dumps([INDEX_VERSION, [(self.files.short(n), v) for n, v in listing]])
        return hashlib.sha256(doc.encode()).hexdigest()

    def read_manifest(self, store: ObjectStore) -> dict[str, Any] | None:
        """The stored manifest of this index version, or None."""
        try:
            doc = json.loads(store.get(manifest_key(self.name)))
        except (KeyError, ValueError):
            return None
        return doc if isinstance(doc, dict) and doc.get("version") == INDEX_VERSION else None

    def build(self, store: ObjectStore, fp: str, listing: list[tuple[str, str]], previous: dict[str, Any] | None,
              progress: Progress | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """Write the day partitions and the manifest; returns (manifest, quarantine rows)."""
        now = dt.datetime.now(dt.UTC)
        days: dict[dt.date, lake.GzipLines] = {}
        rejects: list[dict[str, Any]] = []
        compressor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="archive-gzip")
        try:
            with quick_gil_handoffs():
                rows_total = self._index_files(listing, days, rejects, now, compressor, progress)
            manifest_days: dict[str, dict[str, Any]] = {}
            for day in sorted(days):
                key = partition_key(self.name, day)
                writer = days.pop(day)
                store.put(key, writer.finish(), content_type="application/gzip")
                manifest_days[day.isoformat()] = {"key": key, "rows": writer.count}
        finally:
            compressor.shutdown(wait=True, cancel_futures=True)
        for old_day, info in (previous or {}).get("days", {}).items():
            if old_day not in manifest_days:
                store.delete(info["key"])
        manifest = {
            "version": INDEX_VERSION, "fingerprint": fp, "rows": rows_total, "rejected": len(rejects),
            "days": manifest_days, "built_at": now.isoformat(),
        }
        store.put(manifest_key(self.name), json.dumps(manifest, indent=1).encode(), content_type="application/json")
        log.info("indexed archive %s: %d rows into %d days, %d rejected", self.name, rows_total, len(manifest_days), len(rejects))
        return manifest, rejects

    def _index_files(self, listing: list[tuple[str, str]], days: dict[dt.date, lake.GzipLines], rejects: list[dict[str, Any]],
                     now: dt.datetime, compressor: Executor, progress: Progress | None = None) -> int:
        """Read every export row once into its UTC day's writer; unplaceable rows go to `rejects`,
        and so does a file that cannot be read (on), with the reason (ref: the file's name):
        the rows before the fault stay indexed, the other files go in."""
        rows_total = 0
        total = sum(_size_of(v) for _, v in listing)
        log.info("indexing archive %s: %d file%s, %.1f MB", self.name, len(listing), "" if len(listing) == 1 else "s", total / 1e6)
        meter = _Meter(of(progress)(total, f"index {self.name}", "B"))
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
                    log.warning("archive %s: file %s not read to its end: %s", self.name, short, reason)
                rows_total += count[0]
                meter.file_done(_size_of(version))
                meter.update(rows_total, 0)
        finally:
            meter.close()
        return rows_total

    def _index_file(self, name: str, short: str, days: dict[dt.date, lake.GzipLines], rejects: list[dict[str, Any]],
                    now: dt.datetime, compressor: Executor, meter: _Meter, base: int, count: list[int]) -> None:
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

