"""Logo matcher on FlickrLogos-27: held-out figures and time per image.

Protocol (nothing is tuned on what is reported):
- every photo goes to train/val/test (70/15/15) by the sha256 of its bytes, with the
  detector's own rule (pipeline.detector.split), so a photo never changes sets;
- references are the train-split logo boxes only;
- val/test samples are exactly the classifier's (pipeline.detector.data.samples_of):
  positives are whole photos (the logo must be found in the full photo), negatives a
  region of each photo away from every box, plus synthetic logo-free scenes whose own
  hash puts them in val/test;
- the decision threshold is the lowest one reaching the target precision on VAL, then
  applied unchanged to TEST.
Baseline measured in the same run: a chance classifier (always "logo", random brand).

    BRANDMON_FL27_DIR=../shared/datasets/flickr_logos_27 nice -n 10 .venv/bin/python bench/matching.py
    ... bench/matching.py --val-only --param fallback=none   # choose parameters on val only
    ... bench/matching.py --baseline   # previous defaults (PREVIOUS_DEFAULTS) and current, one run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from pipeline.detector.matching import (
    NO_LOGO,
    LogoMatcher,
    MatcherParams,
    choose_threshold,
    logo_metrics,
)
from pipeline.progress import terminal

SPLITS = ("train", "val", "test")
N_SYNTHETIC = 400  # logo-free scenes generated; each goes to the split its own hash picks
SYNTH_SIZE = 400


@dataclass
class EvalSet:
    images: list[np.ndarray]
    labels: list[set[str]]  # empty set = no logo
    kinds: list[str]  # "whole" (photo with a logo) | "region" (photo away from boxes) | "synthetic"


@dataclass
class Fl27:
    references: list[tuple[str, np.ndarray]]
    sets: dict[str, EvalSet]
    photos: dict[str, int]


def load_fl27(root: Path, n_synthetic: int = N_SYNTHETIC) -> Fl27:
    """References from train-split boxes; val/test samples exactly as the classifier's eval.

    Uses the detector's own loader, split rule and sample spec (pipeline.detector.data/split),
    so the matcher and the CNN are scored on the same images and can be fused.
    """
    from pipeline.detector.data import (
        SampleSpec,
        clip_box,
        crop,
        decode_rgb,
        load_boxes,
        samples_of,
        synthetic_negatives,
    )
    from pipeline.detector.split import split_of

    sources = load_boxes(root)
    spec = SampleSpec()
    refs: list[tuple[str, np.ndarray]] = []
    sets = {sp: EvalSet([], [], []) for sp in ("val", "test")}
    photos = dict.fromkeys(SPLITS, 0)
    for src in sources:
        split = split_of(src.sha256)
        photos[split] += 1
        rgb = decode_rgb(src.read())
        h, w = rgb.shape[:2]
        if split == "train":
            for b in src.boxes:
                cb = clip_box(b, w, h)
                if cb is not None:
                    refs.append((cb.cls, crop(rgb, cb.region).copy()))
            continue
        classes = {b.cls for b in src.boxes}
        for smp in samples_of(src, split, spec, size=(w, h)):
            es = sets[split]
            es.images.append(crop(rgb, smp.region))
            es.labels.append(
                set() if smp.label == NO_LOGO else classes if smp.region is None else {smp.label}
            )
            es.kinds.append("region" if smp.label == NO_LOGO else smp.kind)
    for src in synthetic_negatives(n_synthetic, size=SYNTH_SIZE):
        split = split_of(src.sha256)
        if split in sets:
            sets[split].images.append(decode_rgb(src.read()))
            sets[split].labels.append(set())
            sets[split].kinds.append("synthetic")
    return Fl27(refs, sets, photos)


def summarize(scores: list[dict], labels: list[set[str]]) -> tuple[np.ndarray, list[str | None]]:
    top_score = np.array([max((v[0] for v in s.values()), default=0.0) for s in scores])
    top_class = [
        max(s, key=lambda c: s[c][0]) if s and max(v[0] for v in s.values()) > 0 else None
        for s in scores
    ]
    return top_score, top_class


# The defaults before issue #14's matcher round (commit 3c9a09d): every inlier counted, a
# homography rejected for its shape is not retried. `--baseline` scores them in the same run.
PREVIOUS_DEFAULTS: dict = {"fallback": "none", "count": "all"}


def run(root: Path, workers: int, target_precision: float, params: MatcherParams, splits: tuple[str, ...] = ("val", "test")) -> dict:
    t0 = time.perf_counter()
    data = load_fl27(root)
    return evaluate(data, time.perf_counter() - t0, workers, target_precision, params, splits)


def evaluate(
    data: Fl27, t_load: float, workers: int, target_precision: float, params: MatcherParams,
    splits: tuple[str, ...] = ("val", "test"),
) -> dict:
    """Fit on the train-split references, score `splits`, threshold from val (see module doc)."""
    t1 = time.perf_counter()
    matcher = LogoMatcher(params).fit(data.references)
    t_fit = time.perf_counter() - t1
    blob = matcher.to_bytes()
    t2 = time.perf_counter()
    LogoMatcher.from_bytes(blob)
    t_from = time.perf_counter() - t2
    out: dict = {
        "photos": data.photos,
        "references": matcher.n_references,
        "descriptors": matcher.n_descriptors,
        "model_bytes": len(blob),
        "data_load_s": round(t_load, 2),
        "fit_s": round(t_fit, 2),
        "from_bytes_s": round(t_from, 2),
    }
    results = {}
    for split in splits:
        es = data.sets[split]
        t, c = time.perf_counter(), time.process_time()
        scores = matcher.score_many(es.images, workers=workers, progress=terminal)
        elapsed, cpu = time.perf_counter() - t, time.process_time() - c
        top_score, top_class = summarize(scores, es.labels)
        results[split] = (es, scores, top_score, top_class, elapsed, cpu)
    es, _, val_top, _, _, _ = results["val"]
    val_pos = np.array([bool(lab) for lab in es.labels])
    thr = choose_threshold(val_top, val_pos, target_precision)
    out["threshold"] = thr
    for split in splits:
        es, scores, top, top_class, elapsed, cpu = results[split]
        pos = np.array([bool(lab) for lab in es.labels])
        m = logo_metrics(top, pos, thr)
        photo_px = [
            im.shape[0] * im.shape[1]
            for im, k in zip(es.images, es.kinds, strict=True)
            if k == "whole"
        ]
        correct = [c in lab for c, lab in zip(top_class, es.labels, strict=True) if lab]
        detected = [
            c in lab
            for c, lab, s in zip(top_class, es.labels, top, strict=True)
            if lab and s >= thr
        ]
        neg_kinds = {
            k: {
                "n": int(sum(1 for kk, p in zip(es.kinds, pos, strict=True) if kk == k and not p)),
                "false_positives": int(
                    sum(
                        1
                        for kk, p, s in zip(es.kinds, pos, top, strict=True)
                        if kk == k and not p and s >= thr
                    )
                ),
            }
            for k in ("region", "synthetic")
        }
        rng = np.random.default_rng(0)
        chance_top1 = float(
            np.mean([rng.choice(matcher.classes) in lab for lab in es.labels if lab])
        )
        out[split] = {
            "n_images": len(es.images),
            "n_positive": int(pos.sum()),
            "n_negative": int((~pos).sum()),
            "negatives": neg_kinds,
            "logo": m,
            "brand_top1": round(float(np.mean(correct)), 4),
            "brand_top1_of_detected": round(float(np.mean(detected)), 4) if detected else None,
            "chance": {
                "logo_precision": round(float(pos.mean()), 4),
                "brand_top1": round(chance_top1, 4),
            },
            "s_per_image": round(elapsed / len(es.images), 4),
            "cpu_s_per_image": round(cpu / len(es.images), 4),
            "load_average": [round(v, 2) for v in os.getloadavg()],
            "mean_photo_px": int(np.mean(photo_px)),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--data", default=os.environ.get("BRANDMON_FL27_DIR"))
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--target-precision", type=float, default=0.9)
    ap.add_argument("--threads", type=int, default=1, help="OpenCV threads (1 = one core)")
    ap.add_argument("--param", action="append", default=[], help="matcher param override k=v")
    ap.add_argument("--val-only", action="store_true", help="score the validation split only (for choosing params)")
    ap.add_argument("--baseline", action="store_true", help="also score the previous defaults (PREVIOUS_DEFAULTS) in this run")
    args = ap.parse_args(argv)
    if not args.data or not Path(args.data, "annotations.txt").exists():
        print("FlickrLogos-27 not found: set BRANDMON_FL27_DIR or pass --data", file=sys.stderr)
        return 2
    cv2.setNumThreads(args.threads)
    overrides = {}
    for kv in args.param:
        k, v = kv.split("=", 1)
        typ = type(getattr(MatcherParams(), k))
        overrides[k] = v.lower() in ("1", "true") if typ is bool else typ(v)
    splits = ("val",) if args.val_only else ("val", "test")
    t0 = time.perf_counter()
    data = load_fl27(Path(args.data))
    t_load = time.perf_counter() - t0
    runs = {}
    if args.baseline:
        runs["previous"] = (PREVIOUS_DEFAULTS, MatcherParams(**PREVIOUS_DEFAULTS))
    runs["current"] = (overrides, MatcherParams(**overrides))
    report = {}
    for name, (given, params) in runs.items():
        res = evaluate(data, t_load, args.workers, args.target_precision, params, splits)
        res["params"] = given
        report[name] = res
        print(f"# {name}: " + json.dumps(res, indent=2))
    print(table(report, splits))
    return 0


def table(report: dict, splits: tuple[str, ...]) -> str:
    """One line per (configuration, split): the figures BENCHMARKS.md quotes."""
    lines = ["config    split  logo P  logo R  (tp, fp)   brand top-1  thr     CPU s/img  load avg (1 min)"]
    for name, res in report.items():
        for split in splits:
            r = res[split]
            m = r["logo"]
            lines.append(
                f"{name:9s} {split:5s}  {m['precision']:.3f}   {m['recall']:.3f}   ({m['tp']}, {m['fp']})"
                f"{'':3s}{r['brand_top1']:.3f}        {res['threshold']:.3f}   {r['cpu_s_per_image']:.3f}"
                f"      {r['load_average'][0]:.1f}"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
