"""Issue #14 experiment: a small from-scratch crop classifier, fused with the keypoint matcher.

Outside the product. Builds the FL27 content-hash split exactly as `brandmon train` does
(`load_sources` + `split_of` + `samples_of`), trains a small fully convolutional network on
augmented 64-px patches of the TRAINING split only -- each logo box warped (scale, shift,
rotation, perspective), half in its own photo's context and half pasted onto a logo-free
background (synthetic scenes, box-free windows of training photos); box-free windows as the
`none` class -- under a hard time budget, then scores every validation sample by running the
net once per scale of a small image pyramid (per-brand max over positions and scales) and
prints validation precision / recall / brand top-1 at the Wilson-margin threshold for: the
matcher alone (its stored val scores from a previous `bench/fl27.py --home` run), the crop
net alone, and fusions of the two. The test split is not touched unless `--test` is given.

    BRANDMON_FL27_DIR=../shared/datasets/flickr_logos_27 nice -n 5 .venv/bin/python bench/crop_net.py \
        --scores /tmp/s19/fl27home/var/models/v1/scores.npz --budget 420
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

def load_split(data: str, n_synth: int, seed: int):
    """Decoded train images with boxes, backgrounds, and the val/test samples as `brandmon train` cuts them."""
    from pipeline.detector.data import (
        SampleSpec,
        clip_box,
        crop,
        decode_rgb,
        load_sources,
        samples_of,
        synthetic_negatives,
    )
    from pipeline.detector.split import split_of

    sources = load_sources(data, "boxes")
    if n_synth:
        sources = sources + synthetic_negatives(n_synth, 299, seed)
    train, backgrounds = [], []
    evals: dict[str, list[tuple[str, np.ndarray]]] = {"val": [], "test": []}
    for src in sources:
        split = "train" if src.origin == "synthetic" else split_of(src.sha256)
        arr = decode_rgb(src.read())
        h, w = arr.shape[:2]
        if split == "train":
            boxes = [b for b in (clip_box(b, w, h) for b in src.boxes) if b is not None]
            if boxes:
                train.append((arr, boxes))
            else:
                backgrounds.append(arr)
        else:
            for s in samples_of(src, split, SampleSpec(), size=(w, h)):
                evals[split].append((s.label, np.ascontiguousarray(crop(arr, s.region))))
    return train, backgrounds, evals


def fractions(text: str) -> tuple[float, ...]:
    """`--mine`: '0.4,0.7' -> (0.4, 0.7); '' -> (); refused unless each is a number in [0, 1]."""
    try:
        out = tuple(float(f) for f in text.split(",") if f.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"not comma-separated numbers: {text[:40]!r}") from None
    if any(not 0 <= f <= 1 for f in out):
        raise argparse.ArgumentTypeError(f"fractions of training are between 0 and 1: {text[:40]!r}")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("BRANDMON_FL27_DIR"), help="FlickrLogos-27 folder (default: $BRANDMON_FL27_DIR)")
    ap.add_argument("--scores", required=True, help="the matcher's val/test scores of a `brandmon train --crop-net off` run: <home>/var/models/vN/scores.npz")
    ap.add_argument("--budget", type=float, default=420.0, help="training seconds")
    ap.add_argument("--steps", type=int, help="train this many steps (the budget still caps it) and mine every photo "
                    "in each round: equal work on a busy machine")
    ap.add_argument("--mine", default="0.4,0.7", type=fractions,
                    help="comma-separated fractions of training (0-1) at which hard negatives are mined ('' = never)")
    ap.add_argument("--width", type=int, default=16, help="channels of the first layer (the net's width)")
    ap.add_argument("--batch", type=int, default=64, help="patches per step")
    ap.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (cosine schedule)")
    ap.add_argument("--sides", help="pyramid long sides, e.g. 64,128,224,384 (default: the net's own)")
    ap.add_argument("--target", type=float, default=0.9, help="logo precision the thresholds aim for (Wilson 95%% rule)")
    ap.add_argument("--seed", type=int, default=1234, help="seed of the patches, the net and the synthetic backgrounds")
    ap.add_argument("--save", help="save the val (and test) crop-net score matrices here (.npz)")
    ap.add_argument("--test", action="store_true", help="also score the test split (report only)")
    ap.add_argument("--net", help="save the trained crop net here; if the file exists, load it instead of training")
    ap.add_argument("--load", help="skip training: report the fusions of crop-net scores saved by --save")
    args = ap.parse_args(argv)
    if not args.data:
        print("set BRANDMON_FL27_DIR or --data", file=sys.stderr)
        return 2

    from pipeline.detector.metrics import evaluate_scores, threshold_for_precision

    if args.load:
        saved = np.load(args.load)
        stored = np.load(args.scores)
        splits = [s for s in ("val", "test") if f"{s}/crop" in saved.files and (s == "val" or args.test)]
        report(stored, {s: saved[f"{s}/crop"] for s in splits}, [str(b) for b in stored["brands"]], args.target,
               splits, threshold_for_precision, evaluate_scores)
        return 0
    t0 = time.monotonic()
    print(f"start {time.strftime('%H:%M:%S')} load {os.getloadavg()}", flush=True)
    stored = np.load(args.scores)
    brands = [str(b) for b in stored["brands"]]
    train, backgrounds, evals = load_split(args.data, 300, args.seed)
    y_val = [lab for lab, _ in evals["val"]]
    assert y_val == [str(x) for x in stored["val/labels"]], "val samples differ from the stored scores' order"
    by_class: dict[str, list] = {b: [] for b in brands}
    for ti, (_arr, boxes) in enumerate(train):
        for b in boxes:
            by_class[b.cls].append((ti, b))
    print(f"data: {len(train)} train photos with boxes, {sum(map(len, by_class.values()))} boxes, "
          f"{len(backgrounds)} logo-free backgrounds, {len(evals['val'])} val samples; {time.monotonic() - t0:.0f}s",
          flush=True)

    from pipeline.detector.cropnet import CropNet, train_crop_net

    if args.net and Path(args.net).is_file():
        net = CropNet.from_bytes(Path(args.net).read_bytes())
        print(f"loaded the crop net from {args.net}", flush=True)
    else:
        net, hist = train_crop_net(train, backgrounds, brands, args.budget, seed=args.seed, width=args.width,
                                   batch_size=args.batch, lr=args.lr, max_steps=args.steps,
                                   mine_at=args.mine,
                                   say=lambda m: print(" ", m, flush=True))
        print(f"trained {hist['steps']} steps = {hist['patches']} patches in {hist['seconds']:.0f}s, loss "
              f"{hist['final_loss']}; load {os.getloadavg()}", flush=True)
        if args.net:
            Path(args.net).write_bytes(net.to_bytes())

    if args.sides:
        net.sides = tuple(int(s) for s in args.sides.split(","))
    splits = ["val", "test"] if args.test else ["val"]
    crop_m: dict[str, np.ndarray] = {}
    for split in splits:
        t = time.monotonic()
        cpu = time.process_time()
        scored = net.score_many(img for _lab, img in evals[split])
        crop_m[split] = np.array([[d[b][0] for b in brands] for d in scored])
        n = len(evals[split])
        print(f"scored {n} {split} samples: {(time.monotonic() - t) / n * 1000:.0f} ms wall, "
              f"{(time.process_time() - cpu) / n * 1000:.0f} ms CPU per sample", flush=True)
    if args.save:
        np.savez_compressed(args.save, brands=np.array(brands), **{f"{k}/crop": v for k, v in crop_m.items()})
    report(stored, crop_m, brands, args.target, splits, threshold_for_precision, evaluate_scores)
    return 0


def fusions(m: np.ndarray, c: np.ndarray, tm: float, tc: float) -> dict[str, np.ndarray]:
    """Candidate fusions; `tm`, `tc` are each signal's own val threshold (their scales)."""
    return {
        "max_scaled": np.maximum(m / tm, c / tc),
        "noisy_or": 1 - (1 - m) * (1 - c),
        "sum_scaled": m / tm + c / tc,
    }


def report(stored, crop_m, brands, target, splits, threshold_for_precision, evaluate_scores) -> None:
    y = {s: [str(v) for v in stored[f"{s}/labels"]] for s in splits}
    val_logo = np.array([v != "no_logo" for v in y["val"]])
    thr = {}
    mats = {s: {"matcher": stored[f"{s}/matcher"], "crop": crop_m[s]} for s in splits}
    for name in ("matcher", "crop"):
        thr[name] = threshold_for_precision(val_logo, mats["val"][name].max(axis=1), target, rule="wilson")["threshold"]
    for s in splits:
        mats[s].update(fusions(mats[s]["matcher"], mats[s]["crop"], thr["matcher"], thr["crop"]))
    for name in mats["val"]:
        pick = threshold_for_precision(val_logo, mats["val"][name].max(axis=1), target, rule="wilson")
        for s in splits:
            r = evaluate_scores(y[s], mats[s][name], brands, pick["threshold"])
            iv = r["intervals"]
            print(f"{s:4s} {name:11s} thr {pick['threshold']:.4f} margin_met {pick.get('margin_met')}  "
                  f"P {r['logo']['precision']:.3f} ({iv['logo_precision']['k']}/{iv['logo_precision']['n']})  "
                  f"R {r['logo']['recall']:.3f}  top-1 {r['brand_accuracy']:.3f}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
