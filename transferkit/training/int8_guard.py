"""The head's validation loss on int8 features against float32: the second half of int8's
guard for the feature cache.

``inference.int8`` checks an int8 feature extractor against float32 before use: the relative
L2 difference of its features. That does not say what the head makes of them: the error is
dominated by the largest channels, while a head can lean on small ones that 8 bits round
coarsely. So after the first stage that trained on int8 features (normally the head stage),
its trained part's validation loss (the run's own loss) is computed on the int8 features of
up to ``CHECK_IMAGES`` validation images and on the same images' features from the float32
network the int8 one was checked against (the cache's own: validation features are always
float32's). int8 falls short where the two losses are further
apart than ``tolerance`` allows, either way: a loss higher on int8 features says rounding
hid what the head uses; one higher on float32 features says the head fitted int8's rounding,
while the saved model runs on float32 (or bfloat16) features. The later stages' features are
then computed in float32, with a one-line notice (``training.stages``).

It runs in every run, on that run's own head: a cached int8 network's check, and a study's
int8 features shared between trials, carry only the feature check over.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import keras
import numpy as np

CHECK_IMAGES = 128  # validation images compared: an int8 pass over them is the guard's cost
# Heads trained on int8 features of random-weight VGG16 (96 validation images, the head
# stage's default rate) measured their loss on int8 features 0.2-2.5% from float32's, mostly
# lower; overfitted heads (10x the rate, 24 images) up to 5.4%.
LOSS_TOLERANCE = 0.02  # nats the two losses may differ by (for low losses, where 3% is noise) ...
RELATIVE_TOLERANCE = 0.03  # ... or this share of float32's loss, whichever is larger


def tolerance(float32_loss: float) -> float:
    """How far the int8 features' loss may be from ``float32_loss``: max(``LOSS_TOLERANCE``,
    ``RELATIVE_TOLERANCE`` x ``float32_loss``)."""
    return max(LOSS_TOLERANCE, RELATIVE_TOLERANCE * float32_loss)


@dataclass(frozen=True)
class HeadLossCheck:
    """How the trained part's validation loss on int8 features compared with float32's.

    Attributes:
        stage: the stage that trained on the int8 features.
        images: how many validation images were compared.
        float32_loss, int8_loss: the run's loss on the two networks' features of those images.
        tolerance: how far apart the two may be (``tolerance``).
        feature_check: the int8 network's own check (``inference.int8.Int8Check.describe``).
    """

    stage: str
    images: int
    float32_loss: float
    int8_loss: float
    tolerance: float
    feature_check: str

    @property
    def passed(self) -> bool:
        return abs(self.int8_loss - self.float32_loss) <= self.tolerance

    def describe(self) -> str:
        """One line: the two losses and the verdict."""
        if self.passed:
            return (f"int8 features: the head's validation loss {self.int8_loss:.4f} against float32's "
                    f"{self.float32_loss:.4f} on {self.images} images (within {self.tolerance:.4f})")
        change = "raised" if self.int8_loss > self.float32_loss else "lowered"
        return (f"int8 features {change} the head's validation loss from {self.float32_loss:.4f} to "
                f"{self.int8_loss:.4f} on {self.images} images (> {self.tolerance:.4f})")

    def record(self) -> dict:
        """What metrics.json records (its "int8_features"), and a checkpoint's state."""
        return {**asdict(self), "passed": self.passed}

    @classmethod
    def from_record(cls, record: dict) -> HeadLossCheck:
        """The check ``record`` wrote (a resumed run's)."""
        return cls(**{name: value for name, value in record.items() if name != "passed"})


def compare_head_loss(part, sample, loss, stage: str) -> HeadLossCheck:
    """The trained part's loss on a sample's int8 features against its float32 features.

    Args:
        part: the trained part (features -> class outputs), run in inference mode.
        sample: ``training.features.PairedFeatures`` (``FeaturePlan.int8_sample``).
        loss: the run's loss (``training.compile.make_loss``).
        stage: the stage's name, for the record.

    Returns:
        A ``HeadLossCheck``.
    """
    float32_loss = _mean_loss(part, sample.float32, sample.targets, loss)
    int8_loss = _mean_loss(part, sample.int8, sample.targets, loss)
    return HeadLossCheck(stage, len(sample.targets), float32_loss, int8_loss, tolerance(float32_loss),
                         sample.check.describe())


def _mean_loss(part, features: np.ndarray, targets: np.ndarray, loss, chunk: int = 64) -> float:
    outputs = np.concatenate([keras.ops.convert_to_numpy(part(features[start : start + chunk], training=False))
                              for start in range(0, len(features), chunk)])
    return float(keras.ops.convert_to_numpy(loss(targets, outputs.astype("float32"))))
