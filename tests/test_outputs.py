"""The two-class rule and what follows from it."""

import numpy as np

from transferkit.outputs import (
    class_probabilities,
    encode_targets,
    loss_for,
    output_activation,
    output_units,
    predicted_labels,
    top_margin,
)


def test_two_classes_get_one_sigmoid_unit_more_get_softmax():
    assert (output_units(2), output_activation(2), loss_for(2)) == (1, "sigmoid", "binary_crossentropy")
    for n in (3, 7):
        assert (output_units(n), output_activation(n), loss_for(n)) == (n, "softmax", "categorical_crossentropy")


def test_a_sigmoid_output_becomes_two_probabilities_and_labels():
    outputs = np.array([[0.2], [0.5], [0.9]])
    np.testing.assert_allclose(class_probabilities(outputs), [[0.8, 0.2], [0.5, 0.5], [0.1, 0.9]])
    assert predicted_labels(outputs).tolist() == [0, 1, 1]
    np.testing.assert_allclose(top_margin(outputs), [0.6, 0.0, 0.8])


def test_softmax_labels_and_margins():
    outputs = np.array([[0.1, 0.7, 0.2], [0.4, 0.35, 0.25]])
    assert predicted_labels(outputs).tolist() == [1, 0]
    np.testing.assert_allclose(top_margin(outputs), [0.5, 0.05])


def test_targets_have_the_shape_of_the_output():
    assert encode_targets(np.array([0, 1, 1]), 2).shape == (3, 1)
    assert encode_targets(np.array([0, 2]), 3).tolist() == [[1, 0, 0], [0, 0, 1]]
