from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline.detector.metrics import (
    average_precision,
    evaluate_scores,
    plot_pr_curves,
    pr_curve,
    threshold_for_precision,
)


def test_evaluate_scores_counts_by_hand():
    brands = ["A", "B"]
    y = ["A", "A", "B", "no_logo", "no_logo", "C"]
    scores = np.array(
        [
            [0.9, 0.1],  # A, called A
            [0.2, 0.7],  # A, called B: a logo hit, a brand miss
            [0.1, 0.3],  # B, below threshold: missed
            [0.6, 0.0],  # no_logo called A: false positive
            [0.1, 0.2],  # no_logo: true negative
            [0.0, 0.8],  # C (unknown to the model) called B: a logo hit, a brand miss
        ]
    )
    m = evaluate_scores(y, scores, brands, threshold=0.5)
    assert m["n_images"] == 6 and m["n_logo"] == 4
    assert m["logo"]["tp"] == 3 and m["logo"]["fp"] == 1 and m["logo"]["fn"] == 1 and m["logo"]["tn"] == 1
    assert m["logo"]["precision"] == pytest.approx(0.75)
    assert m["logo"]["recall"] == pytest.approx(0.75)
    # top-1 over brands for images with a brand: A yes, A no, B yes (0.3 > 0.1), C no
    assert m["brand_accuracy"] == pytest.approx(0.5)
    assert m["per_class"]["A"]["precision"] == pytest.approx(0.5)  # called A twice, once right
    assert m["per_class"]["A"]["recall"] == pytest.approx(0.5)
    assert m["per_class"]["C"]["support"] == 1 and m["per_class"]["C"]["recall"] == 0
    labels = m["confusion"]["labels"]
    mat = np.array(m["confusion"]["matrix"])
    assert mat.sum() == 6
    assert mat[labels.index("no_logo"), labels.index("A")] == 1


def test_pr_curve_and_threshold_for_precision():
    y = np.array([1, 1, 0, 1, 0, 0, 1, 0], bool)
    s = np.array([0.95, 0.9, 0.85, 0.8, 0.5, 0.4, 0.3, 0.1])
    p, r, t = pr_curve(y, s)
    assert list(t) == sorted(t, reverse=True)
    assert r[-1] == 1.0 and p[0] == 1.0
    choice = threshold_for_precision(y, s, 0.75)
    # 0.8 gives P = 3/4, R = 3/4; lower thresholds fall below 0.75 precision
    assert choice["threshold"] == pytest.approx(0.8)
    assert choice["target_met"]
    never = threshold_for_precision(y, s, 1.01)
    assert not never["target_met"]
    assert 0 < average_precision(y, s) <= 1


def test_pr_curve_png(tmp_path: Path):
    y = np.array([1, 0, 1, 0], bool)
    s = np.array([0.9, 0.6, 0.4, 0.1])
    p, r, _ = pr_curve(y, s)
    out = plot_pr_curves({"cnn": (p, r)}, tmp_path / "pr.png", "test")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
