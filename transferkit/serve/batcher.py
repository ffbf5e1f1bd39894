"""Micro-batching: the images of requests that arrive together go through the engine as one batch.

One thread owns the engine (an OpenVINO request or a Keras model is not for several threads
at once). A request hands its decoded images over and waits for their outputs; the thread
takes what is queued, up to ``max_batch`` images (a request with more is split across
batches), waiting at most ``wait_s`` after the first for others to join, and runs them
through ``inference.predict.engine_outputs``, the call predict makes, so near ties get
predict's float32 second look.

    batcher = MicroBatcher(engine, max_batch=32)
    batcher.start()
    outputs = batcher.submit(images).result()     # (n, units) float32, in order
    batcher.stop()
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger("transferkit")

# How long the engine waits, after a request arrives at an idle engine, for others to join
# its batch. Under load requests queue while a batch runs and join the next at no wait.
BATCH_WAIT_S = 0.004


@dataclass
class _Job:
    images: np.ndarray
    future: Future
    taken: int = 0  # images handed to a batch so far
    parts: list = field(default_factory=list)  # (start, outputs) of the batches done


@dataclass
class BatchStats:
    """What the engine thread has done.

    Attributes:
        batches: engine calls made.
        images: images that went through them.
        largest: the most images in one call.
    """

    batches: int = 0
    images: int = 0
    largest: int = 0


class MicroBatcher:
    """The engine's thread and the queue of images waiting for it.

    Args:
        forward: a ``ForwardEngine`` (as ``inference.predict.engine_for`` builds it).
        max_batch: the most images in one engine call; default 32.
        wait_s: the longest wait for more requests after the first; default ``BATCH_WAIT_S``.
        lock: held around each engine call (shared with other users of the same Keras
            model); default None.
    """

    def __init__(self, forward, max_batch: int = 32, wait_s: float = BATCH_WAIT_S, lock=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        self.forward = forward
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.stats = BatchStats()
        self._lock = lock
        self._pending: deque[_Job] = deque()
        self._condition = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the engine's thread (jobs submitted before wait for it)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="transferkit-engine", daemon=True)
            self._thread.start()

    def stop(self, drain: bool = True) -> None:
        """End the thread, once it has finished the queued jobs (``drain``, the default) or
        only the batch it is running (``drain=False``: the jobs still queued get a
        RuntimeError)."""
        with self._condition:
            self._closed = True
            if not drain:
                while self._pending:
                    job = self._pending.popleft()
                    if not job.future.done():
                        job.future.set_exception(RuntimeError("the server stopped before these images were run"))
            self._condition.notify_all()
        if self._thread is not None:
            self._thread.join()

    @property
    def queued(self) -> int:
        """Images waiting for the engine."""
        with self._condition:
            return sum(len(job.images) - job.taken for job in self._pending)

    def submit(self, images: np.ndarray) -> Future:
        """Queue images for the engine.

        Args:
            images: uint8 (n, S, S, 3), as ``data.images.load_image`` decodes them.

        Returns:
            A future of their outputs, (n, units) float32 in the same order; it holds the
            engine's exception if the engine failed.

        Raises:
            RuntimeError: the batcher was stopped.
        """
        future: Future = Future()
        if len(images) == 0:
            future.set_result(np.zeros((0, 1), dtype="float32"))
            return future
        with self._condition:
            if self._closed:
                raise RuntimeError("the engine's thread has stopped")
            self._pending.append(_Job(np.asarray(images), future))
            self._condition.notify_all()
        return future

    def _loop(self) -> None:
        while True:
            with self._condition:
                while not self._pending and not self._closed:
                    self._condition.wait()
                if not self._pending:
                    return  # closed, nothing left
                deadline = time.monotonic() + self.wait_s
                while self._queued_locked() < self.max_batch and not self._closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._condition.wait(remaining)
                slices = self._take_locked()
            self._run(slices)

    def _queued_locked(self) -> int:
        return sum(len(job.images) - job.taken for job in self._pending)

    def _take_locked(self) -> list[tuple[_Job, int, int]]:
        """(job, start, stop) slices making up the next batch, at most ``max_batch`` images."""
        slices, room = [], self.max_batch
        while self._pending and room:
            job = self._pending[0]
            count = min(len(job.images) - job.taken, room)
            slices.append((job, job.taken, job.taken + count))
            job.taken += count
            room -= count
            if job.taken == len(job.images):
                self._pending.popleft()
        return slices

    def _run(self, slices: list[tuple[_Job, int, int]]) -> None:
        from transferkit.inference.predict import engine_outputs

        batch = np.concatenate([job.images[start:stop] for job, start, stop in slices])
        try:
            if self._lock is not None:
                with self._lock:
                    outputs = engine_outputs(self.forward, [batch], len(batch))
            else:
                outputs = engine_outputs(self.forward, [batch], len(batch))
        except Exception as error:  # the requests waiting get it; the thread goes on
            for job, _, _ in slices:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        self.stats.batches += 1
        self.stats.images += len(batch)
        self.stats.largest = max(self.stats.largest, len(batch))
        offset = 0
        for job, start, stop in slices:
            job.parts.append((start, outputs[offset : offset + stop - start]))
            offset += stop - start
            if stop == len(job.images) and not job.future.done():
                job.future.set_result(np.concatenate([part for _, part in sorted(job.parts, key=lambda p: p[0])]))
