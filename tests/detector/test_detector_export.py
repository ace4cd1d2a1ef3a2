"""`brandmon model export` and the inference runtimes: export -> load -> score per format, the
runtime `detect` picks, and the Keras fallback when a runtime's package is missing."""

from __future__ import annotations

import importlib.util
import sys

import numpy as np
import pytest
from detector_helpers import jpeg_bytes, scene, store_images
from sqlalchemy import select

from pipeline.detector.runtimes import (
    FORMATS,
    RUNTIME_MODULES,
    RuntimeUnavailable,
    export_key,
    open_export,
    read_export,
    write_export,
)

pytestmark = pytest.mark.integration

NEEDS = {"openvino": ["openvino", "onnxruntime", "tf2onnx"], "onnx": ["onnxruntime", "tf2onnx"], "tflite": [], "savedmodel": []}


def _have(*mods: str) -> bool:
    return all(importlib.util.find_spec(m) is not None for m in mods)


def _batch(size: int, n: int = 12) -> np.ndarray:
    from pipeline.detector.data import decode_rgb
    from pipeline.detector.model import resize_batch

    kinds = ["Reddisc", "Bluesquare", None]
    return resize_batch([decode_rgb(jpeg_bytes(scene(kinds[i % 3], 700 + i, size=110))) for i in range(n)], size)


def _keras_probs(ctx, version: str, x: np.ndarray) -> np.ndarray:
    from pipeline.detector.registry import load_model

    return load_model(ctx, version, precision="fp32", runtime="keras").predict_arrays(x)


CASES = [(fmt, "fp32") for fmt in FORMATS] + [(fmt, "auto") for fmt in FORMATS if fmt != "savedmodel"]


@pytest.mark.filterwarnings("error::FutureWarning")  # tf2onnx's NumPy notices reached users of `model export`
@pytest.mark.parametrize(("fmt", "precision"), CASES)
def test_export_load_and_score_reproduce_the_keras_classifier(make_ctx, install_model, fmt, precision):
    """fp32 exports compute the Keras classifier's function (to 1e-4); int8 ones load, score
    and stay calibrated; OpenVINO's (NNCF, in a child process) keeps >= 80% of the top classes
    of this tiny model, whose frozen random base separates classes by feature differences near
    an int8 step. The agreement on real photos is bench/detect.py's (BENCHMARKS.md)."""
    if not _have(*NEEDS[fmt]) or (fmt == "onnx" and precision == "fp32" and not _have("onnxruntime", "tf2onnx")):
        pytest.skip(f"{fmt} export needs {NEEDS[fmt]} (optional extra `runtimes`)")
    from pipeline.detector.export import export_model
    from pipeline.detector.runtimes import open_export

    ctx = make_ctx()
    version = install_model(ctx)
    meta = export_model(ctx, version, fmt, precision=precision, calibration_images=8)
    assert meta["key"] == export_key(meta["model_artifact"], fmt) and ctx.store.exists(meta["key"])
    assert meta["precision"] == ("int8" if precision == "auto" else "fp32")
    assert meta["calibration_images"] == (8 if meta["precision"] == "int8" else 0)  # the model's own training images

    exported = open_export(ctx.store.get(meta["key"]), threads=2, precision="fp32")
    x = _batch(meta["input_size"])
    got = exported.predict(x)
    want = _keras_probs(ctx, version, x)
    assert got.shape == want.shape == (len(x), len(meta["classes"]))
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-3)
    if meta["precision"] == "fp32":
        np.testing.assert_allclose(got, want, atol=1e-4)
    else:  # int8: valid probabilities that depend on the image
        assert np.isfinite(got).all() and (got >= 0).all()
        assert np.abs(got - got[:1]).max() > 0 or np.abs(want - want[:1]).max() < 1e-6
        if fmt == "openvino" and _have("nncf"):  # NNCF on the IR, in a child process of bounded size
            assert meta["quantizer"].startswith("nncf ")
            assert 0 < meta["quantize_peak_rss_bytes"] < 4 * 1024**3
            # the tiny model's near-uniform scores: 11 of 12 top classes kept when measured
            assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.8
    # a different batch size works too (the runtimes reshape)
    np.testing.assert_allclose(exported.predict(x[:3]), got[:3], atol=1e-5)


@pytest.mark.skipif(not _have("onnxruntime", "tf2onnx"), reason="needs onnxruntime + tf2onnx (extra `runtimes`)")
def test_detect_uses_the_export_and_falls_back_to_keras_when_its_runtime_is_missing(make_ctx, install_model, monkeypatch):
    from pipeline.detector.export import export_model
    from pipeline.detector.infer import detect
    from pipeline.detector.registry import get_version
    from pipeline.detector.runtimes import RuntimeUnavailable, choose_runtime
    from pipeline.schema import image_scores, runs

    ctx = make_ctx()
    version = install_model(ctx)
    kinds = ["Reddisc", "Bluesquare", None]
    store_images(ctx, [jpeg_bytes(scene(kinds[i % 3], 900 + i, size=120)) for i in range(6)])
    key = get_version(ctx, version)["artifact_key"]
    assert choose_runtime(ctx, key, "auto") == "keras"  # no export yet
    with pytest.raises(RuntimeUnavailable, match="no onnx export"):
        choose_runtime(ctx, key, "onnx")
    export_model(ctx, version, "onnx", calibration_images=8)
    monkeypatch.setitem(sys.modules, "openvino", None)  # as if OpenVINO were not installed
    assert choose_runtime(ctx, key, "auto") == "onnx"

    onnx_counts = detect(ctx, limit=3)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # now ONNX Runtime is missing too
    assert choose_runtime(ctx, key, "auto") == "keras"
    with pytest.raises(RuntimeUnavailable, match="onnxruntime"):
        choose_runtime(ctx, key, "onnx")
    keras_counts = detect(ctx)
    assert onnx_counts["scored"] == 3 and keras_counts["scored"] == 3
    with ctx.engine.connect() as conn:
        done = [r.counts for r in conn.execute(select(runs).where(runs.c.kind == "detect", runs.c.status == "succeeded")
                                               .order_by(runs.c.id))]
        scored = list(conn.execute(select(image_scores)))
    assert [c["runtime"] for c in done] == ["onnx", "keras"]
    assert done[0]["precision"] == "int8"
    assert len(scored) == 6 and all(r.status == "ok" and r.top_class for r in scored)


@pytest.mark.skipif(not _have("openvino", "onnxruntime", "tf2onnx"), reason="needs openvino + onnxruntime + tf2onnx")
def test_openvino_int8_without_nncf_falls_back_to_the_qdq_quantiser(make_ctx, install_model, monkeypatch):
    from pipeline.detector.export import ExportError, export_model
    from pipeline.detector.runtimes import open_export

    ctx = make_ctx()
    version = install_model(ctx)
    monkeypatch.setitem(sys.modules, "nncf", None)  # as if NNCF were not installed
    meta = export_model(ctx, version, "openvino", calibration_images=8)
    assert meta["precision"] == "int8" and meta["quantizer"].startswith("onnxruntime ") and "QDQ" in meta["quantizer"]
    x = _batch(meta["input_size"], n=6)
    got = open_export(ctx.store.get(meta["key"]), threads=2).predict(x)
    assert got.shape == (6, len(meta["classes"])) and np.allclose(got.sum(axis=1), 1.0, atol=1e-3)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # neither quantiser: a clear refusal
    with pytest.raises(ExportError, match="needs onnxruntime"):
        export_model(ctx, version, "openvino")


@pytest.mark.skipif(not _have("nncf", "openvino"), reason="needs nncf + openvino (extra `runtimes`)")
def test_the_quantisation_child_is_bounded_and_fails_with_one_clear_error(tmp_path):
    import openvino as ov
    import openvino.opset13 as ops

    from pipeline.detector.quantize import QuantizeError, quantize_ir

    image = ops.parameter([1, 8, 8, 3], ov.Type.u8, name="image")
    x = ops.transpose(ops.convert(image, "f32"), ops.constant(np.array([0, 3, 1, 2], np.int64)))
    conv = ops.convolution(x, ops.constant(np.random.default_rng(0).normal(size=(4, 3, 3, 3)).astype(np.float32)),
                           [1, 1], [0, 0], [0, 0], [1, 1])
    ov.save_model(ov.Model([ops.relu(conv)], [image]), str(tmp_path / "m.xml"), compress_to_fp16=False)
    xml, weights = (tmp_path / "m.xml").read_bytes(), (tmp_path / "m.bin").read_bytes()
    calib = np.random.default_rng(1).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)

    q_xml, q_bin, stats = quantize_ir(xml, weights, calib)
    assert stats["quantizer"].startswith("nncf ") and stats["calibration_images"] == 4
    assert 0 < stats["peak_rss_bytes"] < 4 * 1024**3  # the child's VmHWM, not this process's
    assert b"FakeQuantize" in q_xml and q_bin
    with pytest.raises(QuantizeError, match="int8 quantisation failed: .+"):  # its memory cap is real
        quantize_ir(xml, weights, calib, memory_bytes=64 * 1024**2)
    with pytest.raises(QuantizeError, match="int8 quantisation failed: .+"):
        quantize_ir(b"<not an IR/>", b"", calib)


def test_forcing_a_runtime_by_setting_and_bad_values(make_ctx, install_model, monkeypatch):
    from pipeline.detector.infer import detect
    from pipeline.detector.runtimes import RuntimeUnavailable, runtime_setting

    ctx = make_ctx()
    install_model(ctx)
    assert runtime_setting(ctx) == "auto"
    monkeypatch.setenv("BRANDMON_DETECT_RUNTIME", "tflite")
    assert runtime_setting(ctx) == "tflite"
    store_images(ctx, [jpeg_bytes(scene("Reddisc", 5, size=100))])
    with pytest.raises(RuntimeUnavailable, match="no tflite export"):  # forced, not silently Keras
        detect(ctx)
    monkeypatch.setenv("BRANDMON_DETECT_RUNTIME", "tensorrt")
    with pytest.raises(RuntimeUnavailable, match="must be one of"):
        runtime_setting(ctx)


def test_export_refuses_clearly(make_ctx, install_model, tmp_path):
    from pipeline.detector import registry
    from pipeline.detector.export import ExportError, export_model
    from pipeline.detector.registry import UnknownModel

    ctx = make_ctx()
    version = install_model(ctx)
    with pytest.raises(ExportError, match="fp32 only"):
        export_model(ctx, version, "savedmodel", precision="int8")
    with pytest.raises(ExportError, match="unknown export format"):
        export_model(ctx, version, "caffe")
    with pytest.raises(UnknownModel):
        export_model(ctx, "v99", "tflite")
    # training data gone: int8 needs calibration images, and says how to give them
    row = registry.get_version(ctx, version)
    from pipeline.schema import model_versions

    with ctx.engine.begin() as conn:
        conn.execute(model_versions.update().where(model_versions.c.version == version)
                     .values(params={**row["params"], "data": str(tmp_path / "gone")}))
    with pytest.raises(ExportError, match="--calibration DIR"):
        export_model(ctx, version, "tflite")
    assert set(RUNTIME_MODULES) == set(FORMATS)


@pytest.mark.skipif(not _have("nncf", "openvino"), reason="needs nncf + openvino (extra `runtimes`)")
def test_the_quantiser_uses_full_bias_correction_unless_asked_for_the_fast_one(tmp_path):
    """Full bias correction is the default (it kept more fp32 top classes on FL27,
    bench/results/cascade.txt); the fast one stays selectable, and the stats say which ran."""
    import openvino as ov
    import openvino.opset13 as ops

    from pipeline.detector.quantize import quantize_ir

    rng = np.random.default_rng(2)
    image = ops.parameter([1, 8, 8, 3], ov.Type.u8, name="image")
    x = ops.transpose(ops.convert(image, "f32"), ops.constant(np.array([0, 3, 1, 2], np.int64)))
    conv = ops.convolution(x, ops.constant(rng.normal(size=(4, 3, 3, 3)).astype(np.float32)), [1, 1], [0, 0], [0, 0], [1, 1])
    biased = ops.add(conv, ops.constant(rng.normal(size=(1, 4, 1, 1)).astype(np.float32)))
    ov.save_model(ov.Model([ops.relu(biased)], [image]), str(tmp_path / "m.xml"), compress_to_fp16=False)
    xml, weights = (tmp_path / "m.xml").read_bytes(), (tmp_path / "m.bin").read_bytes()
    calib = rng.integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)

    _, _, full = quantize_ir(xml, weights, calib)
    fast_xml, _, fast = quantize_ir(xml, weights, calib, fast_bias_correction=True)
    assert full["quantizer"].endswith(" full bias correction")
    assert fast["quantizer"].endswith(" fast bias correction")
    assert b"FakeQuantize" in fast_xml


@pytest.mark.skipif(not _have("nncf", "openvino"), reason="needs nncf + openvino (extra `runtimes`)")
def test_openvino_int8_rescores_its_near_ties_with_the_fp32_network(make_ctx, install_model, monkeypatch):
    """The default OpenVINO int8 export is the precision cascade: int8 where its top two
    classes are far apart, the fp32 network's own scores where they are close (margin chosen
    on training images, recorded with what it did there); `--rescore off` is int8 alone; detect
    records the re-scored count; a tampered margin is refused."""

    from pipeline.detector.export import export_model
    from pipeline.detector.infer import detect
    from pipeline.detector.rescore import margins
    from pipeline.schema import runs

    ctx = make_ctx()
    version = install_model(ctx)
    off = export_model(ctx, version, "openvino", calibration_images=8, rescore="off")
    x = _batch(off["input_size"], n=24)
    assert "rescore_margin" not in off
    meta_off, files_off = read_export(ctx.store.get(off["key"]))
    assert "rescore.xml" not in files_off
    int8 = open_export(ctx.store.get(off["key"]), threads=2)
    assert int8.precision == "int8"
    low = int8.predict(x)

    meta = export_model(ctx, version, "openvino", calibration_images=8)
    assert meta["rescore_margin"] >= 0 and meta["rescore_check_images"] > 0
    check = meta["rescore_check"]
    assert check["rescore_precision"] == "fp32" and 0 <= check["rescored_share"] <= 1
    assert check["network_time_vs_int8"] >= 1.0  # int8 on every photo, plus the share re-scored
    assert check["cascade_top_class_agreement"] >= max(0.99, check["int8_top_class_agreement"]) or \
        meta["rescore_check_images"] < 100  # >= 99% wherever 1% is at least one image
    exp = open_export(ctx.store.get(meta["key"]), threads=2)
    assert exp.precision == "int8+fp32"
    got = exp.predict(x)
    want = _keras_probs(ctx, version, x)
    close = margins(low) <= meta["rescore_margin"]
    np.testing.assert_allclose(got[~close], low[~close], atol=1e-6)  # int8 kept where it is sure
    np.testing.assert_allclose(got[close], want[close], atol=1e-4)  # fp32 where it is not
    assert exp.rescored == {"images": len(x), "rescored": int(close.sum())}

    kinds = ["Reddisc", "Bluesquare", None]
    store_images(ctx, [jpeg_bytes(scene(kinds[i % 3], 950 + i, size=120)) for i in range(5)])
    monkeypatch.setenv("BRANDMON_DETECT_RUNTIME", "openvino")
    assert detect(ctx)["scored"] == 5
    with ctx.engine.connect() as conn:
        done = conn.execute(select(runs.c.counts).where(runs.c.kind == "detect")).scalar_one()
    assert done["runtime"] == "openvino" and done["precision"] == "int8+fp32" and 0 <= done["rescored"] <= 5
    from pipeline.runlog import recent_runs
    from pipeline.status import format_status

    run = next(r for r in recent_runs(ctx.engine) if r["kind"] == "detect")  # the text report names them too
    status = format_status({"settings": {"database_url": "x", "storage_url": "y", "s3_endpoint_url": None,
                                         "config": None, "brands": [], "sources": []}, "problems": [], "recent_runs": [run]})
    assert f"openvino int8+fp32, 5 scored, {done['rescored']} re-scored in " in status

    # a margin of 1 re-scores every photo: only the real ones, not the padding of a short batch
    meta_on, files_on = read_export(ctx.store.get(meta["key"]))

    zipped = write_export

    from pipeline.detector import registry
    from pipeline.schema import detections, image_scores, review_queue

    ctx.store.put(meta["key"], zipped({**meta_on, "rescore_margin": 1.0}, files_on))
    registry._LOADED.clear()
    with ctx.engine.begin() as conn:
        for table in (detections, review_queue, image_scores):
            conn.execute(table.delete())
    counts = detect(ctx)
    assert counts["scored"] == 5 + 0 and counts["rescored"] == counts["images"]  # not the batch size
    assert all(isinstance(v, int) for v in counts.values())  # callers sum them

    # a tampered or damaged export: one clear error, never an internal one
    for bad in ("0.1", -1, float("nan"), float("inf"), 2.0, True):
        with pytest.raises(RuntimeUnavailable, match="rescore_margin"):
            open_export(zipped({**meta_on, "rescore_margin": bad}, files_on), threads=1)
    damaged = [
        ({k: v for k, v in files_on.items() if k != "rescore.bin"}, "no rescore.bin"),
        ({k: v for k, v in files_on.items() if k != "rescore.xml"}, "no rescore.xml"),
        ({**files_on, "rescore.xml": b"<not an IR"}, "damaged"),
        ({**files_on, "rescore.bin": files_on["rescore.bin"][:100]}, "damaged"),
        ({k: v for k, v in files_on.items() if k != "model.xml"}, "damaged"),
    ]
    for files, message in damaged:
        with pytest.raises(RuntimeUnavailable, match=message):
            open_export(zipped(meta_on, files), threads=1)
    with pytest.raises(RuntimeUnavailable, match="damaged"):
        open_export(zipped({**meta_on, "precision": "int4"}, files_on), threads=1)
    # export.json's precision must be the network's: an int8 IR called fp32 (or the fp32 IR
    # called int8) would run with the wrong settings and be logged with the wrong precision
    with pytest.raises(RuntimeUnavailable, match="says precision 'fp32' but its network is int8"):
        open_export(zipped({**meta_on, "precision": "fp32"}, files_on), threads=1)
    fp32_as_int8 = {"model.xml": files_on["rescore.xml"], "model.bin": files_on["rescore.bin"]}
    with pytest.raises(RuntimeUnavailable, match="says precision 'int8' but its network is not quantised"):
        open_export(zipped({k: v for k, v in meta_on.items() if k != "rescore_margin"}, fp32_as_int8), threads=1)
    # (run in fp32 here: with precision auto an fp32 export runs, and is logged, in bf16 on a bf16 CPU)
    assert open_export(zipped({**meta_on, "precision": "fp32", "rescore_margin": None}, fp32_as_int8),
                       threads=1, precision="fp32").precision == "fp32"
    for meta_json in ([1, 2], {k: v for k, v in meta_on.items() if k != "format"}):
        with pytest.raises(RuntimeUnavailable, match="damaged"):
            open_export(zipped(meta_json, files_on), threads=1)


@pytest.mark.skipif(not _have("nncf", "openvino"), reason="needs nncf + openvino (extra `runtimes`)")
def test_int8_export_refuses_too_few_calibration_images(make_ctx, install_model, tmp_path):
    from pipeline.detector.export import ExportError, export_model

    ctx = make_ctx()
    version = install_model(ctx)
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.jpg").write_bytes(jpeg_bytes(scene("Reddisc", 5)))
    with pytest.raises(ExportError, match="only 1 readable calibration image.*at least 8"):
        export_model(ctx, version, "openvino", calibration=one)
    for n in (0, -5, 7, True):
        with pytest.raises(ExportError, match="--calibration-images must be a whole number >= 8"):
            export_model(ctx, version, "openvino", calibration_images=n)


def _zip_with_header_patch(entries: dict[str, bytes], offsets: tuple[int, int], value: int, bit: bool) -> bytes:
    """A stored zip of `entries` whose local/central headers get `value` at (local, central)
    offsets: OR-ed in as flag bits when `bit`, else written (a compression method)."""
    import io
    import struct
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, blob in entries.items():
            zf.writestr(name, blob)
    data = bytearray(buf.getvalue())
    for sig, off in ((b"PK\x03\x04", offsets[0]), (b"PK\x01\x02", offsets[1])):
        i = data.find(sig)
        while i >= 0:
            old = struct.unpack("<H", data[i + off : i + off + 2])[0]
            data[i + off : i + off + 2] = struct.pack("<H", old | value if bit else value)
            i = data.find(sig, i + 4)
    return bytes(data)


def test_an_unreadable_export_zip_is_one_line_that_says_to_export_again():
    """Every way a zip can refuse (not a zip, an unsupported compression method, an encrypted
    entry, export.json that is not UTF-8 JSON, a format no runtime has) is a RuntimeUnavailable
    that says what to do: zipfile raises NotImplementedError / RuntimeError for the middle two,
    which reached the CLI as an internal error."""
    import json

    meta = {"export_format": 1, "format": "onnx", "precision": "int8", "classes": ["no_logo", "a"], "input_size": 32}
    entries = {"export.json": json.dumps(meta).encode(), "model.onnx": b"x" * 64}
    assert read_export(_zip_with_header_patch(entries, (8, 10), 0, bit=False))[0] == meta  # the patcher itself
    cases = {
        "empty": b"",
        "not a zip": b"PK\x03\x04 garbage",
        "method 99": _zip_with_header_patch(entries, (8, 10), 99, bit=False),
        "encrypted": _zip_with_header_patch(entries, (6, 8), 1, bit=True),
        "latin-1 json": write_export({}, {}).replace(b"{}", b"{\"format\": \"\xff\"}"),
    }
    for name, data in cases.items():
        with pytest.raises(RuntimeUnavailable, match=r"export it again with `brandmon model export`") as err:
            read_export(data)
        assert "\n" not in str(err.value), name
    with pytest.raises(RuntimeUnavailable, match=r"damaged \(unknown export format '1'\).*export it again"):
        open_export(write_export({**meta, "format": 1}, {}))


@pytest.mark.skipif(not _have("onnxruntime"), reason="needs onnxruntime (extra `runtimes`)")
def test_a_corrupt_onnx_file_or_a_tflite_int8_without_its_head_is_a_damaged_export():
    """ONNX Runtime's InvalidProtobuf is not a RuntimeError: a truncated model.onnx was an
    internal error. A TFLite int8 export without head.npz loaded as a features-only network and
    failed mid-run (`zip() argument 2 is longer than argument 1`)."""
    from pipeline.detector.runtimes import RuntimeUnavailable, open_export, write_export

    meta = {"export_format": 1, "precision": "int8", "classes": ["no_logo", "a"], "input_size": 32}
    with pytest.raises(RuntimeUnavailable, match=r"damaged \(InvalidProtobuf.*export it again"):
        open_export(write_export({**meta, "format": "onnx"}, {"model.onnx": b"\x08\x07garbage"}))
    with pytest.raises(RuntimeUnavailable, match="needs its head.npz; export it again"):
        open_export(write_export({**meta, "format": "tflite"}, {"model.tflite": b"TFL3"}))


def test_an_export_that_is_not_this_models_is_refused_before_scoring(make_ctx, install_model):
    """export.json's classes, input size, format and artifact must be the model's: an edited or
    swapped export would map the network's columns to the wrong classes (or fail mid-run). The
    network's own output width is checked on every batch too."""
    from pipeline.detector import registry
    from pipeline.detector.export import export_model
    from pipeline.detector.registry import get_version, load_model

    ctx = make_ctx()
    version = install_model(ctx)
    meta = export_model(ctx, version, "tflite", precision="fp32")
    key, artifact = meta["key"], get_version(ctx, version)["artifact_key"]
    good, files = read_export(ctx.store.get(key))
    assert load_model(ctx, version, runtime="tflite").runtime == "tflite"  # as exported: accepted
    tampered = {
        "classes": {**good, "classes": list(reversed(good["classes"]))},
        "input size": {**good, "input_size": good["input_size"] + 32},
        "another model artifact": {**good, "model_artifact": "models/artifacts/other.zip"},
    }
    for reason, bad in tampered.items():
        ctx.store.put(key, write_export(bad, files))
        registry._LOADED.clear()  # a fresh load, not the accepted one cached above
        with pytest.raises(RuntimeUnavailable, match=f"does not match this model.*{reason}.*export it again.*"
                                                     f"model export {version} --format tflite"):
            load_model(ctx, version, runtime="tflite")
    assert artifact == good["model_artifact"]
    # one class more in export.json than the network has columns: refused on the first batch
    wide = open_export(write_export({**good, "classes": [*good["classes"], "extra"]}, files))
    with pytest.raises(RuntimeUnavailable, match=r"outputs shape \(2, \d+\), not one probability per class"):
        wide.predict(_batch(good["input_size"], n=2))


def test_a_damaged_export_under_auto_falls_back_to_keras_with_a_warning(make_ctx, install_model, monkeypatch, caplog):
    """`detector.runtime: auto` picks the fastest export; when that export cannot be used (damaged,
    foreign) the nightly run must go on: Keras scores, the run log says `keras`, a warning says
    to export again. A runtime the user forced still fails with the reason."""
    import logging

    from pipeline.detector import registry
    from pipeline.detector.export import export_model
    from pipeline.detector.infer import detect
    from pipeline.detector.runtimes import RuntimeUnavailable
    from pipeline.schema import runs

    ctx = make_ctx()
    version = install_model(ctx)
    meta = export_model(ctx, version, "tflite", precision="fp32")
    ctx.store.put(meta["key"], b"PK\x03\x04 not really a zip")
    registry._LOADED.clear()
    kinds = ["Reddisc", "Bluesquare", None]
    store_images(ctx, [jpeg_bytes(scene(kinds[i % 3], 1700 + i, size=120)) for i in range(4)])
    monkeypatch.delenv("BRANDMON_DETECT_RUNTIME", raising=False)
    with caplog.at_level(logging.WARNING, logger="pipeline.detector.registry"):
        assert detect(ctx, limit=2, runtime="auto")["scored"] == 2
    warned = [r.getMessage() for r in caplog.records if "export cannot be used" in r.getMessage()]
    assert warned and f"brandmon model export {version} --format tflite" in warned[0] and "scoring with Keras" in warned[0]
    with ctx.engine.connect() as conn:
        done = conn.execute(select(runs.c.counts).where(runs.c.kind == "detect")).scalar_one()
    assert done["runtime"] == "keras" and done["scored"] == 2
    with pytest.raises(RuntimeUnavailable, match="not a brandmon model export"):
        detect(ctx, runtime="tflite")
    with pytest.raises(RuntimeUnavailable, match=f"model export {version} --format onnx"):  # names the version
        detect(ctx, runtime="onnx")


def test_calibration_images_are_resized_as_they_are_decoded_and_an_empty_folder_says_what_to_do(
        make_ctx, install_model, tmp_path):
    """The calibration batch held every decoded photo at full size until the end (320 phone
    photos of 12 MP: 11 GB); now each is resized at once, with the same result."""
    from pipeline.detector.data import decode_rgb
    from pipeline.detector.export import ExportError, calibration_batch
    from pipeline.detector.model import resize_batch
    from pipeline.detector.registry import get_version

    ctx = make_ctx()
    row = get_version(ctx, install_model(ctx))
    folder = tmp_path / "cal"
    folder.mkdir()
    blobs = [jpeg_bytes(scene(["Reddisc", None][i % 2], 40 + i, size=160 + 20 * i)) for i in range(5)]
    for i, blob in enumerate(blobs):
        (folder / f"{i}.jpg").write_bytes(blob)
    (folder / "broken.jpg").write_bytes(b"not a jpeg")
    got = calibration_batch(ctx, row, 48, limit=4, folder=folder)
    assert got.shape == (4, 48, 48, 3) and got.dtype == np.uint8
    # a folder is walked in name order (0.jpg .. 4.jpg, then broken.jpg), read only until 4 are in
    want = resize_batch([decode_rgb(b) for b in blobs[:4]], 48)
    np.testing.assert_array_equal(got, want)
    assert len(calibration_batch(ctx, row, 48, limit=8, folder=folder)) == 5  # the broken one skipped
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExportError, match=r"no readable calibration images in .*empty .*--calibration DIR.*--precision fp32"):
        calibration_batch(ctx, row, 48, folder=tmp_path / "empty")


def test_a_calibration_folder_is_read_lazily_and_each_file_is_bounded(make_ctx, install_model, tmp_path, monkeypatch,
                                                                      caplog):
    """`--calibration DIR` read and hashed every file under DIR in full before choosing N: a huge
    folder (or one huge file) was unbounded. Now files are taken in name order until N are in,
    and a file above the size bound is skipped with a warning, never read."""
    import logging
    from pathlib import Path

    from pipeline.detector import export
    from pipeline.detector.registry import get_version

    ctx = make_ctx()
    row = get_version(ctx, install_model(ctx))
    folder = tmp_path / "cal"
    (folder / "a").mkdir(parents=True)
    (folder / "b").mkdir()
    for i in range(3):
        (folder / "a" / f"{i}.jpg").write_bytes(jpeg_bytes(scene("Reddisc", 60 + i, size=120)))
    (folder / "a" / "0_huge.jpg").write_bytes(b"\xff" * 200_000)
    read: list[str] = []
    real_read = Path.read_bytes

    def counting(self: Path) -> bytes:
        read.append(self.name)
        return real_read(self)

    monkeypatch.setattr(export, "MAX_CALIBRATION_FILE_BYTES", 100_000)
    monkeypatch.setattr(Path, "read_bytes", counting)
    for i in range(50):  # many more files further on: never opened
        (folder / "b" / f"{i}.jpg").write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="pipeline.detector.export"):
        got = export.calibration_batch(ctx, row, 32, limit=2, folder=folder)
    assert got.shape == (2, 32, 32, 3)
    assert read == ["0.jpg", "1.jpg"]  # in name order, the huge one skipped unread, folder b not touched
    assert any("0_huge.jpg" in r.getMessage() and "more than 100000" in r.getMessage() for r in caplog.records)


def test_calibration_images_have_an_upper_bound(make_ctx, install_model, capsys):
    """They are held in memory resized (N x size^2 x 3 bytes): `--calibration-images 100000`
    over a large folder took 27 GB at 299 px before anything was quantised."""
    from pipeline.cli import main
    from pipeline.detector.export import MAX_CALIBRATION_IMAGES, ExportError, export_model

    ctx = make_ctx()
    version = install_model(ctx)
    with pytest.raises(ExportError, match=r">= 8 \(at most 4096: they are held in memory\), not 4097"):
        export_model(ctx, version, "tflite", calibration_images=MAX_CALIBRATION_IMAGES + 1)
    with pytest.raises(SystemExit) as exc:
        main(["model", "export", version, "--format", "tflite", "--calibration-images", "100000"])
    assert exc.value.code == 2 and "must be from 8 to 4096" in capsys.readouterr().err


@pytest.mark.skipif(not _have("openvino"), reason="needs openvino (extra `runtimes`)")
def test_an_fp32_openvino_export_run_in_bf16_is_recorded_as_bf16(make_ctx, install_model):
    """OpenVINO runs an fp32 export with the bf16 hint where detect's precision is bf16 (as Keras
    does); the run log recorded `fp32` for it while Keras's run said `bf16`."""
    from pipeline.detector.export import export_model
    from pipeline.detector.model import choose_precision
    from pipeline.detector.runtimes import open_export

    ctx = make_ctx()
    meta = export_model(ctx, install_model(ctx), "openvino", precision="fp32")
    data = ctx.store.get(meta["key"])
    assert open_export(data, threads=1, precision="fp32").precision == "fp32"
    assert open_export(data, threads=1, precision="bf16").precision == choose_precision("bf16") == "bf16"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_quantisation_child_ends_with_its_parent_and_removes_its_folder(tmp_path):
    """A SIGTERM to `brandmon model export` (an Airflow timeout, `kill`) left the NNCF child
    quantising as an orphan for up to an hour, and its folder (~100 MB) in /tmp."""
    import subprocess
    import time
    from pathlib import Path

    from pipeline.settings import child_env

    root = str(Path(__file__).resolve().parents[2])
    env = child_env(root)
    # a parent that is already gone: the child sees it at once
    folder = tmp_path / "orphan"
    folder.mkdir()
    (folder / "model.xml").write_bytes(b"x")
    done = subprocess.run([sys.executable, "-m", "pipeline.detector.quantize", str(folder), "0", "1"], env=env,
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 128 + 15 and not folder.exists()
    # a parent killed while the child runs: the child gets SIGTERM, cleans up and ends
    folder = tmp_path / "killed"
    folder.mkdir()
    (folder / "model.xml").write_bytes(b"x")
    spawn = ("import subprocess, sys, os, time; p = subprocess.Popen([sys.executable, '-m', "
             f"'pipeline.detector.quantize', {str(folder)!r}, '0', str(os.getpid())]); print(p.pid, flush=True); "
             "time.sleep(600)")
    parent = subprocess.Popen([sys.executable, "-c", spawn], env=env, stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    parent.kill()
    parent.wait(timeout=30)

    def running() -> bool:  # a zombie (reaped later by whoever adopted it) has ended
        try:
            return Path(f"/proc/{child}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and running():
        time.sleep(0.2)
    assert not running() and not folder.exists()
