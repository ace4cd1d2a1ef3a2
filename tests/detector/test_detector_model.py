from __future__ import annotations

import numpy as np
import pytest

from pipeline.detector.model import (
    ModelError,
    ModelSpec,
    choose_precision,
    cpu_supports_bf16,
    read_spec,
    resolve_weights,
)

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
    tag, path, note = resolve_weights("auto")
    assert (tag, path) == ("none", None)
    assert "imagenet" in note and "\n" not in note
    (tmp_path / "models").mkdir()
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
