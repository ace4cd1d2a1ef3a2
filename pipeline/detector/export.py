"""`brandmon model export V --format openvino|onnx|tflite|savedmodel`: a deployable classifier.

The exported network is the Keras classifier in fp32 with its head folded into constants
(feature standardisation, dense layer, softmax; dropout is the identity at inference), taking
a uint8 (n, s, s, 3) batch. int8 post-training quantisation (the default where the format has
it: OpenVINO through NNCF on the fp32 IR in a child process, `quantize.py`; ONNX, and OpenVINO
without nncf, through ONNX Runtime's static QDQ quantisation; TFLite through its converter) is
calibrated on the model's own training images: the training split of the data recorded with
the version (`--calibration DIR` for another folder of images). The OpenVINO int8 export also
holds the fp32 network and the margin below which `detect` re-scores a photo with it (the
precision cascade, `rescore.py`; `--rescore off` for int8 alone).

The zip (see `runtimes.py`) is stored at `models/exports/<artifact sha>/<format>.zip`, so a
re-export replaces it and a retrained model never picks up another model's export.
"""

from __future__ import annotations

import datetime as dt
import io
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.context import Context
from pipeline.detector.quantize import QuantizeError, peak_rss_bytes, quantize_ir
from pipeline.detector.runtimes import (
    EXPORT_FORMAT,
    FORMATS,
    export_key,
    runtime_importable,
    write_export,
)
from pipeline.errors import BrandmonError

log = logging.getLogger(__name__)

INT8_FORMATS = ("openvino", "onnx", "tflite")
ONNX_OPSET = 17
CALIBRATION_IMAGES = 64
CHECK_IMAGES = 256  # further training images the precision cascade's margin is chosen on
MIN_CHECK_IMAGES = 32
MIN_CALIBRATION_IMAGES = 8  # int8: fewer images than this calibrate nothing worth shipping
# The calibration images are held in memory, resized: N x size^2 x 3 bytes (4096 at 299 px: 1.1 GB)
MAX_CALIBRATION_IMAGES = 4096
MAX_CALIBRATION_FILE_BYTES = 64 * 1024**2  # a --calibration photo larger than this is skipped


class ExportError(BrandmonError):
    """A model cannot be exported as asked."""


# --- the network to export -------------------------------------------------------------------


def folded_head(net: Any) -> tuple[np.ndarray, np.ndarray]:
    """(kernel, bias) of the head with the feature standardisation folded in: probabilities =
    softmax(features @ kernel + bias), as the Keras head computes at inference."""
    norm = net.head.get_layer("feature_norm")
    dense = net.head.get_layer("classes")
    mean = np.asarray(norm.mean, np.float32).reshape(1, -1)
    std = np.maximum(np.sqrt(np.asarray(norm.variance, np.float32)), 1e-7).reshape(1, -1)  # keras.backend.epsilon()
    kernel = (np.asarray(dense.kernel, np.float32) / std.reshape(-1, 1)).astype(np.float32)
    bias = (np.asarray(dense.bias, np.float32) - (mean / std) @ np.asarray(dense.kernel, np.float32)).reshape(-1)
    return kernel, bias.astype(np.float32)


def inference_function(net: Any, spec: Any, head: bool = True) -> Any:
    """A tf.function: uint8 images -> class probabilities, equal to `net.classifier` at inference.

    Why fold the head: converters (tf2onnx) turn tensors captured from Python into graph
    inputs; constants built inside the function become weights instead. `head=False`: the
    pooled features only (the TFLite int8 export, whose converter would quantise the head too).
    """
    import tensorflow as tf

    kernel, bias = folded_head(net)
    features = net.features

    @tf.function(input_signature=[tf.TensorSpec([None, spec.input_size, spec.input_size, 3], tf.uint8, name="image")])
    def classify(image: Any) -> Any:
        h = features(tf.cast(image, tf.float32), training=False)
        if not head:
            return h
        return tf.nn.softmax(tf.matmul(h, tf.constant(kernel)) + tf.constant(bias))

    return classify


# --- calibration images ----------------------------------------------------------------------


def calibration_batch(ctx: Context, row: dict[str, Any], size: int, limit: int = CALIBRATION_IMAGES,
                      folder: str | Path | None = None) -> np.ndarray:
    """Up to `limit` whole images of the model's training split (or of `folder`), resized as
    detection resizes them. Deterministic: the training split sorted by content hash, a folder
    walked in name order (read only until `limit` images are in, each file bounded in size)."""
    from pipeline.detector.data import IMAGE_EXTS, decode_rgb, load_boxes, load_folders
    from pipeline.detector.model import resize_batch
    from pipeline.detector.split import DEFAULT_FRACTIONS, split_of

    params = row.get("params") or {}
    chosen: Any
    if folder is not None:
        chosen = _any_images(Path(folder))
    else:
        data = params.get("data")
        if not data or not Path(data).exists():
            raise ExportError(f"model {row['version']}: its training data ({data or 'not recorded'}) is not on this machine "
                              "for int8 calibration; pass --calibration DIR (images like the ones to score) or "
                              "--precision fp32")
        loader = load_boxes if params.get("format") == "boxes" else load_folders
        sources = loader(data)
        fractions = tuple((params.get("config") or {}).get("fractions") or DEFAULT_FRACTIONS)
        chosen = sorted((s for s in sources if split_of(s.sha256, fractions) == "train"), key=lambda s: s.sha256)
    arrays = []  # each resized as soon as it is decoded: memory is limit x size^2, not limit photos
    for src in chosen:
        if len(arrays) >= limit:
            break
        try:
            arrays.append(resize_batch([decode_rgb(src.read())], size)[0])
        except Exception as exc:  # noqa: BLE001 - an unreadable photo is skipped, not fatal
            log.warning("calibration: skipping %s: %s", src.name, exc)
    if not arrays:
        where = f"in {folder}" if folder is not None else "in its training split"
        raise ExportError(f"model {row['version']}: no readable calibration images {where} "
                          f"({', '.join(sorted(IMAGE_EXTS))}); pass --calibration DIR with images like the ones "
                          "to score, or --precision fp32")
    return np.stack(arrays)


def _any_images(root: Path) -> Iterator[Any]:
    """The image files under `root` in name order, lazily (a huge folder is read only as far as
    needed); a file above MAX_CALIBRATION_FILE_BYTES is skipped with a warning."""
    import os

    from pipeline.detector.data import IMAGE_EXTS, SourceImage

    if not root.is_dir():
        raise ExportError(f"--calibration {root}: not a folder")
    for top, dirs, names in os.walk(root):
        dirs.sort()
        for name in sorted(names):
            path = Path(top, name)
            if path.suffix.lower() not in IMAGE_EXTS or not path.is_file():
                continue
            size = path.stat().st_size
            if size > MAX_CALIBRATION_FILE_BYTES:
                log.warning("calibration: skipping %s: %d bytes (more than %d)", name[:80], size, MAX_CALIBRATION_FILE_BYTES)
                continue
            yield SourceImage(sha256="", path=path)


def rescore_figures(files: dict[str, bytes], check: np.ndarray, threads: int = 0) -> dict[str, Any]:
    """The precision cascade of an OpenVINO int8 export (rescore.py): its margin, chosen on the
    `check` images from the int8 error against the fp32 IR run in fp32 (which re-scores), and
    what that margin does there (share re-scored, top-class agreement of int8 alone and of the
    cascade)."""
    import os

    import openvino as ov

    from pipeline.detector.rescore import check_figures, choose_margin
    from pipeline.detector.runtimes import openvino_runner, read_ir

    threads = threads or (os.cpu_count() or 1)
    core = ov.Core()

    def probs(xml: str, weights: str, hint: str) -> tuple[np.ndarray, float]:
        """(probabilities, seconds of the scoring after a warm-up batch)."""
        run = openvino_runner(core, read_ir(core, files[xml], files[weights]), hint, threads)
        run(check[:32])
        started = time.perf_counter()
        out = np.concatenate([run(check[i : i + 32]) for i in range(0, len(check), 32)]).astype(np.float64)
        return out, time.perf_counter() - started

    low, low_s = probs("model.xml", "model.bin", "f32")
    ref, ref_s = probs("rescore.xml", "rescore.bin", "f32")  # what detect re-scores with
    margin = choose_margin(low, ref)
    figures = check_figures(low, ref, margin)
    # what the cascade's network costs against int8 alone on these images (the pipeline around
    # it adds the same to both): the share re-scored decides whether the cascade is worth it
    cost = (low_s + figures["rescored_share"] * ref_s) / max(low_s, 1e-9)
    return {"rescore_margin": round(margin, 6), "rescore_check_images": int(len(check)),
            "rescore_check": {**figures, "rescore_precision": "fp32", "network_time_vs_int8": round(cost, 2)}}


# --- per format ------------------------------------------------------------------------------


def _onnx_bytes(fn: Any) -> bytes:
    import warnings

    # tf2onnx, and Keras' shim for it, probe NumPy aliases (np.object ...) that NumPy 2 warns
    # about: notices about their code, nothing a user exporting a model can act on
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import tf2onnx
        except ImportError:
            raise ExportError("ONNX export needs tf2onnx and onnx (pip install 'brandmon[export]')") from None
        try:  # Keras' own shim for tf2onnx on NumPy 2 (np.object, np.bool, ...)
            from keras.src.export.tf2onnx_lib import patch_tf2onnx

            patch_tf2onnx()
        except ImportError:
            pass
        proto, _ = tf2onnx.convert.from_function(fn, input_signature=fn.input_signature, opset=ONNX_OPSET)
    return proto.SerializeToString()


def _quantize_onnx(model: bytes, calib: np.ndarray) -> bytes:
    """Static int8 QDQ quantisation of the convolutions (per-channel weights, uint8 activations)
    with ONNX Runtime. The head (standardisation, dense, softmax) stays float: standardised
    features can hinge on differences far below an 8-bit step of their range."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._it = iter([{"image": calib[i : i + 1]} for i in range(len(calib))])

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._it, None)

    with tempfile.TemporaryDirectory() as tmp:
        src, pre, out = (Path(tmp, n) for n in ("model.onnx", "pre.onnx", "int8.onnx"))
        src.write_bytes(model)
        quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
        quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, op_types_to_quantize=["Conv"])
        return out.read_bytes()


def export_files(fmt: str, net: Any, spec: Any, precision: str, calib: np.ndarray | None,
                 info: dict[str, Any] | None = None, check: np.ndarray | None = None,
                 rescore: bool = True) -> dict[str, bytes]:
    """The runtime files of one format (name -> bytes); `info` receives how int8 was made
    (quantiser, its peak RSS) and, for OpenVINO int8 with `rescore`, the precision cascade's
    margin chosen on the `check` images (`rescore_figures`)."""
    import tensorflow as tf

    info = {} if info is None else info

    fn = inference_function(net, spec)
    if fmt == "onnx":
        model = _onnx_bytes(fn)
        if precision != "int8":
            return {"model.onnx": model}
        quantized = _quantize_onnx(model, calib)
        info.update(quantizer=f"onnxruntime {_version('onnxruntime')} QDQ", quantize_peak_rss_bytes=peak_rss_bytes())
        return {"model.onnx": quantized}
    if fmt == "openvino":
        import openvino as ov

        with tempfile.TemporaryDirectory() as tmp:
            model = ov.convert_model(fn.get_concrete_function())
            ov.save_model(model, str(Path(tmp, "model.xml")), compress_to_fp16=False)
            del model
            xml32, bin32 = Path(tmp, "model.xml").read_bytes(), Path(tmp, "model.bin").read_bytes()
            if precision != "int8":
                return {"model.xml": xml32, "model.bin": bin32}
            if not _installed("nncf"):  # OpenVINO runs ONNX Runtime's QDQ graph as int8
                log.warning("nncf is not installed: quantising the OpenVINO export with ONNX Runtime's QDQ quantiser "
                            "(lower agreement with fp32, more memory; pip install 'brandmon[runtimes]')")
                path = Path(tmp, "int8.onnx")
                path.write_bytes(_quantize_onnx(_onnx_bytes(fn), calib))
                ov.save_model(ov.convert_model(str(path)), str(Path(tmp, "int8.xml")), compress_to_fp16=False)
                xml, weights = Path(tmp, "int8.xml").read_bytes(), Path(tmp, "int8.bin").read_bytes()
                info.update(quantizer=f"onnxruntime {_version('onnxruntime')} QDQ", quantize_peak_rss_bytes=peak_rss_bytes())
        if _installed("nncf"):  # NNCF on the fp32 IR, in a child process
            try:
                xml, weights, stats = quantize_ir(xml32, bin32, calib)
            except QuantizeError as exc:
                raise ExportError(str(exc)) from None
            info.update(quantizer=stats["quantizer"], quantize_peak_rss_bytes=stats["peak_rss_bytes"],
                        quantize_seconds=stats["seconds"])
        files = {"model.xml": xml, "model.bin": weights}
        if rescore and check is not None and len(check):
            files.update({"rescore.xml": xml32, "rescore.bin": bin32})
            info.update(rescore_figures(files, check))
        return files
    if fmt == "tflite":
        if precision != "int8":
            converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()], fn)
            return {"model.tflite": converter.convert()}
        # int8 would quantise the softmax output to 1/256 steps: the network ends at the pooled
        # features and the runtime applies the float head (head.npz).
        feat = inference_function(net, spec, head=False)
        converter = tf.lite.TFLiteConverter.from_concrete_functions([feat.get_concrete_function()], feat)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        converter.representative_dataset = lambda: ([calib[i : i + 1]] for i in range(len(calib)))
        kernel, bias = folded_head(net)
        head = io.BytesIO()
        np.savez(head, kernel=kernel, bias=bias)
        return {"model.tflite": converter.convert(), "head.npz": head.getvalue()}
    if fmt == "savedmodel":
        module = tf.Module()
        module.classify = fn
        module.net = net.classifier  # tracks the variables
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp, "saved_model")
            tf.saved_model.save(module, str(root), signatures={"serving_default": fn.get_concrete_function()})
            return {str(p.relative_to(tmp)): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    raise ExportError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")


def export_model(ctx: Context, version: str, fmt: str, precision: str = "auto", calibration: str | Path | None = None,
                 calibration_images: int = CALIBRATION_IMAGES, rescore: str = "auto",
                 check_images: int = CHECK_IMAGES) -> dict[str, Any]:
    """Export model `version` as `fmt` into the lake; returns what was written (JSON-ready).

    `precision`: `auto` (int8 where the format has it, else fp32), `int8` or `fp32`.
    `rescore` (OpenVINO int8): `auto` adds the fp32 network and the margin below which detect
    scores a photo again with it (the precision cascade, rescore.py), chosen on up to
    `check_images` further training images; `off`: int8 alone.
    """
    from pipeline.detector.model import load_artifact
    from pipeline.detector.registry import get_version

    if fmt not in FORMATS:
        raise ExportError(f"unknown export format {fmt!r} (choose from {', '.join(FORMATS)})")
    if precision == "auto":
        precision = "int8" if fmt in INT8_FORMATS else "fp32"
    if precision not in ("int8", "fp32"):
        raise ExportError(f"export precision must be auto, int8 or fp32, not {precision!r}")
    if rescore not in ("auto", "off"):
        raise ExportError(f"--rescore must be auto or off, not {str(rescore)[:40]!r}")
    if (isinstance(calibration_images, bool) or not isinstance(calibration_images, int)
            or not MIN_CALIBRATION_IMAGES <= calibration_images <= MAX_CALIBRATION_IMAGES):
        raise ExportError(f"--calibration-images must be a whole number >= {MIN_CALIBRATION_IMAGES} (at most "
                          f"{MAX_CALIBRATION_IMAGES}: they are held in memory), not {str(calibration_images)[:40]}")
    if precision == "int8" and fmt not in INT8_FORMATS:
        raise ExportError(f"{fmt} exports are fp32 only (int8: {', '.join(INT8_FORMATS)})")
    missing = [m for m in _needs(fmt, precision) if not _importable(m)]
    if missing:
        raise ExportError(f"{fmt} export ({precision}) needs {', '.join(missing)} (pip install 'brandmon[runtimes]')")
    row = get_version(ctx, version)
    started = time.monotonic()
    try:
        artifact = ctx.store.get(row["artifact_key"])
    except KeyError:
        raise ExportError(f"model {version}: its artifact {row['artifact_key']} is missing from the lake; "
                          "restore it, or train the model again") from None
    model = load_artifact(artifact, precision="fp32", with_matcher=False)
    del artifact
    spec = model.spec
    calib = check = None
    cascade = precision == "int8" and fmt == "openvino" and rescore == "auto"
    if precision == "int8":
        images = calibration_batch(ctx, row, spec.input_size, calibration_images + (check_images if cascade else 0),
                                   calibration)
        if len(images) < MIN_CALIBRATION_IMAGES:
            raise ExportError(f"int8 export: only {len(images)} readable calibration image(s); it needs at least "
                              f"{MIN_CALIBRATION_IMAGES} like the ones to score (--calibration DIR), or --precision fp32")
        calib, check = images[:calibration_images], images[calibration_images:]
        if cascade and len(check) < MIN_CHECK_IMAGES:
            # Too few images beyond the calibration ones: the margin is chosen on all of them
            # (the quantiser has seen them, so the int8 error there is a little smaller).
            log.warning("only %d images beyond the %d calibration ones: the re-score margin is chosen on all %d "
                        "(below 100 images, as their largest int8 error); the >= 99%% figure needs 100 or more",
                        len(check), len(calib), len(images))
            check = images
    info: dict[str, Any] = {}
    files = export_files(fmt, model.net, spec, precision, calib, info, check=check, rescore=cascade)
    meta = {
        "export_format": EXPORT_FORMAT, "format": fmt, "precision": precision, "model_version": version,
        "model_artifact": row["artifact_key"], "classes": list(spec.classes), "input_size": spec.input_size,
        "input": "uint8 (n, s, s, 3) RGB, squash-resized as detect does", "output": "class probabilities",
        "runtime": _runtime_version(fmt), "calibration_images": 0 if calib is None else int(len(calib)),
        "calibration_source": None if calib is None else str(calibration or (row.get("params") or {}).get("data")),
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), **info,
    }
    data = write_export(meta, files)
    key = export_key(row["artifact_key"], fmt)
    ctx.store.put(key, data, content_type="application/zip")
    meta.update(key=key, bytes=len(data), seconds=round(time.monotonic() - started, 1))
    return meta


def _importable(name: str) -> bool:
    import importlib

    try:
        importlib.import_module(name)
    except ImportError:
        return False
    return True


def _needs(fmt: str, precision: str) -> list[str]:
    """The Python packages an export needs. OpenVINO int8: NNCF, or without it ONNX Runtime's
    QDQ quantiser on the tf2onnx graph (the previous path, kept as the fallback)."""
    if fmt == "openvino":
        if precision != "int8" or _installed("nncf"):
            return ["openvino"]
        return ["openvino", "onnxruntime", "tf2onnx"]
    if fmt == "onnx":
        return ["tf2onnx"] + (["onnxruntime"] if precision == "int8" else [])
    return []


def _installed(name: str) -> bool:
    """`name` can be imported, without importing it (a `sys.modules[name] = None` entry: not)."""
    import importlib.util
    import sys

    if name in sys.modules:
        return sys.modules[name] is not None
    return importlib.util.find_spec(name) is not None


def _version(name: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return "?"


def _runtime_version(fmt: str) -> str:
    import importlib

    name = {"openvino": "openvino", "onnx": "onnxruntime", "tflite": "tensorflow", "savedmodel": "tensorflow"}[fmt]
    mod = importlib.import_module(name)
    return f"{name} {getattr(mod, '__version__', '?')}"


__all__ = ["ExportError", "calibration_batch", "export_model", "inference_function", "runtime_importable"]
