"""`brandmon demand`: do a brand's mentions lead its sales, and by how many days?

1. Both daily series (mentions: posts mentioning the brand, any source; sales: the brand's CSV
   or table) are put on one calendar and *detrended*: each is replaced by its residuals from
   an OLS fit of a linear trend plus day-of-week effects. Raw series share a trend and a weekly
   rhythm, which correlate at every lag and would hide the lead.
2. Cross-correlation of mentions at day t with sales at day t + L for L = 0..42 (only lags
   with at least `MIN_PAIRS` overlapping days). Significance two ways: Bartlett's band
   ±1.96/sqrt(n) per lag (white-noise approximation), and a permutation test of the maximum
   correlation over all lags (mention residuals shuffled `PERMUTATIONS` times, seeded), which
   accounts for having looked at many lags.
3. The best lead L* (the largest positive correlation) and a regression
   sales_t = a + b * mentions_{t-L*}, scored out of sample with an expanding window (fit on the
   days before each test day, predict it) over the last third of the overlap, against the
   naive forecast with the same information (the sales of L* days earlier).
"""

from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.aggregate.forecast import history
from pipeline.context import Context
from pipeline.errors import BrandmonError

MAX_LAG = 42
MIN_PAIRS = 14
PERMUTATIONS = 999
SEED = 20261001


class DemandError(BrandmonError):
    """Too little overlap between mentions and sales, or a bad lag range."""


@dataclass
class LeadLag:
    brand: str
    value_name: str
    first_day: dt.date
    last_day: dt.date
    lags: list[int]
    ccf: list[float]
    pairs: list[int]
    band: list[float]  # Bartlett 95% half-width per lag
    best_lag: int
    best_r: float
    p_value: float  # permutation test of max correlation over the lags
    significant: bool
    regression: dict[str, Any] = field(default_factory=dict)
    skipped_lags: list[int] = field(default_factory=list)


def detrend(y: np.ndarray, days: list[dt.date]) -> np.ndarray:
    """Residuals of y (NaN = missing) from intercept + linear trend + day-of-week effects."""
    ok = np.isfinite(y)
    t = np.arange(len(y), dtype=float)
    x = [np.ones(len(y)), (t - t.mean()) / max(1.0, t.std())]
    wd = np.array([d.weekday() for d in days])
    for k in range(1, 7):
        col = (wd == k).astype(float)
        if col[ok].sum() > 0:
            x.append(col)
    xm = np.column_stack(x)
    out = np.full(len(y), np.nan)
    if ok.sum() > xm.shape[1]:
        beta, *_ = np.linalg.lstsq(xm[ok], y[ok], rcond=None)
        out[ok] = y[ok] - xm[ok] @ beta
    return out


def lagged_corr(m: np.ndarray, s: np.ndarray, lag: int) -> tuple[float, int]:
    """corr(m[t], s[t + lag]) over the days where both exist; (nan, n) if undefined."""
    a, b = (m[:-lag], s[lag:]) if lag else (m, s)
    ok = np.isfinite(a) & np.isfinite(b)
    n = int(ok.sum())
    if n < 3:
        return math.nan, n
    a, b = a[ok] - a[ok].mean(), b[ok] - b[ok].mean()
    den = math.sqrt(float((a * a).sum() * (b * b).sum()))
    return (float((a * b).sum() / den) if den > 0 else math.nan), n


def cross_correlation(m: np.ndarray, s: np.ndarray, max_lag: int = MAX_LAG,
                      min_pairs: int = MIN_PAIRS) -> tuple[list[int], list[float], list[int], list[int]]:
    """(lags, correlations, pairs per lag, lags skipped for too little overlap)."""
    lags, rs, ns, skipped = [], [], [], []
    for lag in range(0, max_lag + 1):
        r, n = lagged_corr(m, s, lag)
        if n < min_pairs or not math.isfinite(r):
            skipped.append(lag)
            continue
        lags.append(lag)
        rs.append(r)
        ns.append(n)
    return lags, rs, ns, skipped


def permutation_p(m: np.ndarray, s: np.ndarray, lags: list[int], observed: float,
                  n_perm: int = PERMUTATIONS, seed: int = SEED) -> float:
    """P(max over lags of corr >= observed) with the mention residuals shuffled (seeded)."""
    rng = np.random.default_rng(seed)
    ok = np.flatnonzero(np.isfinite(m))
    hits = 0
    for _ in range(n_perm):
        shuffled = m.copy()
        shuffled[ok] = m[rng.permutation(ok)]
        best = max((lagged_corr(shuffled, s, lag)[0] for lag in lags), default=math.nan)
        hits += bool(math.isfinite(best) and best >= observed)
    return (hits + 1) / (n_perm + 1)


def _unit(values: np.ndarray) -> float:
    """The largest finite absolute value (1 if none): series are divided by it before any sum of
    squares, so revenue of 1e300 or 1e-300 gives the same answer as units, not an overflow."""
    finite = np.abs(values[np.isfinite(values)])
    top = float(finite.max()) if finite.size else 0.0
    return top if top > 0 else 1.0


def _round(v: float, digits: int) -> float:
    """Rounded to `digits` decimals, or to 4 significant digits when that would lose the value
    (a slope in revenue of 1e-9 units would otherwise print as 0)."""
    return round(v, digits) if v == 0 or abs(v) >= 10 ** -digits else float(f"{v:.4g}")


def _window(mentions: dict[dt.date, float], sales: dict[dt.date, float], max_lag: int) -> tuple[dt.date, dt.date]:
    """The days on which a pair (mentions on t, sales on t + L, 0 <= L <= max_lag) can fall.

    Why: days outside it pair with nothing, and a sales file spanning centuries (or holding
    0001-01-01 and 9999-12-31) would put millions of empty days under the permutation test."""
    lo = max(min(mentions).toordinal(), min(sales).toordinal() - max_lag)
    hi = min(max(mentions).toordinal() + max_lag, max(sales).toordinal())
    inside = [d for series in (mentions, sales) for d in series if lo <= d.toordinal() <= hi]
    return (min(inside), max(inside)) if inside else (min(mentions), min(mentions) - dt.timedelta(days=1))


def lag_regression(mentions: np.ndarray, sales: np.ndarray, lag: int, test_share: float = 1 / 3) -> dict[str, Any]:
    """sales_t = a + b * mentions_{t-lag}: in-sample fit, expanding-window out-of-sample MAE vs naive."""
    unit = _unit(sales)  # fit in units of the largest sale (no overflow), report in the sales' own
    x = mentions[:-lag] if lag else mentions
    y = sales[lag:] / unit
    naive_lag = max(lag, 1)
    ys_prev = np.concatenate([np.full(naive_lag, np.nan), sales[:-naive_lag] / unit])[lag:]  # naive_lag days before
    ok = np.isfinite(x) & np.isfinite(y)
    idx = np.flatnonzero(ok)
    if len(idx) < 8:
        return {}
    b, a = np.polyfit(x[idx], y[idx], 1)
    n_test = max(3, int(round(len(idx) * test_share)))
    errs, naive = [], []
    for j in idx[-n_test:]:
        train = idx[idx < j]
        if len(train) < 5 or not np.isfinite(ys_prev[j]):
            continue
        bj, aj = np.polyfit(x[train], y[train], 1)
        errs.append(abs(aj + bj * x[j] - y[j]))
        naive.append(abs(ys_prev[j] - y[j]))
    resid = y[idx] - (a + b * x[idx])
    r2 = 1 - float((resid ** 2).sum()) / max(1e-12, float(((y[idx] - y[idx].mean()) ** 2).sum()))
    out = {"intercept": _round(float(a) * unit, 3), "slope": _round(float(b) * unit, 4), "r2": round(r2, 3),
           "n": int(len(idx))}
    if errs:
        mae, nmae = float(np.mean(errs)) * unit, float(np.mean(naive)) * unit
        out.update(test_days=len(errs), mae=_round(mae, 3), naive_mae=_round(nmae, 3), naive_lag_days=naive_lag,
                   beats_naive=mae < nmae)
    return out


def analyse(mentions: dict[dt.date, float], sales: dict[dt.date, float], brand: str, value_name: str,
            max_lag: int = MAX_LAG, n_perm: int = PERMUTATIONS) -> LeadLag:
    if not 0 <= max_lag <= 366:
        raise DemandError(f"--max-lag must be between 0 and 366, got {max_lag}")
    if not mentions:
        raise DemandError(f"no aggregated mentions of {brand} (run `brandmon aggregate`)")
    if not sales:
        raise DemandError("no sales rows")
    first, last = _window(mentions, sales, max_lag)
    no_overlap = DemandError(
        f"mentions ({min(mentions)} .. {max(mentions)}) and sales ({min(sales)} .. {max(sales)}) overlap on "
        f"fewer than {MIN_PAIRS} days at every lag 0..{max_lag}; give a longer sales history")
    if (last - first).days + 1 < MIN_PAIRS:
        raise no_overlap
    days = [first + dt.timedelta(days=k) for k in range((last - first).days + 1)]
    m = np.array([mentions.get(d, np.nan) for d in days], float)
    s = np.array([sales.get(d, np.nan) for d in days], float)
    for name, v in (("sales", s), (f"mentions of {brand}", m)):
        if np.isfinite(v).sum() >= MIN_PAIRS and np.nanmax(v) == np.nanmin(v):
            raise DemandError(f"the {name} never change ({np.nanmax(v):g} every day from {first} to {last}): "
                              "nothing to correlate")
    m_res, s_res = detrend(m, days), detrend(s / _unit(s), days)
    lags, rs, ns, skipped = cross_correlation(m_res, s_res, max_lag)
    if not lags:
        raise no_overlap
    k = int(np.argmax(rs))
    p = permutation_p(m_res, s_res, lags, rs[k], n_perm)
    band = [1.96 / math.sqrt(n) for n in ns]
    return LeadLag(brand, value_name, first, last, lags, [round(r, 4) for r in rs], ns, [round(b, 4) for b in band],
                   lags[k], round(rs[k], 4), round(p, 4), bool(p < 0.05 and rs[k] > band[k]),
                   lag_regression(m, s, lags[k]), skipped)


def mention_counts(ctx: Context, brand: str, product: str = "*", platform: str = "*") -> tuple[str, dict[dt.date, float]]:
    brand, _, series = history(ctx, brand, product, platform)
    return brand, {r["day"]: float(r["posts"]) for r in series}


def format_leadlag(res: LeadLag) -> str:
    reg = res.regression
    verdict = ("significant" if res.significant else "NOT significant")
    lines = [
        f"{res.brand} mentions vs {res.value_name}, {res.first_day} .. {res.last_day} (detrended: trend + weekday)",
        f"best lead: mentions lead {res.value_name} by {res.best_lag} day(s), r = {res.best_r:.3f} "
        f"(Bartlett 95% band ±{res.band[res.lags.index(res.best_lag)]:.3f}; permutation p = {res.p_value:.3f} "
        f"over {len(res.lags)} lags): {verdict}",
    ]
    if reg:
        lines.append(f"regression: {res.value_name}_t = {reg['intercept']} + {reg['slope']} x mentions_(t-{res.best_lag}) "
                     f"(R² {reg['r2']}, n {reg['n']})")
        if "mae" in reg:
            lines.append(f"out of sample ({reg['test_days']} last days, expanding window): MAE {reg['mae']} vs naive "
                         f"({res.value_name} {reg['naive_lag_days']} day(s) earlier) MAE {reg['naive_mae']}: "
                         + ("beats the naive forecast" if reg["beats_naive"] else "does NOT beat the naive forecast"))
    if res.skipped_lags:
        lines.append(f"lags {_ranges(res.skipped_lags)} skipped: fewer than {MIN_PAIRS} overlapping days")
    lines.append("lag  r       band   pairs")
    lines += [f"{lag:>3}  {r:+.3f}  {b:.3f}  {n:>5}{'  *' if abs(r) > b else ''}{'  <- best' if lag == res.best_lag else ''}"
              for lag, r, b, n in zip(res.lags, res.ccf, res.band, res.pairs, strict=True)]
    return "\n".join(lines)


def _ranges(values: list[int]) -> str:
    out, start, prev = [], None, None
    for v in values:
        if start is None:
            start = prev = v
        elif v == prev + 1:
            prev = v
        else:
            out.append(f"{start}-{prev}" if start != prev else str(start))
            start = prev = v
    if start is not None:
        out.append(f"{start}-{prev}" if start != prev else str(start))
    return ", ".join(out)


def _mathtext_safe(text: str) -> str:
    return text.replace("$", r"\$")


def plot_leadlag(mentions: dict[dt.date, float], sales: dict[dt.date, float], res: LeadLag, path: str | Path) -> None:
    """Both series on one time axis, mentions shifted forward by the best lead (two y axes)."""
    from pipeline.aggregate.plots import LINE_COLOR, png_axes

    lag = dt.timedelta(days=res.best_lag)
    mentions = {d: v for d, v in mentions.items() if res.first_day <= d <= res.last_day}  # the analysed days
    sales = {d: v for d, v in sales.items() if res.first_day <= d <= res.last_day}
    with png_axes(path, height=3.4) as ax:
        md = sorted(mentions)
        ax.plot([d + lag for d in md], [mentions[d] for d in md], color=LINE_COLOR, lw=1.8,
                label=_mathtext_safe(f"{res.brand} mentions, shifted {res.best_lag} days later"))
        ax.set_ylabel("posts", color=LINE_COLOR)
        ax2 = ax.twinx()
        sd = sorted(sales)
        ax2.plot(sd, [sales[d] for d in sd], color="#d95f02", lw=1.8, label=_mathtext_safe(res.value_name))
        ax2.set_ylabel(_mathtext_safe(res.value_name), color="#d95f02")
        ax.set_title(_mathtext_safe(f"{res.brand}: mentions lead {res.value_name} by {res.best_lag} days "
                                    f"(r = {res.best_r:.2f}, p = {res.p_value:.3f})"), fontsize=11)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="upper left", fontsize=8, frameon=False)
        ax.grid(axis="y", alpha=0.3)
