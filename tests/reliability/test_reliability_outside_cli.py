"""What an outside tester found after the issue-11 fixes (CLI and operations), through the real
`brandmon` command: each test failed on the code before its fix.

Secrets that still leaked (a password with an unencoded `@`, a mistyped database URL, the
Basic-auth form of a webhook's userinfo), files written through a symlink planted in an
export folder, a YAML nested too deep, and a config listing none of the stored brands.
"""

from __future__ import annotations

import base64
import http.server
import os
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rel_helpers import ctx_env
from sqlalchemy import select, text
from test_reliability_hostile_cli import CATALOGUE, add_posts, brandmon, one_line_failure

from pipeline.schema import alert_ledger

SECRET = "Zq7OUTSIDE"


def _bare_env(tmp_path: Path, **variables: str) -> dict[str, str]:
    env = {**os.environ, "BRANDMON_HOME": str(tmp_path / "var"), "BRANDMON_AUTHOR_SALT": "s" * 16,
           "BRANDMON_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "BRANDMON_STORAGE_URL": (tmp_path / "lake").as_uri(),
           **variables}
    env.pop("BRANDMON_CONFIG", None)
    return env


# --- secrets ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("url", [
    f"postgresql://brandmon:pa@{SECRET}/wo#rd@127.0.0.1:1/db",  # an `@` then `/`: the tail became the host
    f"postgresql+psycopg2://brandmon:p#ss@{SECRET}/rd?x=1%@127.0.0.1:1/db",
    f"postgresql:/brandmon:{SECRET}@127.0.0.1:1/db",  # one slash missing
    f"postgresql//brandmon:{SECRET}@127.0.0.1:1/db",
    f"postgresql+psycopg2:://brandmon:{SECRET}@127.0.0.1:1/db",
    f"brandmon:{SECRET}@127.0.0.1:1/db",  # no scheme at all
], ids=["at-then-slash", "hash-at-query", "one-slash", "no-colon", "double-colon", "no-scheme"])
def test_a_database_url_pasted_carelessly_never_shows_its_password(url, tmp_path, tally):
    """(Before: `status` and every command printed the password's tail, re-encoded by SQLAlchemy
    (`bm:***@Zq7OUTSIDE%2Fwo%23rd...`) or the whole mistyped URL with its password.)"""
    env = _bare_env(tmp_path, BRANDMON_DATABASE_URL=url)
    out = ""
    for args in (["status"], ["-vv", "status"], ["db", "upgrade"], ["trends", "--brand", "Acme", "--start", "2026-10-01",
                                                                     "--end", "2026-10-02"]):
        proc = brandmon(env, *args, timeout=90)
        out += proc.stdout + proc.stderr
        if args[0] != "-vv":
            assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
            assert proc.returncode != 0, proc.stdout
    tally.secret_scan(1, len(out), out.count(SECRET))
    assert SECRET not in out, out[-3000:]
    assert "***" in out


class _EchoAuth(http.server.BaseHTTPRequestHandler):
    """A receiver that refuses and echoes the Authorization header back, as debug endpoints do."""

    def do_POST(self) -> None:  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        body = f"bad credentials: {self.headers.get('Authorization')}".encode()
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_a: Any) -> None:
        pass


@pytest.fixture
def echo_server() -> Iterator[int]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _EchoAuth)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()


def test_a_webhook_echoing_basic_auth_never_shows_the_password(make_ctx, backend, echo_server, tally):
    """A webhook URL with userinfo is sent as `Authorization: Basic base64(user:password)`; a
    receiver that echoes it must not put that form in `alerts test`, the logs, the ledger or
    `alerts list`. (Before: `Basic dXNlcjpa...` was shown and stored as the alert's error.)"""
    config = {**CATALOGUE, "network": {"allowed_private_hosts": ["127.0.0.1"]}, "alerts": {
        "destinations": {"hook": {"kind": "webhook", "url_env": "HOOK_URL"}},
        "rules": [{"name": "sov", "kind": "share_of_voice", "brand": "Acme", "above": 0.1, "min_posts": 1}],
        "max_age_days": 100000, "retries": 1, "max_total_s": 10, "timeout_s": 5}}
    ctx = make_ctx(config, backend)
    add_posts(ctx)
    basic = base64.b64encode(f"hookuser:{SECRET}".encode()).decode()
    env = ctx_env(ctx, HOOK_URL=f"http://hookuser:{SECRET}@127.0.0.1:{echo_server}/hook")
    out = ""
    for args in (["-vv", "alerts", "test", "sov"], ["-v", "aggregate"], ["alerts", "list"],
                 ["alerts", "list", "--format", "json"]):
        proc = brandmon(env, *args)
        out += proc.stdout + proc.stderr
    with ctx.engine.connect() as conn:
        errors = [r.last_error or "" for r in conn.execute(select(alert_ledger.c.last_error))]
    assert errors and all("HTTP 401" in e for e in errors), errors
    out += "".join(errors)
    assert "HTTP 401: bad credentials: ***" in out, out[-3000:]
    tally.secret_scan(2, len(out), out.count(SECRET) + out.count(basic))
    assert SECRET not in out and basic not in out, out[-3000:]


# --- files written out of place -------------------------------------------------------------------


def _queued_ctx(make_ctx: Any, backend: str) -> Any:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "aggregate"))
    from test_aggregate_gallery import gallery_ctx

    return gallery_ctx(make_ctx, backend)  # one image (C) in the review queue


def test_review_export_never_writes_through_a_planted_symlink(make_ctx, backend, tmp_path, tally):
    """A review folder is the labeller's: `manifest.csv`, `images/` or an image name planted as
    symlinks to files outside are refused, and nothing outside changes. (Before: the manifest
    was written through its symlink, overwriting the file it pointed at.)"""
    ctx = _queued_ctx(make_ctx, backend)
    from agg_helpers import sha

    env = ctx_env(ctx)
    victim = tmp_path / "victim.txt"
    outside = tmp_path / "outside"
    outside.mkdir()
    cases = {
        "manifest": lambda d: (d / "manifest.csv").symlink_to(victim),
        "images-folder": lambda d: (d / "images").symlink_to(outside, target_is_directory=True),
    }
    for name, plant in cases.items():
        victim.write_text("precious\n")
        folder = tmp_path / f"review-{name}"
        folder.mkdir()
        plant(folder)
        proc = brandmon(env, "review", "export", "--out", str(folder))
        one_line_failure(proc, "leads outside", "symlink")
        assert victim.read_text() == "precious\n" and list(outside.iterdir()) == [], name
        tally.bad_input("refused")
    # an image name planted as a dangling symlink: that image is skipped, the rest exported
    folder = tmp_path / "review-dangling"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / f"{sha('C')}.jpg").symlink_to(outside / "created.jpg")
    proc = brandmon(env, "review", "export", "--out", str(folder))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert list(outside.iterdir()) == [], "an image was written outside the review folder"
    tally.bad_input("refused")
    # the same export into a clean folder works
    clean = tmp_path / "review-clean"
    assert brandmon(env, "review", "export", "--out", str(clean)).returncode == 0
    assert (clean / "images" / f"{sha('C')}.jpg").is_file() and (clean / "manifest.csv").is_file()


# --- one line, not a traceback --------------------------------------------------------------------


@pytest.mark.parametrize("doc", ["brands: " + "[" * 100_000 + "]" * 100_000, "brands:" + "\n  - x: " * 1 + "{a: " * 50_000 + "}" * 50_000],
                         ids=["flow-lists", "flow-maps"])
def test_a_config_nested_too_deep_is_one_line(doc, tmp_path, tally):
    """(Before: `internal error: RecursionError ... (a bug)`, exit 70.)"""
    cfg = tmp_path / "deep.yaml"
    cfg.write_text(doc)
    env = {**_bare_env(tmp_path), "BRANDMON_CONFIG": str(cfg)}
    for args in (["status"], ["aggregate"]):
        one_line_failure(brandmon(env, *args), "malformed YAML", "nested too deeply")
        tally.bad_input("clear error")


# --- a configuration never deletes data by accident ----------------------------------------------


def test_a_config_listing_none_of_the_stored_brands_is_refused(make_ctx, backend, tmp_path, tally):
    """BRANDMON_CONFIG pointing at another deployment's file (no brand in common) is refused like
    an empty one; editing the catalogue (one brand removed, one added) still works.
    (Before: the stored brands were replaced and a restated range deleted all their counts.)"""
    from test_reliability_hostile_cli import count

    from pipeline.schema import brands, mention_daily, text_mentions

    ctx = make_ctx(CATALOGUE, backend)
    add_posts(ctx)
    env = ctx_env(ctx)
    assert brandmon(env, "aggregate", "--quiet").returncode == 0
    tables = (brands, text_mentions, mention_daily)
    before = [count(ctx, t) for t in tables]
    other = tmp_path / "other.yaml"
    other.write_text("brands:\n  - {name: Foo, keywords: [foo]}\n  - {name: Bar, keywords: [bar]}\n")
    for args in (["aggregate", "--quiet"], ["aggregate", "--start", "2026-10-01", "--end", "2026-10-06", "--quiet"]):
        proc = brandmon({**env, "BRANDMON_CONFIG": str(other)}, *args)
        one_line_failure(proc, "lists none of the 2 brand(s) the database holds (Acme, Globex)", "--allow-empty-catalogue")
        assert [count(ctx, t) for t in tables] == before
        tally.bad_input("refused")
    edited = tmp_path / "edited.yaml"
    edited.write_text("brands:\n  - {name: acme, keywords: [acme]}\n  - {name: Foo, keywords: [foo]}\n")
    proc = brandmon({**env, "BRANDMON_CONFIG": str(edited)}, "aggregate", "--quiet")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = brandmon({**env, "BRANDMON_CONFIG": str(other)}, "aggregate", "--quiet", "--allow-empty-catalogue")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with ctx.engine.connect() as conn:
        assert sorted(r.name for r in conn.execute(brands.select())) == ["Bar", "Foo"]  # replaced on purpose


def test_names_too_long_for_their_columns_are_one_line_errors_naming_them(make_ctx, backend, tmp_path, tally):
    """A 300-character brand, product or source name and a 5,000-character BRANDMON_LOCK_HOST:
    one line naming the setting, the same on both backends. (Before: Postgres answered `value
    too long for type character varying(200)` with advice to check the URL and privileges;
    SQLite stored the name.)"""
    ctx = make_ctx(CATALOGUE, backend)
    env = ctx_env(ctx)
    long = "A" * 300
    docs = {
        "brands[0].name is longer than 200": f"brands:\n  - {{name: {long}, keywords: [a]}}\n",
        "brands[0].products[0].name is longer than 200":
            f"brands:\n  - {{name: Acme, keywords: [a], products: [{{name: {long}}}]}}\n",
        "sources[0].name is longer than 100": f"sources:\n  - {{name: {'s' * 300}, kind: synthetic}}\n",
    }
    for i, (needle, doc) in enumerate(docs.items()):
        cfg = tmp_path / f"long{i}.yaml"
        cfg.write_text(doc)
        one_line_failure(brandmon({**env, "BRANDMON_CONFIG": str(cfg)}, "aggregate", "--quiet"), needle)
        tally.bad_input("clear error")
    proc = brandmon({**env, "BRANDMON_LOCK_HOST": "h" * 5000}, "aggregate", "--quiet")
    one_line_failure(proc, "BRANDMON_LOCK_HOST is longer than 100 characters")
    tally.bad_input("clear error")
    with ctx.engine.connect() as conn:
        assert [r.name for r in conn.execute(text("SELECT name FROM brands"))] == []  # nothing stored


def test_a_review_manifest_saved_by_a_spreadsheet_is_read_or_refused_in_one_line(make_ctx, backend, tmp_path, tally):
    """A manifest saved as "CSV UTF-8" (byte-order mark) keeps its labels; one in another encoding
    or without the `sha256` header is one line. (Before: the BOM hid every row, so labels were
    silently dropped ("0 labelled, 0 still unlabelled"); Latin-1 was `internal error:
    UnicodeDecodeError`; a foreign header was silently "0 labelled".)"""
    from rel_helpers import jpeg

    ctx = make_ctx(CATALOGUE, backend)
    env = ctx_env(ctx)
    folder = tmp_path / "review"
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "a.jpg").write_bytes(jpeg(1))
    manifest = folder / "manifest.csv"
    manifest.write_bytes("sha256,file,model_version,suggested_class,score,label\r\n".encode("utf-8-sig")
                         + f"{'a' * 64},a.jpg,m1,Acme,0.5,Acme\r\n".encode())
    into = tmp_path / "training"
    proc = brandmon(env, "review", "import", str(folder), "--into", str(into))
    assert proc.returncode == 0 and "1 labelled (1 new files)" in proc.stdout, (proc.stdout, proc.stderr[-2000:])
    assert (into / "Acme" / "a.jpg").is_file()
    tally.bad_input("kept")
    for raw, needle in ((b"sha256,file,label\r\n" + "é".encode("latin-1") * 3 + b",a.jpg,Acme\r\n", "not UTF-8"),
                        (b"image,name\r\n1,2\r\n", "no `sha256` column")):
        manifest.write_bytes(raw)
        one_line_failure(brandmon(env, "review", "import", str(folder), "--into", str(into)), needle)
        tally.bad_input("clear error")


def test_sales_at_the_ends_of_the_calendar_are_one_line_not_a_hang(make_ctx, backend, tmp_path, tally):
    """`demand` with a sales row dated 9999-12-31 or 0001-01-01 (a CSV, or a table in the
    database): one line, at once. (Before: it built a daily series across ten thousand years
    and ran until killed, growing past 800 MB.)"""
    ctx = make_ctx(CATALOGUE, backend)
    add_posts(ctx)
    env = ctx_env(ctx)
    assert brandmon(env, "aggregate", "--quiet").returncode == 0
    good = "".join(f"2026-10-{d:02d},{10 + d}\n" for d in range(1, 7))
    for i, extra in enumerate(("9999-12-31,5\n", "0001-01-01,5\n")):
        sales = tmp_path / f"sales{i}.csv"
        sales.write_text("date,units\n" + good + extra)
        one_line_failure(brandmon(env, "demand", "--brand", "Acme", "--sales", str(sales), timeout=60),
                         "outside the days brandmon handles")
        tally.bad_input("clear error")
    with ctx.engine.begin() as conn:
        conn.execute(text("CREATE TABLE my_sales (date DATE, units INTEGER)"))
        conn.execute(text("INSERT INTO my_sales VALUES ('2026-10-01', 3), ('9999-12-31', 4)"))
    one_line_failure(brandmon(env, "demand", "--brand", "Acme", "--sales-table", "my_sales", timeout=60),
                     "outside the days brandmon handles")
    tally.bad_input("clear error")


@pytest.mark.parametrize("args", [
    ["review", "export", "--out", "{tmp}/review", "--limit", "-1"],
    ["detect", "--limit", "-5"],
    ["train", "--data", "{tmp}/data", "--epochs", "0"],
    ["train", "--data", "{tmp}/data", "--epochs", "-1"],
    ["train", "--data", "{tmp}/data", "--input-size", "100000"],
    ["train", "--data", "{tmp}/data", "--target-precision", "nan"],
    ["train", "--data", "{tmp}/data", "--time-budget", "-1"],
], ids=lambda a: " ".join(a[:1] + a[-2:]))
def test_numeric_options_out_of_range_are_refused_before_any_work(make_ctx, backend, args, tmp_path, tally):
    """Bounds the train DAG's params already had, on the command line too. (Before: `review
    export --limit -1` exported every queued image on SQLite and blamed the URL and privileges
    on Postgres; `train --epochs 0/-1`, `--time-budget -1`, `--target-precision nan` trained
    and registered a model; `--input-size 100000` was `internal error: MemoryError`.)"""
    ctx = _queued_ctx(make_ctx, backend)
    (tmp_path / "data").mkdir()
    proc = brandmon(ctx_env(ctx), *[a.replace("{tmp}", str(tmp_path)) for a in args], timeout=60)
    one_line_failure(proc, f"argument {args[-2]}")
    assert not (tmp_path / "review").exists()
    tally.bad_input("clear error")
