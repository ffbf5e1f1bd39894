"""Keras PyDataset batches of decoded images, augmented with one augmenter per worker thread,
and the same batches as a ``tf.data.Dataset`` (``to_tf_dataset``: what Keras on TensorFlow is
given, ``keras_input``)."""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable

import keras
import numpy as np

from transferkit.errors import StrategyError

log = logging.getLogger("transferkit")


class SeededBatches(keras.utils.PyDataset):
    """Batches in an order drawn from (seed, epoch): the same order whatever reads them.

    Subclasses say what a sample is (``_inputs``); this class owns the order, the targets
    and sample weights, and the epoch counter.
    """

    def __init__(self, count: int, targets: np.ndarray, batch_size: int, *, shuffle: bool,
                 sample_weights: np.ndarray | None, seed: int, workers: int = 1):
        super().__init__(workers=workers, use_multiprocessing=False)
        self.count = count
        self.targets = targets
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.sample_weights = sample_weights
        self.seed = seed
        self._epoch_lock = threading.RLock()
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Position the stream at an epoch (each epoch has its own seeded order): the next
        pass over ``to_tf_dataset`` takes this epoch."""
        with self._epoch_lock:
            self._place(epoch)
            self._positioned = True

    def _place(self, epoch: int) -> None:
        """What an epoch sets (a subclass adds its own; called under the epoch lock)."""
        self.epoch = epoch
        self.order = (np.random.default_rng([self.seed, epoch]).permutation(self.count)
                      if self.shuffle else np.arange(self.count))

    def begin_pass(self) -> None:
        """A pass over ``to_tf_dataset`` begins: it takes the epoch set since the last pass
        began (``set_epoch``: the epoch callback, or the start), else the one after the last.

        Decided when a pass begins, not when one ends: Keras takes a known number of batches
        and drops the iterator, so a pass's end runs in tf.data's prefetch thread only if
        that thread gets there, whenever it is next scheduled: on a busy machine after the
        next epoch's ``set_epoch`` (training that epoch in the order of the one after), or
        never (repeating an epoch's order where nothing sets the epoch).
        """
        with self._epoch_lock:
            if not self._positioned:
                self._place(self.epoch + 1)
            self._positioned = False

    def __len__(self) -> int:
        return math.ceil(self.count / self.batch_size)

    def __getitem__(self, index: int):
        selected = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        x = self._inputs(selected)
        y = self.targets[selected]
        if self.sample_weights is None:
            return x, y
        return x, y, self.sample_weights[selected]

    def _inputs(self, selected: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError

    def on_epoch_end(self) -> None:
        self.set_epoch(self.epoch + 1)


class ImageBatches(SeededBatches):
    """Training or validation batches from decoded images, augmenting on the fly.

    Each image's augmentation is seeded from (seed, epoch, position), so a run is
    reproducible whatever the worker threads do; each thread has its own augmenter, since
    one albumentations pipeline is not safe to call from several threads at once.
    """

    def __init__(
        self,
        images: np.ndarray,
        targets: np.ndarray,
        batch_size: int,
        *,
        shuffle: bool = False,
        augmenter_factory: Callable[[], object] | None = None,
        sample_weights: np.ndarray | None = None,
        seed: int = 0,
        workers: int = 1,
    ):
        self.images = images
        self.augmenter_factory = augmenter_factory
        self._local = threading.local()
        super().__init__(len(images), targets, batch_size, shuffle=shuffle,
                         sample_weights=sample_weights, seed=seed, workers=workers)

    def with_augmenter(self, augmenter_factory: Callable[[], object] | None) -> ImageBatches:
        """The same batches (images, order, weights, seed), augmented by ``augmenter_factory``
        instead (None: not augmented)."""
        return ImageBatches(self.images, self.targets, self.batch_size, shuffle=self.shuffle,
                            augmenter_factory=augmenter_factory, sample_weights=self.sample_weights,
                            seed=self.seed, workers=self.workers)

    def _inputs(self, selected: np.ndarray) -> np.ndarray:
        batch = self.images[selected]
        if self.augmenter_factory is not None:
            augmenter = getattr(self._local, "augmenter", None)
            if augmenter is None:
                augmenter = self._local.augmenter = self.augmenter_factory()
            batch = np.stack(
                [
                    augment_one(augmenter, image, [self.seed, self.epoch, int(position)])
                    for image, position in zip(batch, selected, strict=False)
                ]
            )
        return batch.astype("float32")


def augment_one(augmenter, image: np.ndarray, seed_parts: list[int]) -> np.ndarray:
    """Augment one image with its own seed, so the result depends on the image's place in
    the run, not on which worker thread drew it.

    Args:
        augmenter: an albumentations pipeline (``build_augmenter``).
        image: a uint8 (S, S, 3) image.
        seed_parts: what the seed is made of (run seed, epoch, row ...).

    Returns:
        The augmented image, same shape and dtype.
    """
    return augmented(augmenter, image, seed_parts)["image"]


def augmented(augmenter, image: np.ndarray, seed_parts: list[int]) -> dict:
    """``augment_one``'s whole result: the pipeline's dict ("image", and "applied_transforms"
    where it records them, ``data.augment.was_flipped``)."""
    seed = int(np.random.SeedSequence(seed_parts).generate_state(1)[0])
    augmenter.set_random_seed(seed)
    return augmenter(image=image)


def process_share(batches: ImageBatches, process: int, processes: int, local_devices: int = 1) -> ImageBatches:
    """One process's share of ``batches`` for data-parallel training: its part of every
    global batch, from images only it reads.

    The process takes every ``processes``-th image from ``process`` on, repeats its own
    first images up to as many as the largest share holds (rounded up to a multiple of
    ``local_devices``: every process must run as many steps, of equal sizes, split evenly
    over its devices), and batches them ``batch_size / processes`` at a time, shuffled per
    epoch from a seed of its own (the run's seed and ``process``).

    Args:
        batches: the run's training or validation ``ImageBatches`` (global batch size).
        process: this process's index, from 0.
        processes: how many processes train together.
        local_devices: devices in each process; default 1.

    Returns:
        The share, an ``ImageBatches``.

    Raises:
        StrategyError: the batch size does not split evenly over the devices, or there are
            fewer images than processes.
    """
    if batches.batch_size % (processes * local_devices):
        raise StrategyError(f"--batch-size {batches.batch_size} does not split evenly over {processes} processes "
                            f"of {local_devices} device(s) each; use a multiple of {processes * local_devices}")
    if batches.count < processes:
        raise StrategyError(f"{batches.count} image(s) cannot be shared by {processes} processes; add images or "
                            "start fewer processes")
    size = -(-batches.count // processes)
    size = -(-size // local_devices) * local_devices
    rows = np.resize(np.arange(process, batches.count, processes), size)  # np.resize repeats from the start
    return ImageBatches(
        batches.images[rows], batches.targets[rows], batches.batch_size // processes, shuffle=batches.shuffle,
        augmenter_factory=batches.augmenter_factory,
        sample_weights=None if batches.sample_weights is None else batches.sample_weights[rows],
        seed=int(np.random.SeedSequence([batches.seed, process]).generate_state(1)[0]) if process else batches.seed,
        workers=batches.workers,
    )


PREFETCH = 2  # batches ``to_tf_dataset`` prepares ahead of the step that takes them


def to_tf_dataset(batches: SeededBatches, prefetch: int = PREFETCH):
    """The same batches, in the same seeded order, as a ``tf.data.Dataset`` (needs TensorFlow,
    on any Keras backend): each pass over it is the epoch set for it, else the next
    (``SeededBatches.begin_pass``), prepared
    ``prefetch`` batches ahead in a thread, as Keras does for a ``PyDataset`` but without
    tf.data's autotuning.

    tf.data's autotuning optimizer wakes on a timer whose period doubles, up to seconds, over
    an iterator's life, and the end of every epoch (the iterator's destruction) waits for its
    next wake-up, all cores idle: at the end of a 3-8 s epoch of a cached stage it stalled
    0-2.5 s (``benchmarks/README.md``); a fixed buffer stalls for nothing.

    Args:
        batches: a ``SeededBatches`` (training or validation images, or features).
        prefetch: batches prepared ahead; default ``PREFETCH``.

    Returns:
        A ``tf.data.Dataset`` of the tuples ``batches[i]`` gives ((x, y) or (x, y, weights)).

    Raises:
        ImportError: TensorFlow is not installed (only Keras on TensorFlow is given this).
    """
    import tensorflow as tf

    signature = tuple(tf.TensorSpec((None, *np.shape(part)[1:]), tf.as_dtype(np.asarray(part).dtype))
                      for part in batches[0])

    def one_epoch():
        batches.begin_pass()
        for index in range(len(batches)):
            yield batches[index]

    options = tf.data.Options()
    options.autotune.enabled = False
    dataset = tf.data.Dataset.from_generator(one_epoch, output_signature=signature).prefetch(prefetch)
    return dataset.with_options(options).apply(tf.data.experimental.assert_cardinality(len(batches)))  # the steps


def keras_input(batches: SeededBatches):
    """What Keras's ``fit`` or ``predict`` is given for ``batches``: on the TensorFlow backend
    ``to_tf_dataset`` (no stall at the end of each pass), elsewhere the ``PyDataset`` itself.

    Args:
        batches: a ``SeededBatches``.

    Returns:
        A ``tf.data.Dataset`` or ``batches``.
    """
    return to_tf_dataset(batches) if keras.backend.backend() == "tensorflow" else batches
