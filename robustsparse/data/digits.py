"""``digits``: scikit-learn's bundled 8x8 handwritten digits (1797 images, 1 channel, 10 classes, values 0..16).

The copy ships inside scikit-learn (``sklearn.datasets.load_digits``), so this dataset needs no download and is the
library's embedded default. It has no official train/test split; ours is a seeded (seed 0) stratified selection of
360 test images, computed with the same version-stable procedure as the validation split, so it is identical on
every call and every machine.
"""

from __future__ import annotations

import numpy as np
import torch

from .registry import DatasetSpec, stratified_indices

TEST_SIZE = 360
SPEC = DatasetSpec(name="digits", channels=1, size=(8, 8), num_classes=10, val_size=180, needs_root=False)


def spec() -> DatasetSpec:
    return SPEC


def load(split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits  # deferred: scikit-learn is slow to import

    bunch = load_digits()
    x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    test = np.zeros(len(y), dtype=bool)
    test[stratified_indices(y, TEST_SIZE, seed=0)] = True
    keep = test if split == "test" else ~test
    return torch.from_numpy(np.ascontiguousarray(x[keep])), torch.from_numpy(y[keep])
