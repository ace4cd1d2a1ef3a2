"""The feature cache: the base network's pooled features per sample, computed once.

Why: retraining only the head (new classes, more data, another dropout) should cost seconds,
not a pass of Inception v3 over every image again. Rows of `feature_cache` are keyed by
(cache_key, sample id) where cache_key names the base model *by the hash of its weights*, the
input size and the preprocessing version; the sample id is the image's sha256 (or the hash of
image + crop region). Augmentation and fine-tuning change what the base sees or the base
itself, so they bypass the cache (the trainer says so).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from sqlalchemy import Engine, select

from pipeline.database import upsert
from pipeline.detector.model import BASE, PREPROCESS_VERSION
from pipeline.schema import feature_cache, utcnow

log = logging.getLogger(__name__)

DTYPE = np.float16  # 2048 features x 2 bytes = 4 KiB per sample


def cache_key(base_digest: str, input_size: int, base: str = BASE) -> str:
    return f"{base}:{base_digest[:16]}:{input_size}:{PREPROCESS_VERSION}"


def read_cached(engine: Engine, key: str, ids: Sequence[str], chunk: int = 500) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    ids = list(dict.fromkeys(ids))
    with engine.connect() as conn:
        for i in range(0, len(ids), chunk):
            rows = conn.execute(
                select(feature_cache.c.image_sha256, feature_cache.c.vector).where(
                    feature_cache.c.cache_key == key, feature_cache.c.image_sha256.in_(ids[i : i + chunk])
                )
            )
            for sid, blob in rows:
                found[sid] = np.frombuffer(blob, DTYPE).astype(np.float32)
    return found


def write_cached(engine: Engine, key: str, vectors: dict[str, np.ndarray]) -> int:
    now = utcnow()
    rows = [
        {"cache_key": key, "image_sha256": sid, "vector": np.asarray(v, DTYPE).tobytes(), "created_at": now}
        for sid, v in vectors.items()
    ]
    with engine.begin() as conn:
        return upsert(conn, feature_cache, rows, keys=["cache_key", "image_sha256"], update=())


def features_for(
    engine: Engine,
    key: str,
    ids: Sequence[str],
    compute: Callable[[list[int]], np.ndarray],
    batch_size: int = 64,
    progress: Any = None,
) -> tuple[np.ndarray, dict[str, int]]:
    """Features for `ids` in order: cached rows, plus `compute(indices)` for the rest.

    `compute` gets positions into `ids` and returns their feature rows; new rows are written
    back in batches, so an interrupted run keeps what it computed. Returns (matrix, counts).
    """
    have = read_cached(engine, key, ids)
    missing = [i for i, sid in enumerate(ids) if sid not in have]
    dim = next(iter(have.values())).shape[0] if have else None
    computed: dict[str, np.ndarray] = {}
    for start in range(0, len(missing), batch_size):
        part = missing[start : start + batch_size]
        vecs = np.asarray(compute(part), np.float32)
        new = {ids[i]: v for i, v in zip(part, vecs, strict=True)}
        write_cached(engine, key, new)
        computed.update(new)
        if progress is not None:
            progress.update(len(part))
        dim = vecs.shape[1]
    out = np.zeros((len(ids), dim or 0), np.float32)
    for i, sid in enumerate(ids):
        # cached values come back through float16; so do fresh ones (identical either way)
        out[i] = have[sid] if sid in have else computed[sid].astype(DTYPE).astype(np.float32)
    return out, {"hits": len(ids) - len(missing), "misses": len(missing)}
