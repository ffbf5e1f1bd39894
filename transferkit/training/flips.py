"""Whether horizontal flips change the class, and ``augment.hflip = "auto"``.

A mirrored cat is a cat; a mirrored digit, letter or left-pointing arrow is another thing.
Training on flips then teaches the wrong class. ``check_flips`` compares a model's class
probabilities of validation images with those of their mirror images: mirrored images that
score clearly worse (the rule at ``FLIP_ACCURACY_DROP``) are the sign. Finetune warns with it
at the end where every stage flipped (``evaluation.tta``), and so does ``doctor --model``.

With ``hflip = "auto"`` (the default) the run decides by itself. Its first stage trains
without flips; then ``judge_flips`` checks that model on the validation images, a round at a
time until the answer is clear (``JUDGE_ROUND``, ``DECISIVE``), and the later stages train
with flips unless mirrored images scored clearly worse (``training.stages``, ``AutoFlips``).
The feature cache computes its views with flips all the same, in one pass for all stages: a
stage without flips reads a view's mirrored images as the image itself (view 0), so nothing
is computed again whatever is decided.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

# Mirrored validation images score "clearly worse" (check_flips) when all three hold: the
# accuracy drops by at least FLIP_ACCURACY_DROP, the log loss rises by more than
# FLIP_LOSS_MARGIN nats, and the images the flip makes wrong outnumber those it makes right
# by more than twice the square root of their sum (a sign test at about two standard
# deviations, which needs at least 5 more images made wrong than right: few images never warn).
FLIP_ACCURACY_DROP = 0.05
FLIP_LOSS_MARGIN = 0.1
# Fewer validation images than this tell an effect from noise too seldom: nothing is judged.
MIN_JUDGED_IMAGES = 20
# At most this many validation images (a seeded choice) are judged on.
MAX_JUDGED_IMAGES = 500
# Judged in rounds of about this many images; a judgement ends once its answer is clear, more
# than DECISIVE standard errors from the line (a sequential test: a clear answer shows on the
# first round, an unclear one goes on to every image).
JUDGE_ROUND = 96
DECISIVE = 3.0
FLIP_ADVICE = "turn the recipe's horizontal flip off: --set augment.hflip=false (or hflip = false under [augment])"


@dataclass(frozen=True)
class FlipCheck:
    """How mirrored validation images score against the originals.

    Attributes:
        n_images: validation images.
        accuracy, flipped_accuracy: accuracy on the images and on their mirror images.
        log_loss, flipped_log_loss: mean log loss (nats) likewise.
        made_wrong: images right as they are and wrong mirrored; made_right: the reverse.
    """

    n_images: int
    accuracy: float
    flipped_accuracy: float
    log_loss: float
    flipped_log_loss: float
    made_wrong: int
    made_right: int

    @property
    def changes_class(self) -> bool:
        """Mirrored images score clearly worse (the rule at ``FLIP_ACCURACY_DROP``)."""
        return self._worse_by(2.0)

    def clearly_changes_class(self) -> bool:
        """As ``changes_class``, the sign test at ``DECISIVE`` standard deviations: an answer
        that a later round of images would not overturn."""
        return self._worse_by(DECISIVE)

    def clearly_keeps_class(self) -> bool:
        """The accuracy drop lies more than ``DECISIVE`` standard errors below
        ``FLIP_ACCURACY_DROP``: more images would not show flips changing the class."""
        net = self.made_wrong - self.made_right
        return net + DECISIVE * math.sqrt(self.made_wrong + self.made_right) < FLIP_ACCURACY_DROP * self.n_images

    def _worse_by(self, deviations: float) -> bool:
        net = self.made_wrong - self.made_right
        return (net >= FLIP_ACCURACY_DROP * self.n_images - 1e-9
                and self.flipped_log_loss > self.log_loss + FLIP_LOSS_MARGIN
                and net > deviations * math.sqrt(self.made_wrong + self.made_right))

    def figure(self) -> str:
        """The measurement in words, e.g. "accuracy 0.950 -> 0.610, log loss 0.150 -> 1.200 ..."."""
        return (f"mirrored validation images: accuracy {self.accuracy:.3f} -> {self.flipped_accuracy:.3f}, "
                f"log loss {self.log_loss:.3f} -> {self.flipped_log_loss:.3f} ({self.n_images} images; "
                f"{self.made_wrong} made wrong, {self.made_right} made right)")

    def as_dict(self) -> dict:
        """The fields and ``changes_class``, JSON-ready."""
        return {**asdict(self), "changes_class": self.changes_class}


def check_flips(plain: np.ndarray, flipped: np.ndarray, labels: np.ndarray) -> FlipCheck:
    """Compare the class probabilities of images and of their mirror images.

    Args:
        plain, flipped: (n, k) class probabilities of the images and of their mirror images.
        labels: (n,) true class indices.

    Returns:
        A ``FlipCheck``; its ``changes_class`` is the warning's rule.
    """
    labels = np.asarray(labels, dtype="int64")
    right = np.argmax(plain, axis=1) == labels
    right_flipped = np.argmax(flipped, axis=1) == labels
    count = max(1, len(labels))
    return FlipCheck(
        n_images=int(len(labels)), accuracy=float(np.sum(right) / count),
        flipped_accuracy=float(np.sum(right_flipped) / count), log_loss=mean_log_loss(plain, labels),
        flipped_log_loss=mean_log_loss(flipped, labels), made_wrong=int(np.sum(right & ~right_flipped)),
        made_right=int(np.sum(~right & right_flipped)),
    )


def image_log_losses(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Each image's negative log probability of its true class (nats; clipped at 1e-15)."""
    picked = np.asarray(probabilities, dtype="float64")[np.arange(len(labels)), labels]
    return -np.log(np.clip(picked, 1e-15, 1.0))


def mean_log_loss(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log probability of the true classes (nats; probabilities clipped at 1e-15)."""
    return float(np.mean(image_log_losses(probabilities, labels))) if len(labels) else 0.0


def judge_flips(probabilities: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]], labels: np.ndarray,
                seed: int = 0) -> FlipCheck | None:
    """Whether flips change the class, on as few validation images as make it clear.

    The images are taken in a seeded order (at most ``MAX_JUDGED_IMAGES``), ``JUDGE_ROUND``
    at a time; after each round ``check_flips`` on all so far ends the judgement when flips
    clearly change the class or clearly do not (``FlipCheck.clearly_changes_class``,
    ``clearly_keeps_class``), else on the last round by ``changes_class``.

    Args:
        probabilities: rows (indices into the validation images) -> (their (n, k) class
            probabilities, their mirror images').
        labels: (n,) the validation images' class indices.
        seed: the order the images are taken in; default 0.

    Returns:
        The ``FlipCheck`` of the images judged; None with fewer than ``MIN_JUDGED_IMAGES``.
    """
    labels = np.asarray(labels, dtype="int64")
    if len(labels) < MIN_JUDGED_IMAGES:
        return None
    order = np.random.default_rng(seed).permutation(len(labels))[:MAX_JUDGED_IMAGES]
    judged, plain, flipped = [], [], []
    for start in range(0, len(order), JUDGE_ROUND):
        rows = np.sort(order[start : start + JUDGE_ROUND])
        these, mirrored = probabilities(rows)
        judged.append(rows)
        plain.append(np.asarray(these, dtype="float64"))
        flipped.append(np.asarray(mirrored, dtype="float64"))
        check = check_flips(np.concatenate(plain), np.concatenate(flipped), labels[np.concatenate(judged)])
        if check.clearly_changes_class() or check.clearly_keeps_class():
            break
    return check


@dataclass(frozen=True)
class AutoFlips:
    """``augment.hflip = "auto"``: the first stage that trains does so without flips; after it
    ``judge_flips`` checks its model on the validation images, and the later stages train
    with flips unless mirrored images scored clearly worse (a model that never saw a mirrored
    image tells whether mirroring keeps the class; one trained on flips learns to call a
    mirrored image by the original's class, or cannot learn the task at all).

    Attributes:
        without: the training augmenter factory without flips (None where the recipe
            augments with nothing else).
    """

    without: Callable[[], object] | None


def auto_flips(augment) -> AutoFlips | None:
    """The ``AutoFlips`` of a recipe's ``augment`` section where its ``hflip`` is "auto", else None."""
    from transferkit.data.augment import augmenter_factory

    return AutoFlips(augmenter_factory(augment, flips=False)) if augment.hflip == "auto" else None


def flip_free_stages(stages, record: dict | None) -> set[int]:
    """The stages of ``hflip = "auto"`` that train without flips: the first that trains, and
    where the decision (``flip_record``) found that flips change the class, all after it.

    Args:
        stages: the recipe's ``StageConfig``s.
        record: the decision, or None before it.
    """
    trained = [index for index, stage in enumerate(stages) if stage.epochs > 0]
    free = set(trained[:1])
    if record is not None and not record["kept"]:
        free.update(index for index in trained if index > record["stage_index"])
    return free


def flipped_after_judging(hflip, record: dict | None) -> bool:
    """Whether the stages after the judged one trained with flips: ``hflip`` true, or "auto"
    whose decision (``flip_record``) kept them (no decision: no later stage flipped).

    Args:
        hflip: the recipe's ``augment.hflip`` (true, false or "auto").
        record: the run's flip decision, or None.
    """
    return hflip is True or (hflip == "auto" and record is not None and record["kept"])


def as_trained(recipe, record: dict | None):
    """The recipe as the run's last stage trained: ``augment.hflip`` false where "auto" did
    not flip after its first stage (the decision found that flips change the class, or no
    later stage trained), else the recipe itself. The TTA choice reads it: no mirrored
    variant for a model trained without flips.

    Args:
        recipe: the run's ``Recipe``.
        record: the run's flip decision (``flip_record``), or None.
    """
    if recipe.augment.hflip != "auto" or flipped_after_judging(recipe.augment.hflip, record):
        return recipe
    return recipe.model_copy(update={"augment": recipe.augment.model_copy(update={"hflip": False})})


def flip_record(check: FlipCheck | None, stage: str, index: int, reason: str | None = None) -> dict:
    """What a run records of the decision (metrics.json "hflip", the checkpoint's state).

    Args:
        check: the ``judge_flips`` check, or None where nothing was judged (too few
            validation images, or ``reason``): the later stages flip then.
        stage, index: the stage judged after, its name and index.
        reason: why nothing was judged, where not too few images; default None.

    Returns:
        {"mode": "auto", "judged_after", "stage_index", "kept" (the later stages flip),
        "check" (``FlipCheck.as_dict``, or None), and "reason" where given}; a run adds the
        judgement's "seconds".
    """
    record = {"mode": "auto", "judged_after": stage, "stage_index": index,
              "kept": check is None or not check.changes_class, "check": None if check is None else check.as_dict()}
    return record if reason is None else {**record, "reason": reason}


def describe_decision(record: dict, stages: list[str]) -> str:
    """One line: the decision, its figures, and which stages flip."""
    later = ", ".join(repr(name) for name in stages[record["stage_index"] + 1 :])
    check = record.get("check")
    if check is None:
        why = record.get("reason") or f"fewer than {MIN_JUDGED_IMAGES} validation images to judge them on"
        return f"horizontal flips (hflip = \"auto\"): not judged ({why}); stage(s) {later} train with them"
    figure = FlipCheck(**{key: check[key] for key in FlipCheck.__dataclass_fields__}).figure()
    if record["kept"]:
        return (f"horizontal flips (hflip = \"auto\"): after stage '{record['judged_after']}', trained without "
                f"them, {figure}; stage(s) {later} train with them")
    return (f"horizontal flips (hflip = \"auto\") seem to change the class: after stage '{record['judged_after']}', "
            f"trained without them, {figure}; stage(s) {later} train without them too")
