"""Per-channel input normalisation as the model's first layer, so attacks always work on images in [0, 1].

``mean`` and ``std`` are buffers: they move with ``.to()`` and are saved in the state_dict.
"""

from __future__ import annotations

import torch
from torch import nn


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel; ``mean``/``std`` are sequences of 1 or C floats."""

    def __init__(self, mean, std):
        super().__init__()
        mean_t = torch.as_tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1)
        std_t = torch.as_tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1)
        if mean_t.shape != std_t.shape and 1 not in (mean_t.shape[1], std_t.shape[1]):
            raise ValueError(f"mean and std lengths differ: {mean_t.shape[1]} vs {std_t.shape[1]}")
        if (std_t <= 0).any():
            raise ValueError("std values must be > 0")
        self.register_buffer("mean", mean_t)
        self.register_buffer("std", std_t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"mean={self.mean.flatten().tolist()}, std={self.std.flatten().tolist()}"
