"""Detector throughput and feature-cache benchmark (figures as ratios to baselines of the same run).

1. Inference at 299x299, end to end from stored JPEG bytes (lake) to `image_scores` +
   `detections` rows: `brandmon detect`'s tf.data pipeline in fp32 and in mixed bf16, against
   a per-image loop (read bytes, decode, resize, `model.predict` on one image, write its rows).
2. Head retraining with a warm feature cache against a cold one (same data, same base).

The classifier has random weights (`weights=none`): throughput does not depend on what the
weights are. Images are synthetic scenes (400x400 JPEG) so the run needs no dataset.

    nice -n 5 .venv/bin/python bench/detect.py [--images 544] [--loop-images 48]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def make_ctx(root: Path):
    from pipeline.context import Context
    from pipeline.database import upgrade
    from pipeline.settings import load_settings

    env = {
        "BRANDMON_HOME": str(root / "var"),
        "BRANDMON_DATABASE_URL": f"sqlite:///{root / 'bench.db'}",
        "BRANDMON_STORAGE_URL": (root / "lake").as_uri(),
        "BRANDMON_AUTHOR_SALT": "bench",
    }
    ctx = Context(load_settings(env=env))
    upgrade(ctx.engine)
    return ctx


def store_scenes(ctx, n: int, size: int = 400) -> list[str]:
    from sqlalchemy import insert

    from pipeline.schema import images
    from pipeline.synthetic import scene_jpeg

    brands = ["Acme", "Globex", "Initech", None]
    shas = []
    with ctx.engine.begin() as conn:
        for i in range(n):
            data = scene_jpeg(2 * i + 1, brands[i % 4], size=size)
            sha = hashlib.sha256(data).hexdigest()
            key = f"images/sha256/{sha[:2]}/{sha[2:4]}/{sha}"
            ctx.store.put(key, data, content_type="image/jpeg")
            conn.execute(insert(images).values(sha256=sha, storage_key=key, mime="image/jpeg", size_bytes=len(data)))
            shas.append(sha)
    return shas


def register_random_model(ctx, size: int = 299) -> str:
    from pipeline.detector import registry
    from pipeline.detector.model import ModelSpec, build_network, save_artifact

    classes = ["no_logo", "Acme", "Globex", "Initech"]
    net = build_network(len(classes), size)
    spec = ModelSpec(classes=classes, input_size=size, weights="none", threshold=0.5)
    version = registry.register(ctx, spec, save_artifact(spec, net), "bench", {"precision": 1.0, "recall": 1.0}, {})
    registry.activate(ctx, version)
    return version


def clear_scores(ctx) -> None:
    from sqlalchemy import delete

    from pipeline.schema import detections, image_scores, review_queue

    with ctx.engine.begin() as conn:
        for t in (detections, review_queue, image_scores):
            conn.execute(delete(t))


def per_image_loop(ctx, version: str, limit: int) -> tuple[int, float, float]:
    """The naive baseline: one image at a time through `model.predict`, rows written per image.

    Returns (images, wall seconds, CPU seconds of this process). The model is loaded and one
    image predicted before timing, as the pipeline is warmed up before its timed run.
    """
    from pipeline.detector.data import decode_rgb
    from pipeline.detector.infer import _pending_select, rows_for_image, write_batch
    from pipeline.detector.model import resize_batch
    from pipeline.detector.registry import load_model
    from pipeline.schema import utcnow

    model = load_model(ctx, version, precision="fp32", with_matcher=False)
    with ctx.engine.connect() as conn:
        rows = list(conn.execute(_pending_select(version).limit(limit)))
    det = ctx.settings.detector
    model.net.classifier.predict(resize_batch([decode_rgb(ctx.store.get(rows[0].storage_key))], model.spec.input_size), verbose=0)
    started, cpu = time.perf_counter(), time.process_time()
    for row in rows:
        x = resize_batch([decode_rgb(ctx.store.get(row.storage_key))], model.spec.input_size)
        probs = model.net.classifier.predict(x.astype("float32"), verbose=0)[0]
        s, d, r = rows_for_image(row.sha256, version, model.spec, probs, None, (1.0, 1.0), det.score_floor, det.review_margin, utcnow())
        write_batch(ctx, [s], d, [r] if r else [])
    return len(rows), time.perf_counter() - started, time.process_time() - cpu


def batched(ctx, precision: str) -> tuple[int, float, float, float]:
    """`detect` over every unscored image, after a warm-up run of one batch.

    The warm-up loads the model and traces the classifier once (what a long-lived worker or
    the first batch of a nightly run pays once); the timed run is the pipeline itself, from
    stored JPEG bytes to committed `image_scores`/`detections` rows. Returns (images, wall s,
    CPU s, warm-up wall s).
    """
    from pipeline.detector.infer import detect

    t0 = time.perf_counter()
    detect(ctx, limit=ctx.settings.detector.batch_size, precision=precision)
    warm = time.perf_counter() - t0
    started, cpu = time.perf_counter(), time.process_time()
    counts = detect(ctx, precision=precision)
    return counts["scored"] + counts["corrupt"], time.perf_counter() - started, time.process_time() - cpu, warm


def cache_bench(root: Path, n_per_class: int, size: int) -> dict:
    from pipeline.detector.jobs import train_model
    from pipeline.synthetic import make_training_folders

    ctx = make_ctx(root / "cache")
    data = make_training_folders(root / "folders", ["Acme", "Globex", "Initech"], n_per_class=n_per_class, size=160, seed=3)
    opts = {"input_size": size, "mode": "head", "head_epochs": 20, "synthetic_negatives": 0, "matcher": "off"}
    t0 = time.perf_counter()
    cold = train_model(ctx, data, weights="none", activate="never", progress=False, **opts)
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = train_model(ctx, data, weights="none", activate="never", progress=False, **opts)
    t_warm = time.perf_counter() - t0
    return {
        "samples": sum(cold["params"]["splits"].values()),
        "input_size": size,
        "cold_s": round(t_cold, 1),
        "warm_s": round(t_warm, 1),
        "cold_features": cold["params"]["feature_cache"],
        "warm_features": warm["params"]["feature_cache"],
        "cold_stage_s": cold["params"]["stage_seconds"],
        "warm_stage_s": warm["params"]["stage_seconds"],
        "speedup": round(t_cold / t_warm, 2),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=544)
    ap.add_argument("--loop-images", type=int, default=48)
    ap.add_argument("--cache-per-class", type=int, default=40)
    ap.add_argument("--cache-size", type=int, default=299)
    ap.add_argument("--skip-cache", action="store_true")
    args = ap.parse_args()

    from pipeline.detector.model import choose_precision, cpu_supports_bf16

    out: dict = {"cpu_bf16": cpu_supports_bf16(), "auto_precision": choose_precision("auto"), "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory(prefix="brandmon-bench-") as tmp:
        root = Path(tmp)
        ctx = make_ctx(root / "infer")
        store_scenes(ctx, args.images)
        version = register_random_model(ctx)
        # The loop runs before and after the pipeline (the cores are shared: load varies), and
        # the pipeline is compared with the mean of the two, in wall time and in CPU time.
        load0 = os.getloadavg()
        loops: list[tuple[int, float, float]] = []
        n, t, c = per_image_loop(ctx, version, args.loop_images)
        loops.append((n, t, c))
        print(f"per-image model.predict loop: {n} images in {t:.1f}s = {n / t:.2f} img/s; CPU {1000 * c / n:.0f} ms/img", flush=True)
        clear_scores(ctx)
        for prec in ("fp32", "bf16"):
            n, t, c, warm = batched(ctx, prec)
            out[f"batched_{prec}_img_s"] = round(n / t, 2)
            out[f"batched_{prec}_cpu_ms_per_img"] = round(1000 * c / n, 1)
            out[f"batched_{prec}_warmup_s"] = round(warm, 1)
            print(f"detect pipeline {prec}: {n} images in {t:.1f}s = {n / t:.2f} img/s; CPU {1000 * c / n:.0f} ms/img "
                  f"(warm-up run: model load + trace + one batch {warm:.1f}s)", flush=True)
            clear_scores(ctx)
        n, t, c = per_image_loop(ctx, version, args.loop_images)
        loops.append((n, t, c))
        print(f"per-image model.predict loop, again: {n} images in {t:.1f}s = {n / t:.2f} img/s; CPU {1000 * c / n:.0f} ms/img", flush=True)
        loop_rate = sum(n for n, _, _ in loops) / sum(t for _, t, _ in loops)
        loop_cpu = 1000 * sum(c for _, _, c in loops) / sum(n for n, _, _ in loops)
        out["loop_img_s"] = round(loop_rate, 2)
        out["loop_img_s_runs"] = [round(n / t, 2) for n, t, _ in loops]
        out["loop_cpu_ms_per_img"] = round(loop_cpu, 1)
        for prec in ("fp32", "bf16"):
            out[f"batched_{prec}_vs_loop"] = round(out[f"batched_{prec}_img_s"] / loop_rate, 2)
            out[f"batched_{prec}_cpu_vs_loop"] = round(loop_cpu / out[f"batched_{prec}_cpu_ms_per_img"], 2)
            print(f"detect pipeline {prec} vs the loop ({loop_rate:.2f} img/s, {loop_cpu:.0f} ms CPU/img): "
                  f"{out[f'batched_{prec}_vs_loop']:.2f}x in wall time, {out[f'batched_{prec}_cpu_vs_loop']:.2f}x per CPU-second",
                  flush=True)
        load1 = os.getloadavg()
        out["load_avg_start_end"] = [round(load0[0], 2), round(load1[0], 2)]
        print(f"load average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f}; {os.cpu_count()} cores", flush=True)
        ctx.close()
        if not args.skip_cache:
            out["head_retrain"] = cache_bench(root, args.cache_per_class, args.cache_size)
            c = out["head_retrain"]
            print(f"head retraining ({c['samples']} samples, {c['input_size']}px): cold cache {c['cold_s']}s, "
                  f"warm cache {c['warm_s']}s ({c['speedup']}x)", flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
