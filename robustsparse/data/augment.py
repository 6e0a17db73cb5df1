"""Batched training-time augmentation: random crop with zero padding and random horizontal flip.

Works on a whole (N, C, H, W) batch on its own device with no per-image Python loop: every image draws its own crop
offset and flip coin from ``generator``, so a seeded generator reproduces the same batch exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustsparse.errors import UserError


def augment(
    x: torch.Tensor, crop_padding: int = 0, flip: bool = False, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Pad by ``crop_padding`` zeros, crop back to (H, W) at a random offset in [0, 2p]^2 per image, then flip
    each image horizontally with probability 0.5 if ``flip``. Returns ``x`` itself when both are disabled."""
    if isinstance(crop_padding, bool) or not isinstance(crop_padding, int) or crop_padding < 0:
        raise UserError(f"crop_padding must be an integer >= 0, got {crop_padding!r}")
    if x.dim() != 4:
        raise ValueError(f"augment expects a (N, C, H, W) batch, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    # Random numbers are drawn on the generator's device (a CPU generator may drive a GPU batch), then moved.
    rng_device = generator.device if generator is not None else x.device
    if crop_padding:
        p = crop_padding
        top, left = torch.randint(0, 2 * p + 1, (2, n, 1), generator=generator, device=rng_device).to(x.device)
        rows = (top + torch.arange(h, device=x.device)).view(n, 1, h, 1)
        cols = (left + torch.arange(w, device=x.device)).view(n, 1, 1, w)
        padded = F.pad(x, (p, p, p, p))
        batch = torch.arange(n, device=x.device).view(n, 1, 1, 1)
        channel = torch.arange(c, device=x.device).view(1, c, 1, 1)
        x = padded[batch, channel, rows, cols]
    if flip:
        coin = torch.rand(n, generator=generator, device=rng_device).to(x.device) < 0.5
        x = torch.where(coin.view(n, 1, 1, 1), x.flip(3), x)
    return x
