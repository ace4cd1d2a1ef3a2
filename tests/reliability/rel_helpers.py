"""Shared helpers for the reliability suite: the tally, the bad-input corpus, private targets,
generated hostile payloads, table snapshots and child processes to kill.

The tally is module state read by `conftest.pytest_terminal_summary`: each test reports the
faults it injected, the bad inputs it tried and the rows it compared (and lost); faults of a
test that passed count as survived. Under pytest-xdist each worker sends its tally to the
controller, which prints the sum (tests/conftest.py).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import create_engine, event, text

DATA = Path(__file__).resolve().parents[1] / "data" / "bad"
DAY = dt.datetime(2026, 10, 2, tzinfo=dt.UTC)
END = DAY + dt.timedelta(days=1)


# --- the tally ---------------------------------------------------------------------------------


class Tally:
    """Suite-wide counters; `current` holds what the running test did until it ends."""

    def __init__(self) -> None:
        self.totals: Counter[str] = Counter()
        self.current: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.outcomes: Counter[str] = Counter()

    def fault(self, kind: str, n: int = 1) -> None:
        self.current["faults"] += n
        self.kinds[kind] += n

    def bad_input(self, outcome: str, n: int = 1) -> None:
        self.current["bad_inputs"] += n
        self.outcomes[outcome] += n

    def rows(self, compared: int, lost: int = 0) -> None:
        self.current["rows_compared"] += compared
        self.current["rows_lost"] += lost

    def secret_scan(self, values: int, scanned_bytes: int, found: int) -> None:
        self.current["secret_values"] += values
        self.current["secret_bytes"] += scanned_bytes
        self.current["secrets_found"] += found

    def end_test(self, passed: bool) -> None:
        cur = self.current
        for k in ("secret_values", "secret_bytes", "secrets_found"):
            self.totals[k] += cur[k]
        self.totals["faults"] += cur["faults"]
        self.totals["bad_inputs"] += cur["bad_inputs"]
        self.totals["rows_compared"] += cur["rows_compared"]
        self.totals["rows_lost"] += cur["rows_lost"]
        if passed:
            self.totals["survived"] += cur["faults"]
            self.totals["bad_inputs_handled"] += cur["bad_inputs"]
        self.totals["tests_passed" if passed else "tests_failed"] += 1
        self.current = Counter()

    def dump(self) -> dict[str, dict[str, int]]:
        """The finished tests' counters, as plain dicts (what a pytest-xdist worker sends back)."""
        return {"totals": dict(self.totals), "kinds": dict(self.kinds), "outcomes": dict(self.outcomes)}

    def merge(self, dumped: dict[str, dict[str, int]]) -> None:
        """Add another process's `dump()` (the xdist controller sums its workers' tallies)."""
        self.totals.update(dumped["totals"])
        self.kinds.update(dumped["kinds"])
        self.outcomes.update(dumped["outcomes"])

    def lines(self) -> list[str]:
        t = self.totals
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(self.kinds.items()))
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(self.outcomes.items()))
        return [
            f"faults injected: {t['faults']}  survived: {t['survived']}",
            f"  by kind: {kinds or 'none'}",
            f"bad inputs tried: {t['bad_inputs']}  handled as expected: {t['bad_inputs_handled']}"
            f"  (corpus: {len(load_cases())} cases in tests/data/bad/cases.json, each run per backend)",
            f"  outcomes: {outcomes or 'none'}",
            f"rows compared against uninterrupted runs: {t['rows_compared']}  rows lost: {t['rows_lost']}",
            f"secrets grepped for: {t['secret_values']} values in {t['secret_bytes']:,} bytes written  found: {t['secrets_found']}",
            f"reliability tests: {t['tests_passed']} passed, {t['tests_failed']} failed",
        ]


TALLY = Tally()


# --- the corpus --------------------------------------------------------------------------------


def load_cases(kind: str | None = None) -> list[dict[str, Any]]:
    cases = json.loads((DATA / "cases.json").read_text())["cases"]
    return [c for c in cases if kind is None or c["kind"] == kind]


def payload(case: dict[str, Any]) -> bytes:
    """The case's bytes: its committed file, or generated now (big or binary payloads)."""
    if "payload" in case:
        return (DATA / case["payload"]).read_bytes()
    return GENERATORS[case["generate"]]()


def _jpeg(w: int = 64, h: int = 48, color: tuple[int, int, int] = (200, 30, 30), quality: int = 90) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (w, h), color).save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def jpeg(seed: int = 0) -> bytes:
    """A small valid JPEG, different per seed."""
    return _jpeg(color=(seed * 37 % 256, 90, 200 - seed % 100))


def _noisy_jpeg(size: int = 128) -> bytes:
    import random

    rnd = random.Random(1)
    im = Image.frombytes("RGB", (size, size), bytes(rnd.getrandbits(8) for _ in range(size * size * 3)))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_claiming(w: int, h: int) -> bytes:
    """A ~100-byte PNG whose header claims w x h pixels (a decompression bomb's shape)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + _chunk(b"IEND", b"")


def _png_bad_crc() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (1, 2, 3)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    at = data.index(b"IDAT") + 8
    data[at : at + 6] = b"\xde\xad\xbe\xef\x00\x01"
    return bytes(data)


def _jpeg_claiming(w: int, h: int) -> bytes:
    """A valid small JPEG with its SOF0 frame size rewritten to w x h."""
    data = bytearray(_jpeg(16, 16))
    at = data.index(b"\xff\xc0") + 5
    data[at : at + 4] = struct.pack(">HH", h, w)
    return bytes(data)


def _gif_claiming(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (4, 4), 1).save(buf, "GIF")
    data = bytearray(buf.getvalue())
    data[6:10] = struct.pack("<HH", w, h)
    return bytes(data)


def _row(**kw: Any) -> str:
    row = {"author_id": "u1", "text": "acme", "created_at": "2026-10-02T06:00:00Z", **kw}
    return json.dumps(row)


GENERATORS = {
    "text_10mb": lambda: _row(id="big-text", text="acme " + "x" * (10 * 1024 * 1024)).encode() + b"\n",
    "deep_nesting": lambda: (
        '{"id": "deep", "author_id": "u1", "created_at": "2026-10-02T06:00:00Z", "x": ' + "[" * 100_000 + "]" * 100_000 + "}\n"
    ).encode(),
    "line_20mb_junk": lambda: b'{"created_at": "2026-10-02T07:00:00Z", "id": "junk", "x": "' + b"A" * (20 * 1024 * 1024) + b"\n",
    "content_10mb": lambda: json.dumps({"content": "<p>acme " + "y" * (10 * 1024 * 1024) + "</p>"}).encode(),
    "truncated_jpeg": lambda: _noisy_jpeg()[: len(_noisy_jpeg()) // 2],
    "png_50000x50000": lambda: png_claiming(50_000, 50_000),
    "png_bad_crc": _png_bad_crc,
    "bytes_300k": lambda: b"\xff\xd8\xff\xe0" + b"\x00" * 300_000,
    "jpeg_65500x65500": lambda: _jpeg_claiming(65_500, 65_500),
    "gif_65535x65535": lambda: _gif_claiming(65_535, 65_535),
    "not_found": lambda: b"",
}


# --- private targets ---------------------------------------------------------------------------


class CountingServer:
    """A tiny HTTP server that answers every GET with a valid JPEG and counts the hits.

    Bound to a private address the pipeline must never fetch from (127.0.0.2, ::1, or
    127.0.0.1 reached by a name that is not on the allow-list)."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.hits: list[str] = []
        body = _jpeg(8, 8)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *_a: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                outer.hits.append(self.path)
                self.send_response(200)
                self.send_header("Content-Type", "image/jpeg")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        family = socket.AF_INET6 if ":" in host else socket.AF_INET

        class Server(ThreadingHTTPServer):
            address_family = family
            daemon_threads = True

        self.httpd = Server((host, 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    @property
    def port(self) -> int:
        return self.httpd.server_address[1]

    def __enter__(self) -> CountingServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@contextlib.contextmanager
def private_targets() -> Iterator[dict[str, CountingServer]]:
    with CountingServer("127.0.0.2") as p4, CountingServer("127.0.0.1") as p1, CountingServer("::1") as p6:
        yield {"p4": p4, "p1": p1, "p6": p6}


# --- snapshots ---------------------------------------------------------------------------------

VOLATILE = {"id", "ingested_at", "updated_at", "created_at", "computed_at", "marked_at", "scored_at", "attempts",
            "started_at", "finished_at", "acquired_at", "expires_at", "owner"}


def table_rows(ctx: Any, table: Any, *, drop: set[str] = VOLATILE, round_floats: int | None = None) -> set[tuple[Any, ...]]:
    """A table's rows as a set of tuples, without the volatile columns; posts' ids resolved to keys."""
    from sqlalchemy import select

    from pipeline.schema import posts

    with ctx.engine.connect() as conn:
        keys = {r.id: (r.platform, r.external_id) for r in conn.execute(select(posts.c.id, posts.c.platform, posts.c.external_id))}
        cols = [c for c in table.c if c.name not in drop or c.name == "post_id"]
        out = set()
        for r in conn.execute(select(*cols)):
            vals = []
            for c, v in zip(cols, r, strict=True):
                if c.name == "post_id":
                    v = keys.get(v)
                elif isinstance(v, float) and round_floats is not None:
                    v = round(v, round_floats)
                elif isinstance(v, dict | list):
                    v = json.dumps(v, sort_keys=True)
                vals.append(v)
            out.add(tuple(vals))
    return out


def snapshot(ctx: Any, tables: list[Any], round_floats: int | None = 4, lake: bool = True) -> dict[str, set[Any]]:
    out: dict[str, set[Any]] = {t.name: table_rows(ctx, t, round_floats=round_floats) for t in tables}
    if lake:
        out["lake"] = set(ctx.store.list(""))
    return out


def compare(tally: Tally, want: dict[str, set[Any]], got: dict[str, set[Any]]) -> list[str]:
    """Differences between two snapshots (empty = equal); counts compared and lost rows."""
    problems = []
    compared = lost = 0
    for name in want:
        a, b = want[name], got.get(name, set())
        compared += len(a)
        lost += len(a - b)
        if a != b:
            problems.append(f"{name}: missing {sorted(map(str, a - b))[:3]} extra {sorted(map(str, b - a))[:3]}")
    tally.rows(compared, lost)
    return problems


# --- child processes ---------------------------------------------------------------------------


def ctx_env(ctx: Any, **extra: str) -> dict[str, str]:
    s = ctx.settings
    env = {**os.environ, "BRANDMON_DATABASE_URL": s.database_url, "BRANDMON_STORAGE_URL": s.storage_url,
           "BRANDMON_HOME": str(s.home), "BRANDMON_AUTHOR_SALT": s.author_salt.get(), "TF_CPP_MIN_LOG_LEVEL": "2", **extra}
    if s.config_path:
        env["BRANDMON_CONFIG"] = str(s.config_path)
    if s.s3_endpoint_url:
        env["BRANDMON_S3_ENDPOINT_URL"] = s.s3_endpoint_url
    return env


def spawn(ctx: Any, code: str, *args: str, **env: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], env=ctx_env(ctx, **env),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def kill_when(proc: subprocess.Popen, ready: Any, timeout: float = 120, settle: float = 0.0) -> bool:
    """SIGKILL `proc` once `ready()` is true (True) or when it exits first (False)."""
    deadline = time.monotonic() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                assert proc.returncode == 0, f"the child failed (exit {proc.returncode}): {err[-1500:]}"
                return False
            if time.monotonic() > deadline:
                raise AssertionError("the child never reached the kill point")
            time.sleep(0.02)
        if settle:
            time.sleep(settle)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(30)
        return proc.returncode == -signal.SIGKILL  # False: it had already finished
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


# --- a Postgres + S3 context that outlives one test -----------------------------------------------


@contextlib.contextmanager
def shared_pg_ctx(config: dict[str, Any], pg_admin_url: str, s3_endpoint: str, root: Path) -> Iterator[Any]:
    """Like the `make_ctx(config, "postgres")` fixture, for module-scoped references."""
    import uuid

    import yaml

    from pipeline.context import Context
    from pipeline.database import upgrade
    from pipeline.settings import load_settings
    from tests.support.services import create_bucket, create_database, drop_database

    db_name, bucket = f"t_{uuid.uuid4().hex[:12]}", f"lake-{uuid.uuid4().hex[:12]}"
    (root / "brandmon.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    create_bucket(s3_endpoint, bucket)
    env = {"BRANDMON_HOME": str(root / "var"), "BRANDMON_AUTHOR_SALT": "test-salt-5f1c0ffee",
           "BRANDMON_CONFIG": str(root / "brandmon.yaml"), "BRANDMON_DATABASE_URL": create_database(pg_admin_url, db_name),
           "BRANDMON_STORAGE_URL": f"s3://{bucket}/lake", "BRANDMON_S3_ENDPOINT_URL": s3_endpoint}
    ctx = Context(load_settings(env=env))
    upgrade(ctx.engine)
    try:
        yield ctx
    finally:
        ctx.close()
        drop_database(pg_admin_url, db_name)


# --- fault injectors (object-store faults: tests.support.services.S3FaultProxy) -------------------


@contextlib.contextmanager
def drop_connection_on(ctx: Any, needle: str, nth: int = 1) -> Iterator[list[int]]:
    """pg_terminate_backend() this engine's connection, from another one, when it is about to
    run its `nth` statement containing `needle` (inside the job's open transaction)."""
    admin = create_engine(ctx.settings.database_url, isolation_level="AUTOCOMMIT")
    seen, fired = [0], []

    def before(conn, cursor, statement, params, context, executemany):  # type: ignore[no-untyped-def]
        if needle in statement and not fired:
            seen[0] += 1
            if seen[0] >= nth:
                pid = conn.connection.dbapi_connection.get_backend_pid()
                with admin.connect() as a:
                    a.execute(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
                fired.append(pid)
                time.sleep(0.2)

    event.listen(ctx.engine, "before_cursor_execute", before)
    try:
        yield fired
    finally:
        event.remove(ctx.engine, "before_cursor_execute", before)
        admin.dispose()
