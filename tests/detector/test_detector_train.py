"""Training end to end on tiny generated data (weights=none, 75 px, frozen random base)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from detector_helpers import FAST, argmax_recall, make_boxes, make_folders
from sqlalchemy import func, select

from pipeline.detector.evaluate import evaluate_folder
from pipeline.detector.jobs import active_model, train_model
from pipeline.detector.registry import activate, list_versions
from pipeline.schema import feature_cache

pytestmark = pytest.mark.integration


def test_training_beats_chance_and_registers_an_active_model(make_ctx, tmp_path: Path):
    ctx = make_ctx()
    data = make_folders(tmp_path / "train", {"Reddisc": 30, "Bluesquare": 30, "no_logo": 30}, seed=1)
    result = train_model(ctx, data, fmt="folders", weights="none", target_precision=0.8, progress=False, **FAST)
    assert result["activated"]
    model = active_model(ctx)
    assert model["version"] == result["version"] == "v1"
    assert model["classes"] == ["no_logo", "Bluesquare", "Reddisc"]
    assert 0 < model["threshold"] < 1
    assert {"precision", "recall", "f1", "brand_accuracy"} <= set(model["metrics"])
    # the held-out split was written out as folders, and a PR curve as PNG
    eval_dir = Path(result["eval_dir"])
    assert {p.name for p in eval_dir.iterdir()} <= {"Reddisc", "Bluesquare", "no_logo"}
    assert Path(result["pr_curve"]).read_bytes()[:4] == b"\x89PNG"
    assert ctx.store.exists(f"models/{result['version']}/pr_curve.png")
    # TensorBoard event files of the run, with the per-epoch loss
    events = list(Path(result["params"]["tensorboard"]).rglob("events.out.tfevents.*"))
    assert events and any(b"epoch_loss" in e.read_bytes() for e in events)

    # unseen images (other seeds): far better than the 1/3 of chance
    unseen = make_folders(tmp_path / "unseen", {"REDDISC": 15, "bluesquare": 15, "No_Logo": 15}, seed=99)
    report = evaluate_folder(ctx, unseen)
    json.dumps(report)  # JSON-ready
    assert {"n_images", "logo", "brand_accuracy", "per_class"} <= set(report)
    assert {"precision", "recall", "f1"} <= set(report["logo"])
    assert report["n_images"] == 45
    assert report["unknown_classes"] == []  # class names matched case-insensitively
    assert report["accuracy"] >= 0.7, report
    assert report["brand_accuracy"] >= 0.8, report
    assert set(report["per_class"]) >= {"Reddisc", "Bluesquare", "no_logo"}


def test_upsampling_raises_minority_recall_and_retraining_hits_the_cache(make_ctx, tmp_path: Path):
    ctx = make_ctx()
    data = make_folders(tmp_path / "train", {"Reddisc": 60, "Bluesquare": 3, "no_logo": 60}, seed=2)
    unseen = make_folders(tmp_path / "unseen", {"Reddisc": 20, "Bluesquare": 20, "no_logo": 20}, seed=98)
    opts = {**FAST, "head_epochs": 6, "learning_rate": 2e-4}
    plain = train_model(ctx, data, weights="none", activate="always", progress=False, **{**opts, "upsample": 0.0})
    cache = plain["params"]["feature_cache"]
    assert cache["hits"] == 0 and cache["misses"] > 0
    with ctx.engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(feature_cache)).scalar_one()
    assert rows == cache["misses"]
    recall_plain = argmax_recall(ctx, unseen, "Bluesquare", plain["version"])

    balanced = train_model(ctx, data, weights="none", activate="always", progress=False, **{**opts, "upsample": 1.0})
    # same base weights, input size and images: every feature comes from the cache
    assert balanced["params"]["feature_cache"] == {"hits": cache["misses"], "misses": 0}
    counts = balanced["params"]["class_counts"]
    assert counts["before"]["Bluesquare"] <= 3 and counts["after"]["Bluesquare"] == counts["after"]["Reddisc"]
    recall_balanced = argmax_recall(ctx, unseen, "Bluesquare", balanced["version"])
    assert recall_balanced > recall_plain + 0.15, (recall_plain, recall_balanced)


def test_registry_activation(make_ctx, tmp_path: Path):
    ctx = make_ctx()
    data = make_folders(tmp_path / "train", {"Reddisc": 12, "no_logo": 12}, seed=3)
    opts = {**FAST, "head_epochs": 3}
    v1 = train_model(ctx, data, weights="none", activate="never", progress=False, **opts)
    assert not v1["activated"] and active_model(ctx) is None
    v2 = train_model(ctx, data, weights="none", activate="always", progress=False, **opts)
    assert v2["activated"] and active_model(ctx)["version"] == "v2"
    activate(ctx, "v1")
    rows = list_versions(ctx)
    assert [r["version"] for r in rows] == ["v1", "v2"]
    assert [r["active"] for r in rows] == [True, False]  # exactly one active
    assert rows[0]["weights"] == "none" and rows[0]["base"] == "inception_v3"
    assert rows[0]["data_fingerprint"] == rows[1]["data_fingerprint"]
    assert ctx.store.exists(rows[0]["artifact_key"])


def test_boxes_training_with_matcher_reports_each_signal(make_ctx, tmp_path: Path):
    ctx = make_ctx()
    data = make_boxes(tmp_path / "boxes", 40, style="fl27")
    result = train_model(ctx, data, fmt="boxes", weights="none", progress=False, **{**FAST, "matcher": "auto"})
    m = result["metrics"]
    assert set(m["per_signal_test"]) == {"cnn", "matcher", "fused"}
    assert m["signal"] == "fused"
    assert result["params"]["matcher"]["references"] > 0
    counts = result["params"]["class_counts"]["before"]
    assert counts["no_logo"] > 0 and counts["Reddisc"] > 0  # regions away from boxes became negatives


def test_augmentation_bypasses_the_feature_cache_and_says_so(make_ctx, tmp_path: Path, capsys):
    ctx = make_ctx()
    data = make_folders(tmp_path / "train", {"Reddisc": 10, "no_logo": 10}, seed=4)
    result = train_model(ctx, data, weights="none", progress=True, **{**FAST, "head_epochs": 2, "augment": True})
    assert "augmentation is on: the feature cache is bypassed" in capsys.readouterr().err
    assert result["params"]["feature_cache"] is None
    assert result["params"]["history"]["head"]["epochs"] == 2
    with ctx.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(feature_cache)).scalar_one() == 0
