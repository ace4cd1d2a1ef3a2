"""`brandmon detect` on stored images: rows, idempotence, corrupt images, review loop."""

from __future__ import annotations

import csv
import datetime as dt
from pathlib import Path

import numpy as np
import pytest
from detector_helpers import jpeg_bytes, scene, store_images
from sqlalchemy import select

from pipeline.dag_assets import parse_batch_key
from pipeline.detector.jobs import detect_pending, pending_batches
from pipeline.detector.review import export_queue, import_labels
from pipeline.dirty import pending_days
from pipeline.schema import detections, image_scores, review_queue

pytestmark = pytest.mark.integration


def _blobs(n: int, seed: int = 0) -> list[bytes]:
    kinds = ["Reddisc", "Bluesquare", None]
    return [jpeg_bytes(scene(kinds[i % 3], 10_000 + seed * 100 + i, size=120 + 7 * (i % 4))) for i in range(n)]


def test_detect_writes_rows_is_idempotent_and_survives_corrupt_images(make_ctx, install_model, backend):
    ctx = make_ctx(backend=backend)
    version = install_model(ctx)
    good = _blobs(9)
    truncated = good[0][: len(good[0]) // 3]
    shas = store_images(ctx, [*good[:5], b"definitely not an image", truncated, *good[5:]])
    bad = {shas[5], shas[6]}

    keys = pending_batches(ctx, batch_size=4)
    assert len(keys) == 3 and all(parse_batch_key(k)[0] == version for k in keys)
    assert all(len(k) < 200 for k in keys)  # XCom-sized
    totals: dict[str, int] = {}
    for key in keys:
        for k, v in detect_pending(ctx, batch_key=key).items():
            totals[k] = totals.get(k, 0) + v
    assert totals["images"] == 11 and totals["corrupt"] == 2 and totals["scored"] == 9

    with ctx.engine.connect() as conn:
        scores = {r.image_sha256: r for r in conn.execute(select(image_scores))}
        dets = list(conn.execute(select(detections)))
    assert set(scores) == set(shas)
    for sha in bad:
        assert scores[sha].status == "corrupt" and scores[sha].reason
    assert all(scores[s].status == "ok" and scores[s].top_class for s in shas if s not in bad)
    assert dets and all(d.model_version == version for d in dets)
    assert all(d.score >= ctx.settings.detector.score_floor for d in dets)
    # the red discs among the good images are found as Reddisc
    red = [shas[i] for i in (0, 3)]
    assert all(scores[s].top_class == "Reddisc" for s in red), [scores[s].top_class for s in red]
    with ctx.engine.connect() as conn:
        assert dt.date(2026, 10, 3) in pending_days(conn)  # posting days marked for re-aggregation

    # idempotent: nothing left to score, nothing rewritten
    assert pending_batches(ctx) == []
    again = detect_pending(ctx)
    assert again["images"] == 0
    with ctx.engine.connect() as conn:
        assert len(list(conn.execute(select(detections)))) == len(dets)


def test_review_queue_export_and_import(make_ctx, install_model, tmp_path: Path):
    ctx = make_ctx()
    install_model(ctx, threshold=0.5)
    # a margin of 1 sends every image to the review queue
    ctx.settings = ctx.settings.with_overrides(detector=ctx.settings.detector.__class__(review_margin=1.0))
    shas = store_images(ctx, _blobs(4, seed=1))
    counts = detect_pending(ctx)
    assert counts["review"] == 4
    out = tmp_path / "review"
    first = export_queue(ctx, out)
    assert first["queued"] == 4 and first["written"] == 4
    assert sorted(p.stem for p in (out / "images").iterdir()) == sorted(shas)
    # the labeller: one image via the manifest's label column, another moved into a class folder
    with (out / "manifest.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    rows[0]["label"] = "Reddisc"
    with (out / "manifest.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out / "images" / rows[1]["file"]).rename(out / "no_logo" / rows[1]["file"])
    result = import_labels(ctx, out, into=tmp_path / "training")
    assert result["labelled"] == 2 and result["unlabelled"] == 2
    assert len(list((tmp_path / "training" / "Reddisc").iterdir())) == 1
    assert len(list((tmp_path / "training" / "no_logo").iterdir())) == 1
    with ctx.engine.connect() as conn:
        statuses = sorted(r.status for r in conn.execute(select(review_queue)))
    assert statuses == ["exported", "exported", "labelled", "labelled"]
    # re-running both changes nothing
    assert export_queue(ctx, out)["written"] == 0
    assert import_labels(ctx, out, into=tmp_path / "training")["copied"] == 0


def test_detect_records_its_precision_and_reuses_the_traced_classifier(make_ctx, install_model):
    from pipeline.detector.infer import detect
    from pipeline.detector.model import choose_precision
    from pipeline.detector.registry import load_model
    from pipeline.schema import runs

    ctx = make_ctx()
    version = install_model(ctx)
    shas = store_images(ctx, _blobs(6, seed=2))
    first = detect(ctx, limit=3)
    second = detect(ctx)
    assert first["scored"] + second["scored"] == len(shas)
    with ctx.engine.connect() as conn:
        done = [r.counts for r in conn.execute(select(runs).where(runs.c.kind == "detect", runs.c.status == "succeeded"))]
    # bf16 on this CPU (AMX / AVX512-BF16), fp32 elsewhere: the run log says which was used
    assert [c["precision"] for c in done] == [choose_precision("auto")] * 2
    model = load_model(ctx, version, precision=choose_precision("auto"))
    # one trace for both runs: the second run did not pay for tracing Inception v3 again
    assert model.traced_classifier().experimental_get_tracing_count() == 1


def test_a_failed_batch_commit_stops_the_run_and_the_rerun_completes(make_ctx, install_model, monkeypatch):
    """Commits run on a background thread; a failure there must still fail the run, keep the
    batches committed before it, and leave the rest for the re-run."""
    from pipeline.detector import infer

    ctx = make_ctx()
    install_model(ctx)
    shas = store_images(ctx, _blobs(10, seed=3))
    real = infer.write_batch
    calls = []

    def flaky(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("database went away")
        return real(*args, **kwargs)

    monkeypatch.setattr(infer, "write_batch", flaky)
    with pytest.raises(RuntimeError, match="database went away"):
        infer.detect(ctx, batch_size=4)
    with ctx.engine.connect() as conn:
        assert len(list(conn.execute(select(image_scores)))) == 4  # the first batch only
    monkeypatch.setattr(infer, "write_batch", real)
    assert infer.detect(ctx, batch_size=4)["scored"] == 6
    with ctx.engine.connect() as conn:
        assert {r.image_sha256 for r in conn.execute(select(image_scores))} == set(shas)


def test_review_export_skips_an_image_missing_from_the_lake(make_ctx, install_model, tmp_path: Path, caplog):
    ctx = make_ctx()
    install_model(ctx, threshold=0.5)
    ctx.settings = ctx.settings.with_overrides(detector=ctx.settings.detector.__class__(review_margin=1.0))
    shas = store_images(ctx, _blobs(3, seed=4))
    detect_pending(ctx)
    gone = sorted(shas)[0]
    ctx.store.delete(f"images/sha256/{gone[:2]}/{gone[2:4]}/{gone}")
    out = tmp_path / "review"
    result = export_queue(ctx, out)
    assert result["written"] == 2 and result["missing"] == 1
    assert gone[:12] in caplog.text
    with ctx.engine.connect() as conn:
        status = {r.image_sha256: r.status for r in conn.execute(select(review_queue))}
    assert status[gone] == "pending" and sorted(v for k, v in status.items() if k != gone) == ["exported"] * 2
    with (out / "manifest.csv").open(newline="") as fh:
        assert gone not in {row["sha256"] for row in csv.DictReader(fh)}


def test_the_detect_stream_runs_without_the_autotuner_and_delivers_every_image():
    """With tf.data autotuning on, the end of a from_generator stream waited for the autotuner's
    next wake-up (10 ms, then doubling: 5.1, 10.2, 20.5 s), so a detect run's wall time was
    rounded up to that tick (bench/detect.py: 2016 images in 7.1 s or 10.3 s). The stream turns
    it off and fixes its parallelism instead; it must still deliver every image, in order."""
    from types import SimpleNamespace

    from pipeline.detector.infer import decode_parallelism, image_stream

    blobs = _blobs(7)
    store = {f"k{i}": b for i, b in enumerate(blobs)}
    ctx = SimpleNamespace(store=SimpleNamespace(get=store.__getitem__))
    rows = [SimpleNamespace(storage_key=f"k{i}", width=None, height=None) for i in range(len(blobs))]
    ds = image_stream(ctx, rows, 64, 3, with_view=False)
    assert ds.options().autotune.enabled is False
    assert decode_parallelism() >= 2
    batches = [(b[0].numpy().tolist(), tuple(b[1].shape)) for b in ds]
    assert [i for idx, _ in batches for i in idx] == list(range(7))
    assert [shape for _, shape in batches] == [(3, 64, 64, 3), (3, 64, 64, 3), (1, 64, 64, 3)]


def test_the_keras_scorer_pads_short_batches_to_one_traced_shape(make_ctx, install_model):
    """Short batches (a run's last) are padded inside the Keras scorer, so every batch runs the
    same traced graph, and only the real rows come back."""
    from pipeline.detector.data import decode_rgb
    from pipeline.detector.model import resize_batch
    from pipeline.detector.registry import load_model

    ctx = make_ctx()
    version = install_model(ctx)
    model = load_model(ctx, version, precision="fp32", with_matcher=False)

    x = resize_batch([decode_rgb(b) for b in _blobs(5, seed=4)], model.spec.input_size)
    score = model.scorer(pad_to=8)
    before = model.traced_classifier().experimental_get_tracing_count()
    three, five = score(x[:3]), score(x)
    assert three.shape == (3, len(model.spec.classes)) and five.shape == (5, len(model.spec.classes))
    assert model.traced_classifier().experimental_get_tracing_count() - before <= 1  # one shape: (8, s, s, 3)
    np.testing.assert_allclose(three, five[:3], atol=1e-5)
    np.testing.assert_allclose(five, model.predict_arrays(x), atol=1e-4)
