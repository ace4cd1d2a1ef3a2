"""Inference runtimes for exported classifiers: which are installed, which to use, how to run one.

An export (`brandmon model export`, `export.py`) is one zip in the lake beside the model's own
artifact: `export.json` (format, precision, classes, input size, the runtime's version) plus the
runtime's files. Every format computes the same function as the Keras classifier: a uint8
(n, s, s, 3) batch in, class probabilities out. The matcher and the fusion stay in Python and
come from the model's own artifact.

`detector.runtime` (env `BRANDMON_DETECT_RUNTIME`) picks the runtime: `auto` takes the first of
`PREFERENCE` whose export exists and whose Python package imports, else Keras; a named runtime
must be usable, or the run stops with a one-line error saying why.
"""

from __future__ import annotations

import importlib
import io
import json
import logging
import os
import tempfile
import threading
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import BrandmonError

log = logging.getLogger(__name__)

EXPORT_FORMAT = 1
FORMATS = ("openvino", "onnx", "tflite", "savedmodel")
# Fastest first on this project's reference CPU (bench/detect.py, int8): OpenVINO, then ONNX
# Runtime, then TFLite. The SavedModel is for TF Serving-style deployment, not faster than Keras.
PREFERENCE = ("openvino", "onnx", "tflite")
RUNTIME_CHOICES = ("auto", "keras", *FORMATS)
# The Python package each format's runtime needs (tflite: LiteRT, else TensorFlow's own interpreter).
RUNTIME_MODULES = {"openvino": "openvino", "onnx": "onnxruntime", "tflite": "ai_edge_litert", "savedmodel": "tensorflow"}
MAX_EXPORT_BYTES = 512 * 1024 * 1024  # refuse to unpack larger export zips


class RuntimeUnavailable(BrandmonError):
    """The requested inference runtime cannot be used for this model."""


def export_key(artifact_key: str, fmt: str) -> str:
    """Where a model's export lives: beside its artifact, named by the artifact's content hash."""
    stem = artifact_key.rsplit("/", 1)[-1].removesuffix(".zip")
    return f"models/exports/{stem}/{fmt}.zip"


def runtime_importable(fmt: str) -> bool:
    """The runtime's package imports (a `sys.modules[name] = None` entry counts as missing)."""
    names = [RUNTIME_MODULES[fmt]] + (["tensorflow"] if fmt == "tflite" else [])
    for name in names:
        try:
            importlib.import_module(name)
            return True
        except ImportError:
            continue
    return False


def runtime_setting(ctx: Any) -> str:
    """`BRANDMON_DETECT_RUNTIME` over `detector.runtime`; checked against RUNTIME_CHOICES."""
    from pipeline.settings import detect_runtime

    value = detect_runtime(ctx.settings.detector.runtime)
    if value not in RUNTIME_CHOICES:
        raise RuntimeUnavailable(f"detector.runtime / BRANDMON_DETECT_RUNTIME must be one of {', '.join(RUNTIME_CHOICES)}, "
                                 f"not {value!r}")
    return value


def choose_runtime(ctx: Any, artifact_key: str, setting: str, version: str = "VERSION") -> str:
    """The runtime to score with: `keras` or an export format (see the module doc); `version`
    names the model in the error that says how to export it."""
    if setting == "keras":
        return "keras"
    if setting != "auto":
        if not ctx.store.exists(export_key(artifact_key, setting)):
            raise RuntimeUnavailable(f"detector.runtime={setting}: this model has no {setting} export "
                                     f"(run `brandmon model export {version} --format {setting}`)")
        if not runtime_importable(setting):
            raise RuntimeUnavailable(f"detector.runtime={setting}: its Python package {RUNTIME_MODULES[setting]} "
                                     "is not installed (pip install 'brandmon[runtimes]')")
        return setting
    for fmt in PREFERENCE:
        if ctx.store.exists(export_key(artifact_key, fmt)):
            if runtime_importable(fmt):
                return fmt
            log.info("model has a %s export but %s is not installed: trying the next runtime", fmt, RUNTIME_MODULES[fmt])
    return "keras"


# --- running an export -----------------------------------------------------------------------


@dataclass
class ExportedClassifier:
    """A loaded export: `predict(uint8 batch) -> float32 probabilities`, like the Keras classifier."""

    fmt: str
    meta: dict[str, Any]
    _run: Any = field(repr=False)
    _tmp: Any = field(default=None, repr=False)  # keeps unpacked files alive (SavedModel, OpenVINO)

    @property
    def precision(self) -> str:
        """`int8`, `fp32`, `bf16` (an fp32 export the runtime runs in bf16, as Keras records it),
        or `int8+fp32` for the precision cascade."""
        ran_in = getattr(self._run, "ran_in", None)
        if ran_in:
            return str(ran_in)
        base = str(self.meta.get("precision", "fp32"))
        return f"{base}+fp32" if self.rescored is not None else base

    @property
    def rescored(self) -> dict[str, int] | None:
        """The precision cascade's running counts ({"images", "rescored"}); None without one."""
        return getattr(self._run, "rescored", None)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        out = np.asarray(self._run(np.ascontiguousarray(batch, np.uint8)), np.float32)
        classes = self.meta.get("classes")
        if out.ndim != 2 or (isinstance(classes, list) and out.shape[1] != len(classes)):
            # a network that is not this export's classifier (a swapped or half-written file):
            # stop with a clear line rather than map columns to the wrong classes
            raise RuntimeUnavailable(f"model export is damaged (its {self.fmt} network outputs shape {out.shape}, "
                                     f"not one probability per class of {len(classes or [])}); "
                                     "export it again with `brandmon model export`")
        return out


def read_export(data: bytes) -> tuple[dict[str, Any], dict[str, bytes]]:
    """(export.json, {file name: bytes}) of an export zip; a clear error for anything else."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            if sum(i.file_size for i in zf.infolist()) > MAX_EXPORT_BYTES:
                raise RuntimeUnavailable(f"export unpacks to more than {MAX_EXPORT_BYTES} bytes; refusing it")
            meta = json.loads(zf.read("export.json"))
            if not isinstance(meta, dict) or "format" not in meta:
                raise RuntimeUnavailable("model export is damaged (export.json is not an object with a format); "
                                         "export it again with `brandmon model export`")
            files = {n: zf.read(n) for n in zf.namelist() if n != "export.json" and not n.endswith("/")}
    except BrandmonError:
        raise
    # zipfile's refusals are not all BadZipFile: an unsupported compression method is
    # NotImplementedError, an encrypted entry RuntimeError, a broken deflate stream zlib.error
    except (zipfile.BadZipFile, zipfile.LargeZipFile, KeyError, ValueError, NotImplementedError, RuntimeError,
            EOFError, OSError, zlib.error) as exc:
        raise RuntimeUnavailable(f"not a brandmon model export ({type(exc).__name__}: {str(exc).strip()[:120]}); "
                                 "export it again with `brandmon model export`") from None
    if meta.get("export_format") != EXPORT_FORMAT:
        raise RuntimeUnavailable("model export has an unknown format version; export it again with this brandmon")
    return meta, files


def open_export(data: bytes, threads: int = 0, precision: str = "auto") -> ExportedClassifier:
    """Load an export zip into its runtime. `precision` is the float inference precision for
    runtimes that choose one (OpenVINO: bf16 where the CPU has it); int8 exports stay int8."""
    meta, files = read_export(data)
    fmt = meta["format"]
    loader = {"openvino": _open_openvino, "onnx": _open_onnx, "tflite": _open_tflite, "savedmodel": _open_savedmodel}.get(fmt)
    if loader is None:
        raise RuntimeUnavailable(f"model export is damaged (unknown export format {str(fmt)[:40]!r}); "
                                 "export it again with `brandmon model export`")
    if meta.get("precision", "fp32") not in ("int8", "fp32"):
        raise RuntimeUnavailable(f"model export is damaged (precision {str(meta.get('precision'))[:40]!r}); "
                                 "export it again with `brandmon model export`")
    if not runtime_importable(fmt):
        raise RuntimeUnavailable(f"the {fmt} runtime ({RUNTIME_MODULES[fmt]}) is not installed")
    try:
        run, tmp = loader(meta, files, threads or (os.cpu_count() or 1), precision)
    except BrandmonError:
        raise
    # A missing or corrupt file of the zip. Each runtime has its own exception types (ONNX
    # Runtime's InvalidProtobuf is a plain Exception), so anything its loader raises counts.
    except Exception as exc:  # noqa: BLE001
        raise RuntimeUnavailable(f"model export is damaged ({type(exc).__name__}: {str(exc).strip()[:160]}); "
                                 "export it again with `brandmon model export`") from None
    return ExportedClassifier(fmt=fmt, meta=meta, _run=run, _tmp=tmp)


def check_export_matches(meta: dict[str, Any], fmt: str, spec: Any, artifact_key: str, version: str = "VERSION") -> None:
    """The export at a model's key was made from that model, for that runtime: the same classes in
    the same order, the same input size, the same artifact. A swapped or edited export.json
    would otherwise score every photo with the columns mapped to the wrong classes."""
    wrong = []
    if meta.get("format") != fmt:
        wrong.append(f"format {str(meta.get('format'))[:40]!r}, not {fmt!r}")
    if meta.get("classes") != list(spec.classes):
        wrong.append("its classes differ from the model's")
    if meta.get("input_size") != spec.input_size:
        wrong.append(f"input size {str(meta.get('input_size'))[:20]}, not {spec.input_size}")
    if meta.get("model_artifact") not in (None, artifact_key):
        wrong.append("it was made from another model artifact")
    if wrong:
        raise RuntimeUnavailable(f"the {fmt} export does not match this model ({'; '.join(wrong)}); "
                                 f"export it again with `brandmon model export {version} --format {fmt}`")


def _unpack(files: dict[str, bytes]) -> tempfile.TemporaryDirectory:
    tmp = tempfile.TemporaryDirectory(prefix="brandmon-export-")
    for name, blob in files.items():
        path = Path(tmp.name, name)
        if not path.resolve().is_relative_to(Path(tmp.name).resolve()):
            raise RuntimeUnavailable(f"export holds a path outside its folder: {name!r}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(blob)
    return tmp


def openvino_runner(core: Any, model: Any, hint: str, threads: int) -> Any:
    """`run(uint8 batch) -> probabilities` of an OpenVINO model compiled for this CPU.

    Two streams sharing the threads, each scoring half of the batch: on 2 cores no barrier
    between the threads of one convolution (measured 30% faster on 2 shared cores than one
    2-thread request, and a little less CPU per image)."""
    streams = 2 if threads >= 2 else 1
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": threads,
                                                 "PERFORMANCE_HINT": "THROUGHPUT", "NUM_STREAMS": streams})
    requests = [compiled.create_infer_request() for _ in range(streams)]
    lock = threading.Lock()  # the requests are reused: one batch at a time

    def run(x: np.ndarray) -> np.ndarray:
        parts = [p for p in np.array_split(x, min(len(requests), max(1, len(x)))) if len(p)]
        with lock:
            for req, part in zip(requests, parts, strict=False):
                req.start_async({0: np.ascontiguousarray(part)})
            for req in requests[: len(parts)]:
                req.wait()
            return np.concatenate([req.get_output_tensor(0).data.copy() for req in requests[: len(parts)]])

    return run


def read_ir(core: Any, xml: bytes, weights: bytes) -> Any:
    import openvino as ov

    return core.read_model(model=xml, weights=ov.Tensor(np.frombuffer(weights, np.uint8)))


def _open_openvino(meta: dict, files: dict[str, bytes], threads: int, precision: str) -> tuple[Any, Any]:
    import openvino as ov

    from pipeline.detector.model import choose_precision
    from pipeline.detector.rescore import cascade

    core = ov.Core()
    float_hint = "f32" if choose_precision(precision) == "fp32" else "bf16"
    # int8 exports keep their float remainder in f32 (measured no faster in bf16); fp32 ones
    # run in bf16 where the CPU has it, as the Keras path does.
    hint = "f32" if meta.get("precision") == "int8" else float_hint
    model = read_ir(core, files["model.xml"], files["model.bin"])
    quantised = any(op.get_type_name() == "FakeQuantize" for op in model.get_ops())
    if quantised != (meta.get("precision") == "int8"):  # the run log would record the wrong precision
        raise RuntimeUnavailable(f"model export is damaged (export.json says precision {str(meta.get('precision'))[:40]!r} "
                                 f"but its network is {'int8' if quantised else 'not quantised'}); export it again "
                                 "with `brandmon model export`")
    run = openvino_runner(core, model, hint, threads)
    margin = meta.get("rescore_margin")
    if meta.get("precision") != "int8" or margin is None:
        run.ran_in = "bf16" if hint == "bf16" else None  # type: ignore[attr-defined]  # read by .precision
        return run, None
    # a margin is a difference of two probabilities: a number in [0, 1]
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin <= 1:
        raise RuntimeUnavailable(f"model export has an invalid rescore_margin {str(margin)[:40]!r} (a number in [0, 1]); "
                                 "export it again")
    missing = [n for n in ("rescore.xml", "rescore.bin") if n not in files]
    if missing:
        raise RuntimeUnavailable(f"model export is damaged: it has a rescore_margin but no {' or '.join(missing)}; "
                                 "export it again (or with --rescore off)")
    # The precision cascade (rescore.py): the near ties of int8 are scored again by the fp32 IR,
    # in fp32: bf16 would flip some of the same near ties (it keeps ~99.5% of top classes).
    high = openvino_runner(core, read_ir(core, files["rescore.xml"], files["rescore.bin"]), "f32", threads)
    stats = {"images": 0, "rescored": 0}

    def run_cascade(x: np.ndarray) -> np.ndarray:
        probs, k = cascade(run(x), float(margin), high, x)
        stats["images"] += len(x)
        stats["rescored"] += k
        return probs

    run_cascade.rescored = stats  # type: ignore[attr-defined]  # read by ExportedClassifier.rescored
    return run_cascade, None


def write_export(meta: dict[str, Any], files: dict[str, bytes]) -> bytes:
    """An export zip (`read_export`'s inverse): export.json plus the runtime's files."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("export.json", json.dumps(meta, indent=2, sort_keys=True))
        for name, blob in files.items():
            zf.writestr(name, blob)
    return buf.getvalue()


def _open_onnx(meta: dict, files: dict[str, bytes], threads: int, precision: str) -> tuple[Any, Any]:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(files["model.onnx"], opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: x})[0]

    return run, None


def _tflite_interpreter(content: bytes, threads: int) -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806 - a class
    return Interpreter(model_content=content, num_threads=threads)


def _open_tflite(meta: dict, files: dict[str, bytes], threads: int, precision: str) -> tuple[Any, Any]:
    if meta.get("precision") == "int8" and "head.npz" not in files:  # the int8 network ends at the features
        raise RuntimeUnavailable("model export is damaged: a TFLite int8 export needs its head.npz; "
                                 "export it again with `brandmon model export`")
    interp = _tflite_interpreter(files["model.tflite"], threads)
    inp = interp.get_input_details()[0]["index"]
    out = interp.get_output_details()[0]["index"]
    state = {"n": None}
    lock = threading.Lock()  # an interpreter is not thread-safe
    head = None
    if "head.npz" in files:  # int8: the network ends at the pooled features, the head is float
        with np.load(io.BytesIO(files["head.npz"])) as z:
            head = (z["kernel"].astype(np.float32), z["bias"].astype(np.float32))

    def run(x: np.ndarray) -> np.ndarray:
        with lock:
            if state["n"] != len(x):
                interp.resize_tensor_input(inp, list(x.shape))
                interp.allocate_tensors()
                state["n"] = len(x)
            interp.set_tensor(inp, x)
            interp.invoke()
            y = interp.get_tensor(out).copy()
        if head is None:
            return y
        logits = y.astype(np.float32) @ head[0] + head[1]
        logits -= logits.max(axis=1, keepdims=True)
        e = np.exp(logits)
        return e / e.sum(axis=1, keepdims=True)

    return run, None


def _open_savedmodel(meta: dict, files: dict[str, bytes], threads: int, precision: str) -> tuple[Any, Any]:
    import tensorflow as tf

    tmp = _unpack(files)
    loaded = tf.saved_model.load(str(Path(tmp.name, "saved_model")))
    fn = loaded.signatures["serving_default"]

    def run(x: np.ndarray) -> np.ndarray:
        return next(iter(fn(image=tf.convert_to_tensor(x)).values())).numpy()

    run.loaded = loaded  # type: ignore[attr-defined]  # keep the trackable alive
    return run, tmp
