"""One export call checks its TensorFlow formats (SavedModel, .keras, .h5) in one fresh
process: TensorFlow's start-up is paid once, not once per format, and each file is still
loaded by a process that never imported transferkit."""

from __future__ import annotations

import os

import numpy as np
import pytest

from transferkit.data.samples import generated_images
from transferkit.errors import ExportError
from transferkit.export.keras import float32_model
from transferkit.export.verify import SHARED_PROCESS, FreshChecks


def test_the_tensorflow_formats_share_one_fresh_process_which_outlives_a_file_that_fails(shapes_run, tmp_path):
    assert {name for name, family in SHARED_PROCESS.items() if family == "tensorflow"} == {"savedmodel", "keras",
                                                                                           "h5"}
    model = float32_model(shapes_run.model)
    model.save(tmp_path / "model.keras")
    model.save(tmp_path / "model.h5")
    (tmp_path / "broken.keras").write_bytes(b"not a zip file")
    images = generated_images(5, shapes_run.image_size, np.random.default_rng(1))
    expected = model.predict(images.astype("float32"), verbose=0)

    with FreshChecks() as checks:
        with pytest.raises(ExportError, match=r"broken\.keras does not load and run in a fresh keras process: \w+"):
            checks.run("keras", tmp_path / "broken.keras", images)
        first = checks.run("keras", tmp_path / "model.keras", images)
        second = checks.run("h5", tmp_path / "model.h5", images, batch_size=2)
        assert checks.started == 1
    pid = first.stats["pid"]
    assert second.stats["pid"] == pid != os.getpid()
    for result in (first, second):
        np.testing.assert_allclose(result.outputs, expected, atol=1e-5)
        assert result.stats["load_seconds"] > 0
    with pytest.raises(ProcessLookupError):  # ended (and reaped) when the checks closed
        os.kill(pid, 0)
