"""`brandmon detect`: score every stored image the active model has not scored yet.

Images stream from the lake through `tf.data` (bounded read-ahead of the bytes on threads,
parallel decode + resize, fixed-size batches, prefetch) into the classifier, under the
mixed_bfloat16 policy where the CPU has native bf16. The matcher (if the model has one) sees
each image shrunk to its working size, decoded once in the same pipeline. Each batch is
written in one transaction: `image_scores` (ok | corrupt with the reason), `detections` above
the score floor (upsert on image + version + class), near-threshold images to `review_queue`,
and the posting days of the scored images marked dirty for re-aggregation.

Idempotent: the work list is "images without an `image_scores` row for this version", so a
re-run scores nothing new and a crashed run resumes after its last committed batch.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
from sqlalchemy import and_, select

from pipeline.context import Context
from pipeline.dag_assets import make_batch_key
from pipeline.database import upsert
from pipeline.detector import NO_LOGO
from pipeline.dirty import mark_days_of_images
from pipeline.errors import StorageError
from pipeline.progress import Progress, of
from pipeline.runlog import recorded_run
from pipeline.schema import detections, image_scores, images, review_queue, utcnow

log = logging.getLogger(__name__)

MAX_PIXELS = 80_000_000  # refuse to decode larger images (decompression bombs)
READ_AHEAD = 64  # images fetched from the lake ahead of decoding


# --- work lists ------------------------------------------------------------------------------


def _pending_select(version: str, lo: str | None = None, hi: str | None = None) -> Any:
    scored = image_scores.alias("s")
    q = (
        select(images.c.sha256, images.c.storage_key, images.c.width, images.c.height)
        .select_from(
            images.outerjoin(scored, and_(scored.c.image_sha256 == images.c.sha256, scored.c.model_version == version))
        )
        .where(scored.c.image_sha256.is_(None))
        .order_by(images.c.sha256)
    )
    if lo is not None:
        q = q.where(images.c.sha256 >= lo)
    if hi is not None:
        q = q.where(images.c.sha256 <= hi)
    return q


def pending_batches(ctx: Context, version: str, batch_size: int) -> list[str]:
    """Keys `VERSION:first_sha:last_sha` covering the unscored images, `batch_size` per key."""
    with ctx.engine.connect() as conn:
        shas = [r[0] for r in conn.execute(_pending_select(version).with_only_columns(images.c.sha256))]
    return [make_batch_key(version, shas[i], shas[min(i + batch_size, len(shas)) - 1]) for i in range(0, len(shas), batch_size)]


# --- the input pipeline ----------------------------------------------------------------------


def _fetch_ahead(ctx: Context, rows: list[Any], failed: dict[int, str] | None = None) -> Iterator[tuple[int, bytes]]:
    """Yield (index, bytes) in order with a bounded read-ahead on threads (S3 is latency-bound).

    A read that fails (throttling, a 500) is noted in `failed` (index -> reason) and yields no
    bytes: tf.data would swallow the exception, and the image must not be written off as corrupt.
    After the first failure the remaining images are not read at all (each read would wait out
    boto3's retries against a lake that is failing); they too stay unscored for the re-run.
    """

    def fetch(i: int, row: Any) -> bytes:
        if row.width and row.height and row.width * row.height > MAX_PIXELS:
            return b""  # reported as too large below
        if failed:  # the lake is failing (throttled, down): stop reading, the re-run picks these up
            failed[i] = "not read: an earlier lake read of this run failed"
            return b""
        try:
            return ctx.store.get(row.storage_key)
        except KeyError:
            return b""
        except Exception as exc:
            if failed is None:
                raise
            failed[i] = f"{type(exc).__name__}: {exc}"[:300]
            return b""

    with ThreadPoolExecutor(max_workers=8) as pool:
        window: collections.deque = collections.deque()
        it = iter(enumerate(rows))
        for i, row in it:
            window.append((i, pool.submit(fetch, i, row)))
            if len(window) >= READ_AHEAD:
                break
        for i, row in it:
            j, fut = window.popleft()
            yield j, fut.result()
            window.append((i, pool.submit(fetch, i, row)))
        while window:
            j, fut = window.popleft()
            yield j, fut.result()


def image_stream(ctx: Context, rows: list[Any], size: int, batch_size: int, with_view: bool,
                 failed: dict[int, str] | None = None) -> Any:
    """A tf.data stream of batches; undecodable images are dropped (their index is missing)."""
    import tensorflow as tf

    from pipeline.detector.model import MATCH_MAX_SIDE, resize_tensor, shrink_tensor

    ds = tf.data.Dataset.from_generator(
        lambda: _fetch_ahead(ctx, rows, failed),
        output_signature=(tf.TensorSpec((), tf.int32), tf.TensorSpec((), tf.string)),
    )

    def decode(i: Any, data: Any) -> Any:
        img = tf.io.decode_image(data, channels=3, expand_animations=False)
        img.set_shape([None, None, 3])
        small = resize_tensor(img, size)
        if with_view:
            view = shrink_tensor(img, MATCH_MAX_SIDE)
            return i, small, view, tf.shape(img)[:2], tf.shape(view)[:2]
        return i, small

    ds = ds.map(decode, num_parallel_calls=decode_parallelism(), deterministic=True).ignore_errors()
    ds = ds.padded_batch(batch_size) if with_view else ds.batch(batch_size)
    return ds.prefetch(2).with_options(stream_options())


def decode_parallelism() -> int:
    """Images decoded at once: one per core (the network runs between batches, not beside them)."""
    import os

    return max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2)


def stream_options() -> Any:
    """tf.data options of the detect stream: autotuning off, fixed parallelism instead.

    Why: with autotuning on, the end of a `from_generator` stream waits for the autotuner's
    next wake-up, which comes 10 ms after the stream starts and then at doubling intervals
    (10, 30, 70 ms ... 5.1, 10.2, 20.5 s). A run's wall time was rounded up to that tick:
    bench/detect.py timed 2016 images in 7.1 s or exactly 10.3 s, 512 in 10.3 or 20.5 s
    (issue 15, BENCHMARKS.md). Decode parallelism and prefetch are set by hand above.
    """
    import tensorflow as tf

    options = tf.data.Options()
    options.autotune.enabled = False
    return options


def corrupt_reason(data: bytes, row: Any) -> str:
    if row.width and row.height and row.width * row.height > MAX_PIXELS:
        return f"image too large to decode ({row.width}x{row.height} pixels > {MAX_PIXELS})"
    if not data:
        return "image bytes missing from the lake or empty"
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
    except Exception as exc:  # noqa: BLE001 - we only want its message
        return f"undecodable image: {type(exc).__name__}: {str(exc)[:200]}"
    return "undecodable image (rejected by the TensorFlow decoder)"


# --- scoring ---------------------------------------------------------------------------------


def rows_for_image(
    sha: str, version: str, spec: Any, probs: np.ndarray, match: dict[str, tuple[float, Any]] | None,
    box_scale: tuple[float, float], floor: float, margin: float, now: Any,
) -> tuple[dict[str, Any], list[dict[str, Any]], dict[str, Any] | None]:
    """(image_scores row, detection rows, review row or None) for one decoded image."""
    from pipeline.detector.model import fused_scores

    scores = fused_scores(spec, probs, match)
    top_class, top_score = max(scores.items(), key=lambda kv: kv[1]) if scores else (NO_LOGO, 0.0)
    called = top_score >= spec.threshold
    score_row = {
        "image_sha256": sha, "model_version": version, "status": "ok",
        "top_class": top_class if called else NO_LOGO, "top_score": float(top_score), "reason": None, "scored_at": now,
    }
    dets = []
    for cls, s in scores.items():
        if s < floor:
            continue
        box = None
        if match is not None and match.get(cls, (0, None))[1] is not None:
            x1, y1, x2, y2 = match[cls][1]
            sx, sy = box_scale
            box = [int(round(x1 * sx)), int(round(y1 * sy)), int(round(x2 * sx)), int(round(y2 * sy))]
        dets.append({"image_sha256": sha, "model_version": version, "class_name": cls, "score": float(s), "box": box, "created_at": now})
    review = None
    if abs(top_score - spec.threshold) <= margin:
        review = {"image_sha256": sha, "model_version": version, "class_name": top_class, "score": float(top_score),
                  "status": "pending", "label": None, "updated_at": now}
    return score_row, dets, review


def write_batch(ctx: Context, scores: list[dict], dets: list[dict], reviews: list[dict]) -> None:
    """One transaction per batch: scores, detections, review queue, dirty days."""
    with ctx.engine.begin() as conn:
        upsert(conn, image_scores, scores, keys=["image_sha256", "model_version"])
        upsert(conn, detections, dets, keys=["image_sha256", "model_version", "class_name"])
        upsert(conn, review_queue, reviews, keys=["image_sha256", "model_version"], update=())
        mark_days_of_images(conn, [r["image_sha256"] for r in scores], reason="detected")


def detect(
    ctx: Context, *, version: str | None = None, lo: str | None = None, hi: str | None = None,
    limit: int | None = None, progress: Progress | None = None, batch_size: int | None = None,
    precision: str | None = None, use_matcher: bool = True, runtime: str | None = None,
) -> dict[str, int]:
    """Score the unscored images (optionally of one sha range) with a model version.

    `runtime`: `auto` (default: `detector.runtime` / BRANDMON_DETECT_RUNTIME), `keras`, or an
    export format; the run log records the runtime used and its precision.
    """
    from pipeline.detector.model import choose_precision, configure_threads
    from pipeline.detector.registry import load_model
    from pipeline.detector.runtimes import runtime_setting

    det = ctx.settings.detector
    configure_threads(det.threads)
    batch_size = int(batch_size or det.batch_size)
    prec = choose_precision(precision or det.mixed_precision)
    model = load_model(ctx, version, precision=prec, with_matcher=use_matcher, runtime=runtime or runtime_setting(ctx))
    q = _pending_select(model.version, lo, hi)
    if limit is not None:
        q = q.limit(limit)
    with ctx.engine.connect() as conn:
        rows = list(conn.execute(q))
    counts = {"images": len(rows), "scored": 0, "corrupt": 0, "detections": 0, "review": 0, "batches": 0}
    if not rows:
        return counts
    started = time.monotonic()
    tracker = of(progress)(len(rows), f"detect {model.version}", "img")
    with recorded_run(ctx.engine, "detect", source=model.version) as run_counts, BatchWriter(ctx) as writer:
        failed: dict[int, str] = {}  # images the lake could not serve: left unscored for a re-run
        scorer = _BatchScorer(ctx, model, rows, batch_size, failed)
        rescored_before = _rescored(model)
        for batch in image_stream(ctx, rows, model.spec.input_size, batch_size, model.matcher is not None, failed):
            score_rows, det_rows, review_rows = scorer.score(batch)
            writer.submit(score_rows, det_rows, review_rows)  # commits while the next batch computes
            counts["batches"] += 1
            counts["scored"] += scorer.last_n
            counts["corrupt"] += sum(1 for r in score_rows if r["status"] == "corrupt")
            counts["detections"] += len(det_rows)
            counts["review"] += len(review_rows)
            tracker.update(len(score_rows))
        tail = scorer.tail()
        if tail:
            writer.submit(tail, [], [])
            counts["corrupt"] += len(tail)
            tracker.update(len(tail))
        writer.drain()
        tracker.close()
        if rescored_before is not None:  # the int8 precision cascade: how many near ties it re-scored
            counts["rescored"] = _rescored(model) - rescored_before
        # counts stay numbers (callers sum them); the run log also names the runtime and precision
        run_counts.update(counts, seconds=round(time.monotonic() - started, 2), precision=model.precision,
                          runtime=model.runtime)
        if failed:
            run_counts["unreadable"] = len(failed)
            raise StorageError(f"{len(failed)} image(s) could not be read from the lake ({next(iter(failed.values()))}); "
                               "they stay unscored: re-run detect")
    return counts


def _rescored(model: Any) -> int | None:
    """Images the loaded export's precision cascade has re-scored so far (None: no cascade)."""
    stats = getattr(getattr(model, "exported", None), "rescored", None)
    return None if stats is None else int(stats["rescored"])


class _BatchScorer:
    """Turns each batch of the image stream into rows: scores, detections, review entries, and a
    corrupt row for every image the stream skipped (its index is missing from the batches)."""

    def __init__(self, ctx: Context, model: Any, rows: list[Any], batch_size: int, failed: dict[int, str]) -> None:
        self.ctx, self.model, self.rows, self.batch_size, self.failed = ctx, model, rows, batch_size, failed
        self.forward = model.scorer(pad_to=batch_size)
        self.expected = 0  # next index we expect from the stream; gaps are corrupt images
        self.last_n = 0  # images of the last batch (its gap rows not counted)

    def _matches(self, batch: Any, n: int) -> tuple[list[Any], list[tuple[float, float]]]:
        """The matcher's scores per image, and the factor from its working view back to pixels."""
        if self.model.matcher is None:
            return [None] * n, [(1.0, 1.0)] * n
        views, shapes, vshapes = batch[2].numpy(), batch[3].numpy(), batch[4].numpy()
        crops, scales = [], []
        for k in range(n):
            (h, w), (vh, vw) = shapes[k], vshapes[k]
            crops.append(np.ascontiguousarray(views[k, :vh, :vw]))
            scales.append((float(w) / float(vw), float(h) / float(vh)))
        return self.model.local_scores(crops, workers=2)[0], scales

    def score(self, batch: Any) -> tuple[list[dict], list[dict], list[dict]]:
        det, version, spec = self.ctx.settings.detector, self.model.version, self.model.spec
        idx, x = batch[0].numpy(), batch[1]
        n = int(x.shape[0])
        probs = self.forward(x)
        matches, scales = self._matches(batch, n)
        now = utcnow()
        score_rows: list[dict] = []
        det_rows: list[dict] = []
        review_rows: list[dict] = []
        for k in range(n):
            i = int(idx[k])
            score_rows.extend(self._gaps(i, now))
            s_row, d_rows, r_row = rows_for_image(
                self.rows[i].sha256, version, spec, probs[k], matches[k], scales[k], det.score_floor, det.review_margin, now
            )
            score_rows.append(s_row)
            det_rows.extend(d_rows)
            if r_row:
                review_rows.append(r_row)
        self.last_n = n
        return score_rows, det_rows, review_rows

    def _gaps(self, upto: int, now: Any) -> list[dict[str, Any]]:
        rows = [_corrupt_row(self.ctx, self.rows[g], self.model.version, now)
                for g in range(self.expected, upto) if g not in self.failed]
        self.expected = upto + 1
        return rows

    def tail(self) -> list[dict[str, Any]]:
        """Corrupt rows for the images after the last one the stream delivered."""
        return self._gaps(len(self.rows), utcnow())


class BatchWriter:
    """Commits each batch's rows on one background thread, at most one batch behind.

    Why: the classifier releases the GIL while it computes, so the database round trips of
    batch k overlap the forward pass of batch k+1 instead of idling the cores. One thread and
    one batch in flight keep the commit order, and a failed commit is raised on the next
    `submit` or at `drain`, so the run still stops at the first batch it could not write.
    """

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="detect-writer")
        self._pending: Any = None

    def submit(self, scores: list[dict], dets: list[dict], reviews: list[dict]) -> None:
        self.drain()
        self._pending = self._pool.submit(write_batch, self.ctx, scores, dets, reviews)

    def drain(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def __enter__(self) -> BatchWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            if exc[0] is None:
                self.drain()
            elif self._pending is not None:  # let the batch in flight finish (or fail) quietly
                with contextlib.suppress(Exception):
                    self._pending.result()
        finally:
            self._pool.shutdown(wait=True)


def _corrupt_row(ctx: Context, row: Any, version: str, now: Any) -> dict[str, Any]:
    try:
        data = ctx.store.get(row.storage_key)
    except KeyError:
        data = b""
    reason = corrupt_reason(data, row)
    log.warning("image %s not scored: %s", row.sha256[:12], reason)
    return {"image_sha256": row.sha256, "model_version": version, "status": "corrupt", "top_class": None,
            "top_score": None, "reason": reason, "scored_at": now}
