"""Detector metrics in plain numpy: per-class P/R/F1, logo-vs-no-logo P/R, confusion, PR curve.

Conventions (the same for every signal: CNN, matcher, fused): each image has a score per
brand class; its *logo score* is the highest brand score; it is called a logo when that score
reaches the threshold, and its predicted class is then the top brand, else `no_logo`.
`brand_accuracy` is top-1 over the brand classes, on images whose true class is a brand.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.detector import NO_LOGO


def _prf(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return {"precision": round(p, 4), "recall": round(r, 4), "f1": round(f, 4)}


def pr_curve(is_logo: np.ndarray, score: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall and threshold at every distinct score (descending thresholds)."""
    is_logo = np.asarray(is_logo, bool)
    score = np.asarray(score, float)
    order = np.argsort(-score, kind="stable")
    s, y = score[order], is_logo[order]
    tp = np.cumsum(y)
    fp = np.cumsum(~y)
    last = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1] if len(s) else np.array([], int)
    tp, fp, thr = tp[last], fp[last], s[last]
    pos = max(1, int(is_logo.sum()))
    precision = tp / np.maximum(1, tp + fp)
    recall = tp / pos
    return precision, recall, thr


def average_precision(is_logo: np.ndarray, score: np.ndarray) -> float:
    precision, recall, _ = pr_curve(is_logo, score)
    if not len(recall):
        return 0.0
    prev = np.r_[0.0, recall[:-1]]
    return float(np.sum((recall - prev) * precision))


def threshold_for_precision(is_logo: np.ndarray, score: np.ndarray, target: float) -> dict[str, Any]:
    """The lowest threshold whose precision reaches `target` (most recall at that precision).

    If no threshold reaches it, the one with the best F1 is returned and `target_met` is false,
    so a caller can say so rather than silently shipping a low-precision model.
    """
    precision, recall, thr = pr_curve(is_logo, score)
    ok = np.nonzero(precision >= target)[0]
    if len(ok):
        i = int(ok[np.argmax(recall[ok])])
        # among equal-recall points prefer the lowest threshold (ok is sorted by threshold desc)
        met = True
    else:
        f1 = 2 * precision * recall / np.maximum(1e-9, precision + recall)
        i = int(np.argmax(f1)) if len(f1) else 0
        met = False
    if not len(thr):
        return {"threshold": 0.5, "precision": 0.0, "recall": 0.0, "target": target, "target_met": False}
    return {
        "threshold": float(thr[i]),
        "precision": round(float(precision[i]), 4),
        "recall": round(float(recall[i]), 4),
        "target": target,
        "target_met": met,
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
