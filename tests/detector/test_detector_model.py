from __future__ import annotations

import http.server
import threading
from pathlib import Path

import numpy as np
import pytest

from pipeline.detector.model import (
    IMAGENET_FILE,
    ModelError,
    ModelSpec,
    choose_precision,
    cpu_supports_bf16,
    read_spec,
    resolve_weights,
)
from tests.support.services import free_port

CPU_BF16 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n"
CPU_OLD = "processor\t: 0\nflags\t\t: fpu sse2 avx2\n"


def test_precision_policy_follows_cpu_flags():
    assert cpu_supports_bf16(CPU_BF16)
    assert not cpu_supports_bf16(CPU_OLD)
    assert choose_precision("auto", CPU_BF16) == "bf16"
    assert choose_precision("auto", CPU_OLD) == "fp32"
    assert choose_precision("fp32", CPU_BF16) == "fp32"
    assert choose_precision("bf16", CPU_OLD) == "bf16"
    with pytest.raises(ModelError):
        choose_precision("fp8")


def test_imagenet_falls_back_to_none_with_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    # an unreachable download (as offline): a closed port on 127.0.0.1
    monkeypatch.setenv("BRANDMON_IMAGENET_URL", f"http://127.0.0.1:{free_port()}/weights.h5")
    tag, path, note = resolve_weights("auto")
    assert (tag, path) == ("none", None)
    assert "imagenet" in note and "download" in note and "\n" not in note
    assert not (tmp_path / "models" / IMAGENET_FILE).exists()  # no partial file left behind
    (tmp_path / "models").mkdir(exist_ok=True)
    (tmp_path / "models" / "inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"x")
    assert resolve_weights("imagenet")[0] == "imagenet"
    weights = tmp_path / "mine.h5"
    weights.write_bytes(b"weights")
    assert resolve_weights(str(weights))[0].startswith("file:")
    with pytest.raises(ModelError):
        resolve_weights(str(tmp_path / "missing.h5"))


def test_spec_rejects_foreign_artifacts():
    with pytest.raises(ModelError):
        read_spec(b"not a zip")


@pytest.mark.integration
def test_artifact_round_trip_gives_the_same_predictions():
    from pipeline.detector.model import build_network, load_artifact, save_artifact

    net = build_network(3, 75, dropout=0.2)
    spec = ModelSpec(classes=["no_logo", "A", "B"], input_size=75, dropout=0.2, threshold=0.42)
    x = np.random.default_rng(0).integers(0, 255, (4, 75, 75, 3)).astype(np.uint8)
    before = np.asarray(net.classifier(x.astype(np.float32), training=False))
    loaded = load_artifact(save_artifact(spec, net), precision="fp32")
    assert loaded.spec.classes == spec.classes and loaded.spec.threshold == 0.42
    np.testing.assert_allclose(loaded.predict_arrays(x), before, atol=1e-5)
    bf16 = load_artifact(save_artifact(spec, net), precision="bf16")
    np.testing.assert_allclose(bf16.predict_arrays(x), before, atol=0.05)  # bf16 compute, same weights


def test_imagenet_is_downloaded_into_the_keras_cache_where_online(tmp_path, monkeypatch):
    """`imagenet` fetches the file once (here from a mirror on 127.0.0.1), then uses the cache."""
    served = tmp_path / "mirror"
    served.mkdir()
    payload = b"HDF5-stand-in " * 1000
    (served / IMAGENET_FILE).write_bytes(payload)
    hits: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **kw):
            super().__init__(*a, directory=str(served), **kw)

        def log_message(self, *a):
            hits.append(self.path)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
        monkeypatch.setenv("BRANDMON_IMAGENET_URL", f"http://127.0.0.1:{server.server_port}/{IMAGENET_FILE}")
        tag, path, note = resolve_weights("imagenet")
        assert (tag, note) == ("imagenet", None)
        assert Path(path) == tmp_path / "keras" / "models" / IMAGENET_FILE
        assert Path(path).read_bytes() == payload
        assert len(hits) == 1
        assert resolve_weights("auto")[:2] == ("imagenet", path)  # from the cache, no second download
        assert len(hits) == 1
    finally:
        server.shutdown()


def test_thread_cap_applies_before_tensorflow_starts_and_says_when_too_late():
    """`detector.threads` / BRANDMON_TF_THREADS: set in a fresh process, as a worker task is."""
    import subprocess
    import sys

    code = (
        "from pipeline.detector.model import configure_threads\n"
        "assert configure_threads(1)\n"
        "import tensorflow as tf\n"
        "tf.constant(1.0) + 1.0\n"
        "t = tf.config.threading\n"
        "print(t.get_intra_op_parallelism_threads(), t.get_inter_op_parallelism_threads())\n"
        "print(configure_threads(2))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**__import__("os").environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "1", "False"]
