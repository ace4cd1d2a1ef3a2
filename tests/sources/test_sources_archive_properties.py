"""Property tests of the archive reader (JSON lines, JSON arrays, CSV, each maybe gzipped) and of
the index against the normaliser: whatever the export holds, indexing never raises, every row
it reads is filed under a day or quarantined with a reason, and a filed row's day and time are
the ones its window's normaliser reads (`normalize.row_time`, called by both)."""

from __future__ import annotations

import csv
import datetime as dt
import gzip
import io
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pipeline.sources.archive.index as archive_mod
from pipeline.settings import NetworkConfig, SourceConfig
from pipeline.sources.archive.connector import ArchiveConnector
from pipeline.sources.archive.index import decode_partition
from pipeline.sources.parsing import TIME_KEYS, Normalizer, Reject, row_time

NOW = dt.datetime(2026, 12, 1, tzinfo=dt.UTC)
BASE = dt.datetime(2026, 10, 1, tzinfo=dt.UTC)

# --- strategies --------------------------------------------------------------------------------

instants = st.integers(min_value=-3 * 86400, max_value=5 * 86400).map(lambda s: BASE + dt.timedelta(seconds=s))


@st.composite
def time_values(draw: Any) -> Any:
    """A value of a time column in one of the forms exports use, or something that is not one."""
    when = draw(instants) + dt.timedelta(microseconds=draw(st.sampled_from([0, 0, 500_000, 123_456])))
    kind = draw(st.sampled_from(["z", "offset", "naive", "date", "epoch", "epoch_float", "epoch_ms", "epoch_str", "epoch_exp",
                                 "junk", "empty", "none", "bool", "list", "old", "future"]))
    if kind == "z":
        return when.isoformat().replace("+00:00", "Z")
    if kind == "offset":
        hours = draw(st.integers(-12, 14))
        return when.astimezone(dt.timezone(dt.timedelta(hours=hours))).isoformat()
    if kind == "naive":
        return when.replace(tzinfo=None).isoformat(sep=draw(st.sampled_from(["T", " "])))
    if kind == "date":
        return when.date().isoformat()
    if kind == "epoch":
        return int(when.timestamp())
    if kind == "epoch_float":
        return when.timestamp()
    if kind == "epoch_ms":
        return int(when.timestamp() * 1000)
    if kind == "epoch_str":
        return str(int(when.timestamp()))
    if kind == "epoch_exp":  # a JSON number with an exponent
        return Raw(f"{when.timestamp():.9e}")
    if kind == "junk":
        return draw(st.text(max_size=20))
    if kind == "empty":
        return ""
    if kind == "none":
        return None
    if kind == "bool":
        return draw(st.booleans())
    if kind == "list":
        return [when.isoformat()]
    if kind == "old":
        return "1985-01-01T00:00:00Z"
    return "2099-01-01T00:00:00Z"


class Raw(str):
    """A JSON number written as this text (in CSV and arrays: a string)."""


def esc(text: str, mode: int) -> str:
    """A JSON string literal for `text`: plain, non-ASCII kept, or every character as \\uXXXX."""
    if mode == 0:
        return json.dumps(text)
    if mode == 1:
        return json.dumps(text, ensure_ascii=False)
    return '"' + "".join(json.dumps(c)[1:-1] if ord(c) > 0xFFFF else f"\\u{ord(c):04x}" for c in text) + '"'


def value_json(value: Any, mode: int) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, str):
        return esc(value, mode)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{esc(k, mode)}: {value_json(v, mode)}" for k, v in value.items()) + "}"
    return json.dumps(value)


@st.composite
def records(draw: Any, i: int) -> list[tuple[str, Any]]:
    """One export row as (key, value) pairs: keys may repeat (the last wins, as in any JSON
    parser), times may sit at the top level and in nested objects."""
    pairs: list[tuple[str, Any]] = [("id", f"r{i}"), ("author_id", draw(st.sampled_from(["a", "b", 7]))),
                                    ("text", draw(st.text(max_size=30)))]
    for key in draw(st.lists(st.sampled_from(TIME_KEYS), max_size=3)):
        pairs.append((key, draw(time_values())))
    if draw(st.booleans()):
        pairs.append(("user", {"id": "u", "created_at": draw(time_values())}))
    if draw(st.booleans()):
        pairs.append(("data", {draw(st.sampled_from(TIME_KEYS)): draw(time_values())}))
    return draw(st.permutations(pairs))


@st.composite
def json_lines(draw: Any) -> list[bytes]:
    n = draw(st.integers(1, 12))
    lines = []
    for i in range(n):
        if draw(st.integers(0, 9)) == 0:  # a line that is not a JSON object
            lines.append(draw(st.sampled_from([b"{not json", b"[1, 2]", b'"text"', b"\xff\xfe{}", b'{"id": 1,}', b"null"])))
            continue
        pairs = draw(records(i))
        mode = draw(st.integers(0, 2))
        lines.append(("{" + ", ".join(f"{esc(k, mode)}: {value_json(v, mode)}" for k, v in pairs) + "}").encode())
    return lines


# --- helpers ---------------------------------------------------------------------------------------


def index(folder: Path, **options: Any) -> tuple[ArchiveConnector, dict[dt.date, list[dict[str, Any]]], list[dict[str, Any]], int]:
    source = SourceConfig(name="p", kind="archive", options={"path": str(folder), **options})
    conn = ArchiveConnector(source, NetworkConfig())
    days: dict = {}
    rejects: list[dict[str, Any]] = []
    with ThreadPoolExecutor(max_workers=1) as pool:
        n = conn.index._index_files(conn.files.list(), days, rejects, NOW, pool)
        parts = {day: decode_partition(w.finish()) for day, w in days.items()}
    return conn, parts, rejects, n


def check_agreement(conn: ArchiveConnector, parts: dict[dt.date, list[dict[str, Any]]]) -> int:
    """Each filed row: the normaliser stores it at the partition's `ts`, on the partition's day,
    or rejects it with a reason (it is quarantined by its window); it never raises otherwise."""
    normalizer = Normalizer("salt", now=NOW)
    filed = 0
    for day, rows in parts.items():
        for record in rows:
            filed += 1
            ts = dt.datetime.fromisoformat(record["ts"]) if record.get("ts") else None
            assert ts is None or ts.date() == day
            try:
                post = conn.normalize(normalizer, record)
            except Reject as exc:
                assert str(exc)
                continue
            assert post.posted_at == ts, (record, post.posted_at)
            # and it is the time the parsed row has, by the one definition
            assert row_time(map(record["row"].get, TIME_KEYS)) == ts
    return filed


SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- properties ------------------------------------------------------------------------------------


@SETTINGS
@given(lines=json_lines(), gz=st.booleans(), msgspec=st.booleans())
def test_json_lines_index_time_is_the_normalisers_time(lines, gz, msgspec, monkeypatch_module):
    """JSON lines (escaped keys and values, duplicate keys, nested times, epochs, junk): every
    line is filed or quarantined, and filed rows agree with the normaliser; with or without
    msgspec (the standard library fallback)."""
    monkeypatch_module.setattr(archive_mod, "_DECODE_TIME", archive_mod._DECODE_TIME_ORIG if msgspec else None)
    with tempfile.TemporaryDirectory() as tmp:
        data = b"\n".join(lines) + b"\n"
        name = "x.jsonl.gz" if gz else "x.jsonl"
        (Path(tmp) / name).write_bytes(gzip.compress(data) if gz else data)
        conn, parts, rejects, n = index(Path(tmp))
    assert n == len(lines)
    filed = check_agreement(conn, parts)
    assert filed + len(rejects) == n  # every line accounted for
    assert all(r["reason"] for r in rejects)
    # a line that parses as an object with a readable time is filed, never quarantined here
    for i, line in enumerate(lines, 1):
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            try:
                when = row_time(map(row.get, TIME_KEYS))
            except Reject:
                continue
            if dt.datetime(1990, 1, 1, tzinfo=dt.UTC) <= when <= NOW + dt.timedelta(days=2):
                assert f"x.jsonl{'.gz' if gz else ''}:{i}" not in {r["record_ref"] for r in rejects}


@SETTINGS
@given(rows=st.lists(records(0), min_size=1, max_size=8), fmt=st.sampled_from(["json", "csv"]), gz=st.booleans(),
       cut=st.integers(0, 40))
def test_arrays_and_csv_index_time_is_the_normalisers_time(rows, fmt, gz, cut):
    """JSON arrays and CSV files (maybe gzipped, maybe cut short): rows before a fault are filed
    or quarantined, the file itself is quarantined with the reason if it cannot be read on."""
    dicts = [dict(pairs) | {"id": f"r{i}"} for i, pairs in enumerate(rows)]
    if fmt == "json":
        data = json.dumps(dicts).encode()
    else:
        out = io.StringIO()
        cols = sorted({k for d in dicts for k in d if not isinstance(d[k], dict)})
        writer = csv.DictWriter(out, cols, extrasaction="ignore")
        writer.writeheader()
        for d in dicts:
            writer.writerow({k: ("" if d.get(k) is None else str(d.get(k))) for k in cols})
        data = out.getvalue().encode()
    if cut:
        data = data[: max(1, len(data) - cut)]
    with tempfile.TemporaryDirectory() as tmp:
        name = f"x.{fmt}" + (".gz" if gz else "")
        (Path(tmp) / name).write_bytes(gzip.compress(data) if gz else data)
        conn, parts, rejects, n = index(Path(tmp))
    filed = check_agreement(conn, parts)
    file_rows = [r for r in rejects if r["record_ref"] == name]
    assert filed + len(rejects) - len(file_rows) == n
    assert len(file_rows) <= 1 and all(r["reason"] for r in rejects)
    if not cut:
        assert not file_rows and n == len(dicts)


@SETTINGS
@given(data=st.binary(max_size=300), name=st.sampled_from(["x.jsonl", "x.jsonl.gz", "x.json", "x.json.gz", "x.csv", "x.csv.gz"]),
       squeeze=st.booleans())
def test_any_bytes_never_raise(data, name, squeeze):
    """Arbitrary bytes in any accepted file (tiny caps too): indexing never raises; every row
    read is filed or quarantined; a file it cannot read is one quarantine row."""
    options = {"max_row_bytes": 16, "max_file_bytes": 200} if squeeze else {}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / name).write_bytes(data)
        conn, parts, rejects, n = index(Path(tmp), **options)
    filed = check_agreement(conn, parts)
    file_rows = [r for r in rejects if r["record_ref"] == name]
    assert len(file_rows) <= 1
    assert filed + len(rejects) - len(file_rows) == n


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    archive_mod._DECODE_TIME_ORIG = archive_mod._DECODE_TIME
    yield mp
    mp.undo()
    del archive_mod._DECODE_TIME_ORIG


# --- end to end: every line accounted for in the tables ----------------------------------------------

W0, W1 = BASE - dt.timedelta(days=10), BASE + dt.timedelta(days=10)
RUNS = iter(range(10**6))


@st.composite
def export_lines(draw: Any) -> list[bytes]:
    """JSON lines whose ids repeat now and then (copies of one post on one or two days)."""
    lines = draw(json_lines())
    out = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            out.append(line)
            continue
        if isinstance(row, dict) and draw(st.integers(0, 3)) == 0:
            line = line.replace(b'"id": "r', b'"id": "r0', 1) if b'"id": "r' in line else line
        out.append(line)
    return out


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.integration)])
def test_every_line_is_accounted_for_in_the_tables(make_ctx, backend, tmp_path):
    """Through the real index, window, loader and quarantine (both backends): lines read ==
    quarantined while indexing + fetched by the window, and fetched == new + updated + unchanged
    + superseded + duplicates + quarantined by the window, with nothing out of window."""
    from sqlalchemy import func, select

    from pipeline.ingest.jobs import ingest_window
    from pipeline.schema import quarantine

    folder = tmp_path / "export"
    folder.mkdir()
    ctx = make_ctx({"sources": [{"name": "arch", "kind": "archive", "path": str(folder), "fetch_images": False}]}, backend)

    @settings(max_examples=12 if backend == "sqlite" else 6, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
    @given(lines=export_lines())
    def run(lines: list[bytes]) -> None:
        tag = f"e{next(RUNS)}-"  # fresh ids per example: every stored copy is new
        lines = [line.replace(b'"id": "r', b'"id": "' + tag.encode() + b"r", 1) for line in lines]
        for old in folder.iterdir():
            old.unlink()
        (folder / "x.jsonl").write_bytes(b"\n".join(lines) + b"\n")
        counts = ingest_window(ctx, "arch", W0, W1, force=True)
        with ctx.engine.connect() as conn:
            at_index = conn.execute(select(func.count()).select_from(quarantine).where(
                quarantine.c.source == "arch", quarantine.c.window_start.is_(None))).scalar()
            in_window = conn.execute(select(func.count()).select_from(quarantine).where(
                quarantine.c.source == "arch", quarantine.c.window_start == W0)).scalar()
        assert counts["indexed_rows"] == len(lines)
        assert len(lines) == at_index + counts["fetched"], counts
        assert counts["fetched"] == (counts["new"] + counts["updated"] + counts["unchanged"] + counts["superseded"]
                                     + counts["duplicates"] + in_window), counts
        assert counts["out_of_window"] == 0 and counts["rejected"] == at_index + in_window

    run()
