"""Stage 4, evaluate: the held-out figures at the validation-chosen thresholds, the PR curve,
and the test split written out as a `folders` layout (`brandmon evaluate` re-scores it)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.context import Context
from pipeline.detector import NO_LOGO
from pipeline.detector.data import Sample, crop, decode_rgb
from pipeline.detector.metrics import evaluate_scores, plot_pr_curves, pr_curve
from pipeline.detector.training.calibrate import Calibration

SCORES_FILE = "scores.npz"  # per-photo val/test scores of every signal, beside the PR curve


def summary(m: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one `evaluate_scores` report, with their 95% intervals and counts."""
    return {"logo": {k: m["logo"][k] for k in ("precision", "recall", "f1")}, "brand_accuracy": m["brand_accuracy"],
            "average_precision": m["average_precision"], "n_images": m["n_images"], "threshold": m["threshold"],
            "intervals": m["intervals"]}


def heldout_metrics(cal: Calibration, brands: list[str], y_val: list[str], y_test: list[str],
                    target_precision: float) -> dict[str, Any]:
    """The registry's `metrics`: the main signal's test figures first, then every signal's."""
    val, test = {}, {}
    for name, mat in cal.signals["val"].items():
        thr = cal.thresholds[name]["threshold"]
        val[name] = evaluate_scores(y_val, mat, brands, thr)
        test[name] = evaluate_scores(y_test, cal.signals["test"][name], brands, thr)
    headline = test[cal.main]
    return {
        "signal": cal.main,
        "precision": headline["logo"]["precision"],
        "recall": headline["logo"]["recall"],
        "f1": headline["logo"]["f1"],
        "brand_accuracy": headline["brand_accuracy"],
        "intervals": headline["intervals"],
        "interval_method": headline["interval_method"],
        "n_test": headline["n_images"],
        "target_precision": target_precision,
        "thresholds": cal.thresholds,
        "fusion": cal.fusion,
        "test": test,
        "val": {k: summary(v) for k, v in val.items()},
        "per_signal_test": {k: summary(v) for k, v in test.items()},
    }


def save_scores(path: Path, brands: list[str], signals: dict[str, dict[str, np.ndarray]],
                labels: dict[str, list[str]]) -> Path:
    """Every val/test photo's per-brand score of each signal, and its label, as one .npz.

    Why: how stable a threshold rule is on new photos can only be measured with the scores it
    was chosen from (bench/operating_point.py); re-scoring a model costs minutes.
    """
    arrays: dict[str, np.ndarray] = {"brands": np.array(brands, dtype=str)}
    for split, mats in signals.items():
        arrays[f"{split}/labels"] = np.array(labels[split], dtype=str)
        for name, mat in mats.items():
            arrays[f"{split}/{name}"] = np.asarray(mat, np.float64)  # exact: thresholds are these values
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def write_reports(ctx: Context, version: str, test_samples: list[Sample], test_signals: dict[str, np.ndarray],
                  scores: tuple[list[str], dict[str, dict[str, np.ndarray]], dict[str, list[str]]] | None = None,
                  ) -> dict[str, str]:
    """The PR curve PNG (lake + local), the held-out split as a folders layout, and (given
    `scores` = brands, split -> signal -> matrix, split -> labels) the per-photo scores."""
    y = np.array([s.label != NO_LOGO for s in test_samples])
    curves = {}
    for name, mat in test_signals.items():
        if len(y):
            p, r, _ = pr_curve(y, mat.max(axis=1))
            curves[name] = (p, r)
    local = Path(ctx.settings.home) / "models" / version
    png = plot_pr_curves(curves, local / "pr_curve.png", f"{version}: held-out test split", {})
    ctx.store.put(f"models/{version}/pr_curve.png", png.read_bytes(), content_type="image/png")
    out = {"pr_curve": str(png)}
    if scores is not None:
        npz = save_scores(local / SCORES_FILE, *scores)
        ctx.store.put(f"models/{version}/{SCORES_FILE}", npz.read_bytes(), content_type="application/octet-stream")
        out["scores"] = str(npz)
    out["eval_dir"] = str(export_split(test_samples, Path(ctx.settings.home) / "eval" / version))
    return out


def export_split(samples: list[Sample], out: Path) -> Path:
    """Write samples as `out/<Class>/<file>`: whole images byte for byte, regions as JPEG."""
    from PIL import Image

    from pipeline.safepath import safe_join

    out.mkdir(parents=True, exist_ok=True)
    for s in samples:
        d = safe_join(out, s.label, what="class")  # class names come from training data
        d.mkdir(exist_ok=True)
        if s.region is None:
            suffix = s.source.path.suffix.lower() if s.source.path else ".jpg"
            (d / f"{s.source.sha256[:16]}{suffix}").write_bytes(s.source.read())
        else:
            arr = crop(decode_rgb(s.source.read()), s.region)
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=95)
            (d / f"{s.key[:16]}.jpg").write_bytes(buf.getvalue())
    return out
