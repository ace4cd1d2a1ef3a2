"""The int8 precision cascade: score with int8, re-score the near ties at higher precision.

Why: int8 is about twice as fast as bf16 on this CPU, but a from-scratch classifier's top two
classes are often near ties (FL27: median margin 0.02-0.19), and int8's rounding flips the
top class of 3-5% of photos (issue 15). A photo's top class can only flip when the int8 error
in a difference of two probabilities is larger than the int8 margin between them, so the
photos whose int8 margin is large keep the fp32 top class and only the close ones need the
fp32 network (run in fp32: bf16 keeps ~99.5% of top classes, so it would lose some of the
same near ties).

The margin `m` is chosen when the model is exported, on training images the quantiser did not
calibrate on: the 99th percentile of the int8 error `e` (below). A photo kept at int8 has
margin above m, and its top class can flip only if its error exceeds m, which 1% of photos
do at most: the cascade keeps >= 99% of the fp32 top classes on photos like those, whatever
the share it re-scores (that share is recorded, and it decides the speed).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

RESCORE_QUANTILE = 0.99  # the int8 error quantile the margin covers (top-class agreement >= 99%)


def margins(probs: np.ndarray) -> np.ndarray:
    """Top probability minus the second, per row (0 for a single class)."""
    p = np.asarray(probs, np.float64)
    if p.shape[1] < 2:
        return np.zeros(len(p))
    top2 = np.sort(p, axis=1)[:, -2:]
    return top2[:, 1] - top2[:, 0]


def int8_error(low: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Per row, the largest change int8 made to a difference between its top class and any
    other: max_c |(low[a] - low[c]) - (ref[a] - ref[c])|, a = the int8 top class. The fp32 top
    class differs from int8's only where this exceeds the int8 margin."""
    low, ref = np.asarray(low, np.float64), np.asarray(ref, np.float64)
    a = low.argmax(axis=1)
    rows = np.arange(len(low))
    diff = (low[rows, a][:, None] - low) - (ref[rows, a][:, None] - ref)
    return np.abs(diff).max(axis=1)


def choose_margin(low: np.ndarray, ref: np.ndarray, quantile: float = RESCORE_QUANTILE) -> float:
    """The re-score margin: the `quantile` (upper, nearest rank) of the int8 error over the rows;
    on fewer rows than the quantile can resolve (under 100 for 0.99), their largest error."""
    err = np.sort(int8_error(low, ref))
    if not len(err):
        return 0.0
    if len(err) * (1 - quantile) < 1:
        return float(err[-1])
    rank = min(len(err) - 1, max(0, math.ceil(quantile * len(err)) - 1))
    return float(err[rank])


def cascade(low: np.ndarray, margin: float, rescore: Any, x: np.ndarray) -> tuple[np.ndarray, int]:
    """(probabilities, rows re-scored): `low` where its margin is above `margin`, else `rescore(x[rows])`."""
    out = np.array(low, np.float32, copy=True)
    rows = np.flatnonzero(margins(low) <= margin)
    if len(rows):
        out[rows] = np.asarray(rescore(x[rows]), np.float32)
    return out, int(len(rows))


def check_figures(low: np.ndarray, ref: np.ndarray, margin: float) -> dict[str, float]:
    """What the chosen margin does on the check images: share re-scored, top-class agreement
    with fp32 (`ref`, which also re-scores) of int8 alone and of the cascade."""
    low, ref = (np.asarray(a, np.float64) for a in (low, ref))
    rescored = margins(low) <= margin
    top = np.where(rescored, ref.argmax(1), low.argmax(1))
    n = max(1, len(ref))
    return {"rescored_share": round(float(rescored.sum()) / n, 4),
            "int8_top_class_agreement": round(float((low.argmax(1) == ref.argmax(1)).sum()) / n, 4),
            "cascade_top_class_agreement": round(float((top == ref.argmax(1)).sum()) / n, 4)}
