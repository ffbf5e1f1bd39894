"""Frozen-part feature cache: compute the frozen layers' output once, train the rest on it.

While a stage keeps the bottom of the network frozen, the frozen part's output does not
depend on what is being trained, so it is computed once per image (and per augmented view)
and the trainable top (unfrozen blocks + head) trains on the stored features. With
augmentation on, ``views`` versions of each image are stored, the image itself (view 0)
and then augmented ones, and epoch ``e`` uses view ``e mod views``; every epoch after the
views are computed costs only the top. (Plain images in every other epoch: on digits,
random-weight VGG16 at 64 px, 3 head + 2 fine epochs, validation accuracy 94-96% against
76-80% with two augmented views, benchmarks/README.md.)
A stage starts training as soon as the first view is stored: the later views are
computed in the background while the first epochs train (epoch ``e`` waits for its view).

Features live in memory up to a budget and in a memory-mapped file beyond it. A
``FeatureCache`` keeps them across runs on the same images (a study's trials): a later run
whose frozen part has the same weights, augmentation, seed and engine trains on them without
a pass of its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import keras
import numpy as np

from transferkit.backbones import BackboneSpec
from transferkit.data.batches import SeededBatches
from transferkit.inference.int8 import Int8Check, Int8Engine, Int8Samples, samples_from
from transferkit.model.fold import batchnorm_count, fold_batchnorm
from transferkit.model.surgery import extractor_at, frozen_digest, trainable_at
from transferkit.progress import progress_bar

log = logging.getLogger("transferkit")

# How many training images' features set the head's BatchNorm statistics
# (``model.classifier.calibrate_head_batchnorm``); the cache hands them over.
CALIBRATION_IMAGES = 128


@dataclass(frozen=True)
class Int8Origin:
    """Where features an int8 network computed came from: its ``inference.int8.Int8Engine``
    (whose int8 network ``FeaturePlan.int8_rounds`` runs again over validation images, whose
    features are always float32's), which of its outputs they are, and the block boundary
    (first open block) they are taken at."""

    engine: Int8Engine
    output: int
    first_open: int

    def features(self, images: np.ndarray) -> np.ndarray:
        """The int8 network's features of a batch of uint8 images at this boundary."""
        outputs = self.engine.predict(images)
        return outputs[self.output] if isinstance(outputs, list) else outputs

    def alone(self) -> Int8Origin:
        """The same features from the int8 network reduced to this output
        (``OpenVINOEngine.output_alone``): where the cache's network also computed the
        backbone's output for an earlier stage (VGG16's block5 on 4x4 maps: a fifth of its
        time at 64 px), the passes after training skip it."""
        int8 = self.engine.int8.output_alone(self.output)
        if int8 is self.engine.int8:
            return self
        return Int8Origin(Int8Engine(int8, self.engine.float32, self.engine.check, classifier=False), 0,
                          self.first_open)


@dataclass(frozen=True)
class CachedReference:
    """The last stage's stored training features at its boundary, view 0 (the images
    themselves, unaugmented), kept past the stages: the knn score's reference images need
    only the layers above the boundary on them (``trust.record.after_training_forward``).

    Attributes:
        features: (n, *shape), row i the i-th training image's (a view of the store's array,
            which it keeps alive; memory-mapped where the store spilled to disk).
        first_open: the block boundary (first block above the features).
        int8: whether an int8 network computed them.
    """

    features: np.ndarray
    first_open: int
    int8: bool


class FeatureStore:
    """(views, n, *shape) features in memory up to a budget, else in a memory-mapped file.

    The file is unlinked as soon as it is mapped (on systems that allow it), as
    ``data.arrays.image_array`` does, so a killed run leaves nothing in the temporary folder;
    its space is freed when the store is closed.

    Args:
        views: stored versions of each image.
        count: number of images.
        shape: one image's features.
        dtype: storage dtype.
        memory_budget_mb: above this the store goes to a file.
        spill_dir: where that file goes; default None (the system temporary folder).

    Attributes:
        int8: an ``Int8Origin`` where an int8 network computed the features, else None.
        flipped: (views, n) bool, which stored views are of mirrored images (augmentation
            with horizontal flips); None where nothing was flipped.
    """

    def __init__(self, views: int, count: int, shape: tuple[int, ...], dtype: str, memory_budget_mb: float,
                 spill_dir: str | os.PathLike | None = None):
        self.shape = (views, count, *shape)
        nbytes = math.prod(self.shape) * np.dtype(dtype).itemsize
        self.on_disk = nbytes > 0 and nbytes > memory_budget_mb * 2**20
        self.array = _spilled_array(self.shape, dtype, spill_dir) if self.on_disk else np.empty(self.shape, dtype)
        if self.on_disk:
            log.debug("feature cache: %.1f MB, above cache.memory_mb (%g MB): memory-mapped from a temporary file "
                      "in %s", nbytes / 2**20, memory_budget_mb, spill_dir or tempfile.gettempdir())
        self.nbytes = nbytes
        self.filler: _ViewFiller | None = None
        self.int8: Int8Origin | None = None
        self.flipped: np.ndarray | None = None

    def wait_for(self, view: int | None = None) -> None:
        """Block until ``view`` (default: every view) is stored; re-raise a failure of the
        background computation."""
        if self.filler is not None:
            self.filler.wait(self.shape[0] - 1 if view is None else view)

    def complete(self) -> bool:
        """Every view is stored (none is still being computed, none was left out)."""
        return self.filler is None or self.filler.complete(self.shape[0] - 1)

    def close(self) -> None:
        """Release the memory map, and with it its file's space (after the background
        computation of later views, if any, has finished)."""
        if self.filler is not None:
            self.filler.join()
            self.filler = None
        if self.on_disk and hasattr(self, "array"):
            del self.array

    def __del__(self):  # pragma: no cover - best effort clean-up
        try:
            self.close()
        except Exception:
            pass


def _spilled_array(shape: tuple[int, ...], dtype: str, spill_dir) -> np.memmap:
    """A memory-mapped array on a temporary file that is unlinked once mapped."""
    handle = tempfile.NamedTemporaryFile(prefix="transferkit-features-", suffix=".bin", dir=spill_dir, delete=False)
    try:
        return np.memmap(handle, dtype=dtype, mode="w+", shape=shape)
    finally:
        handle.close()
        with contextlib.suppress(OSError):
            os.unlink(handle.name)


class _ViewFiller:
    """Computes the views after the first in a background thread.

    ``wait(view)`` blocks until every batch of that view is stored (or re-raises what went
    wrong); ``cancel()`` stops after the current batch; ``join()`` waits for the end.
    """

    def __init__(self, run: Callable, jobs: list):
        self._run, self._jobs = run, jobs
        self._complete = 0  # views 0 .. _complete - 1 are stored
        self._error: BaseException | None = None
        self._finished = False
        self._changed = threading.Condition()
        self.cancelled = threading.Event()
        self._thread = threading.Thread(target=self._main, name="transferkit-features", daemon=True)

    def start(self, first_pending_view: int) -> None:
        self._complete = first_pending_view
        self._thread.start()

    def _main(self) -> None:
        try:
            self._run(self._jobs, self._view_done, self.cancelled)
        except BaseException as error:  # handed to whoever waits for a view
            with self._changed:
                self._error = error
        finally:
            with self._changed:
                self._finished = True
                self._changed.notify_all()

    def _view_done(self, view: int) -> None:
        with self._changed:
            self._complete = view + 1
            self._changed.notify_all()

    def wait(self, view: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._complete > view or self._finished)
            if self._complete > view:
                return
            if self._error is not None:
                raise self._error
        raise RuntimeError(f"view {view} of the cached features was not computed (cancelled)")

    def complete(self, view: int) -> bool:
        """Views up to ``view`` are stored (without waiting)."""
        with self._changed:
            return self._complete > view

    def cancel(self) -> None:
        self.cancelled.set()
        self.join()

    def join(self) -> None:
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join()


@dataclass(frozen=True)
class FeaturePass:
    """How one pass of the frozen part over a set of images runs and keeps its outputs.

    Attributes:
        views: stored versions per image, per output; view 0 is the image itself, and with
            an augmenter the later ones are augmented (seeded by seed, view and image);
            without one a single (unaugmented) view is stored.
        augmenter_factory: builds the albumentations pipeline; default None (no augmentation).
        seed: augmentation seed; default 0.
        batch_size: images per forward pass; default 32.
        dtype: storage dtype; default float32.
        memory_budget_mb: above this the stores spill to disk; default 2048.
        spill_dir: where a spilled store's file goes; default None (the system temp folder).
        progress: called with the number of forward batches done (of view 0 when the
            later views go to the background); default None.
        later_views_in_background: compute only view 0 before returning, the others in a
            thread (``forward`` must not be used by anything else meanwhile); default False.
            The values are the same either way.
        stop_requested: checked before each batch; once it returns True the pass stops and
            the stores are left incomplete (for a caller that is about to stop training:
            Ctrl-C during a long pass). Default None.
    """

    views: Sequence[int]
    augmenter_factory: Callable[[], object] | None = None
    seed: int = 0
    batch_size: int = 32
    dtype: str = "float32"
    memory_budget_mb: float = 2048
    spill_dir: str | os.PathLike | None = None
    progress: Callable[[int], None] | None = None
    later_views_in_background: bool = False
    stop_requested: Callable[[], bool] | None = None

    def stored_views(self) -> list[int]:
        """Views kept per output: as asked with an augmenter, at most one without."""
        return [count if self.augmenter_factory is not None else min(count, 1) for count in self.views]

    def stopped(self) -> bool:
        return self.stop_requested is not None and self.stop_requested()


def compute_feature_stores(
    forward: Callable[[np.ndarray], Sequence[np.ndarray]],
    images: np.ndarray,
    feature_shapes: Sequence[tuple[int, ...]],
    settings: FeaturePass,
) -> list[FeatureStore]:
    """Run the frozen part once per image and view, keeping each of its outputs.

    View ``v`` of an image is the same augmented image for every output, so the stores
    agree with what one-output passes would compute. Output ``i`` keeps ``views[i]`` views;
    the pass runs max(views) times over the images. Stores are kept in memory while their
    sum fits the memory budget; the rest spill to disk. With ``later_views_in_background``,
    ``FeatureStore.wait_for(view)`` waits for a view.

    Args:
        forward: batch of images, as ``images`` holds them -> a list of feature maps, one
            per output (a Keras model call or an engine).
        images: uint8 (n, S, S, 3).
        feature_shapes: shape of one image's features, per output.
        settings: a ``FeaturePass`` (views, augmentation, batch size, storage, progress).

    Returns:
        A list of ``FeatureStore`` of shape (views[i], n, *feature_shapes[i]), in the
        order of the outputs.
    """
    stores = _allocate_stores(len(images), feature_shapes, settings)
    feature_pass = _Pass(forward, images, stores, settings)
    jobs = [(view, start) for view in range(max((store.shape[0] for store in stores), default=0))
            for start in range(0, len(images), settings.batch_size)]
    now = [job for job in jobs if job[0] == 0] if settings.later_views_in_background else jobs
    feature_pass.run(now, cancelled=_Asked(settings.stopped) if settings.stop_requested is not None else None)
    if len(now) < len(jobs) and not settings.stopped():
        filler = _ViewFiller(feature_pass.run, jobs[len(now):])
        for store in stores:
            store.filler = filler
        filler.start(first_pending_view=1)
    return stores


def view_seed(seed: int, view: int, index: int) -> list[int]:
    """What image ``index``'s augmentation in view ``view`` is seeded by
    (``data.batches.augment_one``): the same whichever pass or thread computes it."""
    return [seed, 1_000_003, view, index]


def _allocate_stores(count: int, feature_shapes, settings: FeaturePass) -> list[FeatureStore]:
    """One store per output, in memory while the budget lasts, on disk beyond it."""
    stores = []
    budget = settings.memory_budget_mb
    for shape, view_count in zip(feature_shapes, settings.stored_views()):
        store = FeatureStore(view_count, count, shape, settings.dtype, budget, settings.spill_dir)
        budget -= 0 if store.on_disk else store.nbytes / 2**20
        stores.append(store)
    return stores


class _Pass:
    """The batches of a feature pass: prepare (augment) one, run it forward, store its outputs."""

    def __init__(self, forward, images: np.ndarray, stores: list[FeatureStore], settings: FeaturePass):
        self.forward, self.images, self.stores, self.settings = forward, images, stores, settings
        factory = settings.augmenter_factory
        self.augmenter = factory() if factory is not None else None

    def prepare(self, view: int, start: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Batch ``start`` of view ``view``: the images themselves in view 0, later views
        augmented as seeded by (seed, view, image); and which of them are mirrored (None:
        none)."""
        from transferkit.data.augment import was_flipped
        from transferkit.data.batches import augmented

        batch = self.images[start : start + self.settings.batch_size]
        if self.augmenter is None or view == 0:
            # As stored (uint8): an image engine converts inside its network.
            return np.ascontiguousarray(batch), None
        results = [augmented(self.augmenter, image, view_seed(self.settings.seed, view, start + offset))
                   for offset, image in enumerate(batch)]
        flipped = np.array([was_flipped(result) for result in results], dtype=bool)
        return np.ascontiguousarray(np.stack([result["image"] for result in results])), flipped

    def store(self, view: int, start: int, count: int, outputs, flipped: np.ndarray | None = None) -> None:
        """Keep the outputs of ``count`` images from ``start`` as view ``view`` (where kept),
        and which of them are of mirrored images."""
        for store, output in zip(self.stores, outputs):
            if view < store.shape[0]:
                store.array[view, start : start + count] = np.asarray(output, dtype=self.settings.dtype)
                if flipped is not None and flipped.any():
                    if store.flipped is None:
                        store.flipped = np.zeros(store.shape[:2], dtype=bool)
                    store.flipped[view, start : start + count] = flipped

    def run(self, jobs: list, view_done: Callable[[int], None] | None = None, cancelled=None) -> None:
        """Run the (view, start) jobs in order; ``view_done(view)`` after a view's last batch."""
        from concurrent.futures import ThreadPoolExecutor

        progress = self.settings.progress
        # Augment the next batch in a thread while the engine runs the current one. OpenCV's
        # own threads would only compete with the engine's for the same cores.
        with _opencv_threads(1), ThreadPoolExecutor(max_workers=1) as pool:
            pending = pool.submit(self.prepare, *jobs[0]) if jobs else None
            for done, (view, start) in enumerate(jobs, start=1):
                if cancelled is not None and cancelled.is_set():
                    return
                batch, flipped = pending.result()
                if done < len(jobs):
                    pending = pool.submit(self.prepare, *jobs[done])
                self.store(view, start, len(batch), self.forward(batch), flipped)
                if progress is not None and view_done is None:
                    progress(done)
                if view_done is not None and (done == len(jobs) or jobs[done][0] != view):
                    view_done(view)


class _Asked:
    """A stop request read like a ``threading.Event``."""

    def __init__(self, requested: Callable[[], bool]):
        self.is_set = requested


@contextlib.contextmanager
def _opencv_threads(count: int):
    try:
        import cv2
    except ImportError:  # pragma: no cover - albumentations brings OpenCV
        yield
        return
    previous = cv2.getNumThreads()
    cv2.setNumThreads(count)
    try:
        yield
    finally:
        cv2.setNumThreads(previous)


class FeatureBatches(SeededBatches):
    """Training batches over stored features: the same per-epoch order as ``ImageBatches``,
    view ``epoch mod views`` of each image (``views``: the first so many of the store's;
    default all). With ``unflipped``, a view's mirrored images (``FeatureStore.flipped``)
    are read as the image itself (view 0): a stage that trains without flips on views
    computed with them."""

    def __init__(self, store: FeatureStore, targets: np.ndarray, batch_size: int, *, shuffle: bool = True,
                 sample_weights: np.ndarray | None = None, seed: int = 0, views: int | None = None,
                 unflipped: bool = False):
        self.store = store
        self.views = min(views or store.shape[0], store.shape[0])
        self.unflipped = unflipped
        super().__init__(store.shape[1], targets, batch_size, shuffle=shuffle,
                         sample_weights=sample_weights, seed=seed)

    def _place(self, epoch: int) -> None:
        """The epoch's order (as ``ImageBatches``'s) and its view."""
        super()._place(epoch)
        self.view = epoch % self.views

    def in_order(self, max_mb: float = 64):
        """The current view's features of every image in store order, as float32 chunks
        of at most ``max_mb`` (for inference over the whole set in few calls)."""
        self.store.wait_for(self.view)
        row_bytes = 4 * int(np.prod(self.store.shape[2:]))
        rows = max(1, int(max_mb * 2**20) // row_bytes)
        for start in range(0, self.store.shape[1], rows):
            yield self._read(slice(start, start + rows))

    def _inputs(self, selected: np.ndarray) -> np.ndarray:
        self.store.wait_for(self.view)
        # Sorted reads are much faster from a memory map; the batch order is restored after.
        ordering = np.argsort(selected, kind="stable")
        features = np.empty((len(selected), *self.store.shape[2:]), dtype="float32")
        features[ordering] = self._read(selected[ordering])
        return features

    def _read(self, rows: np.ndarray | slice) -> np.ndarray:
        """The current view's features of the images ``rows`` (sorted indices, or a slice),
        as float32."""
        # (Read after the view is stored: its notes of mirrored images are complete then.)
        if not self.unflipped or self.view == 0 or self.store.flipped is None:
            return np.asarray(self.store.array[self.view, rows], dtype="float32")
        rows = np.arange(self.store.shape[1])[rows] if isinstance(rows, slice) else rows
        views = np.where(self.store.flipped[self.view, rows], 0, self.view)
        return np.asarray(self.store.array[views, rows], dtype="float32")


@dataclass
class CachedStage:
    """What a stage trains on the cache: its top part and batches of stored features.

    Attributes:
        trainable: the model to fit (boundary features -> class outputs).
        train, val: ``FeatureBatches`` of the training and validation images.
        calibration: backbone outputs of the first training images (their first view), when
            the stage's features are the backbone's output (for ``calibrate_head_batchnorm``);
            else None.
        computed: True when this stage ran the frozen part (False: it reused features a
            previous stage computed).
    """

    trainable: object
    train: FeatureBatches
    val: FeatureBatches
    calibration: np.ndarray | None
    computed: bool


@dataclass(frozen=True)
class PairedFeatures:
    """The same validation images' features from an int8 network and from its float32 one.

    Attributes:
        targets: the images' targets, one row each.
        int8, float32: their features, float32 arrays of the same shape.
        check: the int8 network's own check against float32 (``inference.int8.Int8Check``).
    """

    targets: np.ndarray
    int8: np.ndarray
    float32: np.ndarray
    check: Int8Check


class FeatureCache:
    """Feature stores kept across runs on the same images, for runs that compute the same
    features: the trials of a study.

    A run's ``FeaturePlan`` given the cache looks each boundary's features up before it runs
    the frozen part, and hands what it computes to the cache. A store serves a later run
    whose frozen part below that boundary has the same weights (a digest of their values),
    on the same image arrays, with the same augmentation pipeline and seed, storage dtype and
    engine, that trains on no more views than it holds. The cache owns its stores: a run
    leaves them complete (it waits for views still computed in the background, unless it
    was asked to stop) and the cache releases the least recently used ones beyond the
    memory budget a run asks for and beyond ``max_entries``.

    Args:
        max_entries: stores (per boundary, training and validation together) kept at most;
            default 8.
    """

    def __init__(self, max_entries: int = 8):
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple, tuple[tuple[FeatureStore, FeatureStore], int, tuple]] = OrderedDict()
        self.hits = 0  # boundaries a run took from the cache
        self.misses = 0  # boundaries a run computed

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: tuple, views: int) -> tuple[FeatureStore, FeatureStore] | None:
        """The (training, validation) stores under ``key`` when they hold ``views`` views."""
        entry = self._entries.get(key)
        if entry is None or entry[1] < views:
            return None
        self._entries.move_to_end(key)
        self.hits += 1
        return entry[0]

    def keep(self, key: tuple, stores: tuple[FeatureStore, FeatureStore], views: int, holds: tuple = ()) -> None:
        """Own ``stores`` (``views`` views each) under ``key``; ``holds``: objects whose
        identity the key names (the image arrays), kept alive as long as the entry."""
        self.misses += 1
        self.drop(key)
        self._entries[key] = (stores, views, holds)

    def drop(self, key: tuple) -> None:
        """Release the stores under ``key`` (if any)."""
        entry = self._entries.pop(key, None)
        if entry is not None:
            for store in entry[0]:
                store.close()

    def memory_mb(self) -> float:
        """Megabytes of the stores held in memory (not spilled)."""
        return sum(store.nbytes for stores, _, _ in self._entries.values() for store in stores
                   if not store.on_disk) / 2**20

    def make_room(self, needed_mb: float, memory_mb: float, keep=()) -> None:
        """Release least recently used stores (never those under the keys in ``keep``) until
        ``needed_mb`` more fit within ``memory_mb`` and one more entry fits ``max_entries``."""
        keep = set(keep)
        for key in [key for key in self._entries if key not in keep]:
            if self.memory_mb() + needed_mb <= memory_mb and len(self._entries) < self.max_entries:
                break
            self.drop(key)

    def close(self) -> None:
        """Release every store."""
        for key in list(self._entries):
            self.drop(key)


class FeaturePlan:
    """The frozen-part features of a run's stages, computed once for all stages that can share them.

    Stage ``i`` trains on features at its boundary ``b_i`` (the first block it trains; the
    backbone's output when it trains the head only). The frozen part up to the shallowest
    boundary of the stages from ``i`` on that lie at or below ``b_i`` is frozen in all of
    them, so one pass over the images computes the features at every one of those
    boundaries (a multi-output network), each with the views its stages use. The default
    recipe's head stage (backbone output) and fine stage (below the top block) so run the
    expensive frozen blocks once, not twice.

    The choice for stage ``i`` depends only on stages ``i`` and later, so a run resumed at
    any stage computes the same features as the uninterrupted run.

    Args:
        model: the classifier.
        spec: the backbone's registry entry.
        stages: the recipe's stages.
        train_data, val_data: the ``ImageBatches`` of the run.
        config: the recipe's ``CacheConfig``.
        forward_factory: (extractor model, ``ForwardWork``) -> batch function returning its outputs.
        seed: augmentation seed.
        dtype: storage dtype.
        verbose: log what is computed, with a progress bar.
        stop: a ``StopFlag``; a feature pass stops early once it is set (the caller then
            stops training). Default None.
        shared: a ``FeatureCache`` to take features from and give them to (the stores are
            then the cache's, and a pass computes only the boundaries it lacks); default
            None (the plan's own stores, released as its stages end).
        context: what else the features depend on for the shared cache: the engine and
            precision ``forward_factory`` runs the frozen part in; default ().
        scope: returns the context the trainable part is built in (a distribution
            strategy's scope); default None (none). The features are computed outside it,
            once, whatever the number of replicas.
        plan_views: (views a pass would compute, seconds of one image's forward pass timed
            on the validation images) -> the views to compute (a time budget's
            ``cache_views``); default None (all).

    Attributes:
        float32_only: int8 is no longer tried for this plan's passes (``use_float32``).
    """

    def __init__(self, model, spec: BackboneSpec, stages, train_data, val_data, config, forward_factory,
                 *, seed: int = 0, dtype: str = "float32", verbose: int | str = 0, stop=None,
                 shared: FeatureCache | None = None, context: tuple = (), scope: Callable | None = None,
                 plan_views: Callable[[int, float], int] | None = None):
        self.model, self.spec, self.stages = model, spec, list(stages)
        # A StopFlag: a pass stops early once a signal asked training to stop.
        self.stop_requested = (lambda: bool(stop.requested)) if stop is not None else None
        self.train_data, self.val_data = train_data, val_data
        self.config, self.forward_factory = config, forward_factory
        self.seed, self.dtype, self.verbose = seed, dtype, verbose
        self.augmenter_factory = getattr(train_data, "augmenter_factory", None)
        # (source, boundary) -> (training store, validation store)
        self._stores: dict[tuple[int, int], tuple[FeatureStore, FeatureStore]] = {}
        self.shared, self.context = shared, tuple(context)
        self.scope = scope or contextlib.nullcontext
        self.plan_views = plan_views
        # (source, boundary) -> its key in the shared cache
        self._shared_keys: dict[tuple[int, int], tuple] = {}
        self.float32_only = False
        # source -> (the float32 engine of its pass, as a list of outputs; its boundaries)
        self._engines: dict[int, tuple[Callable, list[int]]] = {}
        # hflip = "auto": the stages that train without flips (``train_without_flips``).
        self.flip_free: frozenset[int] = frozenset()
        self._without_flips: Callable[[], object] | None = None

    def boundary(self, index: int) -> int:
        """First block that stage ``index`` trains (``len(blocks)``: head only; 0: all)."""
        return self.spec.first_unfrozen(self.stages[index].unfreeze)

    def views(self, index: int) -> int:
        """Views stage ``index`` trains on: min(views, epochs), 1 without augmentation."""
        augmenter_factory = self._without_flips if index in self.flip_free else self.augmenter_factory
        if augmenter_factory is None:
            return 1
        return max(1, min(self.config.views, self.stages[index].epochs))

    def train_without_flips(self, stages, without: Callable[[], object] | None) -> None:
        """Train ``stages`` without horizontal flips (``hflip = "auto"``, ``training.flips``).
        The passes still compute every view with the training augmentation, flips included
        (what a stage with flips reads, whatever was decided before it ran): a flip-free
        stage reads each view's mirrored images as the images themselves (view 0,
        ``FeatureBatches``'s ``unflipped``), so no view is computed again.

        Args:
            stages: the indices of the stages without flips.
            without: the augmenter factory without flips (None: nothing else augments, and
                those stages train on view 0 alone).
        """
        self.flip_free, self._without_flips = frozenset(stages), without

    def source(self, index: int) -> int:
        """The boundary up to which one pass serves stage ``index``: the shallowest boundary
        at or below its own among the stages from ``index`` on."""
        own = self.boundary(index)
        return min(b for b in self._boundaries_from(index) if 0 < b <= own)

    def _boundaries_from(self, index: int) -> list[int]:
        return [self.boundary(j) for j in self._cached_from(index)]

    def _cached_from(self, index: int) -> list[int]:
        """Stages from ``index`` on that train and have a frozen part."""
        return [j for j in range(index, len(self.stages)) if self.stages[j].epochs > 0 and self.boundary(j) > 0]

    def _key(self, index: int) -> tuple[int, int]:
        return self.source(index), self.boundary(index)

    def stage_inputs(self, index: int) -> CachedStage | None:
        """The trainable part and cached batches of stage ``index``; None when the stage
        has no frozen part (or the cache is off)."""
        if self.config is None or not self.config.enabled:
            return None
        own = self.boundary(index)
        if own <= 0:
            return None
        computed = self._key(index) not in self._stores and self._compute_from(index)
        train_store, val_store = self._stores[self._key(index)]
        data = self.train_data
        # The order of the images' own batches (their seed), so that a cached stage sees the
        # batches the uncached one would.
        train = FeatureBatches(train_store, data.targets, data.batch_size, sample_weights=data.sample_weights,
                               seed=getattr(data, "seed", self.seed), views=self.views(index),
                               unflipped=index in self.flip_free)
        val = FeatureBatches(val_store, self.val_data.targets, self.val_data.batch_size, shuffle=False)
        calibration = None
        if own == len(self.spec.blocks):
            # The first view: the features the head trains on (augmented when augmentation is on).
            calibration = np.asarray(train_store.array[0, :CALIBRATION_IMAGES], dtype="float32")
        with self.scope():
            trainable = trainable_at(self.model, self.spec, own)[0]
        return CachedStage(trainable, train, val, calibration, computed)

    def stage_done(self, index: int) -> None:
        """Release the stores no later stage trains on (and the engines of their passes)."""
        later = {self._key(j) for j in self._cached_from(index + 1)}
        for key in [key for key in self._stores if key not in later]:
            self._release(key)
        for source in [source for source in self._engines if source not in {key[0] for key in later}]:
            del self._engines[source]

    def mirrored_validation(self, index: int, rows: np.ndarray) -> np.ndarray:
        """Stage ``index``'s features of the mirror images of validation images ``rows``, as
        its stored validation features are computed (float32's, in the storage dtype): what
        ``training.flips`` compares them with.

        Args:
            index: a stage on cached features.
            rows: indices into the validation images.

        Returns:
            float32 (len(rows), *shape).
        """
        source, boundary = self._key(index)
        engine = self._engines.get(source)
        if engine is None or boundary not in engine[1]:  # taken from the shared cache: no pass of this plan's
            extractor = extractor_at(self.model, self.spec, [boundary])
            single = self.forward_factory(extractor, ForwardWork(len(rows), None))
            engine = self._engines[source] = ((lambda batch: [single(batch)]), [boundary])
        for (other, _), stores in self._stores.items():
            if other == source:  # the pass's engine serves one caller at a time
                stores[0].wait_for()
        forward, boundaries = engine
        output = boundaries.index(boundary)
        images = np.asarray(self.val_data.images[rows])[:, :, ::-1]
        size = self.val_data.batch_size
        features = [np.asarray(forward(np.ascontiguousarray(images[start : start + size]))[output])
                    for start in range(0, len(images), size)]
        return np.concatenate(features).astype(self.dtype).astype("float32")

    def close(self) -> None:
        """Stop any background computation and release every store (a shared cache keeps
        the complete ones)."""
        stopping = self.stop_requested is not None and self.stop_requested()
        for key, stores in self._stores.items():
            for store in stores:
                if store.filler is not None and (key not in self._shared_keys or stopping):
                    store.filler.cancel()
        for key in list(self._stores):
            self._release(key)
        self._engines.clear()

    def int8_origin(self, index: int) -> Int8Origin | None:
        """Where stage ``index``'s training features came from, where an int8 network computed
        them (None where float32 did, or the stage is not cached)."""
        stores = self._stores.get(self._key(index))
        return stores[0].int8 if stores is not None else None

    def reference(self, index: int) -> CachedReference | None:
        """Stage ``index``'s stored training features, view 0 (the images themselves), kept
        for the work after training; None where the stage is not cached."""
        stores = self._stores.get(self._key(index))
        if stores is None:
            return None
        stores[0].wait_for(0)
        return CachedReference(stores[0].array[0], self.boundary(index), stores[0].int8 is not None)

    def int8_rounds(self, index: int, size: int, most: int):
        """Validation images (a seeded order) in rounds of ``size``, at most ``most``, with stage
        ``index``'s features as the int8 network that computed its training features computes
        them now, and as they are stored (float32's): what ``training.int8_guard`` compares the
        trained part's loss on. Each round's int8 pass runs when it is taken.

        Yields:
            ``PairedFeatures`` of each round; none where the stage's features are not an int8
            network's or there are no validation images.
        """
        stores = self._stores.get(self._key(index))
        origin = self.int8_origin(index)
        if origin is None or not stores[1].shape[1]:
            return
        order = np.random.default_rng(self.seed).permutation(stores[1].shape[1])[:most]
        batch = self.val_data.batch_size
        for first in range(0, len(order), size):
            rows = np.sort(order[first : first + size])
            images = np.asarray(self.val_data.images[rows])
            rounded = [origin.features(images[start : start + batch]) for start in range(0, len(rows), batch)]
            yield PairedFeatures(np.asarray(self.val_data.targets[rows]),
                                 np.concatenate(rounded).astype("float32", copy=False),
                                 np.asarray(stores[1].array[0, rows], dtype="float32"), origin.engine.check)

    def use_float32(self) -> None:
        """Compute the later stages' features in float32: release the stores an int8 network
        computed (its views still computed in the background are stopped) and try int8 no
        more; the shared cache is left alone from now on (it may hold int8 features)."""
        self.float32_only = True
        for key in [key for key, stores in self._stores.items() if any(store.int8 for store in stores)]:
            for store in self._stores[key]:
                if store.filler is not None:
                    store.filler.cancel()
            self._release(key)

    def _release(self, key: tuple[int, int]) -> None:
        """Close a store of the plan's own; leave a shared one to the cache, complete (its
        later views waited for) or, where they were cancelled, dropped."""
        stores = self._stores.pop(key)
        shared_key = self._shared_keys.pop(key, None)
        if shared_key is None:
            for store in stores:
                store.close()
            return
        for store in stores:
            if store.filler is not None:
                store.filler.join()
        if not all(store.complete() for store in stores):
            self.shared.drop(shared_key)

    def _compute_from(self, index: int) -> bool:
        """One pass over the images for stage ``index`` and every later stage sharing its
        source (the boundaries a shared cache lacks). Returns whether a pass ran."""
        source = self.source(index)
        # The network has an output for every stage of the run with this source, needed now
        # or not (a store of 0 views costs nothing): a resumed run then runs the very network
        # the uninterrupted run ran, so its numbers are the same by construction (an engine
        # may fuse a graph differently when one more map is an output).
        group = [j for j in self._cached_from(0) if self.source(j) == source]
        served = [j for j in group if j >= index and self._key(j) not in self._stores]
        boundaries = sorted({self.boundary(j) for j in group}, reverse=True)
        views = [max((self.views(j) for j in served if self.boundary(j) == b), default=0) for b in boundaries]
        shared = None if self.float32_only else self.shared
        shared_keys = {}
        if shared is not None:
            shared_keys = self._take_shared(source, boundaries, views)
            wanted = [(b, count) for b, count in zip(boundaries, views) if count and (source, b) not in self._stores]
            if not wanted:
                return False
            boundaries, views = [b for b, _ in wanted], [count for _, count in wanted]
        extractor = extractor_at(self.model, self.spec, boundaries)
        train, val = self.train_data, self.val_data
        passes = max(views)  # self.views() is 1 without augmentation
        forward = self.forward_factory(extractor, ForwardWork(
            passes * len(train.images) + len(val.images),
            None if self.float32_only else samples_from(train.images, val.images, seed=self.seed)))
        # The validation images' features are float32's even where int8 computes the training
        # views: early stopping then judges, and the validation readout (metrics, calibration,
        # the work after training) reads, the float32 model that is saved.
        exact = forward.float32 if isinstance(forward, Int8Engine) else forward
        as_list, exact_as_list = ((engine if len(boundaries) > 1 else (lambda batch, engine=engine: [engine(batch)]))
                                  for engine in (forward, exact))
        shapes = [tuple(int(d) for d in output.shape[1:]) for output in _outputs(extractor)]
        if shared is not None:
            itemsize = np.dtype(self.dtype).itemsize
            needed = sum((count * len(train.images) + len(val.images)) * math.prod(shape) * itemsize
                         for shape, count in zip(shapes, views) if count) / 2**20
            self.shared.make_room(needed, self.config.memory_mb, keep=self._shared_keys.values())
            budget = self.config.memory_mb - self.shared.memory_mb()
        else:
            budget = self.config.memory_mb - self._memory_used_mb()
        total = len(train) + len(val)  # the later views are computed while the stage trains
        bar = progress_bar("batch", total, enabled=bool(self.verbose))
        if self.verbose:
            where = ", ".join(self._describe(b) for b, count in zip(boundaries, views) if count)
            later = "; views after the first are computed while the stage trains" if passes > 1 else ""
            log.info(f"caching features of the frozen part ({passes} view(s) of {len(train.images)} "
                  f"training + {len(val.images)} validation images; at {where}{later})")
        # Validation first: the training pass returns after its first view and goes on in
        # the background, and the engine serves one caller at a time.
        started = time.perf_counter()
        val_stores = compute_feature_stores(exact_as_list, val.images, shapes, FeaturePass(
            views=views, batch_size=val.batch_size,  # one view: no augmenter
            dtype=self.dtype, memory_budget_mb=budget, progress=bar, stop_requested=self.stop_requested,
        ))
        budget -= sum(store.nbytes for store in val_stores if not store.on_disk) / 2**20
        if self.plan_views is not None and len(val.images):  # the views that fit a time budget
            speedup = forward.check.speedup if isinstance(forward, Int8Engine) else 1.0  # int8 over float32
            computed = self.plan_views(passes, (time.perf_counter() - started) / len(val.images) / speedup)
            views = [min(count, computed) for count in views]
        done = len(val)
        train_stores = compute_feature_stores(as_list, train.images, shapes, FeaturePass(
            views=views, augmenter_factory=self.augmenter_factory, seed=self.seed, batch_size=train.batch_size,
            dtype=self.dtype, memory_budget_mb=budget, progress=(lambda n: bar(done + n)) if bar else None,
            later_views_in_background=True, stop_requested=self.stop_requested,
        ))
        self._engines[source] = (exact_as_list, boundaries)
        for output, (boundary, count, train_store, val_store) in enumerate(
                zip(boundaries, views, train_stores, val_stores)):
            if count:
                if isinstance(forward, Int8Engine):
                    train_store.int8 = Int8Origin(forward, output, boundary)
                self._stores[source, boundary] = (train_store, val_store)
                if shared_keys.get(boundary) is not None:
                    self.shared.keep(shared_keys[boundary], (train_store, val_store), count,
                                     holds=(train.images, val.images))
                    self._shared_keys[source, boundary] = shared_keys[boundary]
        return True

    def _take_shared(self, source: int, boundaries: list[int], views: list[int]) -> dict[int, tuple | None]:
        """Take from the shared cache the boundaries it holds with enough views.

        Returns:
            Each boundary's key in the cache (None where the features cannot be shared: an
            augmentation pipeline albumentations cannot describe).
        """
        keys = {}
        for boundary, count in zip(boundaries, views):
            if not count:
                continue
            key = keys[boundary] = self._shared_key(boundary)
            found = self.shared.lookup(key, count) if key is not None else None
            if found is not None:
                self._stores[source, boundary] = found
                self._shared_keys[source, boundary] = key
                if self.verbose:
                    log.info(f"features at {self._describe(boundary)}: taken from an earlier run's cache")
        return keys

    def _shared_key(self, boundary: int) -> tuple | None:
        """What the features at ``boundary`` depend on: the frozen weights below it, the
        images, the augmentation and its seed, the storage dtype and the engine."""
        augmentation = None
        if self.augmenter_factory is not None:
            import json

            from transferkit.data.augment import import_albumentations

            try:
                augmentation = json.dumps(import_albumentations().to_dict(self.augmenter_factory()), sort_keys=True)
            except Exception:  # a transform albumentations cannot serialize
                return None
        images = [(id(batches.images), batches.images.shape) for batches in (self.train_data, self.val_data)]
        return (self.context, self.dtype, *images, augmentation, self.seed if augmentation else None,
                frozen_digest(self.model, self.spec, boundary), boundary)

    def _memory_used_mb(self) -> float:
        return sum(store.nbytes for stores in self._stores.values() for store in stores
                   if not store.on_disk) / 2**20

    def _describe(self, boundary: int) -> str:
        if boundary == len(self.spec.blocks):
            return "the backbone's output"
        return f"the input of {self.spec.blocks[boundary]}"


def _outputs(model) -> list:
    outputs = model.output
    return list(outputs) if isinstance(outputs, (list, tuple)) else [outputs]


# --- forward passes in Keras ----------------------------------------------------------


def backbone_features(model, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
    """The backbone's output for uint8 images, computed in inference mode.

    Args:
        model: a classifier from ``build_classifier``.
        images: uint8 (n, S, S, 3).
        batch_size: images per call; default 32.

    Returns:
        float32 features, one row per image.
    """
    layers = [model.get_layer("preprocessing"), model.get_layer("backbone")]
    outputs = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].astype("float32")
        for layer in layers:
            x = layer(x, training=False)
        outputs.append(keras.ops.convert_to_numpy(keras.ops.cast(x, "float32")))
    return np.concatenate(outputs, axis=0)


@dataclass(frozen=True)
class ForwardWork:
    """What a feature pass will ask of the forward function a ``forward_factory`` makes.

    Attributes:
        image_passes: images it will run (every view of the training images, and the
            validation images once).
        int8_samples: the ``inference.int8.Int8Samples`` an int8 network would be
            calibrated and checked on (training images; validation images held back: they
            also key the cached int8 network, which is so this run's own); None: no int8 (its
            features fell short of float32's in this run, ``FeaturePlan.use_float32``).
    """

    image_passes: int
    int8_samples: Int8Samples | None


def engine_forward(engine: str, precision: str, verbose: int | str = 0) -> Callable:
    """The ``forward_factory`` of a run: each extractor's inference engine (its network shared by
    runs on the same frozen weights: ``inference.openvino.SHARED``), taking uint8 images, in
    int8 where ``inference.int8.worth_int8`` says the work is worth trying it.

    Args:
        engine: the recipe's engine ("auto", "keras" or "openvino").
        precision: the recipe's precision.
        verbose: log which engine runs; default 0.

    Returns:
        (extractor, ``ForwardWork``) -> the engine (called on a batch; an
        ``inference.int8.Int8Engine`` where int8 runs).
    """
    from transferkit.inference.engines import SHARED
    from transferkit.inference.int8 import forward_engine, worth_int8

    def forward_factory(extractor, work: ForwardWork):
        samples = work.int8_samples if worth_int8(precision, work.image_passes) else None
        # No int8 samples from the plan: int8 was refused for this run; "int8" then runs float32.
        asked = "float32" if work.int8_samples is None and precision == "int8" else precision
        forward = forward_engine(extractor, engine, precision=asked, cache_dir=SHARED, input_dtype="uint8",
                                 int8_samples=samples)
        if verbose:
            log.info(f"forward engine for the feature cache: {forward.name}"
                     + (" int8" if getattr(forward, "precision_hint", "") == "int8" else ""))
        return forward

    return forward_factory


def default_forward(model, work: ForwardWork | None = None):
    """A batch -> outputs function for forward-only work in Keras, with frozen BatchNorm
    folded into the convolutions before it (what makes bfloat16 pay on ResNet50).

    Args:
        model: an extractor (images -> feature maps).
        work: what it will be asked (unused here: Keras runs every precision as built).

    Returns:
        A function from a batch of images to the model's outputs.
    """
    if batchnorm_count(model):
        model = fold_batchnorm(model)
    return lambda batch: model.predict_on_batch(np.asarray(batch, dtype="float32"))
