"""Stage 1, prepare: sources -> samples per split (by content hash), pixels, matcher references,
and the up-sampled training order. No network is built here."""

from __future__ import annotations

import logging
import math
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.detector import NO_LOGO
from pipeline.detector.data import (
    Box,
    DataError,
    Sample,
    SourceImage,
    class_counts,
    clip_box,
    crop,
    decode_rgb,
    load_sources,
    samples_of,
    synthetic_negatives,
)
from pipeline.detector.split import split_of
from pipeline.detector.training.config import TrainConfig
from pipeline.detector.training.narrate import say
from pipeline.progress import Progress, of

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    """Samples per split with their pixels, ready for the network and the matcher."""

    samples: dict[str, list[Sample]]
    pixels: dict[str, np.ndarray]  # split -> (n, s, s, 3) uint8
    native: dict[str, list[np.ndarray]]  # val/test: the sample at (capped) native resolution
    refs: list[tuple[str, np.ndarray]]  # training logo crops (tight boxes) for the matcher
    has_boxes: bool
    # for the crop net (training split only): photos with their boxes, and logo-free photos
    photos: list[tuple[np.ndarray, list[Box]]] = field(default_factory=list)
    backgrounds: list[np.ndarray] = field(default_factory=list)


@dataclass
class TrainingData:
    """What the later stages learn from: the prepared splits, the classes and the training order."""

    prep: Prepared
    classes: list[str]  # no_logo first, then the brands
    order: list[int]  # indices into the training split, rare classes repeated
    y_train: np.ndarray
    class_weight: dict[int, float] | None
    counts: dict[str, dict[str, int]]  # per class, before and after up-sampling
    want_matcher: bool
    want_crop: bool = False

    @property
    def brands(self) -> list[str]:
        return self.classes[1:]

    def labels(self, split: str) -> list[str]:
        return [s.label for s in self.prep.samples[split]]


def upsample_indices(labels: list[str], ratio: float, rng: random.Random) -> list[int]:
    """Indices of the training stream: each class repeated up to `ratio` x the largest class.

    Whole repeats first (every image of a rare class appears equally often), then a seeded
    random remainder, so the stream is balanced without discarding any sample.
    """
    by_class: dict[str, list[int]] = {}
    for i, label in enumerate(labels):
        by_class.setdefault(label, []).append(i)
    if not by_class or ratio <= 0:
        return list(range(len(labels)))
    target = math.ceil(ratio * max(len(v) for v in by_class.values()))
    out: list[int] = []
    for _label, idx in sorted(by_class.items()):
        n = max(len(idx), target)
        reps, rest = divmod(n, len(idx))
        out.extend(idx * reps)
        out.extend(rng.sample(idx, rest))
    return out


def class_weight_map(labels: list[str], classes: list[str]) -> dict[int, float]:
    """Inverse-frequency weights (mean 1 over the samples), for `class_weights=True`."""
    counts = Counter(labels)
    n, k = len(labels), len(counts)
    return {i: (n / (k * counts[c]) if counts.get(c) else 1.0) for i, c in enumerate(classes)}


CROP_MAX_SIDE = 640  # training photos kept for the crop net are shrunk to this long side (memory)


def shrink_with_boxes(arr: np.ndarray, boxes: list[Box], max_side: int = CROP_MAX_SIDE) -> tuple[np.ndarray, list[Box]]:
    """The photo at most `max_side` long, its boxes scaled with it."""
    import cv2

    h, w = arr.shape[:2]
    s = max_side / max(h, w)
    if s >= 1:
        return np.ascontiguousarray(arr), boxes
    small = cv2.resize(arr, (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    return small, [Box(b.cls, int(b.x1 * s), int(b.y1 * s), max(int(b.x1 * s) + 1, int(b.x2 * s)),
                       max(int(b.y1 * s) + 1, int(b.y2 * s))) for b in boxes]


def prepare(sources: list[SourceImage], cfg: TrainConfig, progress: Progress | None, want_refs: bool,
            want_crop: bool = False) -> Prepared:
    """Decode each source once; cut its samples for its split; resize them to the input size."""
    from pipeline.detector.model import matcher_view, resize_batch

    size = cfg.model.input_size
    assert size is not None
    samples: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    pix: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    native: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    refs: list[tuple[str, np.ndarray]] = []
    photos: list[tuple[np.ndarray, list[Box]]] = []
    backgrounds: list[np.ndarray] = []
    bad = 0
    tracker = of(progress)(len(sources), "prepare data", "img")
    for src in sources:
        split = "train" if src.origin == "synthetic" else split_of(src.sha256, cfg.data.fractions)
        tracker.update(1)
        try:
            arr = decode_rgb(src.read())
        except Exception as exc:  # noqa: BLE001 - a broken file is skipped, not fatal
            bad += 1
            log.warning("skipping unreadable image %s: %s", src.name, exc)
            continue
        h, w = arr.shape[:2]
        mine = samples_of(src, split, cfg.data.samples, size=(w, h))
        if mine:
            pix[split].append(resize_batch([crop(arr, s.region) for s in mine], size))
            samples[split].extend(mine)
            if split in native:
                native[split].extend(matcher_view(crop(arr, s.region)) for s in mine)
        if want_refs and split == "train":
            for b in src.boxes:
                cb = clip_box(b, w, h)
                if cb is not None:
                    refs.append((cb.cls, np.ascontiguousarray(crop(arr, cb.region))))
        if want_crop and split == "train":
            kept = [cb for cb in (clip_box(b, w, h) for b in src.boxes) if cb is not None and cb.cls != NO_LOGO]
            if kept:
                photos.append(shrink_with_boxes(arr, kept))
            elif not src.boxes and (src.label or NO_LOGO) == NO_LOGO:
                backgrounds.append(shrink_with_boxes(arr, [])[0])
    tracker.close()
    if bad:
        say(progress, f"skipped {bad} unreadable image(s)")
    pixels = {k: (np.concatenate(v) if v else np.zeros((0, size, size, 3), np.uint8)) for k, v in pix.items()}
    return Prepared(samples, pixels, native, refs, has_boxes=any(s.boxes for s in sources), photos=photos,
                    backgrounds=backgrounds)


def prepare_data(data: str | Path, fmt: str, cfg: TrainConfig, progress: Progress | None = None,
                 weights_tag: str = "") -> TrainingData:
    """Stage 1: load `data`, add synthetic negatives, prepare the splits, plan the training order."""
    sources = load_sources(data, fmt)
    if cfg.data.synthetic_negatives:
        sources = sources + synthetic_negatives(cfg.data.synthetic_negatives, cfg.data.synthetic_size, cfg.runtime.seed)
    has_boxes = any(s.boxes for s in sources)
    want_matcher = cfg.model.matcher == "on" or (cfg.model.matcher == "auto" and has_boxes)
    if want_matcher and cfg.model.matcher == "on" and not has_boxes:
        say(progress, "matcher: no boxes in the data; using whole training images of each brand as references")
    want_crop = want_matcher and has_boxes and cfg.model.crop_net == "auto" and cfg.fit.crop_net_budget_s > 0
    prep = prepare(sources, cfg, progress, want_refs=want_matcher, want_crop=want_crop)
    train_s = prep.samples["train"]
    brands = sorted({s.label for s in train_s if s.label != NO_LOGO})
    if not brands:
        raise DataError(f"{data}: the training split has no brand class (need at least one besides no_logo)")
    classes = [NO_LOGO, *brands]
    if not any(s.label == NO_LOGO for s in train_s):
        say(progress, "warning: no no_logo training samples; the model cannot learn 'no logo' "
            "(add a no_logo/ folder or use --format boxes)")
    col = {c: i for i, c in enumerate(classes)}
    labels = [s.label for s in train_s]
    order = upsample_indices(labels, cfg.data.upsample, random.Random(cfg.runtime.seed))
    before = class_counts(train_s)
    after = dict(sorted(Counter(train_s[i].label for i in order).items()))
    say(progress, "training samples per class (before -> after up-sampling): "
        + ", ".join(f"{c} {before[c]}->{after[c]}" for c in before))
    say(progress, f"split: {len(train_s)} train / {len(prep.samples['val'])} val / {len(prep.samples['test'])} test "
        f"samples; mode {cfg.fit.mode}, input {cfg.model.input_size}px, weights {weights_tag}")
    return TrainingData(
        prep=prep, classes=classes, order=order, y_train=np.array([col[x] for x in labels], np.int64),
        class_weight=class_weight_map(labels, classes) if cfg.data.class_weights else None,
        counts={"before": before, "after": after}, want_matcher=want_matcher, want_crop=want_crop and bool(prep.photos),
    )


def whole_refs(train_s: list[Sample]) -> list[tuple[str, np.ndarray]]:
    """Matcher references when there are no boxes: every whole training image of a brand."""
    return [(s.label, decode_rgb(s.source.read())) for s in train_s if s.label != NO_LOGO and s.region is None]


def matcher_refs(data: TrainingData) -> list[tuple[str, Any]]:
    """The matcher's references: the training split's logo boxes, else whole brand images."""
    return data.prep.refs or whole_refs(data.prep.samples["train"])
