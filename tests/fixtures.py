"""Model code "brought from elsewhere" for the tests of ``robustsparse eval --model`` (tests/test_eval_external.py).

    robustsparse eval --model tests.fixtures:tiny_net --weights w.safetensors --data digits --suite clean,pgd-20

``tiny_net()`` is what a user's own ``package.module:function`` looks like: it builds an ``nn.Module`` for 1x8x8
digits images in [0, 1] with its input normalisation inside, and returns logits for 10 classes.
"""
import torch
from torch import nn


class Standardize(nn.Module):
    """(x − mean) / std inside the model: the evaluator attacks [0, 1] pixels, so normalisation belongs here."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))

    def forward(self, x):
        return (x - self.mean) / self.std


def tiny_net() -> nn.Module:
    return nn.Sequential(Standardize(0.3, 0.4), nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 10))
