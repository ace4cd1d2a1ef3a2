"""Detector metrics in plain numpy: per-class P/R/F1, logo-vs-no-logo P/R, confusion, PR curve.

Every proportion reported (logo precision, recall, brand top-1) carries its 95% Wilson score
interval and the counts behind it (`intervals`): on a split of ~200 photos a point estimate
moves by several points from one sample of photos to the next.

Conventions (the same for every signal: CNN, matcher, fused): each image has a score per
brand class; its *logo score* is the highest brand score; it is called a logo when that score
reaches the threshold, and its predicted class is then the top brand, else `no_logo`.
`brand_accuracy` is top-1 over the brand classes, on images whose true class is a brand.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from statistics import NormalDist
from typing import Any

import numpy as np

from pipeline.detector import NO_LOGO


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)}


def pr_counts(is_logo: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """True and false positives called at every distinct score (descending thresholds)."""
    is_logo = np.asarray(is_logo, bool)
    score = np.asarray(score, float)
    order = np.argsort(-score, kind="stable")
    s, y = score[order], is_logo[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.array([], int)
    return tp[last], fp[last], s[last]


def pr_curve(is_logo: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at every distinct score (descending thresholds)."""
    tp, fp, thr = pr_counts(is_logo, score)
    pos = max(1, int(np.asarray(is_logo, bool).sum()))
    precision = tp / np.maximum(1, tp + fp)
    recall = tp / pos
    return precision, recall, thr


def average_precision(is_logo: np.ndarray, score: np.ndarray) -> float:
    precision, recall, _ = pr_curve(is_logo, score)
    if not len(recall):
        return 0.0
    prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev) * precision))


THRESHOLD_RULES = ("wilson", "point")
INTERVAL_METHOD = "Wilson score, 95% two-sided"


def z_of(confidence: float) -> float:
    """The two-sided normal quantile of a confidence level (0.95 -> 1.96)."""
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1, not {confidence!r}")
    return NormalDist().inv_cdf(0.5 + confidence / 2.0)


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion k/n (two-sided; (0, 1) when n is 0).

    Why Wilson: unlike the normal (Wald) interval it stays inside [0, 1] and does not collapse
    to a point at k = n, which is where a detector's precision usually sits.
    """
    if n <= 0:
        return 0.0, 1.0
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    z = z_of(confidence)
    p = k / n
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half))


def proportion(k: int, n: int, confidence: float = 0.95) -> dict[str, Any]:
    """A proportion with its Wilson interval and the counts behind it (JSON-ready)."""
    low, high = wilson_interval(k, n, confidence)
    return {"estimate": round(k / n, 4) if n else 0.0, "low": round(low, 4), "high": round(high, 4),
            "k": int(k), "n": int(n)}


def threshold_for_precision(is_logo: np.ndarray, score: np.ndarray, target: float, rule: str = "point",
                            confidence: float = 0.95) -> dict[str, Any]:
    """The lowest threshold (most recall) whose precision reaches `target` under `rule`.

    `point`: the precision measured on these images reaches `target` -- on a small validation
    split about half of such choices fall below `target` on new images. `wilson`: the lower end
    of the precision's Wilson interval at `confidence` reaches it -- a margin that shrinks as
    the split grows. When no threshold has that margin, `wilson` takes, among the thresholds
    whose measured precision reaches `target`, the one with the highest lower bound, and says
    `margin_met: false`. If none reaches `target` at all, the best-F1 threshold is returned with
    `target_met: false`, so a caller can say so rather than silently ship a low-precision model.
    """
    if rule not in THRESHOLD_RULES:
        raise ValueError(f"threshold rule must be one of {', '.join(THRESHOLD_RULES)}, not {rule!r}")
    tp, fp, thr = pr_counts(is_logo, score)
    precision = tp / np.maximum(1, tp + fp)
    recall = tp / max(1, int(np.asarray(is_logo, bool).sum()))
    if not len(thr):
        return {"threshold": 0.5, "precision": 0.0, "recall": 0.0, "target": target, "target_met": False,
                "rule": rule, "margin_met": False}
    called = tp + fp
    lows = np.array([wilson_interval(int(a), int(b), confidence)[0] for a, b in zip(tp, called, strict=True)])
    ok = np.nonzero(precision >= target)[0]
    sure = np.nonzero(lows >= target)[0]
    if rule == "wilson" and len(sure):
        i = int(sure[np.argmax(recall[sure])])
    elif rule == "wilson" and len(ok):
        i = int(ok[np.argmax(lows[ok])])
    elif len(ok):
        # ok runs from high to low thresholds: argmax takes the most recall, and of equal-recall
        # points the highest threshold (no extra false positive for the same hits)
        i = int(ok[np.argmax(recall[ok])])
    else:
        f1 = 2 * precision * recall / np.maximum(1e-9, precision + recall)
        i = int(np.argmax(f1))
    return {
        "threshold": float(thr[i]),
        "precision": round(float(precision[i]), 4),
        "recall": round(float(recall[i]), 4),
        "target": target,
        "target_met": bool(precision[i] >= target),
        "rule": rule,
        "confidence": confidence,
        "precision_low": round(float(lows[i]), 4),
        "margin_met": bool(lows[i] >= target),
        "tp": int(tp[i]),
        "called": int(called[i]),
    }


def evaluate_scores(
    y_true: Sequence[str], scores: np.ndarray, brands: Sequence[str], threshold: float
) -> dict[str, Any]:
    """All figures for one signal: `scores[i, j]` is image i's score for `brands[j]`."""
    brands = list(brands)
    scores = np.asarray(scores, float).reshape(len(y_true), len(brands))
    y_true = [str(y) for y in y_true]
    n = len(y_true)
    logo_score = scores.max(axis=1) if brands else np.zeros(n)
    top = scores.argmax(axis=1) if brands else np.zeros(n, int)
    called = logo_score >= threshold
    pred = [brands[t] if c else NO_LOGO for t, c in zip(top, called, strict=True)]
    is_logo = np.array([y != NO_LOGO for y in y_true], bool)

    tp = int(np.sum(is_logo & called))
    fp = int(np.sum(~is_logo & called))
    fn = int(np.sum(is_logo & ~called))
    tn = int(np.sum(~is_logo & ~called))
    logo = {**_prf(tp, fp, fn), "tp": tp, "fp": fp, "fn": fn, "tn": tn}

    with_brand = [i for i, y in enumerate(y_true) if y != NO_LOGO]
    brand_hits = sum(1 for i in with_brand if brands and brands[top[i]] == y_true[i])
    brand_accuracy = brand_hits / len(with_brand) if with_brand else 0.0

    labels = [NO_LOGO, *brands]
    labels += sorted({y for y in y_true if y not in labels})  # true classes the model lacks
    index = {c: k for k, c in enumerate(labels)}
    confusion = np.zeros((len(labels), len(labels)), int)
    for t, p in zip(y_true, pred, strict=True):
        confusion[index[t], index[p]] += 1
    per_class: dict[str, dict[str, float]] = {}
    for c, k in index.items():
        support = int(confusion[k].sum())
        if not support and not confusion[:, k].sum():
            continue
        ctp = int(confusion[k, k])
        per_class[c] = {**_prf(ctp, int(confusion[:, k].sum()) - ctp, support - ctp), "support": support}
    exact = sum(1 for t, p in zip(y_true, pred, strict=True) if t == p)
    intervals = {
        "logo_precision": proportion(tp, tp + fp),  # photos called a logo that have one
        "logo_recall": proportion(tp, tp + fn),  # logo photos called a logo
        "brand_accuracy": proportion(brand_hits, len(with_brand)),  # logo photos whose top brand is right
    }
    return {
        "n_images": n,
        "n_logo": int(is_logo.sum()),
        "threshold": round(float(threshold), 6),
        "logo": logo,
        "brand_accuracy": round(brand_accuracy, 4),
        "accuracy": round(exact / n, 4) if n else 0.0,
        "average_precision": round(average_precision(is_logo, logo_score), 4),
        "per_class": per_class,
        "confusion": {"labels": labels, "matrix": confusion.tolist()},
        "intervals": intervals,
        "interval_method": INTERVAL_METHOD,
    }


def plot_pr_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], path: Path, title: str, marks: dict[str, tuple[float, float]] | None = None) -> Path:
    """Write a precision-recall PNG (matplotlib, Agg backend: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.5), dpi=100)
    for name, (precision, recall) in curves.items():
        ax.plot(recall, precision, label=name, drawstyle="steps-post")
    for name, (r, p) in (marks or {}).items():
        ax.plot([r], [p], "o", label=name)
    ax.set_xlabel("recall (logo vs no_logo)")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1.01)
    ax.set_ylim(0, 1.01)
    ax.grid(alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="lower left", fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
