"""ANHIR landmark metrics against numbers worked out by hand."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest

from scripts.evaluate.metrics import (
    PairScores,
    image_diagonal,
    pair_landmarks,
    relative_tre,
    score_pair,
    summarise,
)

TARGET = np.array([[10.0, 20.0], [100.0, 50.0], [300.0, 400.0]])


def test_image_diagonal_is_hypotenuse_of_height_and_width():
    assert image_diagonal((300, 400)) == 500.0
    assert image_diagonal((300, 400, 3)) == 500.0
    with pytest.raises(ValueError):
        image_diagonal((0, 400))


def test_relative_tre_of_3_4_5_offset_on_diagonal_500():
    moved = TARGET + [3.0, 4.0]  # every landmark 5 px away
    np.testing.assert_allclose(relative_tre(moved, TARGET, 500.0), [0.01, 0.01, 0.01])


def test_relative_tre_is_per_landmark_and_zero_when_aligned():
    moved = TARGET + [[0.0, 0.0], [6.0, 8.0], [0.0, -50.0]]  # 0, 10 and 50 px
    np.testing.assert_allclose(relative_tre(moved, TARGET, 1000.0), [0.0, 0.01, 0.05])


def test_pair_landmarks_equal_counts_no_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a, b = pair_landmarks(TARGET, TARGET + 1)
    assert a.shape == b.shape == (3, 2)


def test_pair_landmarks_truncates_to_shorter_and_warns_with_both_counts():
    longer = np.vstack([TARGET + 1, [[7.0, 7.0]]])
    with pytest.warns(UserWarning, match=r"4 warped landmarks vs 3 target landmarks"):
        a, b = pair_landmarks(longer, TARGET, names=("warped", "target"))
    np.testing.assert_array_equal(a, TARGET + 1)  # row order kept, the extra last row dropped
    np.testing.assert_array_equal(b, TARGET)


def test_relative_tre_truncates_mismatched_counts():
    longer = np.vstack([TARGET + [3.0, 4.0], [[1e6, 1e6]]])
    with pytest.warns(UserWarning, match="4 .* vs 3"):
        rtre = relative_tre(longer, TARGET, 500.0)
    np.testing.assert_allclose(rtre, [0.01, 0.01, 0.01])


@pytest.mark.parametrize("bad", [np.zeros((3,)), np.zeros((3, 3))])
def test_landmarks_must_be_n_by_2(bad):
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        relative_tre(bad, TARGET, 500.0)


@pytest.mark.parametrize("diagonal", [0.0, -1.0, math.nan, math.inf])
def test_diagonal_must_be_positive_and_finite(diagonal):
    with pytest.raises(ValueError, match="target_diagonal"):
        relative_tre(TARGET, TARGET, diagonal)


def test_score_pair_with_one_landmark_getting_worse():
    source = TARGET + [[30.0, 40.0], [30.0, 40.0], [0.0, 10.0]]  # initial errors 50, 50, 10 px
    warped = TARGET + [[3.0, 4.0], [0.0, 0.0], [0.0, 20.0]]  # final errors 5, 0, 20 px: the third got worse
    scores = score_pair(warped, TARGET, source, 1000.0)
    assert scores.rtre_median == pytest.approx(0.005)
    assert scores.rtre_mean == pytest.approx(25 / 3 / 1000)
    assert scores.rtre_max == pytest.approx(0.02)
    assert scores.initial_rtre_median == pytest.approx(0.05)
    assert scores.robustness == pytest.approx(2 / 3)


def test_score_pair_unchanged_landmark_is_not_robust():
    # "strictly smaller": an identity registration improves nothing
    source = TARGET + [3.0, 4.0]
    assert score_pair(source, TARGET, source, 500.0).robustness == 0.0


def test_score_pair_truncates_to_target_count():
    source = np.vstack([TARGET + [30.0, 40.0], [[0.0, 0.0]]])
    warped = np.vstack([TARGET + [3.0, 4.0], [[1e6, 1e6]]])  # the unpaired 4th row must not count
    with pytest.warns(UserWarning, match="4 source landmarks vs 3 target landmarks"):
        scores = score_pair(warped, TARGET, source, 500.0)
    assert scores.rtre_max == pytest.approx(0.01)
    assert scores.initial_rtre_median == pytest.approx(0.1)
    assert scores.robustness == 1.0


def test_score_pair_rejects_warping_that_lost_landmarks():
    with pytest.raises(ValueError, match="2 warped source landmarks but 3 source landmarks"):
        score_pair(TARGET[:2], TARGET, TARGET, 500.0)


def test_score_pair_rejects_empty_landmarks():
    empty = np.zeros((0, 2))
    with pytest.raises(ValueError, match="no landmark pairs"):
        score_pair(empty, empty, empty, 500.0)


def test_summarise_medians_means_and_count():
    scores = [
        PairScores(rtre_median=0.01, rtre_mean=0.02, rtre_max=0.1, initial_rtre_median=0.1, robustness=1.0),
        PairScores(rtre_median=0.02, rtre_mean=0.03, rtre_max=0.2, initial_rtre_median=0.1, robustness=0.5),
        PairScores(rtre_median=0.06, rtre_mean=0.07, rtre_max=0.3, initial_rtre_median=0.1, robustness=0.0),
    ]
    summary = summarise(scores)
    assert summary["median_median_rtre"] == pytest.approx(0.02)
    assert summary["mean_median_rtre"] == pytest.approx(0.03)
    assert summary["mean_max_rtre"] == pytest.approx(0.2)
    assert summary["mean_robustness"] == pytest.approx(0.5)
    assert summary["pairs"] == 3
    assert all(type(value) in (float, int) for value in summary.values())  # plain Python numbers: JSON-ready


def test_summarise_empty_has_no_nan():
    assert summarise([]) == {
        "median_median_rtre": None,
        "mean_median_rtre": None,
        "mean_max_rtre": None,
        "mean_robustness": None,
        "pairs": 0,
    }
