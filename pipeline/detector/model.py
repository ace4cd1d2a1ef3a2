"""The classifier network, its base weights, precision policy, and its artifact format.

Inception v3 without its top -> global average pooling (2048-d features) -> dropout -> softmax
over `no_logo` + one class per brand. The network takes float RGB in 0..255 at a square input
size and rescales inside, so a saved model needs no outside preprocessing beyond
`resize_batch` (the same function in training and inference).

The artifact is one zip in the object store: `model.json` (classes, sizes, base, weights tag,
fusion parameters), `classifier.weights.h5`, and optionally `matcher.npz` (the local-feature
matcher). TensorFlow is imported inside functions only.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import tempfile
import zipfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.detector import NO_LOGO
from pipeline.errors import BrandmonError

log = logging.getLogger(__name__)

BASE = "inception_v3"
PREPROCESS_VERSION = "pp1"  # squash-resize (bilinear, antialiased), round to uint8, 0..255
MIN_INPUT = 75  # Inception v3's smallest input side
IMAGENET_FILE = "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5"
ARTIFACT_FORMAT = 1


class ModelError(BrandmonError):
    """A model artifact or weights file cannot be used."""


@dataclass
class ModelSpec:
    """Everything needed to rebuild the network and read its outputs."""

    classes: list[str]  # index order of the softmax; classes[0] == "no_logo"
    input_size: int = 299
    base: str = BASE
    weights: str = "none"  # imagenet | none | file:<sha256>
    dropout: float = 0.3
    threshold: float = 0.5
    combiner: dict[str, Any] | None = None  # matching.combine params when a matcher is present
    matcher_threshold: float | None = None
    preprocess: str = PREPROCESS_VERSION
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def brands(self) -> list[str]:
        return [c for c in self.classes if c != NO_LOGO]


# --- base weights ----------------------------------------------------------------------------


def keras_home() -> Path:
    from pipeline.settings import keras_home as configured

    return configured()


IMAGENET_URL = "https://storage.googleapis.com/tensorflow/keras-applications/inception_v3/" + IMAGENET_FILE
IMAGENET_MD5 = "bcbd6486424b2319ff4ef7d526e38f63"  # Keras' own check of the official file
DOWNLOAD_TIMEOUT_S = 20.0


def imagenet_weights_path() -> Path | None:
    path = keras_home() / "models" / IMAGENET_FILE
    return path if path.is_file() else None


def download_imagenet() -> tuple[Path | None, str | None]:
    """Fetch the no-top ImageNet weights into Keras' cache, as Keras itself would.

    `BRANDMON_IMAGENET_URL` points at a mirror (an air-gapped site's artifact store); the
    official file's MD5 is checked unless a mirror is set (the mirror is then trusted, as Keras
    does without a hash). A socket timeout keeps a firewalled machine from hanging.
    Returns (path, None) or (None, why it failed in a few words).
    """
    import socket

    import keras

    from pipeline.settings import imagenet_mirror

    mirror = imagenet_mirror()
    url, md5 = (mirror, None) if mirror else (IMAGENET_URL, IMAGENET_MD5)
    try:  # Keras falls back to /tmp/.keras when its home does not exist yet
        (keras_home() / "models").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        return None, f"cannot create {keras_home() / 'models'}: {exc.strerror}"
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        path = keras.utils.get_file(IMAGENET_FILE, url, cache_subdir="models", file_hash=md5,
                                    cache_dir=str(keras_home()))
    except Exception as exc:  # noqa: BLE001 - offline, refused, bad hash: all mean "not available"
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        partial = keras_home() / "models" / IMAGENET_FILE
        if partial.is_file() and md5 is not None:  # a failed hash check leaves the file behind
            partial.unlink(missing_ok=True)
        return None, reason[:200]
    finally:
        socket.setdefaulttimeout(previous)
    return Path(path), None


def resolve_weights(choice: str) -> tuple[str, str | None, str | None]:
    """(tag recorded with the model, path to load, note for the user) for a weights choice.

    `auto`/`imagenet` use the Keras cache (`$KERAS_HOME/models`), downloading the file there
    first where the machine is online; where it cannot be had the note says so in one line and
    the base starts from random weights (`none`).
    """
    if choice in ("auto", "imagenet"):
        path = imagenet_weights_path()
        why = None
        if path is None:
            path, why = download_imagenet()
        if path is not None:
            return "imagenet", str(path), None
        note = (
            f"imagenet weights not available ({IMAGENET_FILE} not in {keras_home() / 'models'} and the download "
            f"failed: {why}); training the Inception v3 base from scratch (weights=none)"
        )
        return "none", None, note
    if choice == "none":
        return "none", None, None
    path = Path(choice[5:] if choice.startswith("file:") else choice).expanduser()
    if not path.is_file():
        raise ModelError(f"weights {choice!r}: use auto, imagenet, none, or an existing .h5 file path")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return f"file:{digest}", str(path), None


# --- precision policy ------------------------------------------------------------------------


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """AMX or AVX512-BF16 in /proc/cpuinfo flags: bf16 matmuls are then native and fast."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def choose_precision(setting: str, cpuinfo: str | None = None) -> str:
    """`auto` -> bf16 where the CPU supports it, else fp32; `bf16`/`fp32` as given."""
    setting = (setting or "auto").lower()
    if setting in ("bf16", "mixed_bfloat16"):
        return "bf16"
    if setting in ("fp32", "float32"):
        return "fp32"
    if setting != "auto":
        raise ModelError(f"detector.mixed_precision must be auto, bf16 or fp32, not {setting!r}")
    return "bf16" if cpu_supports_bf16(cpuinfo) else "fp32"


@contextmanager
def precision_policy(precision: str):
    """Build models under the mixed_bfloat16 policy, then restore the previous global policy."""
    import keras

    previous = keras.mixed_precision.global_policy().name
    keras.mixed_precision.set_global_policy("mixed_bfloat16" if precision == "bf16" else "float32")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def configure_threads(threads: int) -> bool:
    """Cap TensorFlow's intra-op threads (inter-op at 2) before its runtime starts.

    Why: an Airflow worker runs several tasks at once, and each TensorFlow task would otherwise
    start one thread per core and oversubscribe them. 0 leaves TensorFlow's default (all
    cores). Returns False when the runtime had already started (the cap cannot change then).
    """
    if threads <= 0:
        return True
    import tensorflow as tf

    threading = tf.config.threading
    if threading.get_intra_op_parallelism_threads() == threads:
        return True
    try:
        threading.set_intra_op_parallelism_threads(threads)
        threading.set_inter_op_parallelism_threads(min(2, threads))
    except RuntimeError:
        log.warning("TensorFlow is already running: detector.threads=%d applies from the next process", threads)
        return False
    return True


def enable_determinism(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and make TensorFlow's ops deterministic.

    Why: the demo must give the same model (and so the same figures) on every run of a commit,
    on an idle or a busy machine. Op determinism fixes the order of floating-point sums within
    an op for a given thread count, so callers also pin the thread count (`configure_threads`).
    It is process-wide and cannot be switched off again, so only the demo and explicitly
    deterministic training runs call it.
    """
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    tf.config.experimental.enable_op_determinism()


# --- network ---------------------------------------------------------------------------------


@dataclass
class Network:
    """The classifier and its two halves, sharing layers (so weights are shared too)."""

    classifier: Any  # image (s, s, 3) 0..255 -> class probabilities
    features: Any  # image -> 2048-d pooled features (the cache stores these)
    head: Any  # 2048-d features -> class probabilities
    base: Any  # the Inception v3 model inside `features`


def build_network(
    n_classes: int,
    input_size: int,
    weights_path: str | None = None,
    dropout: float = 0.3,
    base_training: bool = False,
    seed: int = 1234,
) -> Network:
    """Inception v3 base (optionally loaded from `weights_path`) + GAP + dropout + softmax.

    `base_training=False` calls the base with `training=False` (keras-io transfer-learning
    recipe). In Keras 3 that alone does not hold BatchNorm in inference mode once `fit` runs
    the whole model with training=True, so `set_trainable` also freezes the BatchNorm layers
    for fine-tuning. A base trained from scratch needs `True` so BatchNorm learns its statistics.
    """
    import keras

    if input_size < MIN_INPUT:
        raise ModelError(f"input size {input_size} is below Inception v3's minimum of {MIN_INPUT}")
    keras.utils.set_random_seed(seed)
    base = keras.applications.InceptionV3(
        include_top=False, weights=None, input_shape=(input_size, input_size, 3)
    )
    if weights_path:
        try:
            base.load_weights(weights_path)
        except Exception as exc:  # noqa: BLE001 - any h5/shape problem is the user's file
            raise ModelError(f"cannot load base weights from {weights_path}: {str(exc).splitlines()[0]}") from None
    inputs = keras.Input((input_size, input_size, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="inception_scale")(inputs)
    x = base(x, training=None if base_training else False)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    features = keras.Model(inputs, x, name="features")

    feat_in = keras.Input((x.shape[-1],), name="feature")
    # Standardises the features (identity until `adapt_feature_norm`); float32 so bf16 inference
    # keeps the small spreads a frozen base can produce.
    y = keras.layers.Normalization(axis=-1, dtype="float32", name="feature_norm")(feat_in)
    y = keras.layers.Dropout(dropout, name="dropout")(y)
    out = keras.layers.Dense(n_classes, activation="softmax", dtype="float32", name="classes")(y)
    head = keras.Model(feat_in, out, name="head")

    img = keras.Input((input_size, input_size, 3), name="image")
    classifier = keras.Model(img, head(features(img)), name="logo_classifier")
    return Network(classifier=classifier, features=features, head=head, base=base)


def adapt_feature_norm(net: Network, features: np.ndarray) -> None:
    """Standardise the head's input with the training features' mean and variance.

    Why: a frozen base's pooled features can vary across images by 1e-5 around a large mean
    (a randomly initialised base with inference-mode BatchNorm, measured on the test marks),
    far below what a softmax head at a normal learning rate can use; standardised, the same
    features are linearly separable. Only for a frozen base: cached features stay valid.
    """
    if len(features):
        net.head.get_layer("feature_norm").adapt(np.asarray(features, np.float32))


def set_trainable(net: Network, mode: str) -> None:
    """`head`: base frozen; `full`: everything trains; `finetune:N`: the top N mixed blocks too
    (their BatchNorm layers frozen, keras-io's fine-tuning recipe)."""
    if mode == "head":
        net.base.trainable = False
        return
    net.base.trainable = True
    if mode == "full":
        return
    if not mode.startswith("finetune:"):
        raise ModelError(f"unknown training mode {mode!r} (head, full, finetune:N)")
    n_blocks = int(mode.split(":", 1)[1])
    names = [layer.name for layer in net.base.layers]
    mixed = [i for i, name in enumerate(names) if name.startswith("mixed") and "_" not in name]
    # Inception v3 has mixed0..mixed10; unfreeze the layers after the (N+1)-th last block end.
    cut = mixed[-(n_blocks + 1)] if n_blocks < len(mixed) else -1
    import keras

    for i, layer in enumerate(net.base.layers):
        # BatchNorm stays frozen, which in Keras 3 also means inference mode: the recorded
        # `base(x, training=False)` does not survive, since fit's training=True is propagated
        # into nested models and overrides it (caught by a test: moving means drifted).
        layer.trainable = i > cut and not isinstance(layer, keras.layers.BatchNormalization)


def batchnorm_layers(net: Network) -> list[Any]:
    import keras

    return [layer for layer in net.base.layers if isinstance(layer, keras.layers.BatchNormalization)]


def set_bn_momentum(net: Network, momentum: float) -> None:
    """A base trained from scratch for a few hundred steps needs faster-moving BN statistics."""
    for layer in batchnorm_layers(net):
        layer.momentum = momentum


def recalibrate_batchnorm(net: Network, pixels: np.ndarray, batch_size: int = 32, max_batches: int = 24) -> int:
    """Set every BatchNorm's moving statistics to the average over clean training batches.

    Why: after a short from-scratch run the moving averages lag far behind the weights (and
    were taken on augmented images), so inference-mode outputs would not match what the
    network learned. A forward pass in training mode with momentum k/(k+1) for batch k makes
    the moving statistics the exact mean over these batches. Gradients are not involved.
    """
    import tensorflow as tf

    layers = batchnorm_layers(net)
    saved = [layer.momentum for layer in layers]
    order = np.random.default_rng(0).permutation(len(pixels))
    n = 0
    try:
        for k, start in enumerate(range(0, len(order), batch_size)):
            if k >= max_batches:
                break
            idx = np.sort(order[start : start + batch_size])
            if len(idx) < 2:
                break
            for layer in layers:
                layer.momentum = k / (k + 1)
            net.features(tf.convert_to_tensor(pixels[idx], tf.float32), training=True)
            n += 1
    finally:
        for layer, m in zip(layers, saved, strict=True):
            layer.momentum = m
    return n


def weights_digest(model: Any) -> str:
    """sha256 of a model's weights: the feature cache's notion of "the same base"."""
    h = hashlib.sha256()
    for w in model.get_weights():
        h.update(np.ascontiguousarray(w).tobytes())
    return h.hexdigest()


# --- preprocessing ---------------------------------------------------------------------------


def resize_batch(images: list[np.ndarray], size: int) -> np.ndarray:
    """Squash-resize uint8 HxWx3 arrays to (n, size, size, 3) uint8, the way inference does."""
    import tensorflow as tf

    out = np.empty((len(images), size, size, 3), np.uint8)
    for i, img in enumerate(images):
        out[i] = resize_tensor(tf.convert_to_tensor(img), size).numpy()
    return out


def resize_tensor(img: Any, size: int) -> Any:
    """The one resize used everywhere (tf.data inference and training): PREPROCESS_VERSION."""
    import tensorflow as tf

    resized = tf.image.resize(img, (size, size), method="bilinear", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


MATCH_MAX_SIDE = 960  # images handed to the matcher are shrunk to at most this long side
# (the matcher's query_long_side: larger would be shrunk again, smaller upscaled)


def shrink_tensor(img: Any, max_side: int = MATCH_MAX_SIDE) -> Any:
    """Shrink (never enlarge) to a long side of at most `max_side`, keeping the aspect ratio."""
    import tensorflow as tf

    shape = tf.shape(img)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = tf.minimum(1.0, max_side / tf.maximum(h, w))
    new = tf.cast(tf.maximum(1.0, tf.round(tf.stack([h, w]) * scale)), tf.int32)
    resized = tf.image.resize(img, new, method="bilinear", antialias=True)
    return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)


def matcher_view(arr: np.ndarray, max_side: int = MATCH_MAX_SIDE) -> np.ndarray:
    """The image as the matcher sees it, the same way in training, evaluation and detection."""
    import tensorflow as tf

    h, w = arr.shape[:2]
    if max(h, w) <= max_side:
        return np.ascontiguousarray(arr)
    return shrink_tensor(tf.convert_to_tensor(np.ascontiguousarray(arr)), max_side).numpy()


# --- artifact --------------------------------------------------------------------------------


@dataclass
class LoadedModel:
    spec: ModelSpec
    net: Network | None  # None when an exported runtime scores instead of Keras
    matcher: Any | None  # pipeline.detector.matching.LogoMatcher
    precision: str
    version: str = ""
    runtime: str = "keras"  # keras | an export format (pipeline.detector.runtimes)
    exported: Any | None = None  # runtimes.ExportedClassifier when runtime != keras
    cropnet: Any | None = None  # pipeline.detector.cropnet.CropNet, folded into the matcher's scores
    _traced: Any = field(default=None, repr=False, compare=False)

    def local_scores(self, views: list[np.ndarray], workers: int = 2, progress: Any = None) -> tuple[list[Any], list[Any] | None]:
        """(per image {brand: (score, box)}: the matcher's, with the crop net folded in when the
        model has one; the crop net's own scores, or None)."""
        match = self.matcher.score_many(views, workers=workers, progress=progress)
        if self.cropnet is None or "crop" not in (self.spec.extra or {}):
            return match, None
        from pipeline.detector.cropnet import merge_local

        crop = self.cropnet.score_many(views)
        return [merge_local(m, c, self.spec.extra["crop"]) for m, c in zip(match, crop, strict=True)], crop

    def scorer(self, pad_to: int | None = None) -> Any:
        """A callable: uint8 (n, s, s, 3) batch (array or tensor) -> float32 probabilities, n rows.

        `pad_to`: the traced Keras graph is specialised to its batch shape, so a short batch
        (a run's last) is padded with zeros to `pad_to` rows and the padding's rows dropped:
        one graph per run. Exported runtimes take any batch size and score the real rows only
        (the precision cascade would count padding as re-scored)."""
        if self.exported is not None:
            exported = self.exported
            return lambda x: exported.predict(np.asarray(x))
        traced = self.traced_classifier()

        def score(x: Any) -> np.ndarray:
            n = int(x.shape[0])
            if pad_to and n < pad_to:
                import tensorflow as tf

                x = tf.concat([x, tf.zeros((pad_to - n, *x.shape[1:]), x.dtype)], 0)
            return np.asarray(traced(x), np.float32)[:n]

        return score

    def traced_classifier(self) -> Any:
        """The classifier as a tf.function over uint8 batches, traced once per loaded model.

        Tracing Inception v3 costs ~2 s (profiled: 2.2 s of a 9.8 s run of 160 images); kept
        here, the registry's cached model pays it once per process, not once per `detect`. The
        uint8 -> float cast happens inside the graph (no float32 copy of the batch on the host).
        """
        if self._traced is None:
            import tensorflow as tf

            classifier = self.net.classifier
            self._traced = tf.function(lambda x: classifier(tf.cast(x, tf.float32), training=False),
                                       reduce_retracing=True)
        return self._traced

    def predict_arrays(self, batch: np.ndarray) -> np.ndarray:
        """Class probabilities for a uint8 (n, s, s, 3) batch."""
        import tensorflow as tf

        if self.exported is not None:
            return self.exported.predict(batch)

        out = self.net.classifier(tf.convert_to_tensor(batch, tf.float32), training=False)
        return np.asarray(out, np.float32)


def save_artifact(spec: ModelSpec, net: Network, matcher: Any | None = None, cropnet: Any | None = None) -> bytes:
    """One zip with the spec JSON, the classifier weights, the matcher and the crop net (if any)."""
    with tempfile.TemporaryDirectory() as tmp:
        wpath = Path(tmp) / "classifier.weights.h5"
        net.classifier.save_weights(str(wpath))
        buf = io.BytesIO()
        with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            meta = {"format": ARTIFACT_FORMAT, **asdict(spec)}
            zf.writestr("model.json", json.dumps(meta, indent=2, sort_keys=True))
            zf.write(wpath, "classifier.weights.h5", compress_type=zipfile.ZIP_STORED)  # floats barely compress
            if matcher is not None:
                zf.writestr("matcher.npz", matcher.to_bytes())
            if cropnet is not None:
                zf.writestr("cropnet.zip", cropnet.to_bytes(), compress_type=zipfile.ZIP_STORED)
        return buf.getvalue()


def read_spec(data: bytes) -> ModelSpec:
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            meta = json.loads(zf.read("model.json"))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as exc:
        raise ModelError(f"not a brandmon model artifact: {exc}") from None
    if meta.pop("format", None) != ARTIFACT_FORMAT:
        raise ModelError("model artifact has an unknown format version; retrain with this brandmon")
    known = set(ModelSpec.__dataclass_fields__)
    return ModelSpec(**{k: v for k, v in meta.items() if k in known})


def load_artifact(data: bytes, precision: str = "fp32", with_matcher: bool = True, with_network: bool = True) -> LoadedModel:
    """Rebuild the network (under the chosen precision policy) and load its weights.

    `with_network=False` reads only the spec and the matcher (an exported runtime scores).
    """
    spec = read_spec(data)
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(io.BytesIO(data)) as zf:
        net = None
        if with_network:
            wpath = Path(tmp) / "classifier.weights.h5"
            wpath.write_bytes(zf.read("classifier.weights.h5"))
            with precision_policy(precision):
                net = build_network(len(spec.classes), spec.input_size, None, spec.dropout)
                net.classifier.load_weights(str(wpath))
        matcher = None
        if with_matcher and "matcher.npz" in zf.namelist():
            from pipeline.detector.matching import LogoMatcher

            matcher = LogoMatcher.from_bytes(zf.read("matcher.npz"))
        cropnet = None
        if matcher is not None and "cropnet.zip" in zf.namelist():  # models before the crop net have none
            from pipeline.detector.cropnet import CropNet

            cropnet = CropNet.from_bytes(zf.read("cropnet.zip"))
    return LoadedModel(spec=spec, net=net, matcher=matcher, precision=precision, cropnet=cropnet)


def fused_scores(spec: ModelSpec, probs: np.ndarray, match: dict[str, tuple[float, Any]] | None) -> dict[str, float]:
    """Per-brand scores of one image: the CNN's probabilities, fused with the matcher's if any."""
    cnn = {c: float(p) for c, p in zip(spec.classes, probs, strict=True)}
    if match is None or spec.combiner is None:
        return {c: cnn[c] for c in spec.brands}
    from pipeline.detector.matching import combine

    fused = combine(cnn, {c: s for c, (s, _box) in match.items()}, spec.combiner)
    return {c: float(fused.get(c, 0.0)) for c in spec.brands}
