"""The int8 precision cascade's arithmetic (pipeline/detector/rescore.py): margins, the int8
error, the margin chosen from it, and the promise it makes on the images it was chosen on."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from pipeline.detector.rescore import cascade, check_figures, choose_margin, int8_error, margins


def test_margins_and_int8_error_by_example():
    low = np.array([[0.6, 0.3, 0.1], [0.34, 0.33, 0.33]])
    ref = np.array([[0.5, 0.4, 0.1], [0.30, 0.40, 0.30]])
    np.testing.assert_allclose(margins(low), [0.3, 0.01])
    # row 0: int8 top is class 0; its gap to class 1 moved 0.3 -> 0.1 (0.2), to class 2 0.5 -> 0.4 (0.1)
    # row 1: gap to class 1 moved 0.01 -> -0.10 (0.11): the fp32 top class is another one
    np.testing.assert_allclose(int8_error(low, ref), [0.2, 0.11])
    assert margins(np.ones((2, 1))).tolist() == [0.0, 0.0]


def test_cascade_rescores_only_the_close_rows():
    low = np.array([[0.9, 0.1], [0.52, 0.48], [0.5, 0.5]], np.float32)
    x = np.arange(3)
    seen = []

    def high(rows: np.ndarray) -> np.ndarray:
        seen.append(rows.tolist())
        return np.tile([0.0, 1.0], (len(rows), 1))

    got, k = cascade(low, 0.05, high, x)
    assert k == 2 and seen == [[1, 2]]
    np.testing.assert_allclose(got, [[0.9, 0.1], [0.0, 1.0], [0.0, 1.0]])
    got, k = cascade(low, -1.0, high, x)  # a negative margin re-scores nothing and never calls high
    assert k == 0 and len(seen) == 1 and np.array_equal(got, low)


def test_choose_margin_is_the_upper_nearest_rank_quantile():
    ref = np.tile([0.5, 0.5], (100, 1))
    low = ref.copy()
    low[:, 0] += np.arange(100) / 1000  # errors 0.000 .. 0.099
    low[:, 1] -= 0.0
    assert choose_margin(low, ref) == pytest.approx(0.098)  # the 99th of 100
    assert choose_margin(low, ref, quantile=1.0) == pytest.approx(0.099)
    assert choose_margin(np.zeros((0, 2)), np.zeros((0, 2))) == 0.0


def _probs(draw_rows: int, classes: int):
    return arrays(np.float64, (draw_rows, classes), elements=st.floats(0.0, 1.0, allow_nan=False, width=32))


@settings(max_examples=200, deadline=None)
@given(data=st.data(), n=st.integers(1, 60), c=st.integers(2, 6), q=st.sampled_from([0.9, 0.95, 0.99, 1.0]))
def test_the_cascade_keeps_the_promised_share_of_reference_top_classes(data, n, c, q):
    """On the images the margin was chosen on, with exact re-scoring, at most (1 - q) of the
    top classes differ from the reference, whatever the scores (ties included)."""
    low = data.draw(_probs(n, c))
    ref = data.draw(_probs(n, c))
    m = choose_margin(low, ref, quantile=q)
    got, _ = cascade(low, m, lambda rows: ref[rows], np.arange(n))
    flipped = int(np.sum(got.argmax(1) != ref.astype(np.float32).argmax(1)))
    assert flipped <= int(np.floor((1 - q) * n + 1e-9))
    figures = check_figures(low, ref, m)
    assert 0.0 <= figures["rescored_share"] <= 1.0
    assert figures["cascade_top_class_agreement"] >= figures["int8_top_class_agreement"] - 1e-12
