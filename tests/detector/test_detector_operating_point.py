"""The operating point: Wilson intervals on reported proportions, and the threshold rule with a
margin for the validation split's size (issue #14)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from statsmodels.stats.proportion import proportion_confint

from pipeline.detector.data import DataError
from pipeline.detector.metrics import (
    evaluate_scores,
    pr_counts,
    proportion,
    threshold_for_precision,
    wilson_interval,
)
from pipeline.detector.training.calibrate import calibrate, choose_thresholds, signal_matrices
from pipeline.detector.training.config import resolve_config
from pipeline.detector.training.report import SCORES_FILE, save_scores

counts = st.integers(min_value=1, max_value=5000).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))


@given(counts, st.sampled_from([0.8, 0.9, 0.95, 0.99]))
def test_wilson_interval_contains_the_estimate_and_matches_statsmodels(kn, confidence):
    k, n = kn
    low, high = wilson_interval(k, n, confidence)
    assert 0.0 <= low <= k / n <= high <= 1.0
    ref_low, ref_high = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    assert low == pytest.approx(ref_low, abs=1e-9) and high == pytest.approx(ref_high, abs=1e-9)


@given(counts, st.integers(min_value=2, max_value=50))
def test_wilson_interval_shrinks_as_the_sample_grows(kn, factor):
    k, n = kn
    low, high = wilson_interval(k, n)
    big_low, big_high = wilson_interval(k * factor, n * factor)  # the same proportion, more evidence
    assert big_high - big_low < high - low
    assert low <= big_low + 1e-12 or k == 0


def test_wilson_interval_by_hand_and_edges():
    # 87 of 91: 0.956, interval from the closed form (z = 1.959964)
    low, high = wilson_interval(87, 91)
    assert low == pytest.approx(0.8924, abs=1e-4) and high == pytest.approx(0.9828, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no evidence: anything
    assert wilson_interval(10, 10)[1] == 1.0 and wilson_interval(10, 10)[0] < 1.0
    assert proportion(3, 4) == {"estimate": 0.75, "low": 0.3006, "high": 0.9544, "k": 3, "n": 4}
    with pytest.raises(ValueError):
        wilson_interval(5, 4)
    with pytest.raises(ValueError):
        wilson_interval(1, 4, confidence=1.0)


scored = st.integers(min_value=1, max_value=200).flatmap(
    lambda n: st.tuples(
        st.lists(st.booleans(), min_size=n, max_size=n),
        st.lists(st.integers(0, 40).map(lambda v: v / 40), min_size=n, max_size=n),  # ties on purpose
    )
)


@settings(max_examples=150, deadline=None)
@given(scored, st.sampled_from([0.5, 0.8, 0.9, 0.95]))
def test_wilson_rule_holds_its_margin_whenever_any_threshold_can(data, target):
    y, s = np.array(data[0], bool), np.array(data[1], float)
    old = threshold_for_precision(y, s, target, rule="point")
    new = threshold_for_precision(y, s, target, rule="wilson")
    tp, fp, thr = pr_counts(y, s)
    lows = np.array([wilson_interval(int(a), int(a + b))[0] for a, b in zip(tp, fp, strict=True)])
    called = s >= new["threshold"]
    k, n = int(np.sum(called & y)), int(np.sum(called))
    assert (new["tp"], new["called"]) == (k, n)  # the reported counts are the threshold's own
    assert new["precision_low"] == pytest.approx(wilson_interval(k, n)[0], abs=1e-4)
    if np.any(lows >= target):
        assert new["margin_met"] and new["target_met"]
        assert wilson_interval(k, n)[0] >= target
        # the most recall among the thresholds that hold the margin
        assert k == max(int(a) for a, lo in zip(tp, lows, strict=True) if lo >= target)
    else:
        assert not new["margin_met"]
    if old["target_met"]:
        # the margin only ever raises the threshold: never a precision the old rule would not give
        assert new["target_met"] and new["threshold"] >= old["threshold"]
        assert new["recall"] <= old["recall"]
    else:
        assert new["threshold"] == old["threshold"] and not new["target_met"]


def test_wilson_rule_by_hand_leaves_the_lucky_tail():
    # 60 logos, 3 negatives, 9 logos, 20 negatives (descending score): the point rule takes
    # 69/72 (P 0.958, but its Wilson low 0.885 < 0.9); the margin keeps to the clean 60/60 (low 0.940)
    y = np.array([1] * 60 + [0] * 3 + [1] * 9 + [0] * 20, bool)
    s = np.linspace(1.0, 0.01, len(y))
    old = threshold_for_precision(y, s, 0.9, rule="point")
    new = threshold_for_precision(y, s, 0.9, rule="wilson")
    assert old["target_met"] and (old["tp"], old["called"]) == (69, 72) and not old["margin_met"]
    assert new["margin_met"] and (new["tp"], new["called"]) == (60, 60)
    assert new["precision_low"] == pytest.approx(0.9398, abs=1e-4) and new["threshold"] == pytest.approx(s[59])
    with pytest.raises(ValueError, match="threshold rule"):
        threshold_for_precision(y, s, 0.9, rule="median")


def test_wilson_rule_without_margin_keeps_the_target_and_says_so():
    y = np.array([1] * 8 + [0] + [1] * 3, bool)  # 8/8 at best: Wilson low 0.676 < 0.9
    s = np.linspace(1, 0.1, len(y))
    new = threshold_for_precision(y, s, 0.9, rule="wilson")
    assert new["target_met"] and not new["margin_met"] and new["precision"] >= 0.9
    assert new["precision_low"] == pytest.approx(wilson_interval(new["tp"], new["called"])[0], abs=1e-4)


@settings(deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["A", "B", "no_logo"]), st.floats(0, 1), st.floats(0, 1)), min_size=1, max_size=60),
       st.floats(0.05, 0.95))
def test_evaluate_scores_intervals_carry_their_counts(rows, threshold):
    y = [r[0] for r in rows]
    scores = np.array([[r[1], r[2]] for r in rows])
    m = evaluate_scores(y, scores, ["A", "B"], threshold)
    iv, logo = m["intervals"], m["logo"]
    assert (iv["logo_precision"]["k"], iv["logo_precision"]["n"]) == (logo["tp"], logo["tp"] + logo["fp"])
    assert (iv["logo_recall"]["k"], iv["logo_recall"]["n"]) == (logo["tp"], logo["tp"] + logo["fn"])
    assert iv["brand_accuracy"]["n"] == m["n_logo"]
    assert iv["logo_precision"]["estimate"] == logo["precision"] and iv["logo_recall"]["estimate"] == logo["recall"]
    assert iv["brand_accuracy"]["estimate"] == m["brand_accuracy"]
    for v in iv.values():
        assert v["low"] <= v["estimate"] <= v["high"]
    assert m["interval_method"].startswith("Wilson")


def _val(rng: np.random.Generator, n_pos: int, n_neg: int) -> tuple[np.ndarray, list[str]]:
    """Two brands; logo photos score high with overlap into the negatives' range."""
    pos = rng.uniform(0.3, 1.0, n_pos)
    neg = rng.uniform(0.0, 0.6, n_neg)
    mat = np.zeros((n_pos + n_neg, 2))
    mat[:n_pos, 0] = pos
    mat[n_pos:, 1] = neg
    return mat, ["A"] * n_pos + ["no_logo"] * n_neg


def test_choose_thresholds_defaults_to_the_margin_and_keeps_the_old_rule_selectable():
    mat, y = _val(np.random.default_rng(3), 80, 100)
    new = choose_thresholds({"cnn": mat}, y, 0.9)["cnn"]
    old = choose_thresholds({"cnn": mat}, y, 0.9, rule="point")["cnn"]
    assert new["rule"] == "wilson" and old["rule"] == "point"
    assert new["margin_met"] and new["precision_low"] >= 0.9 and new["threshold"] > old["threshold"]
    assert old["precision"] >= 0.9 and old["precision_low"] < 0.9  # the old rule's pick: no margin


def test_calibrate_and_config_refuse_an_unknown_rule_and_warn_when_val_is_too_small(caplog):
    classes = ["no_logo", "A", "B"]
    rng = np.random.default_rng(0)
    y_val = ["no_logo"] * 4 + ["A"] * 3 + ["B"] * 3
    p = rng.dirichlet([1, 1, 1], len(y_val))
    for i, lab in enumerate(y_val):
        p[i, classes.index(lab)] += 2
    p /= p.sum(axis=1, keepdims=True)
    with pytest.raises(DataError, match="threshold_rule"):
        calibrate({"val": p, "test": p}, classes, y_val, 0.9, rule="median")
    with pytest.raises(DataError, match="threshold_rule"):
        resolve_config("default", False, None, {"threshold_rule": "median"})
    assert resolve_config("default", False, None, {}).model.threshold_rule == "wilson"
    with caplog.at_level(logging.WARNING, logger="pipeline.detector.train"):
        cal = calibrate({"val": p, "test": p}, classes, y_val, 0.9)
    chosen = cal.thresholds["cnn"]
    assert chosen["target_met"] and not chosen["margin_met"]  # 6 logo photos cannot show 0.9 with 95%
    assert "too small to show precision 0.9" in caplog.text and "6/6" in caplog.text


def test_saved_scores_round_trip_exactly(tmp_path: Path):
    rng = np.random.default_rng(1)
    signals = {s: {"cnn": rng.random((5, 2)), "fused": rng.random((5, 2))} for s in ("val", "test")}
    labels = {"val": ["A", "no_logo", "B", "A", "no_logo"], "test": ["B"] * 5}
    path = save_scores(tmp_path / "v1" / SCORES_FILE, ["A", "B"], signals, labels)
    with np.load(path, allow_pickle=False) as z:
        assert list(z["brands"]) == ["A", "B"]
        assert list(z["val/labels"]) == labels["val"]
        assert np.array_equal(z["test/fused"], signals["test"]["fused"])  # bit-exact: thresholds are these values


def _fusion_case(cnn_on_negatives: float, matched: int) -> tuple[np.ndarray, list[dict], list[str]]:
    """60 logo photos (A, B) and 60 without: the matcher finds `matched` logos (score 0.8) and
    nothing else; the CNN gives every logo photo's brand 0.5 and every 3rd negative
    `cnn_on_negatives` for A."""
    classes = ["no_logo", "A", "B"]
    y = ["A", "B"] * 30 + ["no_logo"] * 60
    probs = np.zeros((len(y), 3))
    match: list[dict] = []
    for i, lab in enumerate(y):
        if lab == "no_logo":
            p_a = cnn_on_negatives if i % 3 == 0 else 0.02
            probs[i] = [1 - p_a - 0.01, p_a, 0.01]
            match.append({})
        else:
            probs[i] = [0.25, 0.25, 0.25]
            probs[i, classes.index(lab)] = 0.5
            match.append({lab: (0.8, None)} if i < matched else {})
    return probs, match, y


def test_fusion_is_chosen_on_val_by_the_recall_it_keeps_at_the_margin():
    from pipeline.detector.training.calibrate import MATCHER_ONLY, choose_fusion

    classes, brands = ["no_logo", "A", "B"], ["A", "B"]
    noisy_or = {"kind": "noisy_or", "w_cnn": 1.0, "w_match": 1.0}
    # the CNN is surer of 20 negatives than of any logo: fused with it, they rank above the
    # matched logos; alone, the matcher keeps its 50 clean matches
    probs, match, y = _fusion_case(cnn_on_negatives=0.97, matched=50)
    comb, record = choose_fusion(brands, probs, classes, match, noisy_or, y, 0.9, "wilson")
    assert record["chosen"] == "matcher_only" and comb == MATCHER_ONLY
    assert record["candidates"]["matcher_only"]["recall"] == pytest.approx(50 / 60, abs=1e-4)
    assert record["candidates"]["matcher_only"]["margin_met"] and not record["candidates"]["fitted"]["target_met"]
    fused = signal_matrices(brands, probs, classes, match, comb)
    assert np.array_equal(fused["fused"], fused["matcher"])  # matcher alone, through the fused path
    # a CNN that separates cleanly adds the 30 logos the matcher misses: the fitted fusion stays
    probs, match, y = _fusion_case(cnn_on_negatives=0.02, matched=30)
    comb, record = choose_fusion(brands, probs, classes, match, noisy_or, y, 0.9, "wilson")
    assert record["chosen"] == "fitted" and comb == noisy_or
    assert record["candidates"]["fitted"]["recall"] == 1.0
    with pytest.raises(DataError, match="fusion"):
        calibrate({"val": probs, "test": probs}, classes, y, 0.9, fusion="best")
    with pytest.raises(DataError, match="fusion"):
        resolve_config("default", False, None, {"fusion": "best"})


def test_fusion_fitted_is_recorded_in_the_metrics_as_forced(monkeypatch):
    """Outside check (#14): with `fusion: val` the metrics say which fusion decides
    (`fusion.chosen`), with `fitted` they said nothing; now `fitted`, marked as forced."""
    from pipeline.detector.training import calibrate as cal_mod
    from pipeline.detector.training.report import heldout_metrics

    classes, brands = ["no_logo", "A", "B"], ["A", "B"]
    noisy_or = {"kind": "noisy_or", "w_cnn": 1.0, "w_match": 1.0}
    # the case where `val` would choose the matcher alone: the record must not pretend it chose
    probs, match, y = _fusion_case(cnn_on_negatives=0.97, matched=50)
    # the matcher stage itself (references, keypoints) is not under test: its scores are given
    monkeypatch.setattr(cal_mod, "fit_matcher", lambda *a, **kw: (object(), {"val": match, "test": match}, dict(noisy_or)))
    inputs = ([], {"val": [], "test": []}, 1)
    by_fusion = {fusion: cal_mod.calibrate({"val": probs, "test": probs}, classes, y, 0.9, inputs, fusion=fusion)
                 for fusion in ("val", "fitted")}
    assert by_fusion["val"].fusion["chosen"] == "matcher_only" and by_fusion["val"].fusion["forced"] is False
    forced = by_fusion["fitted"]
    assert forced.combiner == noisy_or
    metrics = heldout_metrics(forced, brands, y, y, 0.9)
    assert metrics["fusion"]["chosen"] == "fitted" and metrics["fusion"]["forced"] is True
    assert metrics["fusion"]["combiner"] == noisy_or and "not chosen on val" in metrics["fusion"]["reason"]
