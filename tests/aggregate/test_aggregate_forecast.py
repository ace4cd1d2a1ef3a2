"""`brandmon forecast` and the demand_signal table / v_forecast view the aggregation fills."""

from __future__ import annotations

import datetime as dt
import json

import numpy as np
import pytest
from agg_helpers import CONFIG, FakePost, add_posts, ts
from demo_history import demo_history_ctx
from sqlalchemy import func, select, text

from pipeline.aggregate.forecast import (
    MIN_HISTORY,
    backtest,
    make_forecast,
    mase_scale,
    refresh_forecasts,
    seasonal_naive,
)
from pipeline.aggregate.jobs import aggregate_dirty
from pipeline.cli import main
from pipeline.schema import demand_signal

START = dt.date(2026, 10, 1)
WEEK = (9, 10, 11, 10, 8, 4, 3)  # Acme posts by weekday


def use_ctx(monkeypatch, ctx) -> None:
    s = ctx.settings
    for k, v in (("BRANDMON_DATABASE_URL", s.database_url), ("BRANDMON_STORAGE_URL", s.storage_url),
                 ("BRANDMON_CONFIG", str(s.config_path)), ("BRANDMON_HOME", str(s.home))):
        monkeypatch.setenv(k, v)
    if s.s3_endpoint_url:
        monkeypatch.setenv("BRANDMON_S3_ENDPOINT_URL", s.s3_endpoint_url)


def weekly_ctx(make_ctx, backend: str, days: int):
    """Acme with a weekly rhythm (plus a little wobble) for `days` days; Globex/Initech never named."""
    ctx = make_ctx(CONFIG, backend)
    rows, pid = [], 1
    for i in range(days):
        day = START + dt.timedelta(days=i)
        for k in range(WEEK[day.weekday()] + (i * 7) % 3):
            rows.append(FakePost(pid, f"p{pid}", ts(day, k % 24), "acme", author=f"u{k}"))
            pid += 1
    with ctx.engine.begin() as conn:
        add_posts(conn, rows)
    aggregate_dirty(ctx)
    return ctx


def test_seasonal_naive_and_mase_scale():
    y = [float(v) for v in (1, 2, 3, 4, 5, 6, 7, 2, 3, 4, 5, 6, 7, 8)]
    import numpy as np

    assert list(seasonal_naive(np.array(y), 9)) == [2, 3, 4, 5, 6, 7, 8, 2, 3]
    assert mase_scale(np.array(y)) == pytest.approx(1.0)
    assert mase_scale(np.array([3.0] * 10)) is None


def test_backtest_of_a_pure_weekly_pattern_beats_naive_with_noise():
    import numpy as np

    rng = np.random.default_rng(3)
    y = np.array([WEEK[i % 7] * 3 + rng.normal(0, 2) for i in range(42)])
    bt = backtest(y, START, trend=False)
    assert bt["origins"] == 10 and bt["horizon"] == 7
    assert bt["mae"] < bt["baseline_mae"] and bt["beats_baseline"]  # seasonal naive carries last week's noise


def test_forecast_on_the_demo_history_beats_seasonal_naive_or_says_why(make_ctx):
    ctx, ds = demo_history_ctx(make_ctx)
    for brand in ("Acme", "Globex", "Initech"):
        fc = make_forecast(ctx, brand, horizon=28)
        assert fc.status == "ok" and fc.history_days == 30 and len(fc.days) == 28
        assert fc.days[0] == ds.start + dt.timedelta(days=30)
        assert all(0 <= lo <= e <= hi for lo, e, hi in zip(fc.lower, fc.expected, fc.upper, strict=True))
        bt = fc.backtest
        assert bt["origins"] == 10 and bt["mase"] is not None
        if bt["beats_baseline"]:
            assert bt["mae"] < bt["baseline_mae"] and fc.message.startswith("beats")
        else:
            assert "does NOT beat" in fc.message and "spike" in fc.message
        mean = sum(r for r in fc.expected[:7]) / 7
        last_week = ds.daily_truth()
        recent = sum(last_week.get((brand, ds.start + dt.timedelta(days=d)), {}).get("posts", 0) for d in range(23, 30)) / 7
        assert mean == pytest.approx(recent, rel=0.5)  # the level carries on
    # Steady Acme and rising Initech follow their weekly rhythm: the model must win there.
    assert make_forecast(ctx, "Acme").backtest["beats_baseline"]


def test_too_short_history_is_said_not_failed(make_ctx, monkeypatch, capsys):
    ctx = weekly_ctx(make_ctx, "sqlite", MIN_HISTORY - 1)
    use_ctx(monkeypatch, ctx)
    assert main(["forecast", "--brand", "acme", "--horizon", "28"]) == 0
    out = capsys.readouterr().out
    assert "history too short to forecast: 20 day(s)" in out and "at least 21 days" in out
    assert main(["forecast", "--brand", "acme", "--horizon", "0"]) == 2
    assert "--horizon must be between 1 and 366" in capsys.readouterr().err
    assert main(["forecast", "--brand", "nobody"]) == 2
    assert "unknown brand" in capsys.readouterr().err


def test_forecast_cli_json_and_table(make_ctx, monkeypatch, capsys, tmp_path):
    ctx = weekly_ctx(make_ctx, "sqlite", 35)
    use_ctx(monkeypatch, ctx)
    assert main(["forecast", "--brand", "Acme", "--horizon", "14", "--json"]) == 0
    fc = json.loads(capsys.readouterr().out)
    assert fc["status"] == "ok" and len(fc["expected"]) == 14 and fc["days"][0] == "2026-11-05"
    # the weekly rhythm carries into the forecast: weekdays above weekends
    by_day = dict(zip(fc["days"], fc["expected"], strict=True))
    assert by_day["2026-11-11"] > by_day["2026-11-08"] + 3  # Wednesday vs Sunday
    assert fc["backtest"]["beats_baseline"] is True
    plot = tmp_path / "fc.png"
    assert main(["forecast", "--brand", "Acme", "--horizon", "7", "--end", "2026-10-28", "--plot", str(plot)]) == 0
    assert plot.read_bytes()[:4] == b"\x89PNG"
    table = capsys.readouterr().out.splitlines()
    assert "after 2026-10-28" in table[0] and table[1].startswith("backtest: 8 rolling origins")  # 28 days: origins 14..21
    assert "vs seasonal naive MAE" in table[1] and len(table) == 3 + 7


def test_aggregation_fills_demand_signal_and_v_forecast(make_ctx, backend, monkeypatch, capsys):
    ctx = weekly_ctx(make_ctx, backend, 28)
    counts = refresh_forecasts(ctx)
    assert counts == {"forecasts": 3, "rows_written": 84, "too_short": 0, "unchanged": 0}  # Globex/Initech: zeros
    with ctx.engine.connect() as conn:
        first_at = conn.execute(select(func.max(demand_signal.c.computed_at))).scalar()
        rows = conn.execute(text(
            "SELECT brand, issued_on, day, horizon_days, expected, lower_95, upper_95, actual_posts, method, "
            "beats_baseline FROM v_forecast ORDER BY brand, day")).all()
    assert len(rows) == 84 and {r.brand for r in rows} == {"Acme", "Globex", "Initech"}
    acme = [r for r in rows if r.brand == "Acme"]
    assert str(acme[0].issued_on) == "2026-10-28" and str(acme[0].day) == "2026-10-29" and acme[0].horizon_days == 1
    assert all(r.actual_posts is None for r in rows)  # all in the future
    assert all(r.lower_95 <= r.expected <= r.upper_95 for r in rows)
    assert {r.method for r in rows if r.brand == "Globex"} == {"constant (the history never varies)"}
    # Idempotent: the same history is not forecast again, nothing rewritten.
    assert refresh_forecasts(ctx) == {"forecasts": 0, "rows_written": 0, "too_short": 0, "unchanged": 3}
    with ctx.engine.connect() as conn:
        assert conn.execute(select(func.max(demand_signal.c.computed_at))).scalar() == first_at
    # A new day: a new issue; v_forecast shows only the latest one, with yesterday's forecast's actual.
    day = START + dt.timedelta(days=28)
    with ctx.engine.begin() as conn:
        add_posts(conn, [FakePost(10_000 + k, f"n{k}", ts(day, k), "acme") for k in range(6)])
    use_ctx(monkeypatch, ctx)
    assert main(["aggregate", "--quiet"]) == 0
    assert "forecasts: 3 new, 0 unchanged, 0 too short" in capsys.readouterr().out
    with ctx.engine.connect() as conn:
        issues = conn.execute(text("SELECT COUNT(DISTINCT issued_on) FROM demand_signal")).scalar()
        latest = conn.execute(text("SELECT DISTINCT issued_on FROM v_forecast")).all()
        old = conn.execute(text("SELECT expected FROM demand_signal WHERE brand = 'Acme' AND day = :d AND "
                                "issued_on = :i"), {"d": day, "i": day - dt.timedelta(days=1)}).scalar()
    assert issues == 2 and [str(r[0]) for r in latest] == [day.isoformat()]
    assert old is not None  # the earlier issue is kept for comparing forecasts with what happened


def test_sql_readme_documents_v_forecast():
    from pathlib import Path

    from pipeline.aggregate.views import TABLE_VIEWS

    readme = (Path(__file__).resolve().parents[2] / "sql" / "README.md").read_text()
    body = TABLE_VIEWS["v_forecast"][1].split("FROM")[0]
    assert "### `v_forecast`" in readme
    for col in ("issued_on", "horizon_days", "expected", "lower_95", "upper_95", "actual_posts", "method",
                "history_days", "backtest_mae", "baseline_mae", "mase", "beats_baseline"):
        assert col in body and f"`{col}`" in readme, col


def test_no_history_names_the_filter_that_matched_nothing(make_ctx):
    """An unknown platform or an --end before the history used to say 'no mentions yet (run
    `brandmon aggregate`)', sending the analyst to re-aggregate instead of fixing the name."""
    ctx, ds = demo_history_ctx(make_ctx)
    fc = make_forecast(ctx, "Globex", platform="<x>")
    assert fc.status == "no_data" and "Globex on platform '<x>'" in fc.message
    fc = make_forecast(ctx, "Globex", end=dt.date(2020, 1, 1))
    assert fc.status == "no_data" and "of Globex up to 2020-01-01" in fc.message and "check the names" in fc.message
    from pipeline.aggregate.sales import SalesError, read_sales_table

    with pytest.raises(SalesError, match="bad table name"):
        read_sales_table(ctx.engine, "posts\n")


def test_a_one_off_spike_is_not_forecast_to_recur_every_week(make_ctx):
    """ETS's additive weekly season learnt the demo's Globex spike (94 posts on Monday 2026-10-19,
    ~18 on other Mondays) as a Monday effect: every Monday ahead was forecast at 38. Spike days
    are fitted at the median of their neighbours; the backtest still scores the actual posts."""
    from pipeline.aggregate.forecast import despiked, forecast_series

    ctx, ds = demo_history_ctx(make_ctx)
    fc = make_forecast(ctx, "Globex", horizon=28)
    mondays = [e for d, e in zip(fc.days, fc.expected, strict=True) if d.weekday() == 0]
    others = [e for d, e in zip(fc.days, fc.expected, strict=True) if d.weekday() in (1, 2, 3, 4)]
    assert max(mondays) < 1.5 * max(others), (mondays, others)
    assert "despiked" in fc.method and fc.backtest["beats_baseline"]
    y = np.array([10.0, 12, 14, 11, 10, 5, 4] * 5)
    y[22] = 200  # one Tuesday
    clean = despiked(y, [k == 22 for k in range(len(y))])
    assert clean[22] == np.median([5, 4, 10, 14, 11, 10]) and (np.delete(clean, 22) == np.delete(y, 22)).all()
    out = forecast_series(y, dt.date(2026, 1, 5), 14, fit_y=clean)
    assert max(out["expected"]) < 30 and out["backtest"]["origins"] == 10
