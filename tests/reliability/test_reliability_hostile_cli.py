"""Hostile and careless input through the real `brandmon` command (issue 11, CLI/ops classes).

One section per class: files written out of place (1), a missing catalogue deleting data (4),
secrets shown (8), tracebacks instead of one line (9), SIGKILLed runs left `running` (10), plus
cases of the same kinds found while fixing them. Each command runs as a subprocess and is judged
by its exit code, its stderr (one line, no "Traceback") and what it left on disk and in the
database. Where data is stored, tests run on SQLite + local folder and on Postgres + S3.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from rel_helpers import DAY, END, ctx_env, jpeg
from sqlalchemy import func, select, text

from pipeline.schema import brands, mention_daily, quarantine, runs, text_mentions

BRANDMON = str(Path(sys.executable).parent / "brandmon")
CATALOGUE = {"brands": [{"name": "Acme", "keywords": ["acme"], "products": [{"name": "Acme One", "keywords": ["acme one"]}]},
                        {"name": "Globex", "keywords": ["globex"]}]}


def brandmon(env: dict[str, str], *args: str, timeout: float = 120, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BRANDMON, *args], env=env, capture_output=True, text=True, timeout=timeout, **kw)


def one_line_failure(proc: subprocess.CompletedProcess[str], *needles: str) -> str:
    """The command failed with exactly one line on stderr, no traceback; returns that line."""
    err = proc.stderr.strip()
    assert proc.returncode not in (0, 1), (proc.returncode, proc.stderr[-2000:])  # 1 = an uncaught traceback
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err
    return err


def env_of(ctx: Any, **extra: str) -> dict[str, str]:
    return ctx_env(ctx, **extra)


def count(ctx: Any, table: Any) -> int:
    with ctx.engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar_one()


def add_posts(ctx: Any, days: int = 6) -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "aggregate"))
    from agg_helpers import FakePost, ts
    from agg_helpers import add_posts as add

    posts, pid = [], 1
    for i in range(days):
        day = dt.date(2026, 10, 1) + dt.timedelta(days=i)
        for k in range(4):
            posts.append(FakePost(pid, f"p{pid}", ts(day, k), "acme one rocks" if k % 2 else "globex news", author=f"u{k}"))
            pid += 1
    with ctx.engine.begin() as conn:
        add(conn, posts)


# --- class 1: files written out of place ---------------------------------------------------------


def _review_folder(root: Path, rows: list[dict[str, str]]) -> Path:
    folder = root / "review"
    (folder / "images").mkdir(parents=True)
    for i, row in enumerate(rows):
        name = row["file"]
        if "/" not in name and "\\" not in name and name not in ("", ".", "..") and "\x00" not in name:
            (folder / "images" / name).write_bytes(jpeg(i))
    with (folder / "manifest.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=["sha256", "file", "model_version", "suggested_class", "score", "label"])
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({"sha256": f"{i:064x}", "model_version": "m1", "suggested_class": "Acme", "score": "0.5", **row})
    return folder


def test_review_import_refuses_rows_that_would_write_outside(make_ctx, backend, tmp_path, tally):
    """Labels and file names of an edited manifest cannot write (or read) outside their folders:
    `..`, absolute paths, NUL, `.`, backslashes, drive letters, a symlinked label folder. The
    good rows still go in. (Today: the `../../x` label wrote outside the training folder.)"""
    ctx = make_ctx(CATALOGUE, backend)
    outside = tmp_path / "outside"
    outside.mkdir()
    into = tmp_path / "training"
    into.mkdir()
    (into / "Linked").symlink_to(outside, target_is_directory=True)  # a label folder pointing out
    (tmp_path / "secret.jpg").write_bytes(b"not for training")
    hostile = [
        {"file": "a.jpg", "label": "../../outside"},
        {"file": "b.jpg", "label": str(outside)},
        {"file": "c.jpg", "label": ".."},
        {"file": "d.jpg", "label": "."},
        {"file": "e.jpg", "label": "Ac\x00me"},
        {"file": "f.jpg", "label": "..\\..\\outside"},
        {"file": "g.jpg", "label": "C:evil"},
        {"file": "h.jpg", "label": "Linked"},
        {"file": "../../secret.jpg", "label": "Acme"},
        {"file": str(tmp_path / "secret.jpg"), "label": "Acme"},
        {"file": "..", "label": "Acme"},
    ]
    good = [{"file": "good.jpg", "label": "Acme"}, {"file": "empty.jpg", "label": ""}]
    folder = _review_folder(tmp_path, hostile + good)
    proc = brandmon(env_of(ctx), "review", "import", str(folder), "--into", str(into))
    tally.bad_input("refused", len(hostile))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    refused = [line for line in proc.stderr.splitlines() if line.startswith("refused row")]
    assert len(refused) == len(hostile), proc.stderr
    assert "1 labelled (1 new files), 1 still unlabelled" in proc.stdout
    assert sorted(p.name for p in (into / "Acme").iterdir()) == ["good.jpg"]
    assert list(outside.iterdir()) == []  # nothing reached the folder outside
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*.jpg") if "review" not in p.parts)
    assert written == ["secret.jpg", "training/Acme/good.jpg"], written


def test_lake_keys_stay_inside_the_root_even_through_symlinks(tmp_path, tally):
    """The local lake refuses keys that are absolute, hold `..`, NUL, backslashes or drive
    letters, and keys whose folder is a symlink out of the lake. (Today: the symlink case wrote
    outside the lake.)"""
    from pipeline.errors import InvalidKeyError
    from pipeline.objectstore import LocalStore

    root, outside = tmp_path / "lake", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "raw").symlink_to(outside, target_is_directory=True)
    store = LocalStore(root)
    bad = ["../x", "/etc/x", "a/../../x", "a\\..\\x", "C:/x", "a/\x00b", "raw/source=x/part.gz", "", "a//b", "./a"]
    for key in bad:
        with pytest.raises(InvalidKeyError):
            store.put(key, b"data")
    tally.bad_input("refused", len(bad))
    assert list(outside.iterdir()) == []
    store.put("reports/daily/2026-10-02.html", b"ok")  # a plain key still works
    assert store.get("reports/daily/2026-10-02.html") == b"ok"


def test_training_data_cannot_name_paths_or_read_outside(tmp_path, tally):
    """A class name from annotations that is a path is refused; an image symlinked from outside
    the training folder is not read."""
    from pipeline.detector.data import DataError, load_boxes, load_folders

    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "private.jpg").write_bytes(jpeg(1))
    data = tmp_path / "data"
    (data / "Acme").mkdir(parents=True)
    (data / "Acme" / "ok.jpg").write_bytes(jpeg(2))
    (data / "Acme" / "leak.jpg").symlink_to(outside / "private.jpg")
    found = load_folders(data)
    assert [s.path.name for s in found] == ["ok.jpg"]
    boxes = tmp_path / "boxes"
    boxes.mkdir()
    (boxes / "x.jpg").write_bytes(jpeg(3))
    (boxes / "x.json").write_text(json.dumps({"xmin": 1, "ymin": 1, "xmax": 9, "ymax": 9, "classtxt": "../../etc"}))
    with pytest.raises(DataError, match="class name '../../etc'"):
        load_boxes(boxes)
    tally.bad_input("refused", 2)


# --- class 4: a missing or empty catalogue never deletes data -----------------------------------


def _aggregate_tables(ctx: Any) -> tuple[int, int, int]:
    return count(ctx, brands), count(ctx, text_mentions), count(ctx, mention_daily)


def test_aggregate_without_config_keeps_the_stored_catalogue(make_ctx, backend, tmp_path, tally):
    """No BRANDMON_CONFIG: the catalogue the database holds is kept and used (INFO line). A
    config with no brands is refused with one line naming the flag; the flag really removes.
    (Today: both runs deleted every brand, text mention and mention_daily row.)"""
    ctx = make_ctx(CATALOGUE, backend)
    add_posts(ctx)
    env = env_of(ctx)
    first = brandmon(env, "aggregate", "--quiet")
    assert first.returncode == 0, first.stderr[-2000:]
    before = _aggregate_tables(ctx)
    assert before[0] == 2 and before[1] > 0 and before[2] > 0

    no_config = {k: v for k, v in env.items() if k != "BRANDMON_CONFIG"}
    for args in (["-v", "aggregate", "--quiet"], ["aggregate", "--start", "2026-10-01", "--end", "2026-10-06", "--quiet"]):
        proc = brandmon(no_config, *args)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert " 0 row(s) changed" in proc.stdout, proc.stdout
        assert _aggregate_tables(ctx) == before
    assert "BRANDMON_CONFIG is not set: aggregating with the catalogue the database holds (2 brand(s)" in \
        brandmon(no_config, "-v", "aggregate", "--quiet").stderr
    tally.bad_input("kept", 3)

    empty = tmp_path / "empty.yaml"
    for doc in ("sources: []\n", "brands: []\n", "brands:\n"):
        empty.write_text(doc)
        proc = brandmon({**env, "BRANDMON_CONFIG": str(empty)}, "aggregate", "--quiet")
        one_line_failure(proc, "lists no brands, but the database holds 2 (Acme, Globex)", "--allow-empty-catalogue")
        assert _aggregate_tables(ctx) == before
        tally.bad_input("refused")
    proc = brandmon({**env, "BRANDMON_CONFIG": str(empty)}, "aggregate", "--quiet", "--allow-empty-catalogue")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _aggregate_tables(ctx)[0] == 0  # removed on purpose


# --- class 8: secrets shown -----------------------------------------------------------------------

SECRET = "Zq9SEKRIT"


@pytest.mark.parametrize("variables", [
    {"BRANDMON_DATABASE_URL": f"postgresql://brandmon@127.0.0.1:1/db?password={SECRET}"},
    {"BRANDMON_DATABASE_URL": f"postgresql://brandmon@127.0.0.1:1/db?sslmode=disable&PassWord={SECRET}"},
    {"BRANDMON_DATABASE_URL": f"postgresql://brandmon:pa#{SECRET}@127.0.0.1:1/db"},
    {"BRANDMON_DATABASE_URL": f"postgresql://brandmon:p@/?{SECRET}@127.0.0.1:1/db"},
    {"BRANDMON_STORAGE_URL": "s3://bucket/lake", "BRANDMON_S3_ENDPOINT_URL": f"http://AKIAKEY:{SECRET}@127.0.0.1:1",
     "AWS_ACCESS_KEY_ID": "AKIAKEY", "AWS_SECRET_ACCESS_KEY": "other", "AWS_MAX_ATTEMPTS": "1"},
], ids=["query-password", "query-mixed-case", "hash-in-password", "at-slash-query-in-password", "s3-endpoint-userinfo"])
def test_status_and_errors_never_print_the_secret(variables, tmp_path, tally):
    """`status` (text and JSON), a failing command and -vv logs show no password or secret key.
    (Today: the query-string, `#` and S3-endpoint secrets were printed by `status`.)"""
    env = {**os.environ, "BRANDMON_HOME": str(tmp_path / "var"), "BRANDMON_AUTHOR_SALT": "s" * 16,
           "BRANDMON_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "BRANDMON_STORAGE_URL": (tmp_path / "lake").as_uri(),
           **variables}
    env.pop("BRANDMON_CONFIG", None)
    out = ""
    for args in (["status"], ["status", "--json"], ["-vv", "status"], ["aggregate", "--quiet"], ["-vv", "report", "--date", "2026-10-02"]):
        proc = brandmon(env, *args, timeout=90)
        assert "Traceback" not in proc.stderr or args[0] == "-vv", proc.stderr[-2000:]
        out += proc.stdout + proc.stderr
    tally.secret_scan(1, len(out), out.count(SECRET))
    assert SECRET not in out, out[-3000:]
    assert "***" in out


def test_quarantine_excerpts_keep_only_allowed_fields(make_ctx, backend, tmp_path, tally):
    """A rejected archive row's excerpt holds ids, times and texts, never its author's name,
    e-mail or screen name under whatever key. (Today: `name`, `email`, `screen_name` were kept.)"""
    from pipeline.ingest.jobs import ingest_window

    folder = tmp_path / "export"
    folder.mkdir()
    bad = [
        {"id": "r1", "author_id": "u1", "text": "acme", "created_at": "not a time", "name": "Zqx Person",
         "email": "zqx@example.org", "screen_name": "zqxhandle"},
        {"id": "r2", "author": {"name": "Zqx Two", "mail": "zqx2@example.org"}, "text": "acme", "created_at": None,
         "profile": {"bio": "zqx bio"}, "poster_nick": "zqxnick"},
    ]
    good = {"id": "ok", "author_id": "u2", "text": "acme", "created_at": "2026-10-02T06:00:00Z"}
    (folder / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [*bad, good]))
    ctx = make_ctx({**CATALOGUE, "sources": [{"name": "arch", "kind": "archive", "path": str(folder), "fetch_images": False}]},
                   backend)
    counts = ingest_window(ctx, "arch", DAY, END)
    assert counts["new"] == 1 and counts["rejected"] == 2
    with ctx.engine.connect() as conn:
        excerpts = [r.excerpt for r in conn.execute(select(quarantine.c.excerpt))]
    tally.bad_input("quarantined", 2)
    assert len(excerpts) == 2 and all("zqx" not in e.lower() for e in excerpts), excerpts
    assert any('"id": "r1"' in e for e in excerpts)


# --- class 9: one line, not a traceback -------------------------------------------------------------


@pytest.fixture
def agg_env(make_ctx, backend):
    ctx = make_ctx(CATALOGUE, backend)
    add_posts(ctx)
    return ctx, env_of(ctx)


@pytest.mark.parametrize("args", [
    ["trends", "--brand", "Acme", "--start", "9999-12-25", "--end", "9999-12-31"],
    ["trends", "--brand", "Acme", "--start", "0001-01-01", "--end", "0001-01-05"],
    ["aggregate", "--start", "9999-12-30", "--end", "9999-12-31"],
    ["aggregate", "--start", "0001-01-01", "--end", "0001-01-02"],
    ["report", "--date", "9999-12-31"],
    ["report", "--date", "0001-01-01"],
    ["backfill", "src", "--start", "9999-12-31", "--end", "9999-12-31"],
    ["ingest", "src", "--start", "9999-12-31T23:00-05:00", "--end", "9999-12-31T23:30-05:00"],
    ["ingest", "src", "--start", "0001-01-01T00:00+01:00", "--end", "0001-01-02"],
    ["trends", "--brand", "Acme", "--start", "2026-02-30", "--end", "2026-03-02"],
    ["trends", "--brand", "Acme", "--start", "2026-10-05", "--end", "2026-10-01"],
    ["aggregate", "--start", "2026-10-05", "--end", "2026-10-01"],
    ["aggregate", "--start", "2026-10-05"],
    ["trends", "--brand", "Acme", "--start", "x" * 5000, "--end", "2026-10-01"],
], ids=lambda a: " ".join(a)[:60])
def test_calendar_ends_and_bad_dates_are_one_line(agg_env, args, tally):
    """(Today: the 9999-12-31 and 0001-01-01 cases ended in OverflowError tracebacks.)"""
    ctx, env = agg_env
    before = count(ctx, mention_daily)
    one_line_failure(brandmon(env, *args))
    assert count(ctx, mention_daily) == before
    tally.bad_input("refused")


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "-5", "0", "1e300", "soon", "0.01"])
def test_bad_lock_ttl_is_one_line(agg_env, value, tally):
    """(Today: inf, nan-free huge values and 1e300 ended in OverflowError tracebacks.)"""
    _ctx, env = agg_env
    one_line_failure(brandmon({**env, "BRANDMON_LOCK_TTL_S": value}, "aggregate", "--quiet"), "BRANDMON_LOCK_TTL_S")
    tally.bad_input("refused")


def test_bad_settings_are_one_line(tmp_path, tally):
    """A port that is no number, a file that is not SQLite, config paths that are a folder, a
    FIFO, a YAML list or a directory. (Today: the port and the not-a-database file ended in
    tracebacks.)"""
    base = {**os.environ, "BRANDMON_HOME": str(tmp_path / "var"), "BRANDMON_AUTHOR_SALT": "s" * 16,
            "BRANDMON_DATABASE_URL": f"sqlite:///{tmp_path / 'b.db'}", "BRANDMON_STORAGE_URL": (tmp_path / "lake").as_uri()}
    base.pop("BRANDMON_CONFIG", None)
    notdb = tmp_path / "notdb.db"
    notdb.write_text("this is not a database\n" * 100)
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    listy = tmp_path / "list.yaml"
    listy.write_text("- brands\n- sources\n")
    cases = [
        ({"BRANDMON_DATABASE_URL": "postgresql://u:pw@db:abc/brandmon"}, ["status"], "port that is not a number"),
        ({"BRANDMON_DATABASE_URL": "postgresql://u:pw@db:99999999999999999999/brandmon"}, ["aggregate"], ""),
        ({"BRANDMON_DATABASE_URL": f"sqlite:///{notdb}"}, ["aggregate"], "is not a SQLite database"),
        ({"BRANDMON_DATABASE_URL": f"sqlite:///{notdb}"}, ["db", "upgrade"], "is not a SQLite database"),
        ({"BRANDMON_DATABASE_URL": f"sqlite:///{tmp_path}"}, ["aggregate"], ""),
        ({"BRANDMON_CONFIG": str(tmp_path)}, ["status"], "is a folder"),
        ({"BRANDMON_CONFIG": str(fifo)}, ["status"], "not a regular file"),
        ({"BRANDMON_CONFIG": str(listy)}, ["status"], "top level must be a mapping"),
        ({"BRANDMON_TF_THREADS": "many"}, ["status"], "BRANDMON_TF_THREADS"),
        ({}, ["trends", "--brand"], "expected one argument"),
    ]
    for extra, args, needle in cases:
        proc = brandmon({**base, **extra}, *args, timeout=60)
        one_line_failure(proc, needle)
        tally.bad_input("refused")
    # status with a non-database file still reports (exit 1) in one PROBLEM line, no traceback
    proc = brandmon({**base, "BRANDMON_DATABASE_URL": f"sqlite:///{notdb}"}, "status")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "is not a SQLite database" in proc.stdout


@pytest.mark.integration
def test_status_by_a_role_without_privileges(make_ctx, pg_admin_url, tally):
    """A Postgres role that may connect but not read the tables: `status` reports it in one
    PROBLEM line (exit 1), other commands in one error line. (Today: a ProgrammingError traceback.)"""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    ctx = make_ctx(CATALOGUE, "postgres")
    role = f"nopriv_{uuid.uuid4().hex[:8]}"
    admin = create_engine(pg_admin_url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f"CREATE ROLE {role} LOGIN"))
    try:
        url = make_url(ctx.settings.database_url).set(username=role, password=None).render_as_string(hide_password=False)
        env = env_of(ctx, BRANDMON_DATABASE_URL=url)
        proc = brandmon(env, "status")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert "PROBLEM  : the database refused to read brandmon's tables: permission denied" in proc.stdout, proc.stdout
        one_line_failure(brandmon(env, "trends", "--brand", "Acme", "--start", "2026-10-01", "--end", "2026-10-02"),
                         "permission denied")
        one_line_failure(brandmon(env, "aggregate", "--quiet"), "permission denied")
        tally.bad_input("refused", 3)
    finally:
        with admin.connect() as conn:
            conn.execute(text(f"DROP OWNED BY {role}"))
            conn.execute(text(f"DROP ROLE {role}"))
        admin.dispose()


MATH_NAMES = ["$Acme$", "a$b$c", "x$^$", "$\\frac{$", "50$ off $\\x"]


def test_brand_names_with_dollar_signs_plot_and_report(make_ctx, backend, tmp_path, tally):
    """Brand names that matplotlib would read as mathtext are drawn as written, in `trends
    --plot` and in the HTML report. (Today: `x$^$` and `$\\frac{$` ended in ValueError tracebacks.)"""
    cfg = {"brands": [{"name": n, "keywords": [f"kw{i}"]} for i, n in enumerate(MATH_NAMES)]}
    ctx = make_ctx(cfg, backend)
    env = env_of(ctx)
    assert brandmon(env, "aggregate", "--start", "2026-10-01", "--end", "2026-10-02", "--quiet").returncode == 0
    for i, name in enumerate(MATH_NAMES):
        png = tmp_path / f"plot{i}.png"
        proc = brandmon(env, "trends", "--brand", name, "--start", "2026-09-01", "--end", "2026-10-02", "--plot", str(png))
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    proc = brandmon(env, "report", "--date", "2026-10-02")
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    html = ctx.store.get("reports/daily/2026-10-02.html").decode()
    for name in MATH_NAMES:
        assert f"<td>{name}</td>" in html
    tally.bad_input("handled", len(MATH_NAMES) + 1)


def test_the_title_is_not_mathtext():
    """The chart title is the literal name (no mathtext), so `$Acme$` keeps its dollars."""
    import io

    from matplotlib.figure import Figure

    from pipeline.aggregate import trends

    made: list[Figure] = []
    real = Figure.savefig

    def keep(self, *a, **kw):
        made.append(self)
        return real(self, *a, **kw)

    Figure.savefig = keep  # type: ignore[method-assign]
    try:
        trends.plot_series([{"day": dt.date(2026, 10, 1), "posts": 1, "rolling_7": None, "spike": False}], io.BytesIO(), "$Acme$")
    finally:
        Figure.savefig = real  # type: ignore[method-assign]
    title = made[0].axes[0].title
    assert title.get_text() == "$Acme$" and not title.get_parse_math()


def test_output_into_a_closed_pipe_exits_quietly(agg_env, tally):
    """`brandmon trends ... | head -1`: no BrokenPipeError traceback. (Today: a traceback.)"""
    _ctx, env = agg_env
    shell = f"{BRANDMON} trends --brand Acme --start 1970-01-01 --end 1979-12-31 --format csv | head -1"
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", shell], env=env, capture_output=True, text=True, timeout=120)
    assert proc.stdout.startswith("day,posts") and proc.stdout.count("\n") == 1
    assert proc.stderr == "", proc.stderr[-2000:]
    tally.bad_input("handled")


# --- class 10: runs killed by SIGKILL ------------------------------------------------------------------

VICTIM = """
import sys, time
from pipeline.context import Context
from pipeline.runlog import recorded_run, window_lock
from pipeline.settings import load_settings
ctx = Context(load_settings())
with window_lock(ctx.engine, "ingest:victim:w"), recorded_run(ctx.engine, "ingest", "victim"):
    print("ready", flush=True)
    time.sleep(600)
"""


def _start_victim(ctx: Any, **env: str) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", VICTIM], env=env_of(ctx, **env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, start_new_session=True)
    line = proc.stdout.readline() if proc.stdout else b""
    assert line.strip() == b"ready", (line, proc.stderr.read() if proc.stderr else b"")
    return proc


def _kill(proc: subprocess.Popen[bytes]) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _status_runs(ctx: Any) -> list[dict[str, Any]]:
    proc = brandmon(env_of(ctx), "status", "--json")
    return json.loads(proc.stdout)["recent_runs"]


def test_a_sigkilled_run_shows_as_abandoned(make_ctx, backend, tally):
    """Same host: the run's process is gone, so `status` shows `abandoned` at once; a later run
    taking over its lock records it as abandoned. (Today: `running` forever.)"""
    ctx = make_ctx(CATALOGUE, backend)
    proc = _start_victim(ctx)
    try:
        assert _status_runs(ctx)[0]["status"] == "running"  # alive: running
    finally:
        _kill(proc)
    tally.fault("SIGKILL")
    shown = _status_runs(ctx)[0]
    assert shown["status"] == "abandoned" and "abandoned" in shown["error"]
    from pipeline.runlog import try_acquire

    assert try_acquire(ctx.engine, "ingest:victim:w")
    with ctx.engine.connect() as conn:
        stored = conn.execute(select(runs.c.status, runs.c.error, runs.c.finished_at)).one()
    assert stored.status == "abandoned" and "taken over" in stored.error and stored.finished_at is not None


def test_a_sigkilled_run_on_another_host_is_abandoned_once_its_lease_expires(make_ctx, backend, tally):
    """Another host: only the lease tells; `running` until it expires, then `abandoned`."""
    ctx = make_ctx(CATALOGUE, backend)
    ttl = 2.0
    proc = _start_victim(ctx, BRANDMON_LOCK_HOST="another-host", BRANDMON_LOCK_TTL_S=str(ttl))
    _kill(proc)
    killed = time.monotonic()
    tally.fault("SIGKILL")
    first = _status_runs(ctx)[0]["status"]
    if time.monotonic() - killed < ttl * 0.5:
        assert first == "running"  # the last renewal still holds
    while _status_runs(ctx)[0]["status"] != "abandoned":
        assert time.monotonic() - killed < ttl + 20, "the killed run never showed as abandoned"
        time.sleep(0.3)
