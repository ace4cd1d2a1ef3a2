"""`brandmon evaluate`: score a labelled `folders` layout with a registered model.

Every signal the model has is scored on its own and fused (CNN, matcher, fused), each at the
threshold the training run chose for it on its validation split, so the figures printed here
are the ones the model would produce in `brandmon detect`. Logo precision, recall and brand
top-1 come with their 95% Wilson score intervals and counts (`intervals`, per signal too). Folder names match the model's
classes case-insensitively; `no_logo` (any case) holds the images without a brand; a folder
whose class the model does not know counts as a brand the model must miss.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from pipeline.context import Context
from pipeline.detector import NO_LOGO
from pipeline.detector.data import DataError, decode_rgb, load_folders
from pipeline.detector.metrics import evaluate_scores
from pipeline.detector.training.calibrate import signal_matrices
from pipeline.progress import Progress, of


def score_arrays(model: Any, arrays: list[np.ndarray], progress: Progress | None = None,
                 batch_size: int = 32) -> dict[str, np.ndarray]:
    """Per-signal (n, n_brands) scores for decoded RGB images, the way `detect` scores them."""
    from pipeline.detector.model import matcher_view, resize_batch

    spec = model.spec
    probs = []
    tracker = of(progress)(len(arrays), "classifier", "img")
    for i in range(0, len(arrays), batch_size):
        part = resize_batch(arrays[i : i + batch_size], spec.input_size)
        probs.append(model.predict_arrays(part))
        tracker.update(len(part))
    tracker.close()
    cnn = np.concatenate(probs) if probs else np.zeros((0, len(spec.classes)), np.float32)
    match, crop = None, None
    if model.matcher is not None:
        views = [matcher_view(a) for a in arrays]
        match, crop = model.local_scores(views, workers=2, progress=progress)
    return signal_matrices(spec.brands, cnn, spec.classes, match, spec.combiner, crop)


def evaluate_folder(ctx: Context, data: str | Path, version: str | None = None, progress: Progress | None = None,
                    runtime: str | None = None, precision: str | None = None) -> dict[str, Any]:
    """The evaluation report (JSON-ready) of model `version` (default: active) on `data`, scored
    with the runtime `detect` would use (or `runtime`); the report names it."""
    from pipeline.detector.model import choose_precision, configure_threads
    from pipeline.detector.registry import load_model
    from pipeline.detector.runtimes import runtime_setting

    configure_threads(ctx.settings.detector.threads)
    model = load_model(ctx, version, precision=choose_precision(precision or ctx.settings.detector.mixed_precision),
                       runtime=runtime or runtime_setting(ctx))
    spec = model.spec
    by_fold = {c.casefold(): c for c in spec.classes}
    sources = load_folders(data)
    labels = [by_fold.get((s.label or NO_LOGO).casefold(), s.label or NO_LOGO) for s in sources]
    kept: list[str] = []
    unreadable: list[str] = []
    parts: list[dict[str, np.ndarray]] = []
    tracker = of(progress)(len(sources), "evaluate", "img")
    for start in range(0, len(sources), 64):  # bounded memory: decode and score 64 at a time
        arrays = []
        for s, lab in zip(sources[start : start + 64], labels[start : start + 64], strict=True):
            try:
                arrays.append(decode_rgb(s.read()))
                kept.append(lab)
            except Exception:  # noqa: BLE001 - reported, not fatal
                unreadable.append(str(s.path))
        if arrays:
            parts.append(score_arrays(model, arrays))
        tracker.update(min(64, len(sources) - start))
    tracker.close()
    if not parts:
        raise DataError(f"{data}: none of the {len(sources)} images could be decoded; nothing to evaluate")
    labels = kept
    signals = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    thresholds = dict((spec.extra or {}).get("thresholds") or {})
    main = (spec.extra or {}).get("signal") or ("fused" if "fused" in signals else "cnn")
    per_signal = {}
    for name, mat in signals.items():
        thr = float(thresholds.get(name, spec.threshold if name == main else 0.5))
        per_signal[name] = evaluate_scores(labels, mat, spec.brands, thr)
    report = dict(per_signal[main])
    report["model"] = model.version
    report["runtime"] = model.runtime
    report["precision"] = model.precision
    report["signal"] = main
    report["signals"] = {
        name: {"logo": {k: m["logo"][k] for k in ("precision", "recall", "f1")}, "brand_accuracy": m["brand_accuracy"],
               "average_precision": m["average_precision"], "threshold": m["threshold"], "intervals": m["intervals"]}
        for name, m in per_signal.items()
    }
    report["unknown_classes"] = sorted({lab for lab in labels if lab not in spec.classes})
    report["unreadable"] = unreadable
    return report


INTERVAL_NAMES = {"logo_precision": "logo P", "logo_recall": "logo R", "brand_accuracy": "brand top-1"}


def interval_text(key: str, iv: dict[str, Any]) -> str:
    """`logo P 0.956 [0.901, 0.981] (87/91)`: a proportion, its interval and its counts."""
    return f"{INTERVAL_NAMES.get(key, key)} {iv['estimate']:.3f} [{iv['low']:.3f}, {iv['high']:.3f}] ({iv['k']}/{iv['n']})"


def format_report(report: dict[str, Any]) -> str:
    """A short human-readable summary (the --json output has everything)."""
    lines = [
        f"model {report['model']} on {report['n_images']} images ({report['n_logo']} with a brand); "
        f"signal {report['signal']}, threshold {report['threshold']:.3f}",
    ]
    for name, m in report["signals"].items():
        lo = m["logo"]
        lines.append(
            f"  {name:8s} logo P {lo['precision']:.3f}  R {lo['recall']:.3f}  F1 {lo['f1']:.3f}  "
            f"brand top-1 {m['brand_accuracy']:.3f}  AP {m['average_precision']:.3f}"
        )
    lines.append(f"  {report['signal']} with {report.get('interval_method', 'Wilson score, 95% two-sided')} intervals "
                 "[low, high] (count/out of):")
    lines.append("    " + "  ".join(interval_text(k, v) for k, v in report["intervals"].items()))
    if report["unknown_classes"]:
        lines.append(f"  classes the model does not know: {', '.join(report['unknown_classes'])}")
    if report["unreadable"]:
        lines.append(f"  unreadable images skipped: {len(report['unreadable'])}")
    return "\n".join(lines)
