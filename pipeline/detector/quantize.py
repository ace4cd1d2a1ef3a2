"""int8 post-training quantisation of an OpenVINO IR with NNCF, run in a child process.

Why NNCF on the IR (not ONNX Runtime's QDQ graph converted to OpenVINO): on the FL27 models it
keeps the fp32 model's top class more often at the same speed (BENCHMARKS.md, issue 15),
and it needs about 0.5 GB where the QDQ calibration held ~7-12 GB.
Why a child process: the calibration's peak memory is returned to the system when the child
exits, the export never holds it beside TensorFlow, and the child's peak RSS (VmHWM) is
reported. The child imports OpenVINO, NNCF and NumPy only.

Settings (measured on the FL27 models): symmetric int8 (`PERFORMANCE` preset), per-channel
weights, activation ranges from the min/max over all calibration images (NNCF's default, the
mean of the per-image extremes, clips the images whose activations are large and moved a
probability by up to 0.95), head (MatMul, Softmax) left float as in the QDQ path, and NNCF's
full bias correction (`fast_bias_correction=False`: each layer's bias corrected on the outputs
of the already-quantised layers before it). The full correction kept 96.7% of the fp32 top
classes on the FL27 test photos where the fast one kept 94.9%, at the same speed
(bench/cascade.py, bench/results/cascade.txt); it makes the quantisation ~1.6x slower.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

QUANTIZE_TIMEOUT_S = 3600
# The child's address-space limit: far above its measured peak (~0.5-1 GB RSS at 299 px),
# so a runaway calibration fails with MemoryError instead of pushing the host into swap.
QUANTIZE_MEMORY_BYTES = 8 * 1024**3


class QuantizeError(RuntimeError):
    """The quantisation child failed; the message holds the last line of its error output."""


def quantize_ir(xml: bytes, weights: bytes, calib: np.ndarray, timeout: float = QUANTIZE_TIMEOUT_S,
                memory_bytes: int | None = QUANTIZE_MEMORY_BYTES,
                fast_bias_correction: bool = False) -> tuple[bytes, bytes, dict[str, Any]]:
    """(int8 xml, int8 bin, stats) of the fp32 IR `xml`/`weights`, calibrated on `calib`
    (uint8 (n, s, s, 3)); stats: quantiser version, seconds, the child's peak RSS in bytes.
    `fast_bias_correction=True`: NNCF's faster, less exact bias correction (the old setting)."""
    import pipeline
    from pipeline.settings import child_env

    with tempfile.TemporaryDirectory(prefix="brandmon-quantize-") as tmp:
        d = Path(tmp)
        (d / "model.xml").write_bytes(xml)
        (d / "model.bin").write_bytes(weights)
        np.save(d / "calib.npy", np.ascontiguousarray(calib, np.uint8))
        (d / "options.json").write_text(json.dumps({"fast_bias_correction": bool(fast_bias_correction)}))
        root = str(Path(pipeline.__file__).resolve().parents[1])
        env = child_env(root)
        try:  # the child sets its own memory limit (no preexec_fn: the caller runs TensorFlow threads)
            proc = subprocess.run([sys.executable, "-m", "pipeline.detector.quantize", str(d), str(memory_bytes or 0),
                                   str(os.getpid())],
                                  env=env, capture_output=True, text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise QuantizeError(f"int8 quantisation did not finish within {timeout:.0f}s") from None
        result = d / "result.json"
        if proc.returncode != 0 or not result.exists():
            tail = (proc.stderr or "").strip().splitlines()[-1:] or [f"exit status {proc.returncode}"]
            raise QuantizeError(f"int8 quantisation failed: {tail[0][:300]}")
        stats = json.loads(result.read_text())
        return (d / "int8.xml").read_bytes(), (d / "int8.bin").read_bytes(), stats


def end_with_parent(folder: Path, parent: int) -> None:
    """Linux: this child ends when the export that started it ends (an Airflow timeout, `kill`),
    and removes the parent's temporary folder, which a killed parent cannot: without it the
    child went on quantising for up to an hour as an orphan and its ~100 MB folder stayed."""
    import ctypes
    import shutil
    import signal

    def stop(signum: int, frame: Any) -> None:
        shutil.rmtree(folder, ignore_errors=True)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(OSError, AttributeError):  # not Linux: only the check below
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if parent and os.getppid() != parent:  # the parent ended before the line above
        stop(signal.SIGTERM, None)


def limit_memory(limit: int) -> None:
    """Cap this process's address space at `limit` bytes (Linux; elsewhere a no-op)."""
    try:
        import resource
    except ImportError:
        return
    if limit > 0:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def peak_rss_bytes() -> int:
    """This process's peak resident set (VmHWM), 0 where /proc is absent."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def quantize_in_this_process(folder: Path) -> dict[str, Any]:
    """The child's work: folder/model.xml + calib.npy -> folder/int8.xml (+ .bin) and result.json."""
    import nncf
    import openvino as ov
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    started = time.monotonic()
    model = ov.Core().read_model(str(folder / "model.xml"))
    calib = np.load(folder / "calib.npy")
    options = json.loads((folder / "options.json").read_text()) if (folder / "options.json").exists() else {}
    fast = bool(options.get("fast_bias_correction", False))
    dataset = nncf.Dataset([calib[i : i + 1] for i in range(len(calib))])
    quantized = nncf.quantize(
        model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(calib),
        ignored_scope=nncf.IgnoredScope(types=["MatMul", "Softmax"], validate=False), fast_bias_correction=fast,
        advanced_parameters=AdvancedQuantizationParameters(
            activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))
    ov.save_model(quantized, str(folder / "int8.xml"), compress_to_fp16=False)
    stats = {"quantizer": f"nncf {nncf.__version__}" + (" fast bias correction" if fast else " full bias correction"),
             "seconds": round(time.monotonic() - started, 1),
             "calibration_images": int(len(calib)), "peak_rss_bytes": peak_rss_bytes()}
    (folder / "result.json").write_text(json.dumps(stats))
    return stats


if __name__ == "__main__":  # the child: python -m pipeline.detector.quantize FOLDER [MEMORY_BYTES]
    import logging

    logging.basicConfig(level=logging.WARNING)
    end_with_parent(Path(sys.argv[1]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    limit_memory(int(sys.argv[2]) if len(sys.argv) > 2 else QUANTIZE_MEMORY_BYTES)
    quantize_in_this_process(Path(sys.argv[1]))
