"""`brandmon demo` end to end, through the installed command, as README's `make demo` runs it.

The real default demo (30 days, ~1.5 minutes on 2 idle cores): it is what README promises, so
the figures README quotes are checked here too, exactly (each brand's total, every spike day).
Then it runs again: every table and every lake object must be exactly as before (the run log
only gains the new runs' rows). Last, a fresh demo in another workdir while two processes keep
both cores busy must print the same table and write the same rows, score for score: the demo
model trains for a fixed number of epochs, deterministically, not against the clock.

The first (unloaded) demo is one run per module (`idle_demo`): the end-to-end test checks it
and re-runs it, the busy test compares against the rows it wrote, snapshotted before any
re-run; either test alone still makes it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import create_engine, select

from pipeline.schema import metadata, runs

# serial: `make test` runs it alone, after the parallel session, so that "idle" means idle
# and the busy run's spinners slow no other test
pytestmark = [pytest.mark.integration, pytest.mark.serial]

BRANDS = ["Acme", "Globex", "Initech"]
FIRST, DAYS = dt.date(2026, 10, 1), 30
# What the demo prints (README quotes these): posts per brand over the 30 days, and the spike days.
TOTALS = {"Acme": 1011, "Globex": 581, "Initech": 571}
SPIKES = {("Globex", dt.date(2026, 10, 19)), ("Initech", dt.date(2026, 10, 28))}
# Rows that must match between two demo runs in different workdirs (timestamps aside).
COMPARED = ("mention_daily", "image_scores", "detections", "text_mentions", "review_queue")
WHEN = {"scored_at", "created_at", "computed_at", "updated_at", "fetched_at", "ingested_at"}


def run_demo(workdir: Path) -> str:
    exe = Path(sys.executable).parent / "brandmon"  # the [project.scripts] entry point
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRANDMON_")}
    proc = subprocess.run([str(exe), "demo", "--workdir", str(workdir), "--quiet"], env=env, cwd=workdir.parent,
                          capture_output=True, text=True, timeout=2400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    return proc.stdout


@dataclass(frozen=True)
class Demo:
    """A fresh demo's printed output, workdir, and its state right after that first run."""

    out: str
    workdir: Path
    state: dict[str, Any]
    rows: dict[str, list[tuple[str, ...]]]


@pytest.fixture(scope="module")
def idle_demo(tmp_path_factory: pytest.TempPathFactory) -> Demo:
    """The real default demo, run once on an otherwise unloaded test process, in a fresh workdir."""
    workdir = tmp_path_factory.mktemp("idle") / "demo"
    out = run_demo(workdir)
    return Demo(out, workdir, state(workdir), rows_without_times(workdir))


def trend_table(out: str) -> dict[str, Any]:
    """The printed table: {day: {brand: (posts, spike)}} and the totals row."""
    lines = out.splitlines()
    head = next(i for i, line in enumerate(lines) if line.startswith("day "))
    assert lines[head].split() == ["day", *BRANDS]
    days: dict[dt.date, dict[str, tuple[int, bool]]] = {}
    for line in lines[head + 1:]:
        if line.startswith("total"):
            totals = dict(zip(BRANDS, map(int, line.split()[1:]), strict=True))
            break
        day, *cells = line.split()
        assert all(re.fullmatch(r"\d+\*?", c) for c in cells), line
        days[dt.date.fromisoformat(day)] = {b: (int(c.rstrip("*")), c.endswith("*")) for b, c in zip(BRANDS, cells, strict=True)}
    return {"days": days, "totals": totals}


def state(workdir: Path) -> dict[str, Any]:
    """Every table's rows (all columns) and every lake object's bytes (as sha256)."""
    engine = create_engine(f"sqlite:///{workdir / 'brandmon.db'}")
    with engine.connect() as conn:
        tables = {t.name: {tuple(map(repr, r)) for r in conn.execute(select(t))} for t in metadata.sorted_tables}
    engine.dispose()
    lake = workdir / "lake"
    tables["lake"] = {(p.relative_to(lake).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest())
                      for p in lake.rglob("*") if p.is_file()}
    return tables


def test_demo_end_to_end_then_rerun_changes_nothing(idle_demo: Demo) -> None:
    workdir, out = idle_demo.workdir, idle_demo.out
    table = trend_table(out)
    days = table["days"]
    assert list(days) == [FIRST + dt.timedelta(days=i) for i in range(DAYS)]
    assert all(table["totals"][b] == sum(days[d][b][0] for d in days) > 0 for b in BRANDS)
    assert all(days[d][b][0] > 0 for d in days for b in BRANDS)  # every brand is talked about every day
    # README: these totals, a spike for Globex on 2026-10-19 (and Initech on 2026-10-28), Initech rising
    assert table["totals"] == TOTALS
    assert {(b, d) for d in days for b in BRANDS if days[d][b][1]} == SPIKES
    initech = [days[d]["Initech"][0] for d in days]
    assert sum(initech[-10:]) > 2 * sum(initech[:10])

    first = {name: set(rows) for name, rows in idle_demo.state.items()}  # a copy: popped below
    assert len(first["posts"]) == 2905 and len(first["images"]) == 340  # README's figures
    assert len(first["image_scores"]) == 340 and first["mention_daily"] and first["text_mentions"]
    assert len(first["model_versions"]) == 1 and not first["dirty_days"] and not first["locks"]
    # v_forecast is filled by the demo (it was empty until a later `brandmon aggregate`).
    assert len(first["demand_signal"]) == 3 * 28

    again = run_demo(workdir)
    assert trend_table(again) == table
    second = state(workdir)
    assert first.pop("runs") <= second.pop("runs")  # the run log keeps every earlier row as it was
    for name in first:
        assert second[name] == first[name], f"{name} changed on the re-run"
    engine = create_engine(f"sqlite:///{workdir / 'brandmon.db'}")
    with engine.connect() as conn:
        statuses = [(k, s) for k, s in conn.execute(select(runs.c.kind, runs.c.status).order_by(runs.c.id))]
    engine.dispose()
    assert all(s == "succeeded" for _k, s in statuses)
    assert [k for k, _s in statuses].count("train") == 1  # the model is not trained again
    check_try_lines(out, workdir)


def check_try_lines(out: str, workdir: Path) -> None:
    """The printed `export ...` line points at the demo's database AND lake: the report run with it
    shows the photos (without BRANDMON_STORAGE_URL it read ./var/lake and showed none)."""
    import shlex

    export = next(line for line in out.splitlines() if line.strip().startswith("export "))
    env = dict(kv.split("=", 1) for kv in shlex.split(export.strip())[1:])
    assert env["BRANDMON_STORAGE_URL"] == (workdir / "lake").as_uri()
    assert env["BRANDMON_DATABASE_URL"] == f"sqlite:///{workdir / 'brandmon.db'}"
    report = next(line.split("brandmon ", 1)[1] for line in out.splitlines() if "brandmon report --date" in line)
    exe = Path(sys.executable).parent / "brandmon"
    clean = {k: v for k, v in os.environ.items() if not k.startswith("BRANDMON_")}
    proc = subprocess.run([str(exe), *report.split()], env={**clean, **env}, cwd=workdir.parent,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "missing from the lake" not in proc.stderr, proc.stderr[-2000:]
    day = report.split()[-1]
    page = (workdir / "lake" / "reports" / "daily" / f"{day}.html").read_text()
    assert page.count("data:image/jpeg;base64,") >= 3


def rows_without_times(workdir: Path) -> dict[str, list[tuple[str, ...]]]:
    """The compared tables' rows, every column but the wall-clock ones, floats as repr (exact)."""
    engine = create_engine(f"sqlite:///{workdir / 'brandmon.db'}")
    tables = {t.name: t for t in metadata.sorted_tables}
    out = {}
    with engine.connect() as conn:
        for name in COMPARED:
            cols = [c for c in tables[name].c if c.name not in WHEN]
            out[name] = sorted(tuple(map(repr, r)) for r in conn.execute(select(*cols)))
    engine.dispose()
    return out


def test_demo_figures_are_the_same_with_both_cores_busy(idle_demo: Demo, tmp_path: Path) -> None:
    """Two fresh demos, the second while two spinning processes compete for both cores."""
    table = trend_table(idle_demo.out)
    spinners = [subprocess.Popen([sys.executable, "-c", "while 1: pass"]) for _ in range(2)]
    try:
        busy = tmp_path / "busy"
        busy_table = trend_table(run_demo(busy))
        assert all(p.poll() is None for p in spinners), "the spinners stopped: the run was not a busy one"
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    assert busy_table == table
    assert table["totals"] == TOTALS
    first, second = idle_demo.rows, rows_without_times(busy)
    assert len(first["image_scores"]) == 340 and first["detections"] and first["mention_daily"]
    for name in COMPARED:
        assert second[name] == first[name], f"{name} differs between the idle and the busy run"
