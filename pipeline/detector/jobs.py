"""The detector's job API: what Airflow tasks, the demo and the CLI call.

Cheap to import (no TensorFlow at module level), so DAG parsing stays fast. Every job takes a
`Context` and returns plain, JSON-ready data (XCom-sized where a DAG passes it on).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from pipeline.context import Context
from pipeline.progress import Progress

log = logging.getLogger(__name__)


def train_model(
    ctx: Context,
    data: str | Path,
    *,
    fmt: str = "folders",
    weights: str = "auto",
    epochs: int | None = None,
    target_precision: float = 0.9,
    profile: str = "default",
    activate: str = "if_better",
    progress: Progress | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Train on `data` (folders | boxes), register the version; returns version, metrics, activated.

    `profile="demo"`: a small from-scratch model for the synthetic brand marks (about a
    minute on 2 cores). `options` override single training settings by their flat names (see
    `training.config.TrainConfig`). `progress`: how to report (default: silently).
    """
    from pipeline.detector.train import train

    return train(
        ctx, data, fmt=fmt, weights=weights, epochs=epochs, target_precision=target_precision,
        profile=profile, activate=activate, progress=progress, **options,
    )


def active_model(ctx: Context) -> dict[str, Any] | None:
    """The active version: version, classes, threshold, base, weights, metrics (precision/recall)."""
    from pipeline.detector.registry import active_version

    row = active_version(ctx)
    if row is None:
        return None
    return {
        "version": row["version"],
        "classes": list(row["classes"]),
        "threshold": float(row["threshold"]),
        "base": row["base"],
        "weights": row["weights"],
        "input_size": row["input_size"],
        "metrics": dict(row["metrics"] or {}),
        "created_at": row["created_at"].isoformat() if row["created_at"] else None,
    }


def pending_batches(ctx: Context, batch_size: int | None = None) -> list[str]:
    """Keys of the unscored-image ranges for the active model (each `batch_size` images).

    Each key is `VERSION:first_sha:last_sha` (~140 bytes), small enough for XCom; an empty
    list when there is no active model or nothing to score.
    """
    from pipeline.detector.infer import pending_batches as _pending
    from pipeline.detector.registry import active_version

    row = active_version(ctx)
    if row is None:
        log.warning("no active detector model: nothing to schedule (train one with `brandmon train`)")
        return []
    return _pending(ctx, row["version"], int(batch_size or ctx.settings.detector.batch_size * 32))


def detect_pending(
    ctx: Context, *, batch_key: str | None = None, limit: int | None = None, progress: Progress | None = None
) -> dict[str, int]:
    """Score unscored images: those of one batch key, or all of them for the active model.

    Returns counts (images, scored, corrupt, detections, review, batches); with no active
    model, `{"images": 0, "no_active_model": 1}` rather than an error, so a nightly DAG run
    before the first training is a no-op.
    """
    from pipeline.dag_assets import parse_batch_key
    from pipeline.detector.infer import detect
    from pipeline.detector.registry import active_version

    if batch_key is not None:
        version, lo, hi = parse_batch_key(batch_key)
        return detect(ctx, version=version, lo=lo, hi=hi, limit=limit, progress=progress)
    if active_version(ctx) is None:
        log.warning("no active detector model: nothing scored (train one with `brandmon train`)")
        return {"images": 0, "no_active_model": 1}
    return detect(ctx, limit=limit, progress=progress)


def evaluate(ctx: Context, data: str | Path, *, version: str | None = None,
             progress: Progress | None = None) -> dict[str, Any]:
    """`brandmon evaluate` as a function: the JSON report for a folders layout."""
    from pipeline.detector.evaluate import evaluate_folder

    return evaluate_folder(ctx, data, version=version, progress=progress)
