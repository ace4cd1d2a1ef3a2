"""`brandmon forecast`: expected daily mentions ahead, with prediction intervals, backtested.

Model: exponential smoothing (statsmodels `ETSModel`, additive errors, additive weekly
seasonality), with no trend or an additive damped trend, whichever has the lower AICc on the
history. Its 95% prediction intervals are the model's analytic ones, floored at zero.

Why trust it: a rolling-origin backtest refits the chosen model at each of the last
`BACKTEST_ORIGINS` days that leave a full backtest horizon (up to 7 days) and compares its
errors with the seasonal-naive forecast (the same weekday one week earlier) over the same
points. Both are given as MAE and MASE (MAE over the in-sample mean absolute weekly
difference, so the seasonal-naive one-step forecast scores about 1). When the model does not
beat the baseline the result says so, and why when the history shows it (spike days no model
of the weekly pattern foresees). Histories shorter than three weeks are not forecast.

`refresh_forecasts` stores each brand's forecast in `demand_signal` (read through the
`v_forecast` view); it is idempotent: a forecast whose input series is unchanged is skipped,
a changed one replaces the rows of the same issue day.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from sqlalchemy import delete, func, insert, select

from pipeline.aggregate.trends import daily_series, resolve_key
from pipeline.context import Context
from pipeline.errors import BrandmonError
from pipeline.schema import demand_signal, mention_daily, utcnow

log = logging.getLogger(__name__)

SEASON = 7
MIN_HISTORY = 21  # three weeks: two to initialise the weekly pattern, one to check it
MAX_HISTORY = 730  # days read back from the last aggregated day
MAX_HORIZON = 366
BACKTEST_HORIZON = 7
BACKTEST_ORIGINS = 10
MIN_TRAIN = 14
LEVEL = 0.95
DEFAULT_HORIZON = 28


class ForecastError(BrandmonError):
    """A bad horizon or an unknown brand."""


@dataclass
class Forecast:
    brand: str
    product: str
    platform: str
    status: str  # ok | too_short | no_data | unchanged
    message: str
    history_days: int = 0
    first_day: dt.date | None = None
    issued_on: dt.date | None = None  # last day of the history
    method: str = ""
    days: list[dt.date] = field(default_factory=list)
    expected: list[float] = field(default_factory=list)
    lower: list[float] = field(default_factory=list)
    upper: list[float] = field(default_factory=list)
    backtest: dict[str, Any] = field(default_factory=dict)
    input_hash: str = ""

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        return json.loads(json.dumps(d, default=lambda v: v.isoformat() if isinstance(v, dt.date) else str(v)))


# --- the statistics (plain functions on arrays) ----------------------------------------------


def seasonal_naive(train: np.ndarray, horizon: int, m: int = SEASON) -> np.ndarray:
    """Each day ahead = the same weekday of the last observed week."""
    last = train[-m:]
    return np.array([last[k % m] for k in range(horizon)], dtype=float)


def mase_scale(y: np.ndarray, m: int = SEASON) -> float | None:
    """In-sample mean absolute seasonal difference (MASE's denominator); None if zero/undefined."""
    if len(y) <= m:
        return None
    s = float(np.mean(np.abs(y[m:] - y[:-m])))
    return s if s > 0 else None


def _fit(y: np.ndarray, start: dt.date, trend: bool) -> Any:
    import pandas as pd
    from statsmodels.tsa.exponential_smoothing.ets import ETSModel

    series = pd.Series(y, index=pd.date_range(start.isoformat(), periods=len(y), freq="D"))
    model = ETSModel(series, error="add", trend="add" if trend else None, damped_trend=trend,
                     seasonal="add", seasonal_periods=SEASON)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # convergence chatter on short, flat series
        return model.fit(disp=False, maxiter=200)


def choose_model(y: np.ndarray, start: dt.date) -> tuple[bool, Any]:
    """(damped trend?, fitted result) with the lower AICc; no trend if the trended fit fails."""
    best = None
    for trend in (False, True):
        try:
            res = _fit(y, start, trend)
        except (ValueError, np.linalg.LinAlgError) as exc:
            log.debug("ETS fit (trend=%s) failed: %s", trend, exc)
            continue
        aicc = float(res.aicc) if res.aicc is not None and math.isfinite(res.aicc) else math.inf
        if best is None or aicc < best[0]:
            best = (aicc, trend, res)
    if best is None:
        raise ValueError("no exponential smoothing model could be fitted")
    return best[1], best[2]


def predict(res: Any, n: int, horizon: int, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    frame = res.get_prediction(start=n, end=n + horizon - 1).summary_frame(alpha=1 - level)
    mean = np.maximum(frame["mean"].to_numpy(float), 0.0)
    lo = np.maximum(frame["pi_lower"].to_numpy(float), 0.0)
    hi = np.maximum(frame["pi_upper"].to_numpy(float), 0.0)
    return mean, lo, hi


def backtest(y: np.ndarray, start: dt.date, trend: bool, horizon: int = BACKTEST_HORIZON,
             origins: int = BACKTEST_ORIGINS, fit_y: np.ndarray | None = None) -> dict[str, Any]:
    """Rolling-origin errors of the model (spec fixed, refitted per origin on `fit_y`, default
    `y`) vs seasonal naive, both scored against the actual `y`."""
    fit_y = y if fit_y is None else fit_y
    n = len(y)
    h = min(horizon, n - MIN_TRAIN)
    if h < 1:
        return {}
    cut = list(range(max(MIN_TRAIN, n - h - origins + 1), n - h + 1))
    err_m, err_b = [], []
    for o in cut:
        try:
            res = _fit(fit_y[:o], start, trend)
            f = np.maximum(np.asarray(res.forecast(h), float), 0.0)
        except (ValueError, np.linalg.LinAlgError):
            f = np.full(h, np.nan)
        actual = y[o:o + h]
        err_m.extend(np.abs(f - actual))
        err_b.extend(np.abs(seasonal_naive(y[:o], h) - actual))
    em, eb = np.array(err_m), np.array(err_b)
    ok = np.isfinite(em)
    if not ok.any():
        return {}
    mae, bmae = float(em[ok].mean()), float(eb[ok].mean())
    scale = mase_scale(y)
    return {
        "origins": len(cut), "horizon": h, "first_origin": (start + dt.timedelta(days=cut[0])).isoformat(),
        "mae": round(mae, 3), "baseline_mae": round(bmae, 3),
        "mase": round(mae / scale, 3) if scale else None,
        "baseline_mase": round(bmae / scale, 3) if scale else None,
        "beats_baseline": mae < bmae,
    }


def despiked(y: np.ndarray, spike: list[bool], half_width: int = 3) -> np.ndarray:
    """`y` with each spike day replaced by the median of its non-spike neighbours (3 days each
    side): local, so a spike on a rising series is put back near the level of its week, not at
    the trailing 28-day mean."""
    out = y.copy()
    for i in np.flatnonzero(spike):
        near = [y[j] for j in range(max(0, i - half_width), min(len(y), i + half_width + 1)) if j != i and not spike[j]]
        if near:
            out[i] = float(np.median(near))
    return out


def forecast_series(y: np.ndarray, start: dt.date, horizon: int = DEFAULT_HORIZON,
                    fit_y: np.ndarray | None = None) -> dict[str, Any]:
    """Model choice, forecast, intervals and backtest of a daily count series starting on `start`.

    `fit_y`: the series the model is fitted on, if not `y` (spike days despiked: an
    additive weekly season otherwise learns a one-off spike as a weekday effect and forecasts it
    again every week); the backtest still scores against `y`."""
    fit_y = y if fit_y is None else fit_y
    n = len(y)
    if np.ptp(y) == 0:  # a constant series: ETS is degenerate, the forecast is the constant
        mean = np.full(horizon, float(y[-1]))
        return {"method": "constant (the history never varies)", "expected": mean, "lower": mean, "upper": mean,
                "backtest": {"origins": 0, "horizon": 0, "mae": 0.0, "baseline_mae": 0.0, "mase": None,
                             "baseline_mase": None, "beats_baseline": False}}
    trend, res = choose_model(fit_y, start)
    mean, lo, hi = predict(res, n, horizon)
    method = f"ETS(A,{'Ad' if trend else 'N'},A) weekly, statsmodels"
    if (adjusted := int((fit_y != y).sum())):
        method += f"; {adjusted} spike day(s) despiked"
    return {"method": method, "expected": mean, "lower": lo, "upper": hi,
            "backtest": backtest(y, start, trend, fit_y=fit_y)}


# --- reading the history and explaining the result ---------------------------------------------


def history(ctx: Context, brand: str, product: str = "*", platform: str = "*",
            end: dt.date | None = None) -> tuple[str, str, list[dict[str, Any]]]:
    """The brand's daily series ('any' source) from its first to its last aggregated day."""
    brand, product = resolve_key(ctx, brand, product)
    md = mention_daily.c
    q = select(func.min(md.day), func.max(md.day)).where(
        md.brand == brand, md.product == product, md.platform == platform, md.source == "any")
    if end is not None:
        q = q.where(md.day <= end)
    with ctx.engine.connect() as conn:
        first, last = conn.execute(q).one()
    if first is None:
        return brand, product, []
    first = max(first, last - dt.timedelta(days=MAX_HISTORY - 1))
    return brand, product, daily_series(ctx, brand, first, last, product=product, platform=platform)


def _why_not(series: list[dict[str, Any]], bt: dict[str, Any]) -> str:
    spikes = [r["day"].isoformat() for r in series if r.get("spike")]
    why = (f"the backtest MAE {bt['mae']} is not below the seasonal-naive {bt['baseline_mae']}")
    if spikes:
        why += (f"; the history has {len(spikes)} spike day(s) ({', '.join(spikes[:3])}) that no model of the "
                "weekly pattern foresees, and which throw both forecasts off for the week after")
    elif len(series) < 6 * SEASON:
        why += f"; with {len(series)} days the weekly pattern is estimated from few weeks"
    return why


def make_forecast(ctx: Context, brand: str, product: str = "*", platform: str = "*",
                  horizon: int = DEFAULT_HORIZON, end: dt.date | None = None,
                  known: Callable[[Forecast], bool] | None = None) -> Forecast:
    """The forecast of one series; `known(fc)` True (input already forecast) stops before fitting."""
    if not 1 <= horizon <= MAX_HORIZON:
        raise ForecastError(f"--horizon must be between 1 and {MAX_HORIZON} days, got {horizon}")
    brand, product, series = history(ctx, brand, product, platform, end)
    fc = Forecast(brand, product, platform, "no_data", "")
    if not series:
        where = (f" / {product}" if product != "*" else "") + (f" on platform {platform!r}" if platform != "*" else "")
        fc.message = (f"no aggregated mentions of {brand}{where}" + (f" up to {end}" if end else "")
                      + " (check the names, or run `brandmon aggregate`)")
        return fc
    y = np.array([float(r["posts"]) for r in series])
    fc.history_days, fc.first_day, fc.issued_on = len(y), series[0]["day"], series[-1]["day"]
    fc.input_hash = hashlib.sha256(json.dumps([fc.issued_on.isoformat(), horizon, y.tolist()]).encode()).hexdigest()
    if len(y) < MIN_HISTORY:
        fc.status = "too_short"
        fc.message = (f"history too short to forecast: {len(y)} day(s) of {brand} mentions "
                      f"({fc.first_day} .. {fc.issued_on}); a weekly-seasonal forecast needs at least "
                      f"{MIN_HISTORY} days (three weeks)")
        return fc
    if known is not None and known(fc):
        fc.status, fc.message = "unchanged", "already forecast from the same history"
        return fc
    out = forecast_series(y, fc.first_day, horizon, fit_y=despiked(y, [bool(r.get("spike")) for r in series]))
    fc.status, fc.method, fc.backtest = "ok", out["method"], out["backtest"]
    fc.days = [fc.issued_on + dt.timedelta(days=k + 1) for k in range(horizon)]
    fc.expected = [round(float(v), 3) for v in out["expected"]]
    fc.lower = [round(float(v), 3) for v in out["lower"]]
    fc.upper = [round(float(v), 3) for v in out["upper"]]
    bt = fc.backtest
    if bt.get("origins"):
        fc.message = ("beats the seasonal-naive baseline in the backtest" if bt["beats_baseline"]
                      else "does NOT beat the seasonal-naive baseline: " + _why_not(series, bt))
    else:
        fc.message = "no backtest (history too short or constant)"
    return fc


def format_forecast(fc: Forecast) -> str:
    head = f"{fc.brand}" + (f" / {fc.product}" if fc.product != "*" else "") + \
        (f" on {fc.platform}" if fc.platform != "*" else "")
    if fc.status != "ok":
        return f"{head}: {fc.message}"
    bt = fc.backtest
    lines = [f"{head}: expected daily posts for {len(fc.days)} days after {fc.issued_on} "
             f"(history {fc.first_day} .. {fc.issued_on}, {fc.history_days} days; {fc.method})"]
    if bt.get("origins"):
        lines.append(f"backtest: {bt['origins']} rolling origins from {bt['first_origin']}, {bt['horizon']}-day "
                     f"horizon: MAE {bt['mae']} (MASE {bt['mase']}) vs seasonal naive MAE {bt['baseline_mae']} "
                     f"(MASE {bt['baseline_mase']}): {fc.message}")
    else:
        lines.append(f"backtest: {fc.message}")
    lines.append(f"{'day':<12}{'expected':>10}{'95% low':>10}{'95% high':>10}")
    lines += [f"{d.isoformat():<12}{e:>10.1f}{lo:>10.1f}{hi:>10.1f}"
              for d, e, lo, hi in zip(fc.days, fc.expected, fc.lower, fc.upper, strict=True)]
    return "\n".join(lines)


# --- the demand_signal table ---------------------------------------------------------------------


def _key(fc: Forecast) -> tuple[Any, ...]:
    ds = demand_signal.c
    return (ds.brand == fc.brand, ds.product == fc.product, ds.platform == fc.platform, ds.issued_on == fc.issued_on)


def stored_hash(conn, fc: Forecast) -> str | None:
    return conn.execute(select(demand_signal.c.input_hash).where(*_key(fc)).limit(1)).scalar()


def store_forecast(conn, fc: Forecast) -> int:
    """Replace the rows of this key and issue day (none if unchanged); returns rows written."""
    key = _key(fc)
    if stored_hash(conn, fc) == fc.input_hash:
        return 0
    conn.execute(delete(demand_signal).where(*key))
    bt, now = fc.backtest, utcnow()
    rows = [{
        "brand": fc.brand, "product": fc.product, "platform": fc.platform, "issued_on": fc.issued_on, "day": d,
        "horizon_days": k + 1, "expected": e, "lower_95": lo, "upper_95": hi, "method": fc.method[:64],
        "history_days": fc.history_days, "backtest_mae": bt.get("mae"), "baseline_mae": bt.get("baseline_mae"),
        "mase": bt.get("mase"), "beats_baseline": bt.get("beats_baseline"), "input_hash": fc.input_hash,
        "computed_at": now,
    } for k, (d, e, lo, hi) in enumerate(zip(fc.days, fc.expected, fc.lower, fc.upper, strict=True))]
    if rows:
        conn.execute(insert(demand_signal), rows)
    return len(rows)


def refresh_forecasts(ctx: Context, horizon: int = DEFAULT_HORIZON) -> dict[str, int]:
    """Forecast every catalogue brand (all products, all platforms) into `demand_signal`."""
    counts = {"forecasts": 0, "rows_written": 0, "too_short": 0, "unchanged": 0}

    def known(fc: Forecast) -> bool:
        with ctx.engine.connect() as conn:
            return stored_hash(conn, fc) == fc.input_hash

    for b in ctx.settings.brands:
        fc = make_forecast(ctx, b.name, horizon=horizon, known=known)
        counts["too_short"] += fc.status == "too_short"
        counts["unchanged"] += fc.status == "unchanged"
        if fc.status != "ok":
            continue
        counts["forecasts"] += 1
        with ctx.engine.begin() as conn:
            counts["rows_written"] += store_forecast(conn, fc)
    return counts


def plot_forecast(fc: Forecast, history_rows: list[dict[str, Any]], path: Any) -> None:
    """History (bars), forecast (line) and its 95% interval (band) in one PNG."""
    from pipeline.aggregate.plots import LINE_COLOR, posts_chart

    bt = fc.backtest
    note = (f" (backtest MASE {bt['mase']} vs seasonal naive {bt['baseline_mase']})" if bt.get("origins") else "")
    days, posts = [r["day"] for r in history_rows], [r["posts"] for r in history_rows]
    with posts_chart(path, days, posts, f"{fc.brand}: expected posts per day{note}") as ax:
        if fc.status == "ok":
            ax.fill_between(fc.days, fc.lower, fc.upper, color=LINE_COLOR, alpha=0.18, label="95% interval")
            ax.plot(fc.days, fc.expected, color=LINE_COLOR, lw=2, label="forecast")
