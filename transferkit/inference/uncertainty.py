"""What predict adds to a class when asked: whether the image looks like anything the run
was trained on (the rejection rule), and the set of classes that holds the true class with
a stated probability (the conformal prediction set).

Both are fitted on the validation split at the end of ``finetune`` (``transferkit.trust``)
and recorded in the run's labels.json; this module applies them, in numpy only, so that
predict (and anything above it) needs nothing of the layers that fit them.

    rule = load_rejection(run)                       # labels.json "rejection" + rejection.npz
    scores = rule.scores(probabilities, embeddings)  # higher: more like the training images
    unknown = rule.rejects(scores)                   # scores < rule.threshold
    sets = load_set_rule(run, 0.9).sets(probabilities)   # (n, k) bool, the top class always in

The scores, all "higher is more familiar":

    knn              cosine similarity of the image's backbone embedding (the backbone's feature
                     maps averaged over height and width, L2-normalised) to its k-th nearest
                     training image's (k = ``neighbours``)
    max_probability  the largest calibrated class probability
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from transferkit.errors import DataError, RunError
from transferkit.outputs import class_probabilities

REFERENCE_FILE = "rejection.npz"
SET_METHOD = "LAC"

log = logging.getLogger("transferkit")


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Each row divided by its L2 norm (a zero row stays zero), as float32."""
    vectors = np.asarray(vectors, dtype="float32")
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.maximum(norms, 1e-12)


def max_probability(probabilities: np.ndarray, embeddings=None, reference=None, neighbours: int = 1) -> np.ndarray:
    """The largest class probability per row of (n, k) probabilities (or a sigmoid's (n, 1))."""
    return class_probabilities(probabilities).max(axis=1)


def knn_similarity(probabilities, embeddings: np.ndarray, reference: np.ndarray, neighbours: int = 1) -> np.ndarray:
    """Cosine similarity of each embedding to its ``neighbours``-th most similar reference row.

    Args:
        probabilities: unused (the score reads embeddings only; the signature is the score table's).
        embeddings: (n, d) backbone embeddings.
        reference: (m, d) unit-length training embeddings.
        neighbours: k, at most m.

    Returns:
        (n,) float32 similarities in [-1, 1].
    """
    queries = unit_rows(embeddings)
    reference = np.asarray(reference, dtype="float32")
    k = min(int(neighbours), len(reference))
    if len(queries) == 0:
        return np.zeros(0, dtype="float32")
    similarity = queries @ reference.T
    # the k-th largest per row: partition instead of a full sort
    return -np.partition(-similarity, k - 1, axis=1)[:, k - 1]


# score name -> (function(probabilities, embeddings, reference, neighbours), needs the embedding)
SCORES: dict[str, tuple[Callable[..., np.ndarray], bool]] = {
    "knn": (knn_similarity, True),
    "max_probability": (max_probability, False),
}


def keep_threshold(scores: np.ndarray, coverage: float) -> float:
    """The threshold that keeps at least ``coverage`` of images exchangeable with ``scores``.

    The ``floor((n + 1) * (1 - coverage))``-th smallest score (split-conformal): a new image of
    the same distribution scores at least this with probability >= ``coverage``. With too few
    scores for that (fewer than 1 / (1 - coverage) - 1), -inf: nothing is rejected.

    Args:
        scores: the validation images' scores.
        coverage: the share to keep, in (0, 1).

    Returns:
        The threshold (keep an image whose score is >= it).
    """
    scores = np.sort(np.asarray(scores, dtype="float64"))
    rank = math.floor((len(scores) + 1) * (1.0 - coverage) + 1e-9)
    return float(scores[rank - 1]) if rank >= 1 else -math.inf


@dataclass(frozen=True)
class RejectionRule:
    """A run's rule for images of no known class.

    Attributes:
        score: a name in ``SCORES``.
        threshold: images scoring below it are unknown.
        neighbours: k of the "knn" score.
        reference: (m, d) unit-length training embeddings for "knn"; None for other scores.
        target_coverage: the share of validation images it was fitted to keep.
    """

    score: str
    threshold: float
    neighbours: int = 1
    reference: np.ndarray | None = field(default=None, repr=False)
    target_coverage: float = 0.95

    @property
    def needs_embedding(self) -> bool:
        """Whether the score reads the backbone embedding (the forward pass must give it)."""
        return SCORES[self.score][1]

    def scores(self, probabilities: np.ndarray, embeddings: np.ndarray | None = None) -> np.ndarray:
        """The score of each image (higher: more like the training images).

        Args:
            probabilities: (n, k) class probabilities (or a sigmoid's (n, 1) outputs).
            embeddings: (n, d) backbone embeddings, for a score that reads them.

        Returns:
            (n,) float32 scores.
        """
        function, needs = SCORES[self.score]
        if needs and embeddings is None:
            raise ValueError(f"the {self.score} score needs the images' backbone embeddings")
        return np.asarray(function(probabilities, embeddings, self.reference, self.neighbours), dtype="float32")

    def rejects(self, scores: np.ndarray) -> np.ndarray:
        """True where an image is unknown (its score is below the threshold)."""
        return np.asarray(scores) < self.threshold


def lac_scores(probabilities: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """LAC nonconformity scores: 1 - the probability of each image's true class."""
    probabilities = class_probabilities(probabilities)
    labels = np.asarray(labels, dtype="int64")
    return 1.0 - probabilities[np.arange(len(labels)), labels]


def set_quantile(calibration_scores: np.ndarray, coverage: float) -> float:
    """Split-conformal quantile: the ``ceil((n + 1) * coverage)``-th smallest calibration score
    (inf when that rank is above n: every class goes in every set).

    Args:
        calibration_scores: the validation images' LAC scores.
        coverage: the probability, in (0, 1), that a set holds the true class.

    Returns:
        q: a class is in an image's set when 1 - its probability <= q.
    """
    scores = np.sort(np.asarray(calibration_scores, dtype="float64"))
    rank = _set_rank(len(scores), coverage)
    return float(scores[rank - 1]) if 1 <= rank <= len(scores) else math.inf


def _set_rank(n: int, coverage: float) -> int:
    """Which of n sorted calibration scores is the quantile: ceil((n + 1) * coverage)."""
    return math.ceil((n + 1) * coverage - 1e-9)


def prediction_sets(probabilities: np.ndarray, quantile: float) -> np.ndarray:
    """(n, k) bool: the classes whose probability is at least 1 - ``quantile``, and always the
    top class (an empty set says nothing a user can act on, and adding the top class only
    raises the coverage)."""
    probabilities = class_probabilities(probabilities)
    members = probabilities >= 1.0 - quantile - 1e-12
    if len(probabilities):
        members[np.arange(len(probabilities)), probabilities.argmax(axis=1)] = True
    return members


@dataclass(frozen=True)
class SetRule:
    """Conformal prediction sets at one coverage.

    Attributes:
        coverage: the probability that a set holds the true class.
        quantile: the LAC quantile of the validation scores at that coverage.
        n_calibration: how many validation images the scores come from.
    """

    coverage: float
    quantile: float
    n_calibration: int

    def sets(self, probabilities: np.ndarray) -> np.ndarray:
        """(n, k) bool membership of each class in each image's set."""
        return prediction_sets(probabilities, self.quantile)


def check_coverage(coverage: float, flag: str = "--sets") -> float:
    """The coverage as a float, or a ``DataError`` naming the flag when it is not in (0, 1)."""
    try:
        value = float(coverage)
    except (TypeError, ValueError):
        raise DataError(f"{flag} must be a number between 0 and 1 (exclusive), e.g. 0.9; got {coverage!r}") from None
    if not 0.0 < value < 1.0:
        raise DataError(f"{flag} must be between 0 and 1 (exclusive), e.g. 0.9 for sets that hold the true "
                        f"class 90% of the time; got {coverage}")
    return value


def _labels_entry(run, key: str, what: str, flag: str) -> dict:
    entry = getattr(run, key, None)
    if not entry:
        raise RunError(f"{run.path} has no {what} in labels.json (a run trained before transferkit fitted one): "
                       f"{flag} needs it; train the run again with 'transferkit finetune'")
    if not isinstance(entry, dict):
        raise RunError(f"{Path(run.path) / 'labels.json'}: \"{key}\" is damaged (not a table); train the run again")
    return entry


def load_rejection(run) -> RejectionRule:
    """The rejection rule a run recorded (labels.json "rejection", and for the "knn" score the
    training embeddings in ``rejection.npz`` beside it).

    Args:
        run: a ``Run`` (its ``rejection`` entry and ``path``).

    Returns:
        A ``RejectionRule``.

    Raises:
        RunError: the run has no rejection entry (trained before there was one), or its entry
            or reference file is missing or damaged.
    """
    entry = _labels_entry(run, "rejection", "rejection threshold", "--reject")
    labels_file = Path(run.path) / "labels.json"
    try:
        score = str(entry["score"])
        threshold = float(entry["threshold"])
        neighbours = int(entry.get("neighbours", 1))
        target = float(entry.get("target_coverage", math.nan))
    except (KeyError, TypeError, ValueError) as error:
        raise RunError(f"{labels_file}: \"rejection\" is damaged ({type(error).__name__}: {error}); "
                       "train the run again") from error
    if score not in SCORES:
        raise RunError(f"{labels_file}: unknown rejection score {score!r} (this transferkit knows "
                       f"{', '.join(SCORES)}); use the transferkit version that trained the run")
    reference = None
    if SCORES[score][1]:
        reference = load_reference(Path(run.path) / str(entry.get("reference_file", REFERENCE_FILE)))
    return RejectionRule(score, threshold, neighbours, reference, target)


def load_reference(path: Path) -> np.ndarray:
    """The unit-length training embeddings of a run's ``rejection.npz``.

    Raises:
        RunError: the file is missing or damaged.
    """
    if not path.is_file():
        raise RunError(f"{path} is missing: --reject needs the training embeddings it holds; copy it back "
                       "from the run, or train the run again")
    try:
        with np.load(path, allow_pickle=False) as archive:
            reference = np.asarray(archive["embeddings"], dtype="float32")
    except (OSError, ValueError, KeyError) as error:
        raise RunError(f"{path} is damaged ({type(error).__name__}); copy it back from the run, or train the "
                       "run again") from error
    if reference.ndim != 2 or len(reference) == 0:
        raise RunError(f"{path} is damaged (embeddings of shape {reference.shape}); train the run again")
    return reference


def load_set_rule(run, coverage: float) -> SetRule:
    """The conformal set rule of a run at a coverage (labels.json "prediction_sets").

    Args:
        run: a ``Run``.
        coverage: in (0, 1), e.g. 0.9.

    Returns:
        A ``SetRule``.

    Raises:
        DataError: ``coverage`` is not in (0, 1).
        RunError: the run has no "prediction_sets" entry, or it is damaged.
    """
    coverage = check_coverage(coverage)
    entry = _labels_entry(run, "prediction_sets", "prediction-set scores", "--sets")
    try:
        scores = np.asarray(entry["scores"], dtype="float64")
        method = str(entry.get("method", SET_METHOD))
    except (KeyError, TypeError, ValueError) as error:
        raise RunError(f"{Path(run.path) / 'labels.json'}: \"prediction_sets\" is damaged "
                       f"({type(error).__name__}: {error}); train the run again") from error
    if method != SET_METHOD or scores.ndim != 1:
        raise RunError(f"{Path(run.path) / 'labels.json'}: \"prediction_sets\" holds method {method!r} "
                       f"with scores of shape {scores.shape}; this transferkit reads {SET_METHOD} scores")
    rule = SetRule(coverage, set_quantile(scores, coverage), len(scores))
    if math.isinf(rule.quantile) and str(run.path) not in _UNREACHABLE_TOLD:
        _UNREACHABLE_TOLD.add(str(run.path))  # once per run: serve asks per request, at any coverage
        reachable = (f"above {_reachable(len(scores))} every set holds every class: ask for "
                     f"{_reachable(len(scores))} or less (--sets, serve's ?sets=), or train with more validation "
                     "images") if len(scores) else "every set holds every class: train with a validation split"
        log.warning("prediction sets at coverage %s need at least %d validation images; %s was calibrated on %d, "
                    "so %s", coverage, images_for_coverage(coverage), run.path, len(scores), reachable)
    return rule


# Run folders whose unreachable coverage was already warned about.
_UNREACHABLE_TOLD: set[str] = set()


def images_for_coverage(coverage: float) -> int:
    """The fewest validation images with which split-conformal sets can reach ``coverage``
    (the quantile's rank ceil((n + 1) * coverage) at most n); with fewer, every set holds
    every class."""
    n = max(1, math.ceil(coverage / (1.0 - coverage) - 1e-9))
    while n > 1 and _set_rank(n - 1, coverage) <= n - 1:
        n -= 1
    while _set_rank(n, coverage) > n:
        n += 1
    return n


def _reachable(n: int) -> str:
    """The highest coverage n validation images reach, n / (n + 1), rounded down to 3 places."""
    return f"{math.floor(1000 * n / (n + 1)) / 1000:g}"


def write_reference(folder: str | os.PathLike, embeddings: np.ndarray) -> Path:
    """Write unit-length training embeddings as ``folder/rejection.npz`` (float16), atomically.

    Returns:
        The file.
    """
    from transferkit.files import atomic_path

    path = Path(folder) / REFERENCE_FILE
    with atomic_path(path) as temporary, open(temporary, "wb") as handle:
        np.savez(handle, embeddings=np.asarray(embeddings, dtype="float16"))
    return path

