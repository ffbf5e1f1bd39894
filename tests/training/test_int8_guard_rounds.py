"""The head-loss guard's rule on constructed features: the trained part is a softmax over the
features (so features are logits), and int8's features are float32's plus a chosen error.
The images are compared in rounds until the mean difference is clearly within the tolerance
or clearly beyond it, else on all of them (at most ``CHECK_MOST``), and the verdict is the
mean difference's."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from transferkit.inference.int8 import Int8Check
from transferkit.outputs import encode_targets
from transferkit.training import int8_guard
from transferkit.training.compile import make_loss
from transferkit.training.features import PairedFeatures


@pytest.fixture(autouse=True)
def tolerance_of_0_02(monkeypatch):
    """The rule at a tolerance of 0.02 nats either way, whatever the shipped one: the losses
    here are about 0.05, so the relative tolerance never takes over."""
    monkeypatch.setattr(int8_guard, "LOSS_TOLERANCE", 0.02)
    monkeypatch.setattr(int8_guard, "RELATIVE_TOLERANCE", 0.03)
    monkeypatch.setattr(int8_guard, "NOISE_FACTOR", 1.0)  # both ways alike, but where a test says


CHECK = Int8Check("feature error", 0.03, 0.1, 2.0, 64)
SOFTMAX = keras.Sequential([keras.Input((4,)), keras.layers.Softmax()])
LOSS = make_loss(4)


def images(n, seed):
    """n images' float32 logits, confidently right (loss about 0.05 each), and targets."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, n)
    logits = rng.normal(0, 0.3, (n, 4)).astype("float32")
    logits[np.arange(n), labels] += 4.0
    return logits, encode_targets(labels, 4)


def rounds(errors, size=int8_guard.CHECK_ROUND, taken=None):
    """Rounds of ``size`` images whose int8 logits of the right class are lowered by
    ``errors`` (one per image); ``taken`` counts the rounds drawn."""
    for first in range(0, len(errors), size):
        part = errors[first : first + size]
        logits, targets = images(len(part), first)
        rounded = logits - targets * part[:, None]
        if taken is not None:
            taken.append(first)
        yield PairedFeatures(targets, rounded.astype("float32"), logits, CHECK)


def test_a_small_even_difference_passes_on_the_first_round():
    taken = []
    check = int8_guard.compare_head_loss(SOFTMAX, rounds(np.full(359, 0.02), taken=taken), LOSS, "head")
    assert taken == [0] and check.images == 128
    assert check.passed and 0 < check.int8_loss - check.float32_loss < check.tolerance
    assert check.clear and check.standard_error < 0.01 and "standard error" in check.describe()


def test_a_large_even_difference_fails_on_the_first_round():
    taken = []
    check = int8_guard.compare_head_loss(SOFTMAX, rounds(np.full(359, 1.0), taken=taken), LOSS, "head")
    assert taken == [0] and check.images == 128
    assert not check.passed and check.int8_loss - check.float32_loss > check.tolerance
    assert check.describe().startswith("int8 features raised the head's validation loss")


def test_a_few_images_carrying_the_difference_go_on_to_every_image_and_the_mean_decides():
    """In the first round 2 of 128 images lose about 1.9 nats each: a mean difference of
    0.03, beyond the tolerance of 0.02 but not clearly. Over all 359 images it is 0.011:
    int8 passes. One round alone would have failed it."""
    errors = np.zeros(359)
    errors[[5, 77]] = 6.0
    taken = []
    check = int8_guard.compare_head_loss(SOFTMAX, rounds(errors, taken=taken), LOSS, "head")
    assert taken == [0, 128, 256] and check.images == 359
    assert check.passed and abs(check.int8_loss - check.float32_loss) < check.tolerance
    first = int8_guard.compare_head_loss(SOFTMAX, rounds(errors[:128]), LOSS, "head")
    assert not first.passed and not first.clear


def test_at_most_check_most_images_are_compared():
    errors = np.zeros(2000)
    errors[::100] = 6.0  # every round unclear
    taken = []
    check = int8_guard.compare_head_loss(SOFTMAX, rounds(errors, taken=taken), LOSS, "head")
    assert check.images == int8_guard.CHECK_MOST and len(taken) == int8_guard.CHECK_MOST // int8_guard.CHECK_ROUND


def test_no_images_no_check():
    assert int8_guard.compare_head_loss(SOFTMAX, rounds(np.zeros(0)), LOSS, "head") is None


@pytest.mark.parametrize("classes, smoothing", [(4, 0.0), (4, 0.1), (2, 0.0), (2, 0.1)])
def test_the_per_image_losses_average_to_the_runs_loss(classes, smoothing):
    from transferkit.recipe import LossConfig

    rng = np.random.default_rng(0)
    loss = make_loss(classes, LossConfig(label_smoothing=smoothing))
    units = 1 if classes == 2 else classes
    part = keras.Sequential([keras.Input((units,)), keras.layers.Activation("sigmoid" if units == 1 else "softmax")])
    features = rng.normal(0, 2, (50, units)).astype("float32")
    targets = encode_targets(rng.integers(0, classes, 50), classes)
    each = int8_guard.image_losses(part, features, targets, loss, chunk=16)
    assert each.shape == (50,) and each.std() > 0
    whole = float(keras.ops.convert_to_numpy(loss(targets, part(features))))
    assert each.mean() == pytest.approx(whole, rel=1e-5)


def test_int8_may_be_noisier_than_it_may_be_shifted(monkeypatch):
    """A loss higher on int8 features (noise the head reads worse) has NOISE_FACTOR times the
    room of a loss lower on them (a shift the head fitted): 0.03 above float32's passes at a
    tolerance of 0.02 and a factor of 2, 0.03 below fails, and 0.07 above fails."""
    monkeypatch.setattr(int8_guard, "NOISE_FACTOR", 2.0)
    # int8's right-class logits 0.45 lower: its loss about 0.03 higher.
    noisier = int8_guard.compare_head_loss(SOFTMAX, rounds(np.full(359, 0.45)), LOSS, "head")
    assert 0.02 < noisier.int8_loss - noisier.float32_loss < 0.04 and noisier.noise_tolerance == 0.04
    assert noisier.passed and noisier.clear and noisier.images == 128 and "within 0.0400" in noisier.describe()
    noisiest = int8_guard.compare_head_loss(SOFTMAX, rounds(np.full(359, 0.8)), LOSS, "head")  # about 0.07
    assert noisiest.int8_loss - noisiest.float32_loss > 0.04 and not noisiest.passed
    assert noisiest.describe().startswith("int8 features raised") and "(> 0.0400" in noisiest.describe()
    # int8's right-class logits 0.8 higher: its loss about 0.03 lower, beyond 0.02 that way.
    shifted = int8_guard.compare_head_loss(SOFTMAX, rounds(np.full(359, -0.8)), LOSS, "head")
    assert -0.04 < shifted.int8_loss - shifted.float32_loss < -0.02
    assert not shifted.passed and shifted.clear and shifted.describe().startswith("int8 features lowered")
    assert "(> 0.0200" in shifted.describe()
    assert int8_guard.HeadLossCheck.from_record(shifted.record()) == shifted


def test_a_record_from_before_the_standard_error_was_kept_still_reads():
    """A checkpoint written before the rounds holds no "standard_error": a resumed run reads it."""
    old = {"stage": "head", "images": 128, "float32_loss": 0.47, "int8_loss": 0.43, "tolerance": 0.02,
           "feature_check": "feature error with float32 0.0253 <= 0.1", "passed": False}
    check = int8_guard.HeadLossCheck.from_record(old)
    assert not check.passed and not check.clear and check.standard_error is None
    assert "standard error" not in check.describe()
    assert check.record() == {**old, "standard_error": None, "noise_tolerance": None}
    # Nor a noise tolerance: the tolerance holds both ways, as it did then.
    assert check.above == 0.02 and not int8_guard.HeadLossCheck.from_record({**old, "int8_loss": 0.495}).passed
