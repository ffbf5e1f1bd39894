"""The rejection rule and the conformal prediction sets as predict applies them: pure numpy,
checked against brute force and, for the coverage guarantees, on many exchangeable draws."""

import math

import numpy as np
import pytest

from transferkit.errors import DataError
from transferkit.inference.uncertainty import (
    RejectionRule,
    check_coverage,
    keep_threshold,
    knn_similarity,
    lac_scores,
    max_probability,
    prediction_sets,
    set_quantile,
    unit_rows,
)


def test_knn_similarity_is_the_kth_largest_cosine_similarity_by_brute_force():
    rng = np.random.default_rng(0)
    reference = unit_rows(rng.normal(size=(40, 8)))
    queries = rng.normal(size=(5, 8)) * 3.0  # not unit length: the score normalises them
    for k in (1, 3, 40):
        expected = [sorted((q / np.linalg.norm(q)) @ r for r in reference)[-k] for q in queries]
        assert knn_similarity(None, queries, reference, k) == pytest.approx(expected, abs=1e-5)
    # A training image scores 1 (it is its own nearest neighbour)
    assert knn_similarity(None, reference[:3], reference, 1) == pytest.approx([1, 1, 1], abs=1e-6)


def test_keep_threshold_is_the_split_conformal_rank_and_keeps_its_coverage_on_new_draws():
    scores = np.arange(1.0, 20.0)  # 19 scores: floor(20 * 0.05) = 1 -> the smallest
    assert keep_threshold(scores, 0.95) == 1.0
    assert keep_threshold(scores[:18], 0.95) == -math.inf  # too few to reject anything at 95%
    assert keep_threshold(np.arange(100.0), 0.9) == 9.0  # floor(101 * 0.1) = 10th smallest
    rng = np.random.default_rng(1)
    kept = [np.mean(rng.normal(size=20_000) >= keep_threshold(rng.normal(size=200), 0.95)) for _ in range(200)]
    assert 0.95 <= np.mean(kept) <= 0.96  # guaranteed >= 0.95 on average, and not much more


def test_rejection_rule_reads_the_score_it_names_and_rejects_below_its_threshold():
    probabilities = np.array([[0.9, 0.05, 0.05], [0.4, 0.35, 0.25]])
    rule = RejectionRule("max_probability", threshold=0.5)
    scores = rule.scores(probabilities)
    assert scores == pytest.approx([0.9, 0.4]) and not rule.needs_embedding
    assert rule.rejects(scores).tolist() == [False, True]
    assert max_probability(np.array([[0.2], [0.7]])) == pytest.approx([0.8, 0.7])  # a sigmoid unit
    knn = RejectionRule("knn", 0.5, 1, unit_rows(np.eye(3)))
    assert knn.needs_embedding
    with pytest.raises(ValueError, match="embeddings"):
        knn.scores(probabilities)


def test_lac_sets_are_the_classes_above_one_minus_q_and_always_hold_the_top_class():
    probabilities = np.array([[0.7, 0.2, 0.1], [0.4, 0.35, 0.25], [0.34, 0.33, 0.33]])
    members = prediction_sets(probabilities, 0.67)
    assert members.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert prediction_sets(probabilities, 0.0).sum(axis=1).tolist() == [1, 1, 1]  # never empty
    assert prediction_sets(probabilities, math.inf).all()
    assert lac_scores(probabilities, np.array([0, 1, 2])) == pytest.approx([0.3, 0.65, 0.67])
    assert set_quantile(np.arange(10.0), 0.5) == 5.0  # ceil(11 * 0.5) = 6th smallest
    assert set_quantile(np.arange(5.0), 0.9) == math.inf  # ceil(6 * 0.9) = 6 > 5: every class


def test_lac_sets_cover_the_true_class_at_the_target_on_exchangeable_draws():
    """Labels drawn from the probabilities themselves (a calibrated model): the empirical
    coverage of the sets, over many calibration draws, is the target or a little above."""
    rng = np.random.default_rng(2)

    def draw(n):
        probabilities = rng.dirichlet(np.full(5, 0.6), size=n)
        labels = (rng.random((n, 1)) > np.cumsum(probabilities, axis=1)).sum(axis=1).clip(max=4)
        return probabilities, labels

    coverage, sizes = [], []
    for _ in range(40):
        calibration, calibration_labels = draw(150)
        quantile = set_quantile(lac_scores(calibration, calibration_labels), 0.9)
        test, test_labels = draw(1000)
        members = prediction_sets(test, quantile)
        coverage.append(members[np.arange(len(test_labels)), test_labels].mean())
        sizes.append(members.sum(axis=1).mean())
    assert 0.9 <= np.mean(coverage) <= 0.93
    assert 1 < np.mean(sizes) < 5  # informative: smaller than every class


@pytest.mark.parametrize("value", [0, 1, 1.5, -0.1, "x"])
def test_a_coverage_outside_zero_one_is_one_line_naming_the_flag(value):
    with pytest.raises(DataError, match=r"--sets must be") as error:
        check_coverage(value)
    assert "\n" not in str(error.value)
    assert check_coverage("0.9") == 0.9
