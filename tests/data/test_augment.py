import importlib.util
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from transferkit.data.augment import build_augmenter, preview_grid, write_preview
from transferkit.recipe import AugmentConfig


def test_all_strengths_zero_means_no_augmenter():
    assert build_augmenter(AugmentConfig(shift=0, contrast=0, rotation=0, hflip=False)) is None


def test_augmenter_is_reproducible_for_a_seed_and_changes_images():
    image = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype="uint8")
    config = AugmentConfig(shift=0.2, contrast=0.3, rotation=30.0)
    first = build_augmenter(config, seed=1)(image=image)["image"]
    again = build_augmenter(config, seed=1)(image=image)["image"]
    other = build_augmenter(config, seed=2)(image=image)["image"]
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, image)
    assert not np.array_equal(first, other)
    assert first.shape == image.shape and first.dtype == np.uint8


def test_contrast_only_keeps_geometry():
    image = np.zeros((16, 16, 3), dtype="uint8")
    image[:, :8] = 200
    out = build_augmenter(AugmentConfig(shift=0, rotation=0, contrast=0.5, hflip=False), seed=0)(image=image)["image"]
    assert (out[:, :8] > out[:, 8:]).all()


def test_preview_grid_has_one_row_per_image_and_views_columns():
    images = [np.full((20, 20, 3), value, dtype="uint8") for value in (0, 128)]
    grid = preview_grid(images, AugmentConfig(), views=3, tile=32)
    assert grid.size == (4 * (32 + 4) + 4, 18 + 2 * (32 + 4) + 4)


def test_write_preview_writes_a_png(shapes_dir, tmp_path):
    path = write_preview(shapes_dir, tmp_path / "out" / "preview.png", image_size=32, count=3, views=2)
    with Image.open(path) as image:
        assert image.format == "PNG"
        assert image.size[1] > 3 * 128


def test_write_preview_refuses_a_count_below_one(shapes_dir, tmp_path):
    import pytest

    from transferkit.errors import DataError

    with pytest.raises(DataError, match="count must be at least 1, got 0"):
        write_preview(shapes_dir, tmp_path / "preview.png", count=0)
    assert not (tmp_path / "preview.png").exists()


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed: nothing to leave out")
def test_albumentations_and_nncf_are_imported_without_torch_and_their_pytorch_parts_still_import_after():
    """albumentations and NNCF import their PyTorch parts, and torch with them (1.2-1.5 s a
    process), wherever torch is installed; transferkit's augmentation and int8 quantization
    do without (``runtime.import_without_torch``), in a fresh process."""
    code = ("import sys\n"
            "from transferkit.data.augment import build_augmenter\n"
            "from transferkit.inference.openvino import NNCF_TORCH_PARTS\n"
            "from transferkit.recipe import AugmentConfig\n"
            "from transferkit.runtime import import_without_torch\n"
            "assert build_augmenter(AugmentConfig(shift=0.1, rotation=5.0)) is not None\n"
            "nncf = import_without_torch('nncf', NNCF_TORCH_PARTS)\n"
            "from nncf.quantization.advanced_parameters import OverflowFix\n"
            "assert callable(nncf.quantize) and 'torch' not in sys.modules, 'torch imported'\n"
            "from albumentations.pytorch import ToTensorV2\n"  # the caller's own imports still work
            "import nncf.tensor.functions.torch_numeric\n"
            "assert 'torch' in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
