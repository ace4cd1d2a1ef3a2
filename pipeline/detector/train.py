"""Training: data -> samples -> Inception v3 classifier (+ local-feature matcher) -> registry.

The split of every photo comes from its content hash (`split.py`); the classifier learns on
the training split only, the validation split chooses everything that is chosen (fusion
weights, decision thresholds for the target precision), and the test split is only ever
*reported* -- and written out as a `folders` layout under `<home>/eval/<version>/` so
`brandmon evaluate` can re-score it later.

Two ways to train the classifier:
- `head`: the base is frozen; its pooled features come from the feature cache (computed once
  per image, base weights and input size) and only the softmax head trains. The default with
  pretrained base weights.
- `full`: the whole network trains, from scratch when no pretrained weights exist (the default
  offline), with augmentation. `finetune:N` trains the head on cached features, then also the
  top N Inception blocks at a low learning rate, BatchNorm in inference mode.
"""

from __future__ import annotations

import io
import logging
import math
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.context import Context
from pipeline.detector import NO_LOGO
from pipeline.detector.data import (
    DataError,
    Sample,
    SampleSpec,
    SourceImage,
    class_counts,
    clip_box,
    crop,
    decode_rgb,
    fingerprint,
    load_sources,
    samples_of,
    synthetic_negatives,
)
from pipeline.detector.metrics import (
    evaluate_scores,
    plot_pr_curves,
    pr_curve,
    threshold_for_precision,
)
from pipeline.detector.split import DEFAULT_FRACTIONS, split_of
from pipeline.errors import BrandmonError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    input_size: int | None = None  # None: 299 with pretrained weights, 128 from scratch
    mode: str = "auto"  # auto | head | full | finetune:N
    epochs: int | None = None  # full/finetune image epochs; None: per mode
    head_epochs: int = 40  # head-only epochs on cached features
    batch_size: int = 32
    learning_rate: float = 1e-3
    finetune_learning_rate: float = 1e-5
    dropout: float = 0.3
    bn_momentum: float | None = 0.9  # BatchNorm momentum when the whole network trains
    augment: bool | None = None  # None: on when the base trains from scratch
    augment_flip: bool = False  # logos with text are not mirror-symmetric: off by default
    upsample: float = 1.0  # each class raised to >= upsample x the largest class (0: off)
    class_weights: bool = False
    synthetic_negatives: int = 0  # logo-free synthetic scenes added to the training no_logo
    synthetic_size: int = 299
    matcher: str = "auto"  # auto (when the data has boxes) | on | off
    matcher_workers: int = 2
    time_budget_s: float | None = None  # stop image training after this long (checked every step)
    deterministic: bool = False  # seeded, op-deterministic, sequential augmentation (see `enable_determinism`)
    seed: int = 1234
    fractions: tuple[float, float, float] = DEFAULT_FRACTIONS
    samples: SampleSpec = field(default_factory=SampleSpec)


PROFILES: dict[str, dict[str, Any]] = {
    # The shipped defaults: real photos, the 30-minute budget on 2 cores.
    "default": {"synthetic_negatives": 300, "upsample": 0.5, "time_budget_s": 17 * 60.0},
    # The demo: small input, from scratch, on synthetic training folders, in about a minute.
    # Bounded by epochs, never by the clock, and deterministic: the same commit trains the same
    # model (and the demo prints the same figures) on an idle or a busy machine.
    "demo": {
        "input_size": 96,
        "mode": "full",
        "epochs": 8,
        "batch_size": 32,
        "learning_rate": 2e-3,
        "augment": True,
        "dropout": 0.2,
        "time_budget_s": None,
        "deterministic": True,
        "matcher": "on",
    },
}


# --- small pure helpers ----------------------------------------------------------------------


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


def resolve_config(profile: str, pretrained: bool, epochs: int | None, overrides: dict[str, Any]) -> TrainConfig:
    if profile not in PROFILES:
        raise DataError(f"unknown training profile {profile!r}; use one of {', '.join(PROFILES)}")
    values: dict[str, Any] = {**PROFILES[profile], **{k: v for k, v in overrides.items() if v is not None}}
    if epochs is not None:
        values["epochs"] = epochs
    unknown = set(values) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise DataError(f"unknown training option(s): {', '.join(sorted(unknown))}")
    if isinstance(values.get("samples"), dict):
        values["samples"] = SampleSpec(**values["samples"])
    try:
        cfg = TrainConfig(**values)
    except TypeError as exc:
        raise DataError(f"bad training options: {exc}") from None
    mode = cfg.mode if cfg.mode != "auto" else ("head" if pretrained else "full")
    check_mode(mode)
    size = cfg.input_size or (299 if pretrained else 128)
    augment = cfg.augment if cfg.augment is not None else (mode == "full" and not pretrained)
    default_epochs = {"full": 12, "head": 0}.get(mode, 4)
    return replace(cfg, mode=mode, input_size=size, augment=augment, epochs=cfg.epochs if cfg.epochs is not None else default_epochs)


def check_mode(mode: str) -> None:
    """`head`, `full` or `finetune:N` with 1 <= N <= 11 (Inception v3 has 11 mixed blocks)."""
    if mode in ("head", "full"):
        return
    head, _, n = mode.partition(":")
    if head != "finetune" or not n.isdigit() or not 1 <= int(n) <= 11:
        raise DataError(f"training mode must be auto, head, full or finetune:N (N = 1..11 top Inception blocks), not {mode!r}")


def _bar(total: int | None, enabled: bool, desc: str, unit: str = "img") -> Any:
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not enabled or not sys.stderr.isatty(), leave=False)


def _say(progress: bool, message: str) -> None:
    """One line of run narration on stderr (the bar's companion), also logged."""
    log.info(message)
    if progress:
        print(message, file=sys.stderr, flush=True)


# --- data preparation ------------------------------------------------------------------------


@dataclass
class Prepared:
    """Samples per split with their pixels, ready for the network and the matcher."""

    samples: dict[str, list[Sample]]
    pixels: dict[str, np.ndarray]  # split -> (n, s, s, 3) uint8
    native: dict[str, list[np.ndarray]]  # val/test: the sample at (capped) native resolution
    refs: list[tuple[str, np.ndarray]]  # training logo crops (tight boxes) for the matcher
    has_boxes: bool


def prepare(sources: list[SourceImage], cfg: TrainConfig, progress: bool, want_refs: bool) -> Prepared:
    """Decode each source once; cut its samples for its split; resize them to the input size."""
    from pipeline.detector.model import matcher_view, resize_batch

    size = cfg.input_size
    assert size is not None
    samples: dict[str, list[Sample]] = {"train": [], "val": [], "test": []}
    pix: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    native: dict[str, list[np.ndarray]] = {"val": [], "test": []}
    refs: list[tuple[str, np.ndarray]] = []
    bad = 0
    bar = _bar(len(sources), progress, "prepare data")
    for src in sources:
        split = "train" if src.origin == "synthetic" else split_of(src.sha256, cfg.fractions)
        try:
            arr = decode_rgb(src.read())
        except Exception as exc:  # noqa: BLE001 - a broken file is skipped, not fatal
            bad += 1
            log.warning("skipping unreadable image %s: %s", src.name, exc)
            bar.update(1)
            continue
        h, w = arr.shape[:2]
        mine = samples_of(src, split, cfg.samples, size=(w, h))
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
        bar.update(1)
    bar.close()
    if bad:
        _say(progress, f"skipped {bad} unreadable image(s)")
    pixels = {k: (np.concatenate(v) if v else np.zeros((0, size, size, 3), np.uint8)) for k, v in pix.items()}
    return Prepared(samples, pixels, native, refs, has_boxes=any(s.boxes for s in sources))


# --- classifier training ---------------------------------------------------------------------


class _KerasProgress:
    """A tqdm bar over all training steps as a Keras callback, with a time budget."""

    @staticmethod
    def make(total_steps: int, enabled: bool, desc: str, budget_s: float | None) -> Any:
        import keras

        class Callback(keras.callbacks.Callback):
            def __init__(self) -> None:
                super().__init__()
                self.bar = _bar(total_steps, enabled, desc, unit="step")
                self.started = time.monotonic()
                self.stopped_by_budget = False
                self.epochs_done = 0
                self.steps_done = 0

            def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
                self.bar.update(1)
                self.steps_done += 1
                if budget_s is not None and time.monotonic() - self.started > budget_s:
                    self.stopped_by_budget = True
                    self.model.stop_training = True
                if logs:
                    self.bar.set_postfix({k: f"{float(v):.3f}" for k, v in logs.items() if k in ("loss", "accuracy")})

            def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
                self.epochs_done = epoch + 1

            def on_train_end(self, logs: dict | None = None) -> None:
                self.bar.close()

        return Callback()


def tensorboard_callback(log_dir: Path) -> Any:
    """Per-epoch scalars as TensorBoard event files.

    Written with TensorFlow's core summary ops and the scalars plugin's metadata, because
    Keras' own TensorBoard callback needs the `tensorboard` package, which is not a runtime
    dependency; `tensorboard --logdir <home>/tensorboard` reads these files all the same.
    """
    import keras
    import tensorflow as tf
    from tensorflow.core.framework import summary_pb2

    meta = summary_pb2.SummaryMetadata(plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars"))

    class Callback(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            log_dir.mkdir(parents=True, exist_ok=True)
            self.writer = tf.summary.create_file_writer(str(log_dir))

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            with self.writer.as_default():
                for name, value in (logs or {}).items():
                    tf.summary.write(f"epoch_{name}", tf.constant(float(value)), step=epoch, metadata=meta)
            self.writer.flush()

        def on_train_end(self, logs: dict | None = None) -> None:
            self.writer.close()

    return Callback()


def _compile(model: Any, lr: float) -> None:
    import keras

    model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=lr),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
    )


def train_head(
    net: Any, x: np.ndarray, y: np.ndarray, order: list[int], cfg: TrainConfig, classes: list[str],
    tb_dir: Path | None, progress: bool, class_weight: dict[int, float] | None,
) -> dict[str, Any]:
    """Train the softmax head on feature vectors (cached base outputs)."""

    _compile(net.head, cfg.learning_rate)
    xs, ys = x[order], y[order]
    steps = math.ceil(len(order) / cfg.batch_size) * cfg.head_epochs
    cb = _KerasProgress.make(steps, progress, "train head", None)
    callbacks = [cb]
    if tb_dir is not None:
        callbacks.append(tensorboard_callback(tb_dir / "head"))
    hist = net.head.fit(
        xs, ys, batch_size=cfg.batch_size, epochs=cfg.head_epochs, shuffle=True, verbose=0,
        callbacks=callbacks, class_weight=class_weight,
    )
    return {"epochs": cfg.head_epochs, "final_loss": round(float(hist.history["loss"][-1]), 4)}


def _image_dataset(pixels: np.ndarray, y: np.ndarray, order: list[int], cfg: TrainConfig, seed: int) -> Any:
    """A tf.data stream over the (up-sampled) training order: shuffle, batch, augment, prefetch.

    The shuffle is seeded (a new seeded order each epoch). With `cfg.deterministic` the
    augmentation runs sequentially, so its random draws meet the batches in one fixed order
    (a parallel map would hand the layers' shared seed state to whichever batch runs first).
    """
    import keras
    import tensorflow as tf

    images = tf.constant(pixels)
    labels = tf.constant(y.astype(np.int32))
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(order, np.int32))
    ds = ds.shuffle(len(order), seed=seed, reshuffle_each_iteration=True).batch(cfg.batch_size)
    ds = ds.map(lambda idx: (tf.cast(tf.gather(images, idx), tf.float32), tf.gather(labels, idx)))
    if cfg.augment:
        layers = [
            keras.layers.RandomZoom((-0.25, 0.15), fill_mode="reflect", seed=seed),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomRotation(0.04, fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomBrightness(0.2, value_range=(0, 255), seed=seed + 3),
            keras.layers.RandomContrast(0.2, seed=seed + 4),
        ]
        if cfg.augment_flip:
            layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 5))
        aug = keras.Sequential(layers, name="augment")
        ds = ds.map(lambda a, b: (tf.clip_by_value(aug(a, training=True), 0.0, 255.0), b),
                    num_parallel_calls=None if cfg.deterministic else tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def train_images(
    net: Any, pixels: np.ndarray, y: np.ndarray, order: list[int], cfg: TrainConfig, lr: float,
    tb_dir: Path | None, progress: bool, class_weight: dict[int, float] | None, desc: str,
) -> dict[str, Any]:
    """Train the classifier on pixels (full or fine-tuning); bypasses the feature cache."""

    _compile(net.classifier, lr)
    ds = _image_dataset(pixels, y, order, cfg, cfg.seed)
    epochs = int(cfg.epochs or 0)
    per_epoch = math.ceil(len(order) / cfg.batch_size)
    steps = per_epoch * epochs
    cb = _KerasProgress.make(steps, progress, desc, cfg.time_budget_s)
    callbacks = [cb]
    if tb_dir is not None:
        callbacks.append(tensorboard_callback(tb_dir / desc.replace(" ", "_")))
    started = time.monotonic()
    hist = net.classifier.fit(ds, epochs=epochs, shuffle=False, verbose=0, callbacks=callbacks, class_weight=class_weight)
    return {
        "epochs": cb.steps_done // per_epoch if per_epoch else 0,  # complete epochs (a cut one is not counted)
        "epochs_planned": epochs,
        "steps": cb.steps_done,
        "steps_planned": steps,
        "stopped_by_time_budget": cb.stopped_by_budget,
        "seconds": round(time.monotonic() - started, 1),
        "final_loss": round(float(hist.history["loss"][-1]), 4) if hist.history.get("loss") else None,
    }


def predict_pixels(net: Any, pixels: np.ndarray, batch_size: int = 32, progress: bool = False, desc: str = "score") -> np.ndarray:
    import tensorflow as tf

    out = []
    bar = _bar(len(pixels), progress, desc)
    for i in range(0, len(pixels), batch_size):
        part = tf.convert_to_tensor(pixels[i : i + batch_size], tf.float32)
        out.append(np.asarray(net.classifier(part, training=False), np.float32))
        bar.update(len(part))
    bar.close()
    n_classes = net.classifier.output_shape[-1]
    return np.concatenate(out) if out else np.zeros((0, n_classes), np.float32)


def base_features(net: Any, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Pooled base features computed directly (no cache), for when the cache is bypassed."""
    import tensorflow as tf

    out = [np.asarray(net.features(tf.convert_to_tensor(pixels[i : i + batch_size], tf.float32), training=False), np.float32)
           for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)


def compute_features(
    ctx: Context, net: Any, key: str, samples: list[Sample], pixels: np.ndarray, progress: bool, batch_size: int = 32
) -> tuple[np.ndarray, dict[str, int]]:
    """Pooled base features of the samples, through the feature cache."""
    import tensorflow as tf

    from pipeline.detector.features import features_for

    bar = _bar(None, progress, "base features")

    def compute(idx: list[int]) -> np.ndarray:
        return np.asarray(net.features(tf.convert_to_tensor(pixels[idx], tf.float32), training=False), np.float32)

    ids = [s.key for s in samples]
    out = features_for(ctx.engine, key, ids, compute, batch_size=batch_size, progress=bar)
    bar.close()
    return out


# --- signals on the validation/test splits ---------------------------------------------------


def signal_matrices(
    brands: list[str], cnn_probs: np.ndarray, classes: list[str], match: list[dict[str, tuple[float, Any]]] | None,
    combiner: dict[str, Any] | None,
) -> dict[str, np.ndarray]:
    """Per-signal (n, n_brands) score matrices: cnn, and matcher + fused when a matcher exists."""
    col = {c: i for i, c in enumerate(classes)}
    cnn = np.stack([cnn_probs[:, col[b]] for b in brands], axis=1) if len(cnn_probs) else np.zeros((0, len(brands)))
    out = {"cnn": cnn}
    if match is not None:
        from pipeline.detector.matching import combine

        mat = np.array([[float(m.get(b, (0.0, None))[0]) for b in brands] for m in match]).reshape(len(match), len(brands))
        out["matcher"] = mat
        fused = np.zeros_like(mat)
        for i in range(len(match)):
            cp = {c: float(cnn_probs[i, col[c]]) for c in classes}
            ms = {b: float(mat[i, j]) for j, b in enumerate(brands)}
            f = combine(cp, ms, combiner)
            fused[i] = [f.get(b, 0.0) for b in brands]
        out["fused"] = fused
    return out


def _summary(m: dict[str, Any]) -> dict[str, Any]:
    return {"logo": {k: m["logo"][k] for k in ("precision", "recall", "f1")}, "brand_accuracy": m["brand_accuracy"],
            "average_precision": m["average_precision"], "n_images": m["n_images"], "threshold": m["threshold"]}


# --- the whole run ---------------------------------------------------------------------------


def train(
    ctx: Context,
    data: str | Path,
    *,
    fmt: str = "folders",
    weights: str = "auto",
    epochs: int | None = None,
    target_precision: float = 0.9,
    profile: str = "default",
    activate: str = "if_better",
    progress: bool = True,
    **overrides: Any,
) -> dict[str, Any]:
    """Train, evaluate on held-out data, register (and maybe activate) a model version."""
    from pipeline.detector import registry
    from pipeline.detector.model import (
        ModelSpec,
        adapt_feature_norm,
        build_network,
        configure_threads,
        enable_determinism,
        recalibrate_batchnorm,
        resolve_weights,
        save_artifact,
        set_bn_momentum,
        set_trainable,
        weights_digest,
    )
    from pipeline.runlog import recorded_run

    if activate not in ("if_better", "always", "never"):
        raise DataError(f"activate must be if_better, always or never, not {activate!r}")
    if profile == "demo" and weights == "auto":
        weights = "none"
    started = time.monotonic()
    stages: dict[str, float] = {}
    last = [started]

    def lap(name: str) -> None:
        now = time.monotonic()
        stages[name] = round(stages.get(name, 0.0) + now - last[0], 1)
        last[0] = now

    threads = ctx.settings.detector.threads
    configure_threads(threads)
    tag, wpath, note = resolve_weights(weights)
    if note:
        _say(True, f"note: {note}")
    cfg = resolve_config(profile, tag != "none", epochs, overrides)
    if cfg.deterministic:
        enable_determinism(cfg.seed)
        if threads <= 0:
            log.warning("deterministic training on all cores (detector.threads=0): the model depends on this "
                        "machine's core count; set detector.threads (or BRANDMON_TF_THREADS) to pin it")
    run_stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    tb_root = Path(ctx.settings.home) / "tensorboard" / f"{run_stamp}-{uuid.uuid4().hex[:6]}"

    with recorded_run(ctx.engine, "train", source=str(data)[:128]) as counts:
        sources = load_sources(data, fmt)
        if cfg.synthetic_negatives:
            sources = sources + synthetic_negatives(cfg.synthetic_negatives, cfg.synthetic_size, cfg.seed)
        want_matcher = cfg.matcher == "on" or (cfg.matcher == "auto" and any(s.boxes for s in sources))
        if want_matcher and cfg.matcher == "on" and not any(s.boxes for s in sources):
            _say(progress, "matcher: no boxes in the data; using whole training images of each brand as references")
        prep = prepare(sources, cfg, progress, want_refs=want_matcher)
        lap("prepare")
        train_s, val_s, test_s = prep.samples["train"], prep.samples["val"], prep.samples["test"]
        brands = sorted({s.label for s in train_s if s.label != NO_LOGO})
        if not brands:
            raise DataError(f"{data}: the training split has no brand class (need at least one besides no_logo)")
        classes = [NO_LOGO, *brands]
        if not any(s.label == NO_LOGO for s in train_s):
            _say(progress, "warning: no no_logo training samples; the model cannot learn 'no logo' "
                 "(add a no_logo/ folder or use --format boxes)")
        col = {c: i for i, c in enumerate(classes)}
        y_train = np.array([col[s.label] for s in train_s], np.int64)
        rng = random.Random(cfg.seed)
        order = upsample_indices([s.label for s in train_s], cfg.upsample, rng)
        before = class_counts(train_s)
        after = dict(sorted(Counter(train_s[i].label for i in order).items()))
        _say(progress, "training samples per class (before -> after up-sampling): "
             + ", ".join(f"{c} {before[c]}->{after[c]}" for c in before))
        _say(progress, f"split: {len(train_s)} train / {len(val_s)} val / {len(test_s)} test samples; "
             f"mode {cfg.mode}, input {cfg.input_size}px, weights {tag}")
        cw = class_weight_map([s.label for s in train_s], classes) if cfg.class_weights else None

        lap("plan")
        net = build_network(len(classes), cfg.input_size, wpath, cfg.dropout, base_training=cfg.mode == "full", seed=cfg.seed)
        history: dict[str, Any] = {}
        cache_counts: dict[str, int] | None = None
        use_cache = cfg.mode.startswith("finetune:") or (cfg.mode == "head" and not cfg.augment)
        if cfg.mode == "head" and cfg.augment:
            set_trainable(net, "head")
            _say(progress, "augmentation is on: the feature cache is bypassed "
                 "(the frozen base sees new crops of every image each epoch)")
            adapt_feature_norm(net, base_features(net, prep.pixels["train"], cfg.batch_size))
            history["head"] = train_images(net, prep.pixels["train"], y_train, order, replace(cfg, epochs=cfg.head_epochs),
                                           cfg.learning_rate, tb_root, progress, cw, "train head")
        elif use_cache:
            from pipeline.detector.features import cache_key

            set_trainable(net, "head")
            key = cache_key(weights_digest(net.base), cfg.input_size)
            feats = {}
            cache_counts = {"hits": 0, "misses": 0}
            for split, ss in prep.samples.items():
                feats[split], c = compute_features(ctx, net, key, ss, prep.pixels[split], progress)
                cache_counts = {k: cache_counts[k] + c[k] for k in cache_counts}
            _say(progress, f"feature cache {key}: {cache_counts['hits']} hits, {cache_counts['misses']} computed")
            adapt_feature_norm(net, feats["train"])
            history["head"] = train_head(net, feats["train"], y_train, order, cfg, classes, tb_root, progress, cw)
            if cfg.mode.startswith("finetune:"):
                _say(progress, f"fine-tuning the top {cfg.mode.split(':')[1]} Inception blocks: "
                     "the feature cache is bypassed (the base changes)")
                set_trainable(net, cfg.mode)
                history["finetune"] = train_images(net, prep.pixels["train"], y_train, order, cfg,
                                                   cfg.finetune_learning_rate, tb_root, progress, cw, "fine-tune")
        else:
            set_trainable(net, "full")
            if cfg.bn_momentum is not None:
                set_bn_momentum(net, cfg.bn_momentum)
            why = "augmentation is on and " if cfg.augment else ""
            _say(progress, f"training the whole network: the feature cache is bypassed ({why}the base itself learns)")
            history["full"] = train_images(net, prep.pixels["train"], y_train, order, cfg, cfg.learning_rate,
                                           tb_root, progress, cw, "train")
            history["full"]["batchnorm_recalibration_batches"] = recalibrate_batchnorm(net, prep.pixels["train"], cfg.batch_size)

        lap("train")
        if cfg.mode == "head" and use_cache:
            probs = {s: np.asarray(net.head(feats[s], training=False), np.float32) for s in ("val", "test")}
        else:
            probs = {s: predict_pixels(net, prep.pixels[s], progress=progress, desc=f"score {s}") for s in ("val", "test")}

        lap("score_cnn")
        matcher = None
        match: dict[str, list[dict[str, tuple[float, Any]]] | None] = {"val": None, "test": None}
        combiner = None
        if want_matcher:
            from pipeline.detector.matching import LogoMatcher, fit_combiner

            refs = prep.refs or _whole_refs(train_s)  # folders: whole training images of each brand
            _say(progress, f"matcher: {len(refs)} reference crops from the training split")
            matcher = LogoMatcher().fit(refs)
            for split in ("val", "test"):
                match[split] = matcher.score_many(prep.native[split], workers=cfg.matcher_workers, progress=progress)
            val_cnn = [{c: float(p) for c, p in zip(classes, row, strict=True)} for row in probs["val"]]
            val_match = [{c: s for c, (s, _b) in m.items()} for m in match["val"]]
            try:
                combiner = fit_combiner(val_cnn, val_match, [s.label for s in val_s])
            except ValueError as exc:
                _say(progress, f"matcher: default fusion (cannot fit on this validation split: {exc})")
                from pipeline.detector.matching import DEFAULT_COMBINER

                combiner = dict(DEFAULT_COMBINER)

        lap("matcher")
        # Thresholds and fusion come from the validation split only; the test split is reported.
        val_sig = signal_matrices(brands, probs["val"], classes, match["val"], combiner)
        test_sig = signal_matrices(brands, probs["test"], classes, match["test"], combiner)
        y_val = [s.label for s in val_s]
        y_test = [s.label for s in test_s]
        val_logo = np.array([y != NO_LOGO for y in y_val])
        thresholds: dict[str, dict[str, Any]] = {}
        val_metrics: dict[str, Any] = {}
        test_metrics: dict[str, Any] = {}
        for name, mat in val_sig.items():
            score = mat.max(axis=1) if mat.size else np.zeros(len(y_val))
            thresholds[name] = threshold_for_precision(val_logo, score, target_precision) if len(y_val) else {
                "threshold": 0.5, "target_met": False, "target": target_precision}
            val_metrics[name] = evaluate_scores(y_val, mat, brands, thresholds[name]["threshold"])
            test_metrics[name] = evaluate_scores(y_test, test_sig[name], brands, thresholds[name]["threshold"])
        main = "fused" if "fused" in test_metrics else "cnn"
        threshold = float(thresholds[main]["threshold"])
        if not thresholds[main].get("target_met"):
            _say(progress, f"warning: no threshold reaches precision {target_precision} on the validation split; "
                 f"using the best-F1 threshold {threshold:.3f}")

        spec = ModelSpec(
            classes=classes, input_size=cfg.input_size, weights=tag, dropout=cfg.dropout, threshold=threshold,
            combiner=combiner, matcher_threshold=thresholds.get("matcher", {}).get("threshold"),
            extra={"thresholds": {k: v["threshold"] for k, v in thresholds.items()}, "signal": main},
        )
        lap("evaluate")
        training = training_summary(history, cfg)
        if training["cut_by_time_budget"]:
            warn_budget_cut(training, progress)
        artifact = save_artifact(spec, net, matcher)
        fp = fingerprint([*train_s, *val_s, *test_s])
        headline = test_metrics[main]
        metrics = {
            "signal": main,
            "precision": headline["logo"]["precision"],
            "recall": headline["logo"]["recall"],
            "f1": headline["logo"]["f1"],
            "brand_accuracy": headline["brand_accuracy"],
            "n_test": headline["n_images"],
            "target_precision": target_precision,
            "thresholds": thresholds,
            "test": test_metrics,
            "val": {k: _summary(v) for k, v in val_metrics.items()},
            "per_signal_test": {k: _summary(v) for k, v in test_metrics.items()},
            "training": training,
        }
        params = {
            "profile": profile,
            "config": _jsonable(asdict(cfg)),
            "data": str(data),
            "format": fmt,
            "class_counts": {"before": before, "after": after},
            "splits": {k: len(v) for k, v in prep.samples.items()},
            "history": history,
            "feature_cache": cache_counts,
            "tensorboard": str(tb_root),
            "weights_note": note,
            "matcher": {"references": matcher.n_references, "per_class": matcher.references_per_class()} if matcher else None,
            "seconds": round(time.monotonic() - started, 1),
            "stage_seconds": stages,
        }
        version = registry.register(ctx, spec, artifact, fp, metrics, params)
        lap("save")
        files = _write_reports(ctx, version, prep, test_sig, y_test, brands, thresholds, headline)
        lap("reports")
        baseline = _score_active_on(ctx, files["eval_dir"], activate, progress)
        if baseline is not None:
            params["baseline"] = baseline
            _say(progress, f"active model {baseline['version']} on this held-out split: logo F1 {baseline['f1']:.3f} "
                 f"(new {version}: {metrics['f1']:.3f})")
        activated = registry.maybe_activate(ctx, version, activate, baseline["f1"] if baseline else None)
        counts.update({"version": version, "activated": activated, "train_samples": len(train_s),
                       "test_samples": len(test_s), "precision": metrics["precision"], "recall": metrics["recall"]})
    _say(progress, f"model {version}: held-out test ({main}) logo precision {metrics['precision']:.3f}, "
         f"recall {metrics['recall']:.3f}, brand top-1 {metrics['brand_accuracy']:.3f}"
         + (" (activated)" if activated else ""))
    return {"version": version, "metrics": metrics, "activated": activated, "params": params, **files}


def training_summary(history: dict[str, Any], cfg: TrainConfig) -> dict[str, Any]:
    """How much training each stage got, and whether the time budget cut any stage short.

    Why: with a time budget (the default profile) the epochs a model gets depend on how busy
    the machine was, and a model cut short can look fine on paper while being much worse; the
    registry keeps this next to the precision it reports.
    """
    stages = {name: {k: h[k] for k in ("epochs", "epochs_planned", "steps", "steps_planned") if k in h}
              for name, h in history.items()}
    cut = sorted(name for name, h in history.items() if h.get("stopped_by_time_budget"))
    return {"stages": stages, "time_budget_s": cfg.time_budget_s, "cut_by_time_budget": bool(cut),
            "cut_stages": cut, "deterministic": cfg.deterministic}


def budget_cut_message(training: dict[str, Any]) -> str:
    """One line: which stage the time budget stopped, after how many of its planned steps."""
    parts = []
    for name in training.get("cut_stages", []):
        st = training["stages"][name]
        parts.append(f"{name} stopped after {st.get('steps')} of {st.get('steps_planned')} steps "
                     f"(epoch {st.get('epochs')} of {st.get('epochs_planned')})")
    budget = training.get("time_budget_s")
    return (f"the time budget of {budget:.0f} s cut training short: " + "; ".join(parts)
            + " (a busy machine trains less; raise --time-budget or retrain when it is idle)")


def warn_budget_cut(training: dict[str, Any], progress: bool) -> None:
    message = budget_cut_message(training)
    log.warning(message)
    if progress:
        print(f"warning: {message}", file=sys.stderr, flush=True)


def _score_active_on(ctx: Context, eval_dir: str, activate: str, progress: bool) -> dict[str, Any] | None:
    """The active model's figures on the new model's held-out split, for `if_better`.

    Why: each model's recorded F1 comes from its own split; comparing those would compare
    different images. Scoring the active model on the new split compares like with like. If it
    cannot be scored (its artifact is gone, say), the registry falls back to its recorded F1.
    """
    from pipeline.detector.evaluate import evaluate_folder
    from pipeline.detector.registry import active_version

    if activate != "if_better":
        return None
    current = active_version(ctx)
    if current is None:
        return None
    try:
        report = evaluate_folder(ctx, eval_dir, current["version"], progress=progress)
    except BrandmonError as exc:
        _say(progress, f"warning: cannot score the active model {current['version']} on the new split ({exc}); "
             "comparing with its recorded F1")
        return None
    return {"version": current["version"], "signal": report["signal"], "f1": float(report["logo"]["f1"]),
            "precision": float(report["logo"]["precision"]), "recall": float(report["logo"]["recall"]),
            "n_images": int(report["n_images"])}


def _whole_refs(train_s: list[Sample]) -> list[tuple[str, np.ndarray]]:
    """Matcher references when there are no boxes: every whole training image of a brand."""
    out = []
    for s in train_s:
        if s.label != NO_LOGO and s.region is None:
            out.append((s.label, decode_rgb(s.source.read())))
    return out


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _write_reports(
    ctx: Context, version: str, prep: Prepared, test_sig: dict[str, np.ndarray], y_test: list[str],
    brands: list[str], thresholds: dict[str, dict[str, Any]], headline: dict[str, Any],
) -> dict[str, str]:
    """The PR curve PNG (lake + local) and the held-out split as a folders layout."""
    y = np.array([t != NO_LOGO for t in y_test])
    curves = {}
    marks = {}
    for name, mat in test_sig.items():
        if len(y):
            p, r, _ = pr_curve(y, mat.max(axis=1))
            curves[name] = (p, r)
    local = Path(ctx.settings.home) / "models" / version
    png = plot_pr_curves(curves, local / "pr_curve.png", f"{version}: held-out test split", marks)
    ctx.store.put(f"models/{version}/pr_curve.png", png.read_bytes(), content_type="image/png")
    eval_dir = export_split(prep.samples["test"], Path(ctx.settings.home) / "eval" / version)
    return {"pr_curve": str(png), "eval_dir": str(eval_dir)}


def export_split(samples: list[Sample], out: Path) -> Path:
    """Write samples as `out/<Class>/<file>`: whole images byte for byte, regions as JPEG."""
    from PIL import Image

    from pipeline.safepath import safe_join

    out.mkdir(parents=True, exist_ok=True)
    for s in samples:
        d = safe_join(out, s.label, what="class")  # class names come from training data
        d.mkdir(exist_ok=True)
        if s.region is None:
            suffix = s.source.path.suffix.lower() if s.source.path else ".jpg"
            (d / f"{s.source.sha256[:16]}{suffix}").write_bytes(s.source.read())
        else:
            arr = crop(decode_rgb(s.source.read()), s.region)
            buf = io.BytesIO()
            Image.fromarray(np.ascontiguousarray(arr)).save(buf, format="JPEG", quality=95)
            (d / f"{s.key[:16]}.jpg").write_bytes(buf.getvalue())
    return out
