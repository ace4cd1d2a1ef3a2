"""`brandmon demo`: the whole pipeline on the embedded defaults, with no network.

It builds a deterministic synthetic social dataset, then runs the same job functions the
Airflow DAGs call (ingest → detect → aggregate) on SQLite and a local lake inside WORKDIR,
and prints the daily trend per brand. Every step is idempotent, so a re-run changes nothing:
windows already ingested are skipped, images already scored are not re-scored, and the demo
model is trained only if WORKDIR has no active model yet.

The figures of a commit are the same however busy the machine and whatever its core count (on
one CPU instruction set: oneDNN's kernels differ between AVX2 and AVX-512): the demo model trains
for a fixed number of epochs (never against the clock) with fixed seeds and TensorFlow's op
determinism, TensorFlow runs on a fixed number of threads (`DEMO_THREADS`, whatever the core
count), and the classifier computes in float32 everywhere (bf16 on CPUs that have it would
move scores near the threshold).
"""

from __future__ import annotations

import datetime as dt
import shlex
import time
from pathlib import Path
from typing import Any

import yaml

from pipeline.context import Context
from pipeline.database import upgrade
from pipeline.settings import workdir_settings

DEMO_THREADS = 2  # TensorFlow intra-op threads of the demo on any machine: results depend on it
DEMO_PRECISION = "fp32"


def demo_settings(workdir: Path, seed: int, days: int, threads: int = DEMO_THREADS,
                  precision: str = DEMO_PRECISION) -> tuple[Context, dict[str, Any]]:
    """A Context on WORKDIR's own SQLite file and lake, whatever BRANDMON_* says."""
    from pipeline.synthetic import demo_config

    workdir.mkdir(parents=True, exist_ok=True)
    config = demo_config(None)
    for src in config["sources"]:
        if src["kind"] == "synthetic":
            src.update(seed=seed, days=days)
    # In the written config too, so `brandmon detect` on WORKDIR later scores the same way.
    config["detector"] = {"mixed_precision": precision, "threads": threads}
    cfg_path = workdir / "brandmon.yaml"
    text = yaml.safe_dump(config, sort_keys=False)
    if not cfg_path.exists() or cfg_path.read_text() != text:
        cfg_path.write_text(text)
    return Context(workdir_settings(workdir, cfg_path)), config


def _step(name: str, quiet: bool) -> float:
    if not quiet:
        print(f"==> {name}", flush=True)
    return time.monotonic()


def _done(t0: float, counts: dict[str, Any], quiet: bool) -> None:
    if not quiet:
        shown = ", ".join(f"{k}={v}" for k, v in counts.items() if isinstance(v, int | float | str))
        print(f"    {shown} ({time.monotonic() - t0:.1f}s)", flush=True)


def run_demo(workdir: str | Path = "var/demo", seed: int = 7, days: int = 30, quiet: bool = False,
             threads: int = DEMO_THREADS, precision: str = DEMO_PRECISION) -> int:
    from pipeline.aggregate.forecast import refresh_forecasts
    from pipeline.aggregate.jobs import aggregate_dirty
    from pipeline.detector.jobs import active_model, detect_pending, train_model
    from pipeline.detector.model import configure_threads, enable_determinism
    from pipeline.ingest.jobs import backfill
    from pipeline.progress import for_cli
    from pipeline.synthetic import make_training_folders

    started = time.monotonic()
    workdir = Path(workdir).resolve()
    ctx, config = demo_settings(workdir, seed, days, threads, precision)
    # Before TensorFlow's runtime starts: the thread count cannot change afterwards.
    configure_threads(threads)
    enable_determinism(seed)
    source = next(s for s in config["sources"] if s["kind"] == "synthetic")
    first = dt.date.fromisoformat(str(source["start"]))
    last = first + dt.timedelta(days=days - 1)
    progress = for_cli(quiet)

    t0 = _step(f"database and lake in {workdir}", quiet)
    upgrade(ctx.engine)
    ctx.store.check()
    _done(t0, {}, quiet)

    t0 = _step(f"ingest: synthetic source {source['name']!r}, {first} .. {last}", quiet)
    counts = backfill(ctx, source["name"], first, last, progress=progress)
    _done(t0, counts, quiet)

    model = active_model(ctx)
    if model is None:
        t0 = _step("train: demo logo model (Inception v3, synthetic brand marks)", quiet)
        brands = [b.name for b in ctx.settings.brands]
        data = make_training_folders(workdir / "training", brands, seed=seed + 1000)
        result = train_model(ctx, data, fmt="folders", profile="demo", activate="always",
                              progress=progress)
        _done(t0, {"version": result.get("version"), "activated": result.get("activated")}, quiet)
    else:
        _step(f"model: {model['version']} already active", quiet)

    t0 = _step("detect: score new images", quiet)
    _done(t0, detect_pending(ctx, progress=progress), quiet)

    t0 = _step("aggregate: recompute touched days", quiet)
    _done(t0, aggregate_dirty(ctx, progress=progress), quiet)

    t0 = _step("forecast: each brand's expected mentions into demand_signal (v_forecast)", quiet)
    _done(t0, refresh_forecasts(ctx), quiet)

    print()
    print(format_trend_table(ctx, [b.name for b in ctx.settings.brands], first, last))
    print(demo_sales_line(workdir, seed, days, first))
    print(f"\ndemo finished in {time.monotonic() - started:.0f}s; data in {workdir}")
    # Every command needs the demo's database AND lake (the report's photos, evidence): one export.
    env = {"BRANDMON_CONFIG": str(workdir / "brandmon.yaml"), "BRANDMON_DATABASE_URL": ctx.settings.database_url,
           "BRANDMON_STORAGE_URL": ctx.settings.storage_url}
    print("try, in this shell:\n  export " + " ".join(f"{k}={shlex.quote(v)}" for k, v in env.items()))
    print(f"  brandmon trends --brand {ctx.settings.brands[0].name} --start {first} --end {last}")
    print(f"  brandmon report --date {last}")
    ctx.close()
    return 0


def demo_sales_line(workdir: Path, seed: int, days: int, first: dt.date) -> str:
    """Write the demo's synthetic sales (following Globex mentions 7 days later) as CSV; one summary line."""
    from pipeline.synthetic import generate_dataset
    from pipeline.synthetic.sales import (
        DEMO_LEAD_DAYS,
        DEMO_SALES_BRAND,
        sales_series,
        write_sales_csv,
    )

    path = write_sales_csv(workdir / "sales.csv", sales_series(generate_dataset(seed=seed, days=days, start=first)))
    return (f"sales: {path} follows {DEMO_SALES_BRAND} mentions {DEMO_LEAD_DAYS} days later; recover the lead with "
            f"`brandmon demand --brand {DEMO_SALES_BRAND} --sales {path}`")


def format_trend_table(ctx: Context, brands: list[str], first: dt.date, last: dt.date) -> str:
    """Posts mentioning each brand per day (text or image); '*' marks a spike day."""
    from pipeline.aggregate.trends import daily_series

    series = {b: {row["day"]: row for row in daily_series(ctx, b, first, last)} for b in brands}
    width = max(8, *(len(b) + 2 for b in brands))
    lines = ["day         " + "".join(f"{b:>{width}}" for b in brands)]
    day = first
    totals = dict.fromkeys(brands, 0)
    while day <= last:
        cells = []
        for b in brands:
            row = series[b].get(day)
            n = int(row["posts"]) if row else 0
            totals[b] += n
            cells.append(f"{n}{'*' if row and row.get('spike') else ' '}".rjust(width))
        lines.append(f"{day.isoformat()}  " + "".join(cells))
        day += dt.timedelta(days=1)
    lines.append("total       " + "".join(f"{totals[b]} ".rjust(width) for b in brands))
    lines.append("(posts per UTC day mentioning the brand in text or image; * = spike)")
    return "\n".join(lines)
