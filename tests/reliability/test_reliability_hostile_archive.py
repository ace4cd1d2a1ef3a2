"""Archive exports under hostile and careless input (issue 11, classes 2, 6 and 7).

Every record an export yields ends as exactly one of: a stored post, a quarantine row with its
reason, or a counted duplicate/superseded copy; a bad file is quarantined (with its name and
the reason) in bounded memory and time while the rest of the export goes in; which copy of a
post is kept does not depend on the order windows run in. Each case runs on SQLite + a local
folder and on Postgres + S3 (the export itself on S3 where the case allows).
"""

from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from rel_helpers import DAY, END, ctx_env, snapshot
from sqlalchemy import select

from pipeline.ingest.jobs import backfill, ingest_window
from pipeline.schema import post_images, posts, quarantine

GOOD = 12
pytestmark = pytest.mark.timeout(300)  # a hang is a failure


def cfg(**options: Any) -> dict[str, Any]:
    source = {"name": "arch", "kind": "archive", "fetch_images": False, **options}
    return {"brands": [{"name": "Acme", "keywords": ["acme"]}], "sources": [source]}


def z(when: dt.datetime) -> str:
    return when.isoformat().replace("+00:00", "Z")


def good_lines(prefix: str = "good", day: dt.datetime = DAY) -> bytes:
    rows = [{"id": f"{prefix}-{i}", "author_id": f"g{i % 3}", "text": f"acme {prefix} {i}",
             "created_at": z(day + dt.timedelta(minutes=100 * i))} for i in range(GOOD)]
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def gzip_repeat(pattern: bytes, total: int) -> bytes:
    """A valid gzip file whose content is `pattern` repeated to about `total` bytes, built in a
    second without ever holding the content (a gzip bomb): after a full flush deflate starts
    afresh, so every further 1 MiB unit compresses to the same bytes."""
    unit = pattern * max(1, (1 << 20) // len(pattern))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    first = c.compress(unit) + c.flush(zlib.Z_FULL_FLUSH)
    again = c.compress(unit) + c.flush(zlib.Z_FULL_FLUSH)
    n = max(2, total // len(unit))
    crc = 0
    for _ in range(n):
        crc = zlib.crc32(unit, crc)
    body = first + again * (n - 1) + c.flush()
    return b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + body + struct.pack("<II", crc, (n * len(unit)) & 0xFFFFFFFF)


@dataclass
class Export:
    path: str
    put: Callable[[str, bytes], None]
    s3: bool


@pytest.fixture
def export(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Export:
    """The export: a local folder with SQLite, an S3 prefix (moto) with Postgres."""
    if backend == "sqlite":
        folder = tmp_path / "export"
        folder.mkdir()

        def put_local(name: str, data: bytes) -> None:
            (folder / name).parent.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(data)

        return Export(str(folder), put_local, False)
    import boto3

    client = boto3.client("s3", endpoint_url=request.getfixturevalue("s3_endpoint"))
    bucket = f"exports-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    return Export(f"s3://{bucket}/dump/", lambda name, data: client.put_object(Bucket=bucket, Key=f"dump/{name}", Body=data), True)


def stored(ctx: Any) -> dict[str, Any]:
    with ctx.engine.connect() as conn:
        return {r.external_id: r for r in conn.execute(select(posts))}


def quarantined(ctx: Any) -> dict[str, str]:
    with ctx.engine.connect() as conn:
        return {r.record_ref: r.reason for r in conn.execute(select(quarantine.c.record_ref, quarantine.c.reason))}


def file_row(q: dict[str, str], name: str) -> str:
    """The quarantine reason of a whole file (its ref: the file's name)."""
    assert name in q, f"no quarantine row for the file {name}: {sorted(q)[:10]}"
    return q[name]


# --- class 2: silent loss -------------------------------------------------------------------------


def test_index_files_rows_by_the_normalisers_time(make_ctx, backend, export, tally):
    """The index and the normaliser read a row's time by one function: a top-level time with a
    JSON escape, an epoch number or an escaped key, beside a nested `user.created_at` on another
    day, is filed under its own day and stored; nothing is dropped as out of window."""
    other = DAY - dt.timedelta(days=1)  # the nested (account) times point at the day before
    user = {"id": "u9", "created_at": z(other + dt.timedelta(hours=3))}
    epoch = f"{(DAY + dt.timedelta(hours=9)).timestamp():.9e}"  # 1.790931600e+09: an exponent
    tricky = [
        ('{"id": "esc-offset", "author_id": "u", "text": "acme", "user": USER, "created_at": "2026-10-02T12:00:00\\u002B01:00"}',
         DAY + dt.timedelta(hours=11)),
        ('{"id": "esc-key", "author_id": "u", "text": "acme", "user": USER, "created\\u005fat": "2026-10-02T08:00:00Z"}',
         DAY + dt.timedelta(hours=8)),
        ('{"id": "epoch-exp", "author_id": "u", "text": "acme", "user": USER, "created_at": EPOCH}', DAY + dt.timedelta(hours=9)),
        ('{"id": "dup-key", "author_id": "u", "text": "acme", "created_at": "2026-10-01T01:00:00Z", "user": USER, '
         '"created_at": "2026-10-02T10:00:00Z"}', DAY + dt.timedelta(hours=10)),
        ('{"id": "u2028", "author_id": "u", "text": "acme \u2028 line sep", "created_at": "2026-10-02T04:00:00Z"}',
         DAY + dt.timedelta(hours=4)),
        ('{"id": "nan", "author_id": "u", "text": "acme", "score": NaN, "created_at": "2026-10-02T05:00:00Z"}',
         DAY + dt.timedelta(hours=5)),
    ]
    tricky = [(line.replace("USER", json.dumps(user)).replace("EPOCH", epoch), want) for line, want in tricky]
    body = "\n".join(line for line, _ in tricky) + "\n"
    export.put("tricky.jsonl", body.encode() + good_lines())
    ctx = make_ctx(cfg(path=export.path), backend)
    counts = backfill(ctx, "arch", other.date(), DAY.date())
    found, q = stored(ctx), quarantined(ctx)
    assert counts["out_of_window"] == 0, counts
    for line, want in tricky:
        ext = json.loads(line)["id"]
        assert ext in found, (ext, q)
        assert found[ext].posted_at == want, (ext, found[ext].posted_at)
        tally.bad_input("stored at its own time")
    assert len(found) == len(tricky) + GOOD and not q
    tally.rows(len(found))


# --- class 6: one bad file must not block a source ---------------------------------------------------


def test_bad_files_quarantined_and_the_rest_goes_in(make_ctx, backend, export, tally):
    """A gzip bomb, a truncated gzip, a plain file named .gz, an empty .gz, a JSON array that
    never closes, an over-long JSON line and an over-long CSV field, beside good files: each bad
    file (or row) is one quarantine row with its reason, every good row is stored, the window
    succeeds, and a forced re-run changes nothing."""
    good = gzip.compress(good_lines("gz"))
    export.put("a-good.jsonl", good_lines())
    export.put("b-good.jsonl.gz", good)
    export.put("bomb.jsonl.gz", gzip_repeat(b"A", 200 << 20))  # 200 MB of one line from ~0.2 MB
    export.put("truncated.jsonl.gz", good[: len(good) // 2])
    export.put("plain.jsonl.gz", good_lines("plain"))
    export.put("empty.csv.gz", b"")
    items = [{"id": f"arr-{i}", "author_id": "u", "text": "acme", "created_at": z(DAY + dt.timedelta(hours=i))} for i in range(3)]
    export.put("open.json", json.dumps(items).encode()[:-1] + b", {\"id\": ")
    long_line = b'{"id": "long", "author_id": "u", "created_at": "2026-10-02T01:00:00Z", "text": "' + b"x" * 300_000 + b'"}\n'
    export.put("long.jsonl", good_lines("after-long").replace(b"\n", b"\n" + long_line, 1))
    csv_text = "id,author_id,text,created_at\n" + "".join(
        f'c{i},u,"{"y" * 300_000 if i == 1 else "acme"}",{z(DAY + dt.timedelta(hours=i))}\n' for i in range(4))
    export.put("field.csv", csv_text.encode())
    ctx = make_ctx(cfg(path=export.path, max_row_bytes=200_000), backend)
    counts = ingest_window(ctx, "arch", DAY, END)
    found, q = stored(ctx), quarantined(ctx)
    want = {f"good-{i}" for i in range(GOOD)} | {f"gz-{i}" for i in range(GOOD)} | {f"after-long-{i}" for i in range(GOOD)}
    want |= {"arr-0", "arr-1", "arr-2", "c0", "c2", "c3"}
    assert want <= set(found), sorted(want - set(found))
    assert "gzip bomb" in file_row(q, "bomb.jsonl.gz")
    assert "truncated gzip" in file_row(q, "truncated.jsonl.gz")
    assert "not a gzip file" in file_row(q, "plain.jsonl.gz")
    assert "not a gzip file (empty)" in file_row(q, "empty.csv.gz")
    assert "JSON array" in file_row(q, "open.json") and "first 3 rows were indexed" in q["open.json"]
    assert "longer than max_row_bytes" in q["long.jsonl:2"]
    assert "longer than max_row_bytes" in q["field.csv:3"] or "field larger than field limit" in q["field.csv:3"]
    assert not any("re-run" in reason for reason in q.values())
    assert counts["rejected"] == len(q)
    tally.bad_input("quarantined", 7)
    before = snapshot(ctx, [posts, post_images, quarantine], lake=False)
    ingest_window(ctx, "arch", DAY, END, force=True)
    assert snapshot(ctx, [posts, post_images, quarantine], lake=False) == before
    tally.rows(len(found))


MEMORY_CAP = 1536 << 20  # address space of the child: far below what the bombs expand to

CHILD = textwrap.dedent("""
    import resource, sys, datetime as dt
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    from pipeline.context import Context
    from pipeline.settings import load_settings
    from pipeline.ingest.jobs import ingest_window
    ctx = Context(load_settings())
    day = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
    counts = ingest_window(ctx, "arch", day, day + dt.timedelta(days=1))
    print("COUNTS", counts["new"], counts["rejected"])
""")


@pytest.mark.integration
def test_bombs_in_a_memory_capped_child(make_ctx, backend, export, tally):
    """With the default caps, in a child whose address space is capped at 1.5 GB and killed if
    it takes more than two minutes: a 4 GiB gzip bomb of one endless line, a CSV whose one
    field is 4 GiB (gzipped), and a 4 GiB JSON array bomb are quarantined, the good file goes in."""
    export.put("good.jsonl", good_lines())
    export.put("bomb.jsonl.gz", gzip_repeat(b"A", 4 << 30))
    export.put("field.csv.gz", _csv_field_bomb(4 << 30))
    export.put("array.json.gz", _array_bomb(4 << 30))
    ctx = make_ctx(cfg(path=export.path), backend)
    proc = subprocess.run([sys.executable, "-c", CHILD.format(cap=MEMORY_CAP)], env=ctx_env(ctx, PYTHONPATH=os.getcwd()),
                          capture_output=True, timeout=120)
    out, err = proc.stdout.decode(), proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err[-2000:]
    q = quarantined(ctx)
    assert set(stored(ctx)) == {f"good-{i}" for i in range(GOOD)}
    for name in ("bomb.jsonl.gz", "field.csv.gz", "array.json.gz"):
        reason = file_row(q, name)
        assert "max_gzip_ratio" in reason or "max_row_bytes" in reason, q
    assert "COUNTS 12 3" in out
    tally.bad_input("quarantined", 3)


def _csv_field_bomb(total: int) -> bytes:
    """A gzipped CSV: a header, then one row whose quoted field never ends (`total` bytes)."""
    head = b"id,author_id,text,created_at\n1,u,\""
    return gzip.compress(head) + gzip_repeat(b"x", total)  # two gzip members: one stream of content


def _array_bomb(total: int) -> bytes:
    """A gzipped JSON array whose first item is one string of `total` bytes."""
    return gzip.compress(b'[{"id": "1", "text": "') + gzip_repeat(b"x", total)


def test_files_outside_the_export_are_refused(make_ctx, backend, tmp_path, tally):
    """A symlink under the export folder to a file outside it is not read (it could expose any
    file the pipeline user can read): one quarantine row says why; symlinks inside are fine.
    A non-UTF-8 file name and a directory named like an export file do not break indexing."""
    folder = tmp_path / "export"
    (folder / "dir.jsonl").mkdir(parents=True)
    (folder / "dir.jsonl" / "inner.jsonl").write_bytes(good_lines("inner"))
    outside = tmp_path / "private.jsonl"
    outside.write_bytes(good_lines("private"))
    (folder / "link-out.jsonl").symlink_to(outside)
    (folder / "real.jsonl").write_bytes(good_lines("real"))
    (folder / "link-in.jsonl").symlink_to(folder / "real.jsonl")
    (folder / "dangling.jsonl").symlink_to(tmp_path / "gone.jsonl")
    odd = os.fsencode(folder) + b"/caf\xe9-\x01.jsonl"  # Latin-1 and a control character in the name
    with open(odd, "wb") as fh:
        fh.write(b'{"id": "no-time", "author_id": "u", "text": "acme"}\n' + good_lines("odd"))
    ctx = make_ctx(cfg(path=str(folder)), backend)
    ingest_window(ctx, "arch", DAY, END)
    found, q = stored(ctx), quarantined(ctx)
    assert not any(k.startswith("private-") for k in found)
    assert "outside the export folder" in file_row(q, "link-out.jsonl")
    assert "broken symlink" in file_row(q, "dangling.jsonl")
    assert {f"real-{i}" for i in range(GOOD)} | {f"inner-{i}" for i in range(GOOD)} | {f"odd-{i}" for i in range(GOOD)} <= set(found)
    assert q["caf\\xe9-\\x01.jsonl:1"] == "missing created_at"
    tally.bad_input("quarantined", 3)
    tally.bad_input("indexed", 2)


@pytest.mark.integration
def test_s3_keys_with_dot_dot_are_refused(make_ctx, s3_endpoint, tmp_path, tally):
    """An S3 key with a `..` segment under the export prefix is refused with a reason."""
    import boto3

    client = boto3.client("s3", endpoint_url=s3_endpoint)
    bucket = f"exports-{os.urandom(4).hex()}"
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="dump/good.jsonl", Body=good_lines())
    client.put_object(Bucket=bucket, Key="dump/../escape.jsonl", Body=good_lines("escape"))
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=bucket, Prefix="dump/")["Contents"]]
    if "dump/../escape.jsonl" not in keys:
        pytest.fail(f"the S3 server normalised the key: {keys}")
    ctx = make_ctx(cfg(path=f"s3://{bucket}/dump/"), "postgres")
    ingest_window(ctx, "arch", DAY, END)
    found, q = stored(ctx), quarantined(ctx)
    assert set(found) == {f"good-{i}" for i in range(GOOD)}
    assert "'..'" in file_row(q, "../escape.jsonl")
    tally.bad_input("quarantined")


def test_a_file_changing_while_read(make_ctx, backend, tmp_path, monkeypatch, tally):
    """An export file rewritten (cut short) while it is being read: quarantined with the reason;
    the other files go in, and the window succeeds."""
    from pipeline.sources.archive import files as archive

    folder = tmp_path / "export"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(good_lines())
    growing = folder / "b.jsonl.gz"
    data = gzip.compress(good_lines("b") * 50)
    growing.write_bytes(data)
    opened = archive.ArchiveFiles.open_raw

    def open_and_cut(self, name):  # type: ignore[no-untyped-def]
        cm = opened(self, name)
        raw = cm.__enter__()
        if name.endswith("b.jsonl.gz"):
            with open(name, "r+b") as fh:  # a writer truncates it after we opened it
                fh.truncate(len(data) // 3)

        class Ctx:
            def __enter__(self_inner):  # noqa: N805
                return raw

            def __exit__(self_inner, *exc):  # noqa: N805
                return cm.__exit__(*exc)

        return Ctx()

    monkeypatch.setattr(archive.ArchiveFiles, "open_raw", open_and_cut)
    ctx = make_ctx(cfg(path=str(folder)), backend)
    ingest_window(ctx, "arch", DAY, END)
    found, q = stored(ctx), quarantined(ctx)
    assert {f"good-{i}" for i in range(GOOD)} <= set(found)
    assert "truncated gzip" in file_row(q, "b.jsonl.gz") or "changed while it was read" in file_row(q, "b.jsonl.gz")
    tally.bad_input("quarantined")


# --- class 7: order-dependent results -----------------------------------------------------------------


def test_the_kept_copy_does_not_depend_on_window_order(make_ctx, backend, export, tally):
    """The same (platform, id) on two days, and twice at one time in two files: windows run
    forwards, backwards, and with --force re-runs in between leave identical tables."""
    day1, day2 = DAY - dt.timedelta(days=1), DAY
    rows1 = [{"id": f"p{i}", "platform": "mastodon", "author_id": "u", "text": f"acme first copy {i}",
              "created_at": z(day1 + dt.timedelta(hours=i))} for i in range(6)]
    rows2 = [{"id": f"p{i}", "platform": "mastodon", "author_id": "u", "text": f"acme second copy {i}",
              "created_at": z(day2 + dt.timedelta(hours=i))} for i in range(3)]
    same_time = [{"id": "tie", "platform": "mastodon", "author_id": "u", "text": t, "created_at": z(day1)} for t in ("acme x", "acme y")]
    export.put("e1.jsonl", "".join(json.dumps(r) + "\n" for r in rows1 + same_time[:1]).encode())
    export.put("e2.jsonl", "".join(json.dumps(r) + "\n" for r in rows2 + same_time[1:]).encode())
    tables = [posts, post_images]

    def run(order: list[dt.datetime], force_again: dt.datetime | None = None) -> dict[str, set[Any]]:
        ctx = make_ctx(cfg(path=export.path), backend)
        for start in order:
            ingest_window(ctx, "arch", start, start + dt.timedelta(days=1))
        if force_again is not None:
            ingest_window(ctx, "arch", force_again, force_again + dt.timedelta(days=1), force=True)
        texts = {r.external_id: r.text for r in stored(ctx).values()}
        assert all(texts[f"p{i}"] == f"acme second copy {i}" for i in range(3)), texts  # the later copy
        assert all(texts[f"p{i}"] == f"acme first copy {i}" for i in range(3, 6))
        return snapshot(ctx, tables, lake=False)

    forwards = run([day1, day2])
    backwards = run([day2, day1])
    forced = run([day2, day1], force_again=day1)
    forced_fwd = run([day1, day2], force_again=day1)
    assert forwards == backwards == forced == forced_fwd
    tally.rows(4 * len(forwards["posts"]))
