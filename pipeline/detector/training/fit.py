"""Stage 2, fit: train the classifier one of three ways, then score the validation and test splits.

- `head`: the base is frozen; its pooled features come from the feature cache (computed once
  per image, base weights and input size) and only the softmax head trains. With augmentation
  on, the cache is bypassed (the frozen base sees new crops of every image each epoch).
- `full`: the whole network trains, with BatchNorm recalibrated afterwards.
- `finetune:N`: the head on cached features, then also the top N Inception blocks at a low
  learning rate, BatchNorm in inference mode.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.context import Context
from pipeline.detector.data import Sample
from pipeline.detector.training.config import TrainConfig
from pipeline.detector.training.narrate import say
from pipeline.detector.training.prepare import TrainingData
from pipeline.progress import Progress, of


@dataclass
class Fitted:
    """The trained network, how each of its stages went, and its scores on val and test."""

    net: Any
    history: dict[str, Any]
    cache_counts: dict[str, int] | None  # feature cache hits/misses (None: bypassed)
    probs: dict[str, np.ndarray]  # val/test -> (n, n_classes) softmax


def keras_progress(total_steps: int, progress: Progress | None, desc: str, budget_s: float | None) -> Any:
    """A Keras callback reporting every training step to a tracker, and stopping at a time budget."""
    import keras

    class Callback(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.tracker = of(progress)(total_steps, desc, "step")
            self.started = time.monotonic()
            self.stopped_by_budget = False
            self.epochs_done = 0
            self.steps_done = 0

        def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
            self.tracker.update(1)
            self.steps_done += 1
            if budget_s is not None and time.monotonic() - self.started > budget_s:
                self.stopped_by_budget = True
                self.model.stop_training = True
            if logs:
                self.tracker.note(**{k: f"{float(v):.3f}" for k, v in logs.items() if k in ("loss", "accuracy")})

        def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
            self.epochs_done = epoch + 1

        def on_train_end(self, logs: dict | None = None) -> None:
            self.tracker.close()

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
    net: Any, x: np.ndarray, y: np.ndarray, order: list[int], cfg: TrainConfig,
    tb_dir: Path | None, progress: Progress | None, class_weight: dict[int, float] | None,
) -> dict[str, Any]:
    """Train the softmax head on feature vectors (cached base outputs)."""
    fit = cfg.fit
    _compile(net.head, fit.learning_rate)
    xs, ys = x[order], y[order]
    steps = math.ceil(len(order) / fit.batch_size) * fit.head_epochs
    callbacks = [keras_progress(steps, progress, "train head", None)]
    if tb_dir is not None:
        callbacks.append(tensorboard_callback(tb_dir / "head"))
    hist = net.head.fit(
        xs, ys, batch_size=fit.batch_size, epochs=fit.head_epochs, shuffle=True, verbose=0,
        callbacks=callbacks, class_weight=class_weight,
    )
    return {"epochs": fit.head_epochs, "final_loss": round(float(hist.history["loss"][-1]), 4)}


def _image_dataset(pixels: np.ndarray, y: np.ndarray, order: list[int], cfg: TrainConfig, seed: int) -> Any:
    """A tf.data stream over the (up-sampled) training order: shuffle, batch, augment, prefetch.

    The shuffle is seeded (a new seeded order each epoch). With `deterministic` the
    augmentation runs sequentially, so its random draws meet the batches in one fixed order
    (a parallel map would hand the layers' shared seed state to whichever batch runs first).
    """
    import keras
    import tensorflow as tf

    images = tf.constant(pixels)
    labels = tf.constant(y.astype(np.int32))
    ds = tf.data.Dataset.from_tensor_slices(np.asarray(order, np.int32))
    ds = ds.shuffle(len(order), seed=seed, reshuffle_each_iteration=True).batch(cfg.fit.batch_size)
    ds = ds.map(lambda idx: (tf.cast(tf.gather(images, idx), tf.float32), tf.gather(labels, idx)))
    if cfg.fit.augment:
        layers = [
            keras.layers.RandomZoom((-0.25, 0.15), fill_mode="reflect", seed=seed),
            keras.layers.RandomTranslation(0.1, 0.1, fill_mode="reflect", seed=seed + 1),
            keras.layers.RandomRotation(0.04, fill_mode="reflect", seed=seed + 2),
            keras.layers.RandomBrightness(0.2, value_range=(0, 255), seed=seed + 3),
            keras.layers.RandomContrast(0.2, seed=seed + 4),
        ]
        if cfg.fit.augment_flip:
            layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 5))
        aug = keras.Sequential(layers, name="augment")
        ds = ds.map(lambda a, b: (tf.clip_by_value(aug(a, training=True), 0.0, 255.0), b),
                    num_parallel_calls=None if cfg.runtime.deterministic else tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def train_images(
    net: Any, pixels: np.ndarray, y: np.ndarray, order: list[int], cfg: TrainConfig, lr: float,
    tb_dir: Path | None, progress: Progress | None, class_weight: dict[int, float] | None, desc: str,
) -> dict[str, Any]:
    """Train the classifier on pixels (full or fine-tuning); bypasses the feature cache."""
    _compile(net.classifier, lr)
    ds = _image_dataset(pixels, y, order, cfg, cfg.runtime.seed)
    epochs = int(cfg.fit.epochs or 0)
    per_epoch = math.ceil(len(order) / cfg.fit.batch_size)
    steps = per_epoch * epochs
    cb = keras_progress(steps, progress, desc, cfg.fit.time_budget_s)
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


def predict_pixels(net: Any, pixels: np.ndarray, batch_size: int = 32, progress: Progress | None = None,
                   desc: str = "score") -> np.ndarray:
    import tensorflow as tf

    out = []
    tracker = of(progress)(len(pixels), desc, "img")
    for i in range(0, len(pixels), batch_size):
        part = tf.convert_to_tensor(pixels[i : i + batch_size], tf.float32)
        out.append(np.asarray(net.classifier(part, training=False), np.float32))
        tracker.update(len(part))
    tracker.close()
    n_classes = net.classifier.output_shape[-1]
    return np.concatenate(out) if out else np.zeros((0, n_classes), np.float32)


def base_features(net: Any, pixels: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """Pooled base features computed directly (no cache), for when the cache is bypassed."""
    import tensorflow as tf

    out = [np.asarray(net.features(tf.convert_to_tensor(pixels[i : i + batch_size], tf.float32), training=False), np.float32)
           for i in range(0, len(pixels), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 2048), np.float32)


def compute_features(
    ctx: Context, net: Any, key: str, samples: list[Sample], pixels: np.ndarray, progress: Progress | None,
    batch_size: int = 32,
) -> tuple[np.ndarray, dict[str, int]]:
    """Pooled base features of the samples, through the feature cache."""
    import tensorflow as tf

    from pipeline.detector.features import features_for

    tracker = of(progress)(None, "base features", "img")

    def compute(idx: list[int]) -> np.ndarray:
        return np.asarray(net.features(tf.convert_to_tensor(pixels[idx], tf.float32), training=False), np.float32)

    out = features_for(ctx.engine, key, [s.key for s in samples], compute, batch_size=batch_size, progress=tracker)
    tracker.close()
    return out


# --- the three ways ---------------------------------------------------------------------------


def _fit_head_augmented(net: Any, data: TrainingData, cfg: TrainConfig, tb: Path, progress: Progress | None) -> dict:
    from pipeline.detector.model import adapt_feature_norm, set_trainable

    set_trainable(net, "head")
    say(progress, "augmentation is on: the feature cache is bypassed "
        "(the frozen base sees new crops of every image each epoch)")
    pixels = data.prep.pixels["train"]
    adapt_feature_norm(net, base_features(net, pixels, cfg.fit.batch_size))
    head = train_images(net, pixels, data.y_train, data.order, cfg.with_options(epochs=cfg.fit.head_epochs),
                        cfg.fit.learning_rate, tb, progress, data.class_weight, "train head")
    return {"head": head}


def _fit_cached(ctx: Context, net: Any, data: TrainingData, cfg: TrainConfig, tb: Path,
                progress: Progress | None) -> tuple[dict, dict[str, int], dict[str, np.ndarray]]:
    """The head on cached features; then, for `finetune:N`, the top blocks on pixels."""
    from pipeline.detector.features import cache_key
    from pipeline.detector.model import adapt_feature_norm, set_trainable, weights_digest

    set_trainable(net, "head")
    key = cache_key(weights_digest(net.base), cfg.model.input_size)
    feats: dict[str, np.ndarray] = {}
    counts = {"hits": 0, "misses": 0}
    for split, ss in data.prep.samples.items():
        feats[split], c = compute_features(ctx, net, key, ss, data.prep.pixels[split], progress)
        counts = {k: counts[k] + c[k] for k in counts}
    say(progress, f"feature cache {key}: {counts['hits']} hits, {counts['misses']} computed")
    adapt_feature_norm(net, feats["train"])
    history = {"head": train_head(net, feats["train"], data.y_train, data.order, cfg, tb, progress, data.class_weight)}
    if cfg.fit.mode.startswith("finetune:"):
        say(progress, f"fine-tuning the top {cfg.fit.mode.split(':')[1]} Inception blocks: "
            "the feature cache is bypassed (the base changes)")
        set_trainable(net, cfg.fit.mode)
        history["finetune"] = train_images(net, data.prep.pixels["train"], data.y_train, data.order, cfg,
                                           cfg.fit.finetune_learning_rate, tb, progress, data.class_weight, "fine-tune")
    return history, counts, feats


def _fit_full(net: Any, data: TrainingData, cfg: TrainConfig, tb: Path, progress: Progress | None) -> dict:
    from pipeline.detector.model import recalibrate_batchnorm, set_bn_momentum, set_trainable

    set_trainable(net, "full")
    if cfg.fit.bn_momentum is not None:
        set_bn_momentum(net, cfg.fit.bn_momentum)
    why = "augmentation is on and " if cfg.fit.augment else ""
    say(progress, f"training the whole network: the feature cache is bypassed ({why}the base itself learns)")
    pixels = data.prep.pixels["train"]
    full = train_images(net, pixels, data.y_train, data.order, cfg, cfg.fit.learning_rate, tb, progress,
                        data.class_weight, "train")
    full["batchnorm_recalibration_batches"] = recalibrate_batchnorm(net, pixels, cfg.fit.batch_size)
    return {"full": full}


def fit_classifier(ctx: Context, data: TrainingData, cfg: TrainConfig, weights_path: Any, tb_root: Path,
                   progress: Progress | None = None) -> Fitted:
    """Stage 2: build the network, train it the configured way, score val and test with it."""
    from pipeline.detector.model import build_network

    mode = cfg.fit.mode
    net = build_network(len(data.classes), cfg.model.input_size, weights_path, cfg.model.dropout,
                        base_training=mode == "full", seed=cfg.runtime.seed)
    cache_counts = None
    feats: dict[str, np.ndarray] | None = None
    if mode == "head" and cfg.fit.augment:
        history = _fit_head_augmented(net, data, cfg, tb_root, progress)
    elif mode == "head" or mode.startswith("finetune:"):
        history, cache_counts, feats = _fit_cached(ctx, net, data, cfg, tb_root, progress)
    else:
        history = _fit_full(net, data, cfg, tb_root, progress)
    if mode == "head" and feats is not None:
        probs = {s: np.asarray(net.head(feats[s], training=False), np.float32) for s in ("val", "test")}
    else:
        probs = {s: predict_pixels(net, data.prep.pixels[s], progress=progress, desc=f"score {s}") for s in ("val", "test")}
    return Fitted(net=net, history=history, cache_counts=cache_counts, probs=probs)
