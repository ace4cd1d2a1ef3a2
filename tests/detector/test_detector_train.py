"""Training end to end on tiny generated data (weights=none, 75 px, frozen random base)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
from detector_helpers import FAST, argmax_recall, make_boxes, make_folders
from sqlalchemy import func, select

from pipeline.detector.evaluate import evaluate_folder
from pipeline.detector.jobs import active_model, train_model
from pipeline.detector.registry import activate, list_versions
from pipeline.progress import terminal
from pipeline.schema import feature_cache

pytestmark = pytest.mark.integration


def test_training_beats_chance_and_registers_an_active_model(make_ctx, tmp_path: Path):
    ctx = make_ctx()
    data = make_folders(tmp_path / "train", {"Reddisc": 30, "Bluesquare": 30, "no_logo": 30}, seed=1)
    result = train_model(ctx, data, fmt="folders", weights="none", target_precision=0.8, **FAST)
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
    # the per-photo val/test scores the thresholds were chosen from, and intervals with counts
    with np.load(result["scores"], allow_pickle=False) as z:
        assert len(z["test/labels"]) == result["metrics"]["n_test"] and z["test/fused" if "test/fused" in z else "test/cnn"].shape[1] == 2
    assert ctx.store.exists(f"models/{result['version']}/scores.npz")
    iv = result["metrics"]["intervals"]["logo_precision"]
    assert iv["low"] <= result["metrics"]["precision"] <= iv["high"] and iv["n"] > 0
    assert result["metrics"]["thresholds"]["cnn"]["rule"] == "wilson"
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
    assert report["intervals"]["logo_recall"]["n"] == 30 and report["signals"]["cnn"]["intervals"]
    assert report["unknown_classes"] == []  # class names matched case-insensitively
    assert report["accuracy"] >= 0.7, report
    assert report["brand_accuracy"] >= 0.8, report
    assert set(report["per_class"]) >= {"Reddisc", "Bluesquare", "no_logo"}


def test_upsampling_raises_minority_recall_and_retraining_hits_the_cache(make_ctx, tmp_path: Path):
    ctx = make_ctx()
    data = make_folders(tmp_path / "train", {"Reddisc": 60, "Bluesquare": 3, "no_logo": 60}, seed=2)
    unseen = make_folders(tmp_path / "unseen", {"Reddisc": 20, "Bluesquare": 20, "no_logo": 20}, seed=98)
    opts = {**FAST, "head_epochs": 6, "learning_rate": 2e-4}
    plain = train_model(ctx, data, weights="none", activate="always", **{**opts, "upsample": 0.0})
    cache = plain["params"]["feature_cache"]
    assert cache["hits"] == 0 and cache["misses"] > 0
    with ctx.engine.connect() as conn:
        rows = conn.execute(select(func.count()).select_from(feature_cache)).scalar_one()
    assert rows == cache["misses"]
    recall_plain = argmax_recall(ctx, unseen, "Bluesquare", plain["version"])

    balanced = train_model(ctx, data, weights="none", activate="always", **{**opts, "upsample": 1.0})
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
    v1 = train_model(ctx, data, weights="none", activate="never", **opts)
    assert not v1["activated"] and active_model(ctx) is None
    v2 = train_model(ctx, data, weights="none", activate="always", **opts)
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
    result = train_model(ctx, data, fmt="boxes", weights="none", **{**FAST, "matcher": "auto"})
    m = result["metrics"]
    assert set(m["per_signal_test"]) == {"cnn", "matcher", "fused"}
    assert m["signal"] == "fused"
    assert result["params"]["matcher"]["references"] > 0
    # the fusion was chosen on val (fitted, or the matcher alone), and decides with its own threshold
    chosen = m["fusion"]["chosen"]
    assert chosen in {"fitted", "matcher_only"} and set(m["fusion"]["candidates"]) == {"fitted", "matcher_only"}
    assert m["fusion"]["candidates"][chosen]["threshold"] == m["thresholds"]["fused"]["threshold"]
    counts = result["params"]["class_counts"]["before"]
    assert counts["no_logo"] > 0 and counts["Reddisc"] > 0  # regions away from boxes became negatives


def test_augmentation_bypasses_the_feature_cache_and_says_so(make_ctx, tmp_path: Path, capsys):
    ctx = make_ctx()
    data = make_folders(tmp_path / "train", {"Reddisc": 10, "no_logo": 10}, seed=4)
    result = train_model(ctx, data, weights="none", progress=terminal, **{**FAST, "head_epochs": 2, "augment": True})
    assert "augmentation is on: the feature cache is bypassed" in capsys.readouterr().err
    assert result["params"]["feature_cache"] is None
    assert result["params"]["history"]["head"]["epochs"] == 2
    with ctx.engine.connect() as conn:
        assert conn.execute(select(func.count()).select_from(feature_cache)).scalar_one() == 0


def test_full_training_stops_at_its_time_budget_and_recalibrates_batchnorm(make_ctx, tmp_path: Path, caplog):
    """The default offline path (whole network from scratch, augmentation, time budget)."""
    ctx = make_ctx()
    data = make_folders(tmp_path / "train", {"Reddisc": 16, "no_logo": 16}, seed=6)
    opts = {**FAST, "mode": "full", "epochs": 500, "time_budget_s": 3.0, "bn_momentum": 0.9}
    with caplog.at_level(logging.WARNING, logger="pipeline.detector.train"):
        result = train_model(ctx, data, weights="none", activate="always", **opts)
    full = result["params"]["history"]["full"]
    per_epoch = 2  # 32 samples, batches of 16
    assert full["stopped_by_time_budget"] and 1 <= full["steps"] < full["steps_planned"] == 500 * per_epoch
    assert full["epochs"] == full["steps"] // per_epoch < 500  # complete epochs only
    assert full["batchnorm_recalibration_batches"] >= 1
    # the model's metrics say how much training it got, and that the budget cut it short
    training = active_model(ctx)["metrics"]["training"]
    assert training["cut_by_time_budget"] and training["cut_stages"] == ["full"]
    assert training["time_budget_s"] == 3.0 and not training["deterministic"]
    assert training["stages"]["full"] == {k: full[k] for k in ("epochs", "epochs_planned", "steps", "steps_planned")}
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "time budget" in r.getMessage()]
    assert len(warnings) == 1
    assert f"full stopped after {full['steps']} of 1000 steps" in warnings[0].getMessage()
    assert result["params"]["feature_cache"] is None  # the base itself learns: no cache
    assert result["params"]["config"]["augment"] is True  # on by default from scratch
    assert active_model(ctx)["version"] == result["version"]


def test_finetune_unfreezes_only_the_top_blocks_and_keeps_batchnorm_in_inference_mode(tmp_path: Path):
    """keras-io recipe: the top N Inception blocks train, BatchNorm statistics stay frozen."""
    import keras

    from pipeline.detector.model import batchnorm_layers, build_network, set_trainable
    from pipeline.detector.training.config import TrainConfig
    from pipeline.detector.training.fit import train_images

    net = build_network(2, 75)
    set_trainable(net, "finetune:2")
    names = [layer.name for layer in net.base.layers]
    cut = names.index("mixed8")  # the third-last block end: mixed9 and mixed10 train
    trainable = [layer.name for layer in net.base.layers if layer.trainable and layer.weights]
    assert trainable and all(names.index(n) > cut for n in trainable)
    assert all(not layer.trainable for layer in net.base.layers[: cut + 1])
    top_bn = [b for b in batchnorm_layers(net) if names.index(b.name) > cut]
    before = [np.array(b.moving_mean) for b in top_bn]
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (16, 75, 75, 3), dtype=np.uint8)
    y = np.array([0, 1] * 8)
    cfg = TrainConfig.of(input_size=75, mode="finetune:2", epochs=1, batch_size=8, augment=False)
    conv_top = next(layer for layer in net.base.layers[cut + 1 :] if isinstance(layer, keras.layers.Conv2D))
    kernel_before = np.array(conv_top.kernel)
    hist = train_images(net, pixels, y, list(range(16)), cfg, 1e-2, None, None, None, "fine-tune")
    assert hist["epochs"] == 1
    assert not np.allclose(np.array(conv_top.kernel), kernel_before)  # the top blocks learned
    assert all(np.array_equal(np.array(b.moving_mean), m) for b, m in zip(top_bn, before, strict=True))


def test_finetune_mode_end_to_end_uses_the_cache_for_the_head_then_bypasses_it(make_ctx, tmp_path: Path, capsys):
    ctx = make_ctx()
    data = make_folders(tmp_path / "train", {"Reddisc": 10, "no_logo": 10}, seed=7)
    result = train_model(ctx, data, weights="none", progress=terminal, **{**FAST, "mode": "finetune:1", "head_epochs": 2, "epochs": 1})
    history = result["params"]["history"]
    assert set(history) == {"head", "finetune"} and history["finetune"]["epochs"] == 1
    assert result["params"]["feature_cache"]["misses"] > 0
    assert "fine-tuning the top 1 Inception blocks: the feature cache is bypassed" in capsys.readouterr().err


@pytest.mark.parametrize("mode", ["finetune:x", "finetune:0", "finetune:12", "sideways"])
def test_bad_training_mode_is_one_clear_error(mode):
    from pipeline.detector.data import DataError
    from pipeline.detector.training.config import resolve_config

    with pytest.raises(DataError, match="finetune:N"):
        resolve_config("default", False, None, {"mode": mode})


def test_if_better_scores_the_active_model_on_the_new_split(make_ctx, tmp_path: Path):
    """Activation compares both models on the same photos (the new validation split), not each on its own split."""
    ctx = make_ctx()
    good = make_folders(tmp_path / "good", {"Reddisc": 24, "Bluesquare": 24, "no_logo": 24}, seed=8)
    v1 = train_model(ctx, good, weights="none", activate="always", **FAST)
    # the same data, barely trained: worse on the same split, so v1 stays active
    v2 = train_model(ctx, good, weights="none", **{**FAST, "head_epochs": 1, "learning_rate": 1e-6})
    base = v2["params"]["baseline"]
    # scored on the new model's validation split (the test split stays report-only), at its own threshold
    new_val = v2["metrics"]["val"][v2["metrics"]["signal"]]
    assert base["version"] == v1["version"] and base["n_images"] == new_val["n_images"]
    rec = v2["promotion"]
    assert rec["active"] == {**base, "floor_met": rec["active"]["floor_met"]} and rec["new"]["recall"] == new_val["logo"]["recall"]
    assert not rec["promoted"] and rec["reason"]
    assert not v2["activated"] and active_model(ctx)["version"] == v1["version"]
    stored = {r["version"]: r for r in list_versions(ctx)}[v2["version"]]["metrics"]["promotion"]
    assert stored["reason"] == rec["reason"] and stored["active"]["version"] == v1["version"]


def test_evaluate_with_no_decodable_image_is_one_clear_error(make_ctx, install_model, tmp_path: Path):
    from pipeline.detector.data import DataError

    ctx = make_ctx()
    install_model(ctx)
    (tmp_path / "eval" / "Reddisc").mkdir(parents=True)
    (tmp_path / "eval" / "Reddisc" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(DataError, match="none of the 1 images could be decoded"):
        evaluate_folder(ctx, tmp_path / "eval")


def test_brandmon_train_warns_in_its_summary_when_the_budget_cut_training(make_ctx, monkeypatch, capsys, tmp_path: Path):
    """`brandmon train --time-budget`: the summary carries a warning line; an uncut run has none."""
    from pipeline.cli import main
    from pipeline.detector import jobs

    ctx = make_ctx()
    s = ctx.settings
    for key, value in (("DATABASE_URL", s.database_url), ("STORAGE_URL", s.storage_url), ("HOME", str(s.home)),
                       ("AUTHOR_SALT", "cli-test")):
        monkeypatch.setenv(f"BRANDMON_{key}", value)
    monkeypatch.delenv("BRANDMON_CONFIG", raising=False)
    real = jobs.train_model
    # the real training, only on the tests' small settings (the CLI has no flag for each of them)
    monkeypatch.setattr(jobs, "train_model", lambda *a, **kw: real(*a, **{**FAST, **kw}))
    data = make_folders(tmp_path / "train", {"Reddisc": 12, "no_logo": 12}, seed=5)
    args = ["train", "--data", str(data), "--weights", "none", "--quiet", "--mode", "full", "--input-size", "75"]
    assert main([*args, "--epochs", "400", "--time-budget", "2"]) == 0
    out = capsys.readouterr().out
    warning = [line for line in out.splitlines() if line.startswith("warning: the time budget of 2 s cut training short")]
    assert len(warning) == 1 and re.search(r"full stopped after \d+ of \d+ steps \(epoch \d+ of 400\)", warning[0])

    assert main([*args, "--epochs", "1", "--activate", "never"]) == 0  # no budget: nothing to warn about
    out = capsys.readouterr().out
    assert "model v2" in out and "warning" not in out



def test_if_better_rescoring_the_active_model_on_the_new_val_split_is_like_with_like(make_ctx, tmp_path: Path):
    """The same deterministic network trained twice: the active one, re-scored on the new
    model's validation split (exported as files, through `evaluate`), gets exactly the figures
    training recorded for the new one, so the rule compares like with like; a tie keeps it."""
    ctx = make_ctx()
    data = make_folders(tmp_path / "d", {"Reddisc": 30, "Bluesquare": 30, "no_logo": 30}, seed=11)
    opts = {**FAST, "deterministic": True, "head_epochs": 4, "target_precision": 0.7}
    v1 = train_model(ctx, data, weights="none", activate="always", **opts)
    v2 = train_model(ctx, data, weights="none", **opts)
    rec = v2["promotion"]
    same = ("n_images", "threshold", "precision", "precision_low", "called", "recall", "brand_accuracy", "f1", "floor_met")
    assert {k: rec["new"][k] for k in same} == {k: rec["active"][k] for k in same} and rec["new"]["called"] > 0
    assert rec["active"]["version"] == v1["version"] and rec["active"]["source"].startswith("scored on the new model's")
    assert not rec["promoted"] and rec["reason"].endswith("a tie on every figure keeps the active model")
    assert active_model(ctx)["version"] == v1["version"]
