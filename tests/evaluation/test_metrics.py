import math

import numpy as np
import pytest
from sklearn import metrics as sk

from transferkit.evaluation.metrics import classification_metrics, expected_calibration_error


def test_metrics_equal_scikit_learn_on_a_fixed_case():
    true = np.array([0, 0, 1, 1, 2, 2, 2, 0])
    probabilities = np.array([
        [0.7, 0.2, 0.1], [0.4, 0.5, 0.1], [0.1, 0.8, 0.1], [0.3, 0.3, 0.4],
        [0.1, 0.1, 0.8], [0.2, 0.2, 0.6], [0.5, 0.1, 0.4], [0.9, 0.05, 0.05],
    ])
    predicted = probabilities.argmax(1)
    m = classification_metrics(true, probabilities, ["a", "b", "c"])
    assert m["accuracy"] == pytest.approx(sk.accuracy_score(true, predicted))
    assert m["balanced_accuracy"] == pytest.approx(sk.balanced_accuracy_score(true, predicted))
    assert m["log_loss"] == pytest.approx(sk.log_loss(true, probabilities))
    assert m["brier"] == pytest.approx(np.mean(np.sum((probabilities - np.eye(3)[true]) ** 2, axis=1)))
    p, r, f, s = sk.precision_recall_fscore_support(true, predicted)
    assert [m["per_class"][n]["f1"] for n in "abc"] == pytest.approx(f)
    assert [m["per_class"][n]["support"] for n in "abc"] == s.tolist()
    assert m["macro_avg"]["f1"] == pytest.approx(sk.f1_score(true, predicted, average="macro"))
    assert m["weighted_avg"]["recall"] == pytest.approx(sk.recall_score(true, predicted, average="weighted"))
    assert m["confusion_matrix"] == sk.confusion_matrix(true, predicted).tolist()
    assert "top5_accuracy" not in m and "roc_auc" not in m and m["absent_classes"] == []


def test_ece_by_hand_on_equal_width_bins():
    # Confidences 0.9 (right), 0.9 (wrong), 0.6 (right): bins 13 and 8 of 15.
    true = np.array([0, 1, 1])
    probabilities = np.array([[0.9, 0.1], [0.9, 0.1], [0.4, 0.6]])
    ece, bins = expected_calibration_error(true, probabilities)
    assert ece == pytest.approx((2 * abs(0.5 - 0.9) + abs(1.0 - 0.6)) / 3)
    assert len(bins) == 15 and sum(b.count for b in bins) == 3
    assert [b.count for b in bins if b.count] == [1, 2]


def test_two_classes_from_a_sigmoid_unit_and_an_absent_class():
    true = np.array([0, 0, 1, 1, 1])
    outputs = np.array([[0.2], [0.6], [0.7], [0.9], [0.4]])
    m = classification_metrics(true, outputs, ["neg", "pos"])
    assert m["threshold"] == 0.5
    assert m["roc_auc"] == pytest.approx(sk.roc_auc_score(true, outputs[:, 0]))
    assert m["average_precision"] == pytest.approx(sk.average_precision_score(true, outputs[:, 0]))
    assert m["brier"] == pytest.approx(sk.brier_score_loss(true, outputs[:, 0]))
    # Seven classes of which the images hold two: absent ones are named, top-5 is reported.
    probabilities = np.full((4, 7), 0.05)
    probabilities[:, 0], probabilities[:, 1] = 0.65, 0.1
    m = classification_metrics(np.array([0, 0, 1, 1]), probabilities, list("abcdefg"))
    assert m["absent_classes"] == list("cdefg") and m["per_class"]["c"]["recall"] is None
    assert m["top5_accuracy"] == 1.0 and m["accuracy"] == 0.5 and m["balanced_accuracy"] == 0.5
    assert not math.isnan(m["log_loss"])
