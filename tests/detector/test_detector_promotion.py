"""`--activate if_better` compares what the product promises: recall at a precision whose 95%
Wilson lower bound reaches the target, both models on the new validation split."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pipeline.detector.metrics import evaluate_scores, wilson_interval
from pipeline.detector.promotion import compare, figures, recorded_figures, summary_line
from pipeline.detector.registry import (
    active_version,
    get_version,
    maybe_activate,
    promote,
    register,
)


def _fig(version: str, tp: int, fp: int, fn: int, top1: float = 0.8) -> dict:
    """Figures of a model calling tp+fp photos of which tp are logos, missing fn logos."""
    p, r = tp / (tp + fp), tp / (tp + fn)
    report = {"logo": {"precision": p, "recall": r, "f1": 2 * p * r / (p + r)}, "brand_accuracy": top1,
              "n_images": tp + fp + fn + 50, "threshold": 0.5,
              "intervals": {"logo_precision": {"k": tp, "n": tp + fp, "low": 0.0}}}
    return figures(report, version, "test")


def test_a_cautious_model_beats_a_point_rule_model_with_more_recall_and_f1_but_no_margin():
    # the old point-rule model: P 0.905 on 95 calls (lower bound 0.83), R 0.86, F1 0.88
    old = _fig("v1", tp=86, fp=9, fn=14)
    # the new cautious model: P 0.97 on 70 calls (lower bound 0.90+), R 0.68, F1 0.80
    new = _fig("v2", tp=68, fp=2, fn=32)
    assert old["f1"] > new["f1"] and old["recall"] > new["recall"]  # the F1 rule would keep v1
    rec = compare(new, old, 0.9)
    assert rec["promoted"] and rec["new"]["floor_met"] and not rec["active"]["floor_met"]
    assert rec["new"]["precision_low"] == pytest.approx(wilson_interval(68, 70)[0], abs=1e-4)
    assert "active model's precision lower bound 0.83" in rec["reason"] and "misses the target 0.9" in rec["reason"]


def test_a_model_that_misses_the_floor_is_not_promoted_even_with_more_recall():
    active = _fig("v1", tp=68, fp=2, fn=32)
    new = _fig("v2", tp=95, fp=5, fn=5)  # P 0.95 but lower bound 0.888 < 0.9; recall 0.95
    rec = compare(new, active, 0.9)
    assert not rec["promoted"] and not rec["new"]["floor_met"] and rec["active"]["floor_met"]
    assert rec["reason"].startswith("the new model's precision lower bound 0.888 misses the target 0.9")


@pytest.mark.parametrize(("tp_new", "top1_new", "promoted", "says"), [
    (80, 0.8, True, "higher recall (0.800 new vs 0.700 active)"),
    (60, 0.8, False, "lower recall (0.600 new vs 0.700 active)"),
    (70, 0.9, True, "higher brand top-1"),
    (70, 0.7, False, "lower brand top-1"),
    (70, 0.8, False, "a tie on every figure keeps the active model"),
])
def test_both_meeting_the_floor_recall_then_top1_decide(tp_new, top1_new, promoted, says):
    active = _fig("v1", tp=70, fp=0, fn=30, top1=0.8)
    new = _fig("v2", tp=tp_new, fp=0, fn=100 - tp_new, top1=top1_new)
    rec = compare(new, active, 0.9)
    assert rec["promoted"] is promoted and says in rec["reason"] and rec["reason"].startswith("both reach")


def test_neither_meeting_the_floor_the_higher_lower_bound_comes_first():
    active = _fig("v1", tp=9, fp=1, fn=1)  # R 0.9, lower bound 0.60
    new = _fig("v2", tp=8, fp=0, fn=2)  # R 0.8, lower bound 0.68
    rec = compare(new, active, 0.9)
    assert rec["promoted"] and rec["reason"].startswith("neither reaches the target 0.9; higher precision lower bound")


def test_figures_from_an_evaluate_report_and_legacy_metrics():
    report = evaluate_scores(["A", "A", "no_logo", "A"], [[0.9], [0.8], [0.7], [0.1]], ["A"], 0.75)
    f = figures(report, "v1", "x")
    assert (f["precision"], f["recall"], f["called"]) == (1.0, pytest.approx(2 / 3, abs=1e-4), 2)
    assert f["precision_low"] == pytest.approx(wilson_interval(2, 2)[0], abs=1e-4)
    legacy = recorded_figures({"version": "v0", "metrics": {"f1": 0.7, "precision": 0.9, "recall": 0.6}})
    assert legacy["f1"] == 0.7 and legacy["precision_low"] is None and "headline" in legacy["source"]


def _register(ctx, version_figures: dict, target: float = 0.9) -> str:
    """A registry row whose recorded validation figures are `version_figures` (an evaluate report)."""
    spec = SimpleNamespace(classes=["no_logo", "Acme"], base="inception_v3", weights="none", input_size=75, threshold=0.5)
    metrics = {"signal": "cnn", "f1": version_figures["logo"]["f1"], "target_precision": target,
               "val": {"cnn": version_figures}}
    return register(ctx, spec, repr(version_figures).encode(), "fp", metrics, {})


def _report(tp: int, fp: int, fn: int) -> dict:
    p, r = tp / (tp + fp), tp / (tp + fn)
    return {"logo": {"precision": round(p, 4), "recall": round(r, 4), "f1": round(2 * p * r / (p + r), 4)},
            "brand_accuracy": 0.8, "n_images": 200, "threshold": 0.5,
            "intervals": {"logo_precision": {"k": tp, "n": tp + fp, "low": round(wilson_interval(tp, tp + fp)[0], 4)}}}


def test_registry_promotes_the_cautious_model_and_records_why(make_ctx, backend):
    ctx = make_ctx(backend=backend)
    point = _register(ctx, _report(86, 9, 14))
    assert maybe_activate(ctx, point, "if_better")  # nothing active yet
    assert get_version(ctx, point)["metrics"]["promotion"]["reason"] == "no active model yet"
    cautious = _register(ctx, _report(68, 2, 32))
    # the active model re-scored on the new split (train passes this): still short of the margin
    baseline = figures(_report(85, 9, 15), point, "scored on the new model's validation split (200 photos)")
    rec = promote(ctx, cautious, "if_better", baseline)
    assert rec["promoted"] and active_version(ctx)["version"] == cautious
    stored = get_version(ctx, cautious)["metrics"]["promotion"]
    assert stored["promoted"] and stored["active"]["recall"] == 0.85 and stored["new"]["recall"] == 0.68
    assert stored["rule"] and stored["target_precision"] == 0.9 and stored["active"]["source"].startswith("scored")
    line = summary_line(stored)
    assert line.startswith(f"if_better: {cautious} promoted: the active model's precision lower bound")
    assert f"active {point} R 0.850" in line


def test_registry_keeps_the_active_model_when_the_new_one_misses_the_floor(make_ctx):
    ctx = make_ctx()
    sure = _register(ctx, _report(68, 2, 32))
    maybe_activate(ctx, sure, "always")
    loose = _register(ctx, _report(95, 5, 5))  # more recall and F1, lower bound 0.888
    assert not maybe_activate(ctx, loose, "if_better")  # no baseline: the recorded figures stand in
    assert active_version(ctx)["version"] == sure
    stored = get_version(ctx, loose)["metrics"]["promotion"]
    assert not stored["promoted"] and "new model's precision lower bound 0.888 misses" in stored["reason"]
    assert stored["active"]["source"] == "recorded on its own validation split"


def test_a_baseline_of_another_version_is_not_used(make_ctx):
    """The active model changed between scoring and deciding: its recorded figures decide."""
    ctx = make_ctx()
    sure = _register(ctx, _report(68, 2, 32))
    maybe_activate(ctx, sure, "always")
    loose = _register(ctx, _report(95, 5, 5))
    stale = figures(_report(10, 10, 90), "v99", "scored")
    assert not promote(ctx, loose, "if_better", stale)["promoted"]


def test_the_real_threshold_rules_point_loses_to_wilson_at_the_operating_point():
    """One validation split of 200 photos scored by the same network: the `point` rule's
    threshold has more recall and F1, but a precision it cannot show with 95% confidence; the
    `wilson` threshold keeps the promise, so `if_better` prefers it (F1 would not)."""
    import numpy as np

    from pipeline.detector.metrics import threshold_for_precision

    rng = np.random.default_rng(7)
    labels = ["A"] * 100 + ["no_logo"] * 100
    score = np.r_[rng.beta(5, 2, 100), rng.beta(2, 5, 100)]
    is_logo = np.array([y != "no_logo" for y in labels])
    picks = {rule: threshold_for_precision(is_logo, score, 0.9, rule=rule) for rule in ("point", "wilson")}
    assert picks["point"]["target_met"] and not picks["point"]["margin_met"] and picks["wilson"]["margin_met"]
    fig = {rule: figures(evaluate_scores(labels, score[:, None], ["A"], pick["threshold"]), f"v-{rule}", "val")
           for rule, pick in picks.items()}
    assert fig["point"]["f1"] > fig["wilson"]["f1"] and fig["point"]["recall"] > fig["wilson"]["recall"]
    assert compare(fig["wilson"], fig["point"], 0.9)["promoted"]  # the cautious model replaces the point-rule one
    assert not compare(fig["point"], fig["wilson"], 0.9)["promoted"]  # and never the other way round
