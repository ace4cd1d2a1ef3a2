"""The training stages one at a time, without training a network: the config's sections and
profiles, prepare on a tiny folder, calibrate and evaluate on synthetic scores, and the import
structure (no cycle between train and evaluate)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from detector_helpers import make_folders

from pipeline.detector.data import DataError, SampleSpec
from pipeline.detector.training.calibrate import calibrate, choose_thresholds, signal_matrices
from pipeline.detector.training.config import (
    PROFILES,
    SECTIONS,
    TrainConfig,
    option_fields,
    resolve_config,
)
from pipeline.detector.training.report import heldout_metrics

ROOT = Path(__file__).resolve().parents[2]


# --- config ----------------------------------------------------------------------------------


def test_every_flat_option_lives_in_one_section_and_round_trips():
    names = [f for cls in SECTIONS.values() for f in cls.__dataclass_fields__]
    assert len(names) == len(set(names)) == len(option_fields())
    cfg = TrainConfig.of(input_size=75, mode="full", seed=7, upsample=0.0, matcher_workers=3)
    assert (cfg.model.input_size, cfg.fit.mode, cfg.runtime.seed, cfg.data.upsample) == (75, "full", 7, 0.0)
    assert TrainConfig.of(**{k: v for k, v in cfg.flat().items() if k not in ("samples", "fractions")}) == cfg
    assert cfg.flat()["samples"] == {"margin": 0.15, "whole_positive": True, "negatives_train": 2,
                                     "negatives_eval": 1, "min_region": 64}
    with pytest.raises(DataError, match="unknown training option.*colour"):
        TrainConfig.of(colour="red")


def test_the_demo_profile_resolves_to_the_settings_the_demo_figures_depend_on():
    cfg = resolve_config("demo", False, None, {})
    flat = cfg.flat()
    assert {k: flat[k] for k in PROFILES["demo"]} == PROFILES["demo"]
    assert flat["upsample"] == 1.0 and flat["synthetic_negatives"] == 0 and flat["seed"] == 1234
    default = resolve_config("default", False, None, {"mode": None, "epochs": None})
    assert (default.fit.mode, default.model.input_size, default.fit.augment, default.fit.epochs) == ("full", 128, True, 12)
    head = resolve_config("default", True, 3, {"samples": {"margin": 0.3}})
    assert (head.fit.mode, head.model.input_size, head.fit.augment, head.fit.epochs) == ("head", 299, False, 3)
    assert head.data.samples == SampleSpec(margin=0.3)
    with pytest.raises(DataError, match="unknown training profile"):
        resolve_config("fast", False, None, {})


# --- prepare -----------------------------------------------------------------------------------


def test_prepare_splits_by_content_hash_and_plans_the_upsampled_order(tmp_path: Path):
    from pipeline.detector.split import split_of
    from pipeline.detector.training.prepare import prepare_data

    data = make_folders(tmp_path / "d", {"Reddisc": 12, "Bluesquare": 4, "no_logo": 8}, seed=3, size=48)
    (tmp_path / "d" / "no_logo" / "broken.jpg").write_bytes(b"not an image")
    cfg = resolve_config("default", False, None, {"input_size": 32, "synthetic_negatives": 0, "upsample": 1.0})
    out = prepare_data(data, "folders", cfg)
    assert out.classes[0] == "no_logo" and out.brands == sorted({s.label for s in out.prep.samples["train"]} - {"no_logo"})
    for split, samples in out.prep.samples.items():
        assert all(split_of(s.source.sha256, cfg.data.fractions) == split for s in samples)
        assert out.prep.pixels[split].shape == (len(samples), 32, 32, 3)
    assert sum(len(v) for v in out.prep.samples.values()) == 24  # the broken file is skipped
    after = out.counts["after"]
    assert len(set(after.values())) == 1  # upsample 1.0: every class as often as the largest
    assert len(out.order) == sum(after.values()) and len(out.y_train) == len(out.prep.samples["train"])


# --- calibrate and evaluate -------------------------------------------------------------------


def _scores(rng: np.random.Generator, labels: list[str], classes: list[str], noise: float) -> np.ndarray:
    p = rng.uniform(0, noise, (len(labels), len(classes)))
    for i, y in enumerate(labels):
        p[i, classes.index(y)] += 1.0
    return p / p.sum(axis=1, keepdims=True)


def test_calibrate_chooses_on_validation_only_and_reaches_the_target():
    rng = np.random.default_rng(0)
    classes = ["no_logo", "Acme", "Globex"]
    y_val = ["no_logo"] * 40 + ["Acme"] * 30 + ["Globex"] * 30
    y_test = ["no_logo"] * 20 + ["Acme"] * 20 + ["Globex"] * 20
    probs = {"val": _scores(rng, y_val, classes, 1.2), "test": _scores(rng, y_test, classes, 1.2)}
    cal = calibrate(probs, classes, y_val, 0.95)
    assert cal.main == "cnn" and cal.matcher is None and set(cal.signals["val"]) == {"cnn"}
    assert cal.thresholds["cnn"]["target_met"] and cal.thresholds["cnn"]["precision"] >= 0.95
    other = calibrate({**probs, "test": probs["test"][::-1]}, classes, y_val, 0.95)
    assert other.thresholds == cal.thresholds  # the test split chooses nothing
    metrics = heldout_metrics(cal, ["Acme", "Globex"], y_val, y_test, 0.95)
    assert metrics["signal"] == "cnn" and metrics["n_test"] == 60 and metrics["target_precision"] == 0.95
    assert metrics["val"]["cnn"]["logo"]["precision"] >= 0.95
    assert metrics["precision"] == metrics["test"]["cnn"]["logo"]["precision"]


def test_thresholds_without_validation_samples_fall_back_and_say_the_target_is_missed():
    out = choose_thresholds({"cnn": np.zeros((0, 2))}, [], 0.9)
    assert out == {"cnn": {"threshold": 0.5, "target_met": False, "target": 0.9}}


def test_signal_matrices_fuse_the_matcher_with_the_classifier():
    probs = np.array([[0.2, 0.7, 0.1], [0.9, 0.05, 0.05]])
    match = [{"Acme": (0.8, None)}, {}]
    out = signal_matrices(["Acme", "Globex"], probs, ["no_logo", "Acme", "Globex"], match, None)
    assert set(out) == {"cnn", "matcher", "fused"}
    np.testing.assert_allclose(out["cnn"], [[0.7, 0.1], [0.05, 0.05]])
    np.testing.assert_allclose(out["matcher"], [[0.8, 0.0], [0.0, 0.0]])
    assert out["fused"][0, 0] > max(out["cnn"][0, 0], out["matcher"][0, 0])  # noisy-or: both agree


# --- structure ---------------------------------------------------------------------------------


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}


def test_no_import_cycle_between_train_and_evaluate():
    detector = ROOT / "pipeline" / "detector"
    assert "pipeline.detector.train" not in _imports(detector / "evaluate.py")
    for stage in (detector / "training").glob("*.py"):
        assert not {"pipeline.detector.train", "pipeline.detector.evaluate"} & _imports(stage), stage.name
    for module in ("pipeline.detector.evaluate", "pipeline.detector.train", "pipeline.detector.training.calibrate"):
        subprocess.run([sys.executable, "-c", f"import {module}"], check=True, cwd=ROOT, timeout=120)
