"""``svhn``: Street View House Numbers, cropped digits (http://ufldl.stanford.edu/housenumbers/), 32x32 RGB.

Files as distributed: ``<root>/train_32x32.mat`` and ``<root>/test_32x32.mat``, MATLAB v5 files holding ``X``
(32, 32, 3, N) uint8 and ``y`` (N, 1) with labels 1..10, where 10 stands for the digit 0 (mapped to 0 here).
The ``extra_32x32.mat`` set is not used.
"""

from __future__ import annotations

import os

import numpy as np
import torch

from robustsparse.errors import UserError

from .registry import DatasetSpec

_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}
_LAYOUT = "expected <root>/train_32x32.mat and <root>/test_32x32.mat from http://ufldl.stanford.edu/housenumbers/"


def spec() -> DatasetSpec:
    return DatasetSpec("svhn", 3, (32, 32), 10, val_size=5000, needs_root=True)


def load(split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    from scipy.io import loadmat  # deferred: only needed for this dataset

    if root is None or not os.path.isdir(root):
        raise UserError(f"SVHN needs root=<folder>, got {root!r}; {_LAYOUT}")
    path = os.path.join(root, _FILES[split])
    if not os.path.isfile(path):
        raise UserError(f"SVHN: missing file {path}; {_LAYOUT}")
    try:
        mat = loadmat(path, variable_names=["X", "y"])
    except Exception as e:  # scipy raises assorted errors for truncated / v7.3 / non-MATLAB files
        raise UserError(f"{path} is not a readable MATLAB v5 SVHN file: {e}") from None
    x, y = mat.get("X"), mat.get("y")
    if x is not None and x.ndim == 3:
        x = x[..., None]  # MATLAB drops a trailing singleton dimension, so a 1-image file comes back 3-D
    if x is None or y is None or x.dtype != np.uint8 or x.shape[:3] != (32, 32, 3) or y.size != x.shape[3]:
        raise UserError(f"{path}: expected variables X (32, 32, 3, N) uint8 and y (N, 1); {_LAYOUT}")
    y = y.reshape(-1).astype(np.int64)
    y[y == 10] = 0
    if len(y) and (y.min() < 0 or y.max() >= 10):
        raise UserError(f"{path}: labels must be 1..10 (10 = digit 0), found {y.min()}..{y.max()}")
    x = torch.from_numpy(np.ascontiguousarray(x.transpose(3, 2, 0, 1))).to(torch.float32).div_(255.0)
    return x, torch.from_numpy(y)
