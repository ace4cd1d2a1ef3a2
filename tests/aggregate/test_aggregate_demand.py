"""`brandmon demand`: the sales parser (examples + Hypothesis), the lead-lag statistics, and the
demo's known lead (sales follow Globex mentions 7 days later) recovered end to end."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json

import numpy as np
import pytest
from demo_history import demo_history_ctx
from hypothesis import given, settings
from hypothesis import strategies as st
from sqlalchemy import Column, Date, Integer, MetaData, Table, insert

from pipeline.aggregate.demand import analyse, plot_leadlag
from pipeline.aggregate.sales import SalesError, parse_sales_csv, read_sales_file, read_sales_table
from pipeline.cli import main
from pipeline.demo import demo_sales_line
from pipeline.synthetic.sales import DEMO_LEAD_DAYS, sales_series

D0 = dt.date(2026, 1, 1)


# --- the parser -----------------------------------------------------------------------------------


def test_parser_examples():
    assert parse_sales_csv("date,units\n2026-01-02,5\n\n2026-01-01,3.5\n") == (
        "units", {dt.date(2026, 1, 1): 3.5, dt.date(2026, 1, 2): 5.0})
    assert parse_sales_csv("store,Revenue,DATE\nA,10.5,2026-01-01\n")[0] == "revenue"
    assert parse_sales_csv("date,units,revenue\n2026-01-01,1,99\n", column_name="revenue")[1] == {D0: 99.0}
    cases = {
        "": "empty file",
        "day,units\n2026-01-01,1\n": "missing column 'date' (found: day, units)",
        "date,amount\n2026-01-01,1\n": "missing column 'units' or 'revenue'",
        "date,units\n2026-13-01,1\n": "line 2: bad date '2026-13-01'",
        "date,units\n01/02/2026,1\n": "line 2: bad date '01/02/2026' (use YYYY-MM-DD)",
        "date,units\n2026-01-01,-2\n": "line 2: negative units -2",
        "date,units\n2026-01-01,nan\n": "not a finite number",
        "date,units\n2026-01-01,lots\n": "units is not a number: 'lots'",
        "date,units\n2026-01-01,1\n\n2026-01-01,2\n": "line 4: duplicate date 2026-01-01 (first on line 2)",
        "date,units\n2026-01-01\n": "line 2: units is not a number: ''",
        "date,units\n": "no sales rows",
        "date,units\n2026-01-01,\"1\n": "malformed CSV",
    }
    for text, msg in cases.items():
        with pytest.raises(SalesError, match=msg.replace("(", r"\(").replace(")", r"\)")) as err:
            parse_sales_csv(text, "s.csv")
        assert "\n" not in str(err.value) and str(err.value).startswith("s.csv")


def test_file_reader_bounds(tmp_path):
    p = tmp_path / "s.csv"
    p.write_bytes("\ufeffdate,units\n2026-01-01,1\n".encode())  # Excel's BOM
    assert read_sales_file(p) == ("units", {D0: 1.0})
    p.write_bytes(b"date,units\n2026-01-01,\xff\n")
    with pytest.raises(SalesError, match="not UTF-8"):
        read_sales_file(p)
    with pytest.raises(SalesError, match="cannot read"):
        read_sales_file(tmp_path / "missing.csv")


@st.composite
def sales_tables(draw):
    days = draw(st.lists(st.integers(0, 4000), min_size=1, max_size=40, unique=True))
    values = draw(st.lists(st.one_of(st.integers(0, 10**9), st.floats(0, 1e12, allow_nan=False)),
                           min_size=len(days), max_size=len(days)))
    col = draw(st.sampled_from(["units", "UNITS", " Units ", "revenue"]))
    extra = draw(st.booleans())
    return {D0 + dt.timedelta(days=d): v for d, v in zip(days, values, strict=True)}, col, extra


@settings(max_examples=150, deadline=None)
@given(sales_tables())
def test_parser_round_trips_valid_tables(table):
    data, col, extra = table
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["note", col, "date"] if extra else ["date", col])
    for d, v in data.items():
        w.writerow(["x,y", repr(v), d.isoformat()] if extra else [d.isoformat(), repr(v)])
    name, parsed = parse_sales_csv(buf.getvalue())
    assert name == col.strip().lower()
    assert parsed == {d: float(v) for d, v in sorted(data.items())} and list(parsed) == sorted(parsed)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=300))
def test_parser_never_fails_other_than_cleanly(text):
    try:
        name, parsed = parse_sales_csv("date,units\n" + text)
    except SalesError as exc:
        assert "\n" not in str(exc)
        return
    assert name == "units" and parsed and all(v >= 0 and np.isfinite(v) for v in parsed.values())


# --- the statistics ---------------------------------------------------------------------------------


def _series(n: int, lag: int, seed: int, coupled: bool = True):
    rng = np.random.default_rng(seed)
    m = 20 + 5 * np.sin(np.arange(n + lag) * 2 * np.pi / 7) + rng.normal(0, 3, n + lag)
    s = 50 + (2 * m[:n] if coupled else rng.normal(0, 6, n)) + rng.normal(0, 2, n)
    days = [D0 + dt.timedelta(days=k) for k in range(n + lag)]
    mentions = {d: float(v) for d, v in zip(days[:n], m[:n], strict=True)}
    sales = {days[k + lag]: float(s[k]) for k in range(n)}
    return mentions, sales


def test_analyse_finds_a_known_lead_and_no_lead_in_noise():
    mentions, sales = _series(90, 11, seed=1)
    res = analyse(mentions, sales, "X", "units", n_perm=199)
    assert res.best_lag == 11 and res.significant and res.p_value <= 0.01
    assert res.regression["beats_naive"] and res.regression["slope"] == pytest.approx(2, rel=0.2)
    mentions, sales = _series(90, 11, seed=2, coupled=False)
    res = analyse(mentions, sales, "X", "units", n_perm=199)
    assert not res.significant and res.p_value > 0.05


def test_analyse_refuses_too_little_overlap():
    from pipeline.aggregate.demand import DemandError

    mentions = {D0 + dt.timedelta(days=k): 1.0 + k % 3 for k in range(30)}
    sales = {D0 + dt.timedelta(days=200 + k): 5.0 + k % 2 for k in range(30)}
    with pytest.raises(DemandError, match="overlap on fewer than 14 days"):
        analyse(mentions, sales, "X", "units")


def test_plot_escapes_dollars(tmp_path):
    mentions, sales = _series(40, 3, seed=4)
    res = analyse(mentions, sales, "Big $$ Co $x$", "revenue ($)", n_perm=19)
    plot_leadlag(mentions, sales, res, tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- the demo's known lead, end to end --------------------------------------------------------------


def test_demand_recovers_the_demo_lead(make_ctx, monkeypatch, capsys, tmp_path):
    ctx, ds = demo_history_ctx(make_ctx)
    s = ctx.settings
    for k, v in (("BRANDMON_DATABASE_URL", s.database_url), ("BRANDMON_STORAGE_URL", s.storage_url),
                 ("BRANDMON_CONFIG", str(s.config_path)), ("BRANDMON_HOME", str(s.home))):
        monkeypatch.setenv(k, v)
    line = demo_sales_line(tmp_path, 7, 30, ds.start)
    csv_path = tmp_path / "sales.csv"
    assert "follows Globex mentions 7 days later" in line and csv_path.exists()
    before = csv_path.stat().st_mtime_ns
    demo_sales_line(tmp_path, 7, 30, ds.start)
    assert csv_path.stat().st_mtime_ns == before  # unchanged content: not rewritten
    plot = tmp_path / "demand.png"
    assert main(["demand", "--brand", "globex", "--sales", str(csv_path), "--plot", str(plot), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert abs(res["best_lag"] - DEMO_LEAD_DAYS) <= 1 and res["significant"]
    assert res["regression"]["beats_naive"] and plot.stat().st_size > 10_000
    # Acme's mentions do not drive these sales: no significant lead.
    assert main(["demand", "--brand", "acme", "--sales", str(csv_path), "--json"]) == 0
    assert not json.loads(capsys.readouterr().out)["significant"]
    # The same sales as a table in the brandmon database.
    t = Table("shop_sales", MetaData(), Column("Date", Date), Column("units", Integer))
    t.create(ctx.engine)
    with ctx.engine.begin() as conn:
        conn.execute(insert(t), [{"Date": d, "units": u} for d, u in sales_series(ds).items()])
    assert main(["demand", "--brand", "Globex", "--sales-table", "shop_sales"]) == 0
    out = capsys.readouterr().out
    assert f"mentions lead units by {res['best_lag']} day(s)" in out and "significant" in out
    assert main(["demand", "--brand", "Globex", "--sales-table", "shop_sales; drop table posts"]) == 2
    assert "bad table name" in capsys.readouterr().err
    assert main(["demand", "--brand", "Globex", "--sales-table", "nope"]) == 2
    assert "table 'nope' not found" in capsys.readouterr().err
    with pytest.raises(SalesError, match="missing column"):
        read_sales_table(ctx.engine, "posts")


# --- hostile sales (outside checker) ------------------------------------------------------------------


def test_analyse_with_sales_at_the_calendar_ends_is_fast_and_finds_the_lead():
    """Sales on 0001-01-01 and 9999-12-31 (or any long history) used to put every day between on
    one calendar: the permutation test then ran for hours. Only days that can pair count."""
    import time

    mentions, sales = _series(90, 11, seed=1)
    res0 = analyse(mentions, sales, "X", "units", n_perm=199)
    sales = {dt.date(1, 1, 1): 5.0, dt.date(9999, 12, 31): 7.0, **sales}
    t0 = time.monotonic()
    res = analyse(mentions, sales, "X", "units", n_perm=199)
    assert time.monotonic() - t0 < 30
    assert res.best_lag == res0.best_lag == 11 and res.significant
    assert res.first_day >= min(mentions) and res.last_day <= max(mentions) + dt.timedelta(days=42)


def test_demand_cli_with_sales_at_the_calendar_ends(tmp_path, make_ctx, monkeypatch, capsys):
    ctx, ds = demo_history_ctx(make_ctx)
    s = ctx.settings
    for k, v in (("BRANDMON_DATABASE_URL", s.database_url), ("BRANDMON_STORAGE_URL", s.storage_url),
                 ("BRANDMON_CONFIG", str(s.config_path)), ("BRANDMON_HOME", str(s.home))):
        monkeypatch.setenv(k, v)
    rows = {dt.date(1, 1, 1): 1.0, **sales_series(ds), dt.date(9999, 12, 31): 2.0}
    p = tmp_path / "ends.csv"
    p.write_text("date,units\n" + "".join(f"{d.isoformat()},{v:g}\n" for d, v in rows.items()))
    # Dates outside brandmon's calendar (1970-01-01 .. 2199-12-31) are one clear line, at once
    # (a 9999-12-31 row once made the analysis run until killed).
    assert main(["demand", "--brand", "Globex", "--sales", str(p), "--plot", str(tmp_path / "d.png"), "--json"]) == 2
    err = capsys.readouterr().err
    assert "0001-01-01" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    rows.pop(dt.date(1, 1, 1)), rows.pop(dt.date(9999, 12, 31))
    p.write_text("date,units\n" + "".join(f"{d.isoformat()},{v:g}\n" for d, v in rows.items()))
    assert main(["demand", "--brand", "Globex", "--sales", str(p), "--plot", str(tmp_path / "d.png"), "--json"]) == 0
    assert abs(json.loads(capsys.readouterr().out)["best_lag"] - DEMO_LEAD_DAYS) <= 1


@pytest.mark.parametrize("factor", [1e-300, 1e6, 1e150, 1e300])
def test_analyse_does_not_depend_on_the_sales_unit(factor):
    """Revenue in any currency: the same lead and correlation, the regression in the same unit
    (huge values used to overflow: r = 0 at lag 0, an infinite intercept)."""
    mentions, sales = _series(90, 11, seed=1)
    ref = analyse(mentions, sales, "X", "units", n_perm=99)
    with np.errstate(all="raise"):  # no overflow on the way
        res = analyse(mentions, {d: v * factor for d, v in sales.items()}, "X", "units", n_perm=99)
    assert (res.best_lag, res.best_r, res.p_value, res.ccf) == (ref.best_lag, ref.best_r, ref.p_value, ref.ccf)
    for k in ("slope", "intercept", "mae", "naive_mae"):
        assert res.regression[k] == pytest.approx(ref.regression[k] * factor, rel=1e-3), k
    assert res.regression["r2"] == ref.regression["r2"]
    json.dumps(res.regression, allow_nan=False)


def test_analyse_refuses_sales_that_never_change():
    from pipeline.aggregate.demand import DemandError

    mentions, sales = _series(60, 3, seed=1)
    for v in (0.0, 1e308):
        with pytest.raises(DemandError, match="never change"):
            analyse(mentions, dict.fromkeys(sales, v), "X", "units", n_perm=19)
