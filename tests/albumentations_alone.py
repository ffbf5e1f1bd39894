"""albumentations as transferkit imports it (``data.augment.import_albumentations``): without
its PyTorch transforms, which would import torch wherever it is installed. For the fork
server's preload (tests/forked.py), which must not import transferkit itself."""

import sys

sys.modules.setdefault("albumentations.pytorch", None)  # its package skips a submodule it cannot import
import albumentations  # noqa: E402, F401

if sys.modules.get("albumentations.pytorch", False) is None:
    del sys.modules["albumentations.pytorch"]
