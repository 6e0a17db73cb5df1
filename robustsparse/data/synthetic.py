"""``synthetic``: a generated, learnable image-classification set for fast tests (no files involved).

Each class has a fixed random prototype image; a sample is its class prototype plus Gaussian noise, clamped to
[0, 1]. Everything is a function of the options (``shape``, ``num_classes``, ``n_train``, ``n_test``, ``seed``), and
train and test come from independent seeded streams, so changing ``n_train`` leaves the test set unchanged.
"""

from __future__ import annotations

import torch

from robustsparse.errors import UserError

from .registry import DatasetSpec

NOISE_STD = 0.25


def _check(shape, num_classes, n_train, n_test, seed) -> tuple:
    def is_int(v) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not (isinstance(shape, (tuple, list)) and len(shape) == 3 and all(is_int(s) and s > 0 for s in shape)):
        raise UserError(f"synthetic: shape must be three positive integers (C, H, W), got {shape!r}")
    if not (is_int(num_classes) and num_classes >= 2):
        raise UserError(f"synthetic: num_classes must be an integer >= 2, got {num_classes!r}")
    for key, value in (("n_train", n_train), ("n_test", n_test), ("seed", seed)):
        if not (is_int(value) and value >= 0):
            raise UserError(f"synthetic: {key} must be an integer >= 0, got {value!r}")
    return tuple(shape)


def spec(*, shape=(3, 32, 32), num_classes=10, n_train=512, n_test=256, seed=0) -> DatasetSpec:
    c, h, w = _check(shape, num_classes, n_train, n_test, seed)
    # 64 by default, but never more than half of a small training set.
    return DatasetSpec("synthetic", c, (h, w), num_classes, min(64, n_train // 2), needs_root=False)


def load(split, root, *, shape=(3, 32, 32), num_classes=10, n_train=512, n_test=256, seed=0):
    shape = _check(shape, num_classes, n_train, n_test, seed)
    prototypes = torch.rand((num_classes, *shape), generator=torch.Generator().manual_seed(seed * 3))
    n, stream = (n_train, 1) if split == "train" else (n_test, 2)
    gen = torch.Generator().manual_seed(seed * 3 + stream)
    y = torch.arange(n) % num_classes  # balanced classes
    y = y[torch.randperm(n, generator=gen)]
    x = (prototypes[y] + NOISE_STD * torch.randn((n, *shape), generator=gen)).clamp_(0.0, 1.0)
    return x.contiguous(), y.to(torch.int64)
