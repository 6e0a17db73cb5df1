"""Checks that the mask buffers of a saved model state agree with its weights and with what its metadata says.

A ticket's checkpoint hash proves the files were not damaged after they were written, not that they were written
right (a hand-assembled or foreign ticket passes the hash): these checks give one clear message instead of a
shape error deep in ``load_state_dict`` or a silently different density.
"""
from __future__ import annotations

import math

import torch

from ..errors import UserError

MASK_SUFFIX = ".weight_mask"


def check_mask_state(state: dict[str, torch.Tensor], recorded_density, source: str) -> None:
    """Every ``<module>.weight_mask`` is binary, has its ``<module>.weight``'s shape, and together they keep the
    ``recorded_density`` (if it is a number) of the masked weights."""
    masks = {k: v for k, v in state.items() if k.endswith(MASK_SUFFIX)}
    kept = total = 0
    for key, mask in masks.items():
        weight_key = key[:-len(MASK_SUFFIX)] + ".weight"
        weight = state.get(weight_key)
        if weight is None:
            raise UserError(f"{source}: mask {key} has no weight {weight_key} beside it")
        if tuple(mask.shape) != tuple(weight.shape):
            raise UserError(f"{source}: mask {key} has shape {tuple(mask.shape)} but {weight_key} has shape "
                            f"{tuple(weight.shape)}")
        values = mask.float()
        bad = (values != 0) & (values != 1)
        if bool(bad.any()):
            raise UserError(f"{source}: mask {key} holds values other than 0 and 1 "
                            f"(e.g. {values[bad].flatten()[0].item()}); a mask must be binary")
        kept += int(values.count_nonzero())
        total += values.numel()
    if masks and isinstance(recorded_density, (int, float)) and not isinstance(recorded_density, bool):
        actual = kept / max(total, 1)
        if not math.isclose(actual, recorded_density, rel_tol=0, abs_tol=1e-9):
            raise UserError(f"{source}: its masks keep {actual:.6f} of the weights, but its metadata records "
                            f"density {recorded_density}; the mask and its record do not belong together")
