"""The crop net: a small from-scratch convolutional classifier of logo crops (issue #14).

Why: the keypoint matcher finds textured logos surely but gets chance-level inliers on plain
shapes (McDonalds, Citroen, Pepsi, Apple), and a whole-photo Inception v3 from scratch gets
about one epoch in the training budget. This net learns from the training split's *boxes*:
every step cuts fresh 64-px patches -- each box warped (scale, shift, rotation, perspective),
half in its own photo and half pasted onto a logo-free background ("synthetic context"),
lighting/colour/blur jittered -- and box-free windows as the `none` class. It is fully
convolutional (stride 32; a 64-px window is one output cell), so a photo is scored by running
it once per scale of a small pyramid: per brand, the highest probability over every position
and scale, with the window it came from as the box.

It never decides alone: `merge_local` folds it into the matcher's per-brand scores (in the
matcher's units), and calibration keeps it only when that beats the matcher alone on the
validation split (`training/calibrate.py`). TensorFlow and OpenCV are imported inside functions.
"""

from __future__ import annotations

import collections
import heapq
import io
import itertools
import json
import math
import queue
import random
import tempfile
import threading
import time
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.detector.data import Box, overlaps, with_margin

PATCH = 64
# pyramid: the photo's long side at each scale. Seven, not the first four: with hard negatives
# (`mine_hard`) the net's false windows are rare enough that more scales find more logos than
# false ones (FL27 val, bench/crop_net.py run 4: recall 0.832 -> 0.860 folded into the matcher).
SIDES = (64, 96, 128, 176, 224, 304, 384)
MINE_SIDES = (64, 128, 224, 384)  # hard negatives are mined at four of them (time)
MINE_SHARE = 0.1  # a mining round stops after this share of the training budget (FL27: all 871 photos in ~30-50 s of 840)
NONE = "none"
FORMAT = 1

Scores = dict[str, tuple[float, Any]]


# --- patches ---------------------------------------------------------------------------------


def _quad(rng: random.Random, bw: float, bh: float) -> np.ndarray:
    """Where a box's corners land in the patch: scaled, shifted, rotated, perspective-jittered."""
    side = math.exp(rng.uniform(math.log(20), math.log(56)))
    asp = rng.uniform(0.85, 1.18)
    s = side / max(bw, bh)
    w, h = bw * s * asp, bh * s / asp
    cx, cy = PATCH / 2 + rng.uniform(-14, 14), PATCH / 2 + rng.uniform(-14, 14)
    th = math.radians(rng.uniform(-18, 18))
    c, si = math.cos(th), math.sin(th)
    pts = []
    for dx, dy in ((-w / 2, -h / 2), (w / 2, -h / 2), (w / 2, h / 2), (-w / 2, h / 2)):
        j = 0.08 * side
        dx, dy = dx + rng.uniform(-j, j), dy + rng.uniform(-j, j)
        pts.append((cx + c * dx - si * dy, cy + si * dx + c * dy))
    return np.float32(pts)


def logo_patch(rng: random.Random, arr: np.ndarray, box: Box, bg: np.ndarray | None) -> np.ndarray:
    """One warped instance of `box`: in its own photo (`bg` None) or pasted onto `bg`."""
    import cv2

    x1, y1, x2, y2 = box.region
    src = np.float32([(x1, y1), (x2, y1), (x2, y2), (x1, y2)])
    H = cv2.getPerspectiveTransform(src, _quad(rng, x2 - x1, y2 - y1))
    if bg is None:
        return cv2.warpPerspective(arr, H, (PATCH, PATCH), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    logo = np.ascontiguousarray(arr[y1:y2, x1:x2])
    Hc = H @ np.array([[1, 0, x1], [0, 1, y1], [0, 0, 1]], np.float64)
    fg = cv2.warpPerspective(logo, Hc, (PATCH, PATCH), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    m = cv2.warpPerspective(np.ones(logo.shape[:2], np.float32), Hc, (PATCH, PATCH), flags=cv2.INTER_LINEAR,
                            borderMode=cv2.BORDER_CONSTANT, borderValue=0)[..., None]
    return (fg * m + bg * (1 - m)).astype(np.uint8)


def window(rng: random.Random, arr: np.ndarray, boxes: Iterable[Box] = (), tries: int = 20) -> np.ndarray | None:
    """A random window (resized to the patch) holding at most a sliver of any box, or None."""
    import cv2

    h, w = arr.shape[:2]
    lo = min(40, w, h)
    for _ in range(tries):
        side = math.exp(rng.uniform(math.log(lo), math.log(min(w, h))))
        ww, hh = min(w, side * rng.uniform(0.8, 1.25)), min(h, side * rng.uniform(0.8, 1.25))
        x, y = rng.uniform(0, w - ww), rng.uniform(0, h - hh)
        clear = True
        for b in boxes:
            ix = max(0.0, min(x + ww, b.x2) - max(x, b.x1))
            iy = max(0.0, min(y + hh, b.y2) - max(y, b.y1))
            tiny = max(b.x2 - b.x1, b.y2 - b.y1) < 0.12 * max(ww, hh)  # too small to be seen at this scale
            if ix * iy > 0.15 * (b.x2 - b.x1) * (b.y2 - b.y1) and not tiny:
                clear = False
                break
        if clear:
            M = np.float32([[PATCH / ww, 0, -x * PATCH / ww], [0, PATCH / hh, -y * PATCH / hh]])
            return cv2.warpAffine(arr, M, (PATCH, PATCH), flags=cv2.INTER_AREA if ww > 2 * PATCH else cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_REFLECT)
    return None


def colour(rng: np.random.Generator, x: np.ndarray) -> np.ndarray:
    """Per-patch saturation, contrast, brightness, channel gain and noise; vectorised."""
    x = x.astype(np.float32)
    n = len(x)
    gray = x.mean(axis=3, keepdims=True)
    sat = rng.uniform(0.5, 1.5, (n, 1, 1, 1)).astype(np.float32)
    sat[rng.random(n) < 0.1] = 0.0
    x = gray + (x - gray) * sat
    mean = x.mean(axis=(1, 2, 3), keepdims=True)
    x = (x - mean) * rng.uniform(0.6, 1.4, (n, 1, 1, 1)) + mean * rng.uniform(0.6, 1.4, (n, 1, 1, 1))
    x = x * rng.uniform(0.9, 1.1, (n, 1, 1, 3))
    x = x + rng.uniform(0, 6, (n, 1, 1, 1)) * rng.standard_normal(x.shape).astype(np.float32)
    return np.clip(x, 0, 255).astype(np.uint8)


class PatchMaker:
    """Batches of (patches, labels) from training photos with boxes and logo-free backgrounds."""

    def __init__(self, photos: list[tuple[np.ndarray, list[Box]]], backgrounds: list[np.ndarray],
                 brands: list[str], seed: int, p_none: float = 0.4, p_paste: float = 0.5, p_hard: float = 0.3) -> None:
        self.photos, self.backgrounds, self.brands = photos, backgrounds, brands
        self.rng, self.nrng = random.Random(seed), np.random.default_rng(seed)
        self.p_none, self.p_paste, self.p_hard = p_none, p_paste, p_hard
        self.hard: list[np.ndarray] = []  # mined windows the net called a brand (`mine_hard`); replaced whole
        self.by_class: dict[str, list[tuple[int, Box]]] = {}
        for i, (_arr, boxes) in enumerate(photos):
            for b in boxes:
                self.by_class.setdefault(b.cls, []).append((i, b))
        self.present = [k for k, b in enumerate(brands) if self.by_class.get(b)]

    def _free(self) -> np.ndarray:
        """A logo-free patch; bounded: photos that are all box and no backgrounds give plain noise."""
        for _ in range(50):
            if self.backgrounds and self.rng.random() < 0.5:
                p = window(self.rng, self.rng.choice(self.backgrounds))
            else:
                arr, boxes = self.rng.choice(self.photos)
                p = window(self.rng, arr, boxes)
            if p is not None:
                return p
        base = self.nrng.uniform(0, 255, (1, 1, 3))
        return np.clip(base + self.nrng.normal(0, 30, (PATCH, PATCH, 3)), 0, 255).astype(np.uint8)

    def batch(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        import cv2

        rng = self.rng
        xs = np.empty((n, PATCH, PATCH, 3), np.uint8)
        ys = np.zeros(n, np.int64)
        for i in range(n):
            if rng.random() < self.p_none:
                hard = self.hard
                if hard and rng.random() < self.p_hard:
                    xs[i] = hard[rng.randrange(len(hard))]
                    if rng.random() < 0.5:
                        xs[i] = xs[i, :, ::-1]
                else:
                    xs[i] = self._free()
                continue
            k = rng.choice(self.present)
            pi, box = rng.choice(self.by_class[self.brands[k]])
            bg = self._free() if rng.random() < self.p_paste else None
            xs[i] = logo_patch(rng, self.photos[pi][0], box, bg)
            ys[i] = k + 1
            if rng.random() < 0.3:
                xs[i] = cv2.GaussianBlur(xs[i], (0, 0), rng.uniform(0.4, 1.4))
        return colour(self.nrng, xs), ys


def at_scale(img: np.ndarray, side: int) -> tuple[np.ndarray, float]:
    """The photo resized so its long side is `side`, padded (reflected) to at least one patch; and the scale."""
    import cv2

    h, w = img.shape[:2]
    s = side / max(h, w)
    im = cv2.resize(np.ascontiguousarray(img), (max(1, round(w * s)), max(1, round(h * s))), interpolation=cv2.INTER_AREA)
    ph, pw = max(0, PATCH - im.shape[0]), max(0, PATCH - im.shape[1])
    if ph or pw:
        im = cv2.copyMakeBorder(im, 0, ph, 0, pw, cv2.BORDER_REFLECT)
    return im, s


def mine_hard(forward: Any, photos: list[tuple[np.ndarray, list[Box]]], backgrounds: list[np.ndarray],
              brands: list[str], sides: tuple[int, ...] = MINE_SIDES, floor: float = 0.2, limit: int = 4000,
              clearance: float = 0.1, deadline: float | None = None, order: Iterable[int] | None = None) -> list[np.ndarray]:
    """The logo-free windows the net now calls a brand most surely, as 64-px patches, surest first.

    Why: random box-free windows are mostly easy, so the net's few confident false windows (text,
    signs, round shapes) set the threshold that keeps precision, and photos with a plain logo sit
    just below it. Mining them from the training photos (outside every box, grown by
    `clearance`) and the logo-free backgrounds, at four of the scales a photo is scored at, and
    training on them as `none` (30% of the `none` patches) is classic bootstrapping (Sung & Poggio; Felzenszwalb et al.).
    A window whose top brand is one the photo holds is skipped: FL27 leaves some instances
    unboxed, and teaching the net that they are `none` would cost recall.
    Bounded: at most `limit` windows are held (a heap), and the photos are visited in `order`
    (photos first, then backgrounds, by index) until `time.monotonic()` passes `deadline`.
    """
    found: list[tuple[float, int, np.ndarray]] = []  # a min-heap: the weakest kept window on top
    items = [(arr, boxes) for arr, boxes in photos] + [(bg, []) for bg in backgrounds]
    index = {b: k for k, b in enumerate(brands)}
    ties = itertools.count()  # heap ties never compare the arrays
    for i in range(len(items)) if order is None else order:
        if deadline is not None and time.monotonic() > deadline:
            break
        arr, boxes = items[i]
        h, w = arr.shape[:2]
        held = {index[b.cls] for b in boxes if b.cls in index}
        # grown as the evaluation's logo-free regions are (`data.free_regions`), in photo pixels
        grown = [with_margin(b.region, w, h, clearance) for b in boxes]
        for side in sides:
            im, s = at_scale(arr, side)
            p = forward(im)[..., 1:]
            top, which = p.max(axis=-1), p.argmax(axis=-1)
            for gy, gx in zip(*np.nonzero(top >= floor), strict=True):
                if int(which[gy, gx]) in held:
                    continue
                x1, y1 = int(gx) * 32, int(gy) * 32  # a valid-padded stride-32 cell: always inside `im`
                if any(overlaps((x1 / s, y1 / s, (x1 + PATCH) / s, (y1 + PATCH) / s), g) for g in grown):
                    continue
                score = float(top[gy, gx])
                if len(found) >= limit and score <= found[0][0]:
                    continue
                entry = (score, next(ties), np.ascontiguousarray(im[y1:y1 + PATCH, x1:x1 + PATCH]))
                if len(found) < limit:
                    heapq.heappush(found, entry)
                else:
                    heapq.heapreplace(found, entry)
    return [patch for _score, _tie, patch in sorted(found, key=lambda t: (-t[0], t[1]))]


# --- the network -----------------------------------------------------------------------------


def build(n_classes: int, width: int = 16) -> Any:
    """Stride-32 fully convolutional net; a 2x2 valid conv makes a 64-px patch one output cell."""
    import keras
    from keras import layers

    inp = keras.Input((None, None, 3))
    x = layers.Rescaling(1 / 127.5, offset=-1.0)(inp)

    def cbr(x: Any, f: int, k: int = 3, pad: str = "same") -> Any:
        x = layers.Conv2D(f, k, padding=pad, use_bias=False)(x)
        x = layers.BatchNormalization(momentum=0.9)(x)
        return layers.ReLU()(x)

    w = width
    x = layers.MaxPooling2D()(cbr(x, w))
    x = layers.MaxPooling2D()(cbr(x, 2 * w))
    x = layers.MaxPooling2D()(cbr(cbr(x, 4 * w), 4 * w))
    x = layers.MaxPooling2D()(cbr(cbr(x, 8 * w), 8 * w))
    x = layers.MaxPooling2D()(cbr(x, 12 * w))
    x = layers.Dropout(0.3)(cbr(x, 16 * w, k=2, pad="valid"))
    return keras.Model(inp, layers.Conv2D(n_classes, 1)(x))


class CropNet:
    """The trained net and its classes (`none` first); scores whole photos by pyramid."""

    def __init__(self, net: Any, brands: list[str], width: int = 16, sides: tuple[int, ...] = SIDES) -> None:
        self.net, self.brands, self.width, self.sides = net, list(brands), width, tuple(sides)
        self._fn: Any = None

    def _forward(self, x: np.ndarray) -> np.ndarray:
        import tensorflow as tf

        if self._fn is None:
            net = self.net
            self._fn = tf.function(lambda t: tf.nn.softmax(net(tf.cast(t, tf.float32), training=False), axis=-1),
                                   input_signature=[tf.TensorSpec((1, None, None, 3), tf.uint8)])
        return self._fn(tf.convert_to_tensor(x[None])).numpy()[0]

    def score(self, img: np.ndarray) -> Scores:
        """Per brand: (highest probability over positions and scales, its window in image pixels)."""
        h, w = img.shape[:2]
        best = np.zeros(len(self.brands))
        boxes: list[Any] = [None] * len(self.brands)
        for side in self.sides:
            im, s = at_scale(img, side)
            p = self._forward(im)[..., 1:]  # (gh, gw, n_brands)
            flat = p.reshape(-1, p.shape[-1])
            where = flat.argmax(axis=0)
            top = flat[where, np.arange(flat.shape[1])]
            for k in np.nonzero(top > best)[0]:
                gy, gx = divmod(int(where[k]), p.shape[1])
                x1, y1 = gx * 32 / s, gy * 32 / s
                boxes[k] = [int(max(0, x1)), int(max(0, y1)), int(min(w, x1 + PATCH / s)), int(min(h, y1 + PATCH / s))]
                best[k] = top[k]
        return {b: (float(best[k]), boxes[k]) for k, b in enumerate(self.brands)}

    def score_many(self, images: Iterable[np.ndarray]) -> list[Scores]:
        return [self.score(im) for im in images]

    def to_bytes(self) -> bytes:
        """A zip of the Keras weights and a JSON header (no pickles)."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "crop.weights.h5"
            self.net.save_weights(str(path))
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w") as zf:
                zf.writestr("cropnet.json", json.dumps({"format": FORMAT, "brands": self.brands, "width": self.width,
                                                        "sides": list(self.sides)}))
                zf.write(path, "crop.weights.h5")
            return buf.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> CropNet:
        with zipfile.ZipFile(io.BytesIO(data)) as zf, tempfile.TemporaryDirectory() as tmp:
            meta = json.loads(zf.read("cropnet.json"))
            if meta.get("format") != FORMAT:
                raise ValueError("not a brandmon crop net (or an unknown version)")
            net = build(len(meta["brands"]) + 1, int(meta["width"]))
            path = Path(tmp) / "crop.weights.h5"
            path.write_bytes(zf.read("crop.weights.h5"))
            net.load_weights(str(path))
        return cls(net, meta["brands"], int(meta["width"]), tuple(meta["sides"]))


def train_crop_net(photos: list[tuple[np.ndarray, list[Box]]], backgrounds: list[np.ndarray], brands: list[str],
                   budget_s: float, seed: int = 1234, width: int = 16, batch_size: int = 64, lr: float = 2e-3,
                   max_steps: int | None = None, say: Any = None,
                   mine_at: tuple[float, ...] = (0.4, 0.7)) -> tuple[CropNet, dict[str, Any]]:
    """Train on fresh patches until `budget_s` (or `max_steps`) runs out; cosine learning rate on the clock.

    Patches are cut on a thread while the network trains (OpenCV and TensorFlow drop the GIL).
    At each fraction of `mine_at` the net's surest false windows are mined (`mine_hard`) and
    join the `none` patches from then on; a round stops after MINE_SHARE of `budget_s` (with
    `max_steps`, a fixed amount of work, it mines every photo).
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    net = build(len(brands) + 1, width)
    opt = keras.optimizers.Adam(lr)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    n_out = len(brands) + 1

    @tf.function
    def step(x: Any, y: Any) -> Any:
        with tf.GradientTape() as tape:
            loss = loss_fn(y, tf.reshape(net(tf.cast(x, tf.float32), training=True), (-1, n_out)))
        opt.apply_gradients(zip(tape.gradient(loss, net.trainable_variables), net.trainable_variables, strict=True))
        return loss

    maker = PatchMaker(photos, backgrounds, brands, seed)
    ready: queue.Queue = queue.Queue(maxsize=4)
    stop = threading.Event()

    failed: list[BaseException] = []

    def produce() -> None:
        try:
            while not stop.is_set():
                b = maker.batch(batch_size)
                while not stop.is_set():
                    try:
                        ready.put(b, timeout=0.5)
                        break
                    except queue.Full:
                        continue
        except BaseException as exc:  # handed to the training loop, which raises it (not a silent 120 s wait)
            failed.append(exc)

    def next_batch() -> tuple[np.ndarray, np.ndarray]:
        """The next batch; the patch thread's own error if it died, at once."""
        waited = time.monotonic() + 120
        while True:
            if failed:
                raise failed[0]
            try:
                return ready.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > waited:
                    raise RuntimeError("crop net: the patch thread made no batch in 120 s") from None

    thread = threading.Thread(target=produce, daemon=True, name="cropnet-patches")
    thread.start()
    started = time.monotonic()
    steps, losses = 0, collections.deque(maxlen=500)  # bounded: a 30-day budget is millions of steps
    pending = sorted(mine_at)
    mined: list[dict[str, Any]] = []
    scorer = CropNet(net, brands, width)
    try:
        while time.monotonic() - started < budget_s and (max_steps is None or steps < max_steps):
            frac = min(1.0, (time.monotonic() - started) / budget_s)
            if max_steps:
                frac = max(frac, steps / max_steps)
            if pending and frac >= pending[0]:
                pending.pop(0)
                t = time.monotonic()
                order = list(range(len(photos) + len(backgrounds)))
                # a cut-short round still sees photos and backgrounds alike; its own generator, seeded by
                # the round: `maker.rng` is drawn by the patch thread at its own pace, so it is not reproducible
                random.Random(seed * 1_000_003 + len(mined)).shuffle(order)
                maker.hard = mine_hard(scorer._forward, photos, backgrounds, brands, order=order,
                                       deadline=None if max_steps else t + MINE_SHARE * budget_s)
                mined.append({"at_step": steps, "windows": len(maker.hard), "seconds": round(time.monotonic() - t, 1)})
                if say:
                    why = "" if maker.hard else (" (no window outside the boxes calls a brand its photo does not hold"
                                                 " at 0.2 or more; with one brand and no logo-free photos none ever can)")
                    say(f"crop net: mined {len(maker.hard)} hard negative windows in {time.monotonic() - t:.0f}s{why}")
            opt.learning_rate.assign(lr * 0.5 * (1 + math.cos(math.pi * frac)))
            x, y = next_batch()
            losses.append(float(step(tf.convert_to_tensor(x), tf.convert_to_tensor(y))))
            steps += 1
            if say and steps % 500 == 0:
                say(f"crop net: step {steps}, loss {np.mean(losses):.3f}, {time.monotonic() - started:.0f}s")
    finally:
        stop.set()
        thread.join(timeout=10)
    history = {"steps": steps, "patches": steps * batch_size, "seconds": round(time.monotonic() - started, 1),
               "final_loss": round(float(np.mean(list(losses)[-100:])), 4) if losses else None, "hard_negatives": mined}
    return scorer, history


# --- fusion with the matcher -----------------------------------------------------------------


def merge_local(match: Scores | None, crop: Scores, params: dict[str, Any]) -> Scores:
    """The matcher's scores with the crop net's folded in, in the matcher's units.

    Each signal is divided by its own validation threshold (`tm`, `tc`), the larger wins
    (an "either is sure" rule: both cross 1 where each alone would call the photo), and the
    result is multiplied back by `tm` so the matcher's scale and threshold keep their meaning.
    The box comes from the winning signal.
    """
    tm, tc = float(params["tm"]), float(params["tc"])
    out: Scores = {}
    for b in dict.fromkeys([*(match or {}), *crop]):
        m, mbox = (match or {}).get(b, (0.0, None))
        c, cbox = crop.get(b, (0.0, None))
        if c / tc > m / tm:
            out[b] = (min(1.0, tm * c / tc), cbox)
        else:
            out[b] = (float(m), mbox)
    return out
