"""Detector throughput and feature-cache benchmark (figures as ratios to baselines of the same run).

1. Inference at 299x299, end to end from stored JPEG bytes (lake) to `image_scores` +
   `detections` rows: `brandmon detect` with each installed exported runtime (OpenVINO / ONNX
   Runtime / TFLite, int8; `brandmon model export`) and with Keras (bf16, fp32), against a
   per-image loop (read bytes, decode, resize, `model.predict` on one image, write its rows).
   Where the time goes: the input stream alone (read + decode + resize) and the network alone.
2. Agreement of each runtime with the Keras fp32 model on the FlickrLogos-27 test photos
   (`--fl27-home`: the `--home` of a `bench/fl27.py` run, holding a trained model and its
   held-out split): top-class agreement of the classifier, agreement of the detection decision
   (fused with the matcher, thresholded), P/R of both, and the matcher's seconds per image.
3. Head retraining with a warm feature cache against a cold one (same data, same base).

The throughput classifier has random weights (`weights=none`): throughput does not depend on
what the weights are; its int8 calibration uses the synthetic scenes. Images are synthetic
scenes (400x400 JPEG) so part 1 needs no dataset.

    nice -n 5 .venv/bin/python bench/detect.py [--images 544] [--loop-images 48] [--fl27-home DIR]
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

import numpy as np

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
    detect(ctx, limit=ctx.settings.detector.batch_size, precision=precision, runtime="keras")
    warm = time.perf_counter() - t0
    started, cpu = time.perf_counter(), time.process_time()
    counts = detect(ctx, precision=precision, runtime="keras")
    return counts["scored"] + counts["corrupt"], time.perf_counter() - started, time.process_time() - cpu, warm


def export_random(ctx, version: str, root: Path, fmts: list[str]) -> dict[str, dict]:
    """Export the throughput model in each format (int8, calibrated on 32 stored scenes)."""
    from pipeline.detector.export import export_model

    calib = root / "calib"
    calib.mkdir(exist_ok=True)
    from pipeline.synthetic import scene_jpeg

    for i in range(32):
        (calib / f"{i}.jpg").write_bytes(scene_jpeg(10_000 + i, ["Acme", "Globex", None][i % 3], size=400))
    out = {}
    for fmt in fmts:
        t0 = time.perf_counter()
        out[fmt] = export_model(ctx, version, fmt, calibration=calib, calibration_images=32,
                                **({"rescore": "off"} if fmt == "openvino" else {}))
        q = out[fmt].get("quantizer")
        how = f", {q}, quantiser peak RSS {out[fmt]['quantize_peak_rss_bytes'] / 2**20:.0f} MB" if q else ""
        print(f"exported {fmt} ({out[fmt]['precision']}{how}) in {time.perf_counter() - t0:.0f}s", flush=True)
    return out


def runtime_pipeline(ctx, runtime: str) -> tuple[int, float, float, float]:
    """`detect` with an exported runtime (int8) over every unscored image, after a warm-up batch."""
    from pipeline.detector.infer import detect

    t0 = time.perf_counter()
    detect(ctx, limit=ctx.settings.detector.batch_size, runtime=runtime)
    warm = time.perf_counter() - t0
    started, cpu = time.perf_counter(), time.process_time()
    counts = detect(ctx, runtime=runtime)
    return counts["scored"] + counts["corrupt"], time.perf_counter() - started, time.process_time() - cpu, warm


def cascade_at_share(ctx, version: str, root: Path, share: float) -> float:
    """Export the throughput model as the OpenVINO int8 cascade, with its margin set so that it
    re-scores `share` of the stored images (random weights give near ties everywhere; the share
    that matters is the trained model's, measured on FL27). Returns the margin."""
    from pipeline.detector import registry
    from pipeline.detector.export import export_model
    from pipeline.detector.infer import _pending_select, image_stream
    from pipeline.detector.registry import get_version
    from pipeline.detector.rescore import margins
    from pipeline.detector.runtimes import _open_openvino, export_key, read_export, write_export

    export_model(ctx, version, "openvino", calibration=root / "calib", calibration_images=32)
    key = export_key(get_version(ctx, version)["artifact_key"], "openvino")
    meta, files = read_export(ctx.store.get(key))
    with ctx.engine.connect() as conn:
        rows = list(conn.execute(_pending_select(version)))
    int8, _ = _open_openvino({k: v for k, v in meta.items() if k != "rescore_margin"}, files, 2, "auto")
    found = [margins(int8(b[1].numpy())) for b in image_stream(ctx, rows, meta["input_size"], 32, False)]
    allm = np.sort(np.concatenate(found))
    margin = float(allm[min(len(allm) - 1, max(0, int(round(share * len(allm))) - 1))]) if share > 0 else -1.0
    ctx.store.put(key, write_export({**meta, "rescore_margin": margin}, files), content_type="application/zip")
    registry._LOADED.clear()
    return margin


def last_detect_counts(ctx) -> dict:
    """The counts of the newest detect run (the timed one)."""
    from sqlalchemy import select

    from pipeline.schema import runs

    with ctx.engine.connect() as conn:
        return conn.execute(select(runs.c.counts).where(runs.c.kind == "detect").order_by(runs.c.id.desc())
                            .limit(1)).scalar_one() or {}


def where_time_goes(ctx, version: str, runtimes: list[str], n: int, size: int = 299) -> dict[str, float]:
    """Images/s of the input stream alone (lake read + decode + resize, tf.data) and of each
    network alone on a ready uint8 batch: the pipeline cannot beat the slower of the two."""
    from pipeline.detector.infer import _pending_select, image_stream
    from pipeline.detector.registry import load_model

    with ctx.engine.connect() as conn:
        rows = list(conn.execute(_pending_select(version).limit(n)))
    out: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    batch = None
    for b in image_stream(ctx, rows, size, 32, False):
        batch = b[1].numpy() if batch is None else batch
    out["stream_img_s"] = round(len(rows) / (time.perf_counter() - t0), 1)
    out["stream_cpu_ms"] = round(1000 * (time.process_time() - c0) / len(rows), 1)
    for rt in runtimes:
        model = load_model(ctx, version, precision="bf16", with_matcher=False, runtime=rt)
        score = model.scorer()
        score(batch)
        t0, c0, k = time.perf_counter(), time.process_time(), 0
        while time.perf_counter() - t0 < 6:
            score(batch)
            k += len(batch)
        out[f"net_{rt}_img_s"] = round(k / (time.perf_counter() - t0), 1)
        out[f"net_{rt}_cpu_ms"] = round(1000 * (time.process_time() - c0) / k, 1)
    return out


def agreement(home: Path, runtimes: list[str]) -> dict:
    """Each runtime against the Keras fp32 classifier on the FL27 held-out test photos."""
    from pipeline.context import Context
    from pipeline.detector.data import NO_LOGO, decode_rgb, load_folders
    from pipeline.detector.export import export_model
    from pipeline.detector.metrics import evaluate_scores
    from pipeline.detector.model import matcher_view, resize_batch
    from pipeline.detector.registry import active_version, load_model
    from pipeline.detector.runtimes import export_key, open_export
    from pipeline.detector.training.calibrate import signal_matrices
    from pipeline.settings import load_settings

    env = {"BRANDMON_HOME": str(home / "var"), "BRANDMON_DATABASE_URL": f"sqlite:///{home / 'fl27.db'}",
           "BRANDMON_STORAGE_URL": (home / "lake").as_uri(), "BRANDMON_AUTHOR_SALT": "bench"}
    ctx = Context(load_settings(env=env))
    row = active_version(ctx)
    version = row["version"]
    eval_dir = home / "var" / "eval" / version
    srcs = load_folders(eval_dir)
    arrays = [decode_rgb(s.read()) for s in srcs]
    keras = load_model(ctx, version, precision="fp32", runtime="keras")
    spec = keras.spec
    by_fold = {c.casefold(): c for c in spec.classes}
    labels = [by_fold.get((s.label or NO_LOGO).casefold(), s.label or NO_LOGO) for s in srcs]
    x = resize_batch(arrays, spec.input_size)
    ref = np.concatenate([keras.predict_arrays(x[i:i + 32]) for i in range(0, len(x), 32)])
    match = None
    out: dict = {"model": version, "input_size": spec.input_size, "images": len(x), "with_brand": sum(lab != NO_LOGO for lab in labels)}
    if keras.matcher is not None:
        views = [matcher_view(a) for a in arrays]
        t0, c0 = time.perf_counter(), time.process_time()
        match = keras.matcher.score_many(views, workers=2)
        out["matcher_s_per_img"] = round((time.perf_counter() - t0) / len(views), 3)
        out["matcher_cpu_s_per_img"] = round((time.process_time() - c0) / len(views), 3)
    main = (spec.extra or {}).get("signal") or ("fused" if match is not None else "cnn")
    thr = float(((spec.extra or {}).get("thresholds") or {}).get(main, spec.threshold))

    def decide(probs: np.ndarray) -> tuple[np.ndarray, list[str], dict]:
        mats = signal_matrices(spec.brands, probs, spec.classes, match, spec.combiner)
        m = mats[main]
        dec = [spec.brands[int(j)] if m[i, j] >= thr else NO_LOGO for i, j in enumerate(m.argmax(1))]
        ev = evaluate_scores(labels, m, spec.brands, thr)
        return m.argmax(1), dec, {"precision": round(ev["logo"]["precision"], 3), "recall": round(ev["logo"]["recall"], 3),
                                  "brand_top1": round(ev["brand_accuracy"], 3)}

    ref_top, ref_dec, out["keras_fp32"] = decide(ref)
    out["signal"], out["threshold"] = main, round(thr, 3)
    s_ref = np.sort(ref, 1)
    out["cnn_top_prob_median"] = round(float(np.median(s_ref[:, -1])), 3)
    out["cnn_margin_median"] = round(float(np.median(s_ref[:, -1] - s_ref[:, -2])), 4)

    def compare(got: np.ndarray, mode: str) -> dict:
        top, dec, pr = decide(got)
        return {"precision_mode": mode,
                "top_class_agreement": round(float(np.mean(top == ref_top)), 4),
                "decision_agreement": round(float(np.mean([a == b for a, b in zip(dec, ref_dec, strict=True)])), 4),
                "cnn_top_class_agreement": round(float(np.mean(got.argmax(1) == ref.argmax(1))), 4),
                "max_abs_prob_diff": round(float(np.abs(got - ref).max()), 4), **pr}

    def scores(exported) -> np.ndarray:
        return np.concatenate([exported.predict(x[i:i + 32]) for i in range(0, len(x), 32)])

    bf = load_model(ctx, version, precision="bf16", runtime="keras")
    out["keras_bf16"] = compare(np.concatenate([bf.predict_arrays(x[i:i + 32]) for i in range(0, len(x), 32)]), "bf16")
    for rt in runtimes:
        # int8 alone, calibrated on the model's own training images
        export_model(ctx, version, rt, **({"rescore": "off"} if rt == "openvino" else {}))
        out[rt] = compare(scores(open_export(ctx.store.get(export_key(row["artifact_key"], rt)), 2)), "int8")
    if "openvino" in runtimes:  # the default OpenVINO export: int8 + the fp32 re-score of near ties
        meta = export_model(ctx, version, "openvino")
        exp = open_export(ctx.store.get(export_key(row["artifact_key"], "openvino")), 2)
        out["openvino_cascade"] = compare(scores(exp), exp.precision)
        out["openvino_cascade"].update(
            rescore_margin=meta["rescore_margin"], check_images=meta["rescore_check_images"], check=meta["rescore_check"],
            test_rescored_share=round(exp.rescored["rescored"] / max(1, exp.rescored["images"]), 4))
    if "openvino" in runtimes:  # the fp32 IR, run in bf16 on this CPU
        export_model(ctx, version, "openvino", precision="fp32")
        exp = open_export(ctx.store.get(export_key(row["artifact_key"], "openvino")), 2, precision="bf16")
        out["openvino_bf16"] = compare(scores(exp), "bf16")
    ctx.close()
    return out


def workers_needed(out: dict, runtimes: list[str], matcher_cpu_s: float) -> dict:
    """2-core workers for 3M images/day from this run's CPU cost per image (2 CPU-s per second
    per worker; CPU time is less sensitive to the other load on a shared machine than wall time)."""
    import math

    need = 3_000_000 / 86_400
    best = f"batched_{runtimes[0]}_int8_cpu_ms_per_img" if runtimes else "batched_keras_bf16_cpu_ms_per_img"
    if "batched_openvino_int8+fp32_cascade_cpu_ms_per_img" in out:  # the default OpenVINO export
        best = "batched_openvino_int8+fp32_cascade_cpu_ms_per_img"
    cpu_s = out[best] / 1000
    return {"pipeline": best, "cpu_s_per_img": round(cpu_s, 4), "without_matcher": math.ceil(need * cpu_s / 2),
            "with_matcher": math.ceil(need * (cpu_s + matcher_cpu_s) / 2)}


def cache_bench(root: Path, n_per_class: int, size: int) -> dict:
    from pipeline.detector.jobs import train_model
    from pipeline.synthetic import make_training_folders

    ctx = make_ctx(root / "cache")
    data = make_training_folders(root / "folders", ["Acme", "Globex", "Initech"], n_per_class=n_per_class, size=160, seed=3)
    opts = {"input_size": size, "mode": "head", "head_epochs": 20, "synthetic_negatives": 0, "matcher": "off"}
    t0 = time.perf_counter()
    cold = train_model(ctx, data, weights="none", activate="never", **opts)
    t_cold = time.perf_counter() - t0
    t0 = time.perf_counter()
    warm = train_model(ctx, data, weights="none", activate="never", **opts)
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
    ap.add_argument("--keras-fp32", action="store_true", help="also time the Keras fp32 pipeline")
    ap.add_argument("--fl27-home", type=Path, help="home of a bench/fl27.py --home run (trained model + test split)")
    ap.add_argument("--runtimes", default="openvino,onnx", help="exported runtimes to time (default openvino,onnx)")
    ap.add_argument("--rescore-share", type=float,
                    help="share of images the timed OpenVINO cascade re-scores (default: the share it re-scored on "
                         "the FL27 test photos with --fl27-home, else 0.5)")
    ap.add_argument("--input-size", type=int, default=299,
                    help="throughput model's input side in px (299: the pretrained default; 128: the from-scratch default)")
    args = ap.parse_args()

    from pipeline.detector.model import choose_precision, cpu_supports_bf16
    from pipeline.detector.runtimes import runtime_importable

    out: dict = {"cpu_bf16": cpu_supports_bf16(), "auto_precision": choose_precision("auto"), "cores": os.cpu_count()}
    runtimes = [r for r in args.runtimes.split(",") if r and runtime_importable(r)]
    print(f"runtimes installed and timed: {runtimes or 'none (Keras only)'}", flush=True)
    # The FL27 agreement first: the cascade's timed share is the one it re-scored there.
    a = agreement(args.fl27_home, runtimes) if args.fl27_home else None
    if a is None:
        print("agreement with Keras fp32 on the FL27 test photos: not measured (--fl27-home DIR: the --home of a "
              "bench/fl27.py run)", flush=True)
    share = args.rescore_share
    if share is None:
        share = a["openvino_cascade"]["test_rescored_share"] if a and "openvino_cascade" in a else 0.5
    with tempfile.TemporaryDirectory(prefix="brandmon-bench-") as tmp:
        root = Path(tmp)
        ctx = make_ctx(root / "infer")
        store_scenes(ctx, args.images)
        version = register_random_model(ctx, args.input_size)
        out["exports"] = {k: {f: v[f] for f in ("precision", "bytes", "seconds", "runtime")}
                          for k, v in export_random(ctx, version, root, runtimes).items()}
        out["where_time_goes"] = where_time_goes(ctx, version, [*runtimes, "keras"], min(256, args.images), args.input_size)
        w = out["where_time_goes"]
        print(f"where the time goes: input stream alone (lake read + decode + resize) {w['stream_img_s']} img/s, "
              f"{w['stream_cpu_ms']} ms CPU/img; network alone: "
              + ", ".join(f"{rt} {w[f'net_{rt}_img_s']} img/s ({w[f'net_{rt}_cpu_ms']} ms CPU/img)"
                          for rt in [*runtimes, "keras"]), flush=True)
        # The loop runs before and after the pipeline (the cores are shared: load varies), and
        # the pipeline is compared with the mean of the two, in wall time and in CPU time.
        load0 = os.getloadavg()
        loops: list[tuple[int, float, float]] = []
        n, t, c = per_image_loop(ctx, version, args.loop_images)
        loops.append((n, t, c))
        print(f"per-image model.predict loop: {n} images in {t:.1f}s = {n / t:.2f} img/s; CPU {1000 * c / n:.0f} ms/img", flush=True)
        clear_scores(ctx)
        pipelines = [(f"{rt} int8", rt) for rt in runtimes] + [("keras bf16", "bf16")] + ([("keras fp32", "fp32")] if args.keras_fp32 else [])
        if "openvino" in runtimes:
            pipelines.append(("openvino int8+fp32 cascade", "openvino-cascade"))
            pipelines.append(("openvino bf16", "openvino-bf16"))
        for label, what in pipelines:
            if what in ("bf16", "fp32"):
                n, t, c, warm = batched(ctx, what)
            elif what == "openvino-cascade":  # the default OpenVINO export, at the FL27 share re-scored
                margin = cascade_at_share(ctx, version, root, share)
                n, t, c, warm = runtime_pipeline(ctx, "openvino")
                done = last_detect_counts(ctx)
                out["cascade_timed"] = {"margin": round(margin, 5), "target_share": share,
                                        "rescored_share": round(done.get("rescored", 0) / max(1, done.get("images", 1)), 4),
                                        "precision": done.get("precision")}
                print(f"  (cascade timed at margin {margin:.3g}: re-scored {100 * out['cascade_timed']['rescored_share']:.1f}% "
                      f"of the timed images in fp32, aiming at {100 * share:.1f}%)", flush=True)
            elif what == "openvino-bf16":  # the fp32 IR, run in bf16 (replaces the int8 export)
                from pipeline.detector import registry
                from pipeline.detector.export import export_model

                export_model(ctx, version, "openvino", precision="fp32")
                registry._LOADED.clear()  # a worker keeps its loaded export until it restarts
                n, t, c, warm = runtime_pipeline(ctx, "openvino")
            else:
                n, t, c, warm = runtime_pipeline(ctx, what)
            prec = label.replace(" ", "_")
            out[f"batched_{prec}_img_s"] = round(n / t, 2)
            out[f"batched_{prec}_cpu_ms_per_img"] = round(1000 * c / n, 1)
            out[f"batched_{prec}_warmup_s"] = round(warm, 1)
            print(f"detect pipeline {label}: {n} images in {t:.1f}s = {n / t:.2f} img/s; CPU {1000 * c / n:.0f} ms/img "
                  f"(warm-up run: model load + one batch {warm:.1f}s)", flush=True)
            clear_scores(ctx)
        n, t, c = per_image_loop(ctx, version, args.loop_images)
        loops.append((n, t, c))
        print(f"per-image model.predict loop, again: {n} images in {t:.1f}s = {n / t:.2f} img/s; CPU {1000 * c / n:.0f} ms/img", flush=True)
        loop_rate = sum(n for n, _, _ in loops) / sum(t for _, t, _ in loops)
        loop_cpu = 1000 * sum(c for _, _, c in loops) / sum(n for n, _, _ in loops)
        out["loop_img_s"] = round(loop_rate, 2)
        out["loop_img_s_runs"] = [round(n / t, 2) for n, t, _ in loops]
        out["loop_cpu_ms_per_img"] = round(loop_cpu, 1)
        for label, _ in pipelines:
            prec = label.replace(" ", "_")
            out[f"batched_{prec}_vs_loop"] = round(out[f"batched_{prec}_img_s"] / loop_rate, 2)
            out[f"batched_{prec}_cpu_vs_loop"] = round(loop_cpu / out[f"batched_{prec}_cpu_ms_per_img"], 2)
            print(f"detect pipeline {label} vs the loop ({loop_rate:.2f} img/s, {loop_cpu:.0f} ms CPU/img): "
                  f"{out[f'batched_{prec}_vs_loop']:.2f}x in wall time, {out[f'batched_{prec}_cpu_vs_loop']:.2f}x per CPU-second",
                  flush=True)
        load1 = os.getloadavg()
        out["load_avg_start_end"] = [round(load0[0], 2), round(load1[0], 2)]
        print(f"load average (1 min) at start {load0[0]:.2f}, at end {load1[0]:.2f}; {os.cpu_count()} cores", flush=True)
        ctx.close()
        if a is not None:
            out["fl27_agreement"] = a
            print(f"FL27 test split ({a['images']} photos, {a['with_brand']} with a brand; model {a['model']} at "
                  f"{a['input_size']} px, signal {a['signal']} at {a['threshold']}): Keras fp32 P {a['keras_fp32']['precision']} "
                  f"R {a['keras_fp32']['recall']} top-1 {a['keras_fp32']['brand_top1']}", flush=True)
            print(f"  (the CNN alone: median top probability {a['cnn_top_prob_median']}, median margin to the "
                  f"second class {a['cnn_margin_median']})", flush=True)
            for rt in ["keras_bf16", *runtimes, *(["openvino_cascade", "openvino_bf16"] if "openvino" in runtimes else [])]:
                r = a[rt]
                print(f"  {rt} ({r['precision_mode']}) vs Keras fp32: top-class agreement {100 * r['top_class_agreement']:.1f}%, "
                      f"decision agreement {100 * r['decision_agreement']:.1f}%, CNN-alone top class "
                      f"{100 * r['cnn_top_class_agreement']:.1f}%; P {r['precision']} R {r['recall']} "
                      f"top-1 {r['brand_top1']} (max |prob diff| {r['max_abs_prob_diff']})", flush=True)
                if "rescore_margin" in r:
                    c = r["check"]
                    print(f"    cascade margin {r['rescore_margin']} chosen on {r['check_images']} training images "
                          f"(there: re-scored {100 * c['rescored_share']:.1f}%, agreement int8 "
                          f"{100 * c['int8_top_class_agreement']:.1f}% -> cascade {100 * c['cascade_top_class_agreement']:.1f}%); "
                          f"test photos re-scored {100 * r['test_rescored_share']:.1f}%", flush=True)
            if "matcher_s_per_img" in a:
                print(f"  matcher: {a['matcher_s_per_img']} s/img wall with 2 threads, {a['matcher_cpu_s_per_img']} "
                      "CPU-s/img", flush=True)
                out["workers_3m_per_day"] = workers_needed(out, runtimes, a["matcher_cpu_s_per_img"])
                print(f"  2-core workers for 3M images/day (34.7 img/s): {out['workers_3m_per_day']}", flush=True)
        if not args.skip_cache:
            out["head_retrain"] = cache_bench(root, args.cache_per_class, args.cache_size)
            c = out["head_retrain"]
            print(f"head retraining ({c['samples']} samples, {c['input_size']}px): cold cache {c['cold_s']}s, "
                  f"warm cache {c['warm_s']}s ({c['speedup']}x)", flush=True)
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
