"""The micro-batcher with the real engine predict builds: requests queued together share
engine calls of at most ``max_batch`` images, and each gets exactly its own outputs."""

from __future__ import annotations

import numpy as np
import pytest

from transferkit.inference.predict import engine_for, engine_outputs
from transferkit.serve.batcher import MicroBatcher


@pytest.fixture(scope="module")
def forward(shapes_run):
    """The engine predict builds for the run."""
    return engine_for(shapes_run, "auto", "auto")


def test_requests_queued_together_share_engine_calls_and_get_their_own_outputs(shapes_run, forward):
    rng = np.random.default_rng(3)
    size = shapes_run.image_size
    requests = [rng.integers(0, 256, (count, size, size, 3), dtype="uint8") for count in (1, 2, 3, 1)]
    batcher = MicroBatcher(forward, max_batch=4)
    futures = [batcher.submit(images) for images in requests]  # all queued before the engine's thread starts
    batcher.start()
    try:
        answers = [future.result(timeout=120) for future in futures]
    finally:
        batcher.stop()
    # 7 images, at most 4 a call: two calls, the 3-image request split across them
    assert (batcher.stats.batches, batcher.stats.images, batcher.stats.largest) == (2, 7, 4)
    for images, outputs in zip(requests, answers):
        alone = engine_outputs(forward, [images], len(images))
        assert outputs.shape == alone.shape
        np.testing.assert_allclose(outputs, alone, atol=1e-5)


def test_an_engine_failure_reaches_the_requests_and_the_thread_goes_on(shapes_run, forward):
    size = shapes_run.image_size
    batcher = MicroBatcher(forward, max_batch=4)
    wrong = batcher.submit(np.zeros((2, size, size, 5), dtype="uint8"))  # five channels: no engine takes them
    batcher.start()
    try:
        with pytest.raises(ValueError):
            wrong.result(timeout=120)
        right = batcher.submit(np.zeros((1, size, size, 3), dtype="uint8")).result(timeout=120)
        assert right.shape == (1, len(shapes_run.class_names))
    finally:
        batcher.stop()
    with pytest.raises(RuntimeError, match="stopped"):
        batcher.submit(np.zeros((1, size, size, 3), dtype="uint8"))


def test_a_stop_without_draining_ends_after_the_running_batch_and_fails_the_queued(shapes_run, forward):
    """A second Ctrl-C: the batch the engine runs finishes, the images still queued are not run."""
    import threading
    import time

    size = shapes_run.image_size
    held = threading.Lock()
    held.acquire()  # the engine's first call waits on it
    batcher = MicroBatcher(forward, max_batch=2, lock=held)
    running, *queued = [batcher.submit(np.zeros((2, size, size, 3), dtype="uint8")) for _ in range(3)]
    batcher.start()
    deadline = time.monotonic() + 60
    while batcher.queued > 4:  # the thread took the first job and waits for the engine
        assert time.monotonic() < deadline
        time.sleep(0.01)
    stopping = threading.Thread(target=batcher.stop, kwargs={"drain": False})
    stopping.start()
    for future in queued:
        with pytest.raises(RuntimeError, match="server stopped"):
            future.result(timeout=60)  # at once, while the running batch still waits
    assert not running.done()
    held.release()
    stopping.join(timeout=120)
    assert not stopping.is_alive()
    assert running.result(timeout=1).shape == (2, len(shapes_run.class_names))
    assert (batcher.stats.batches, batcher.stats.images) == (1, 2)
