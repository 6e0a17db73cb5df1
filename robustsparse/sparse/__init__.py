"""Sparsity core: masks over the prunable weights, choosing them from scores, carrying them in a model, reporting.

* Prunable parameters: the ``.weight`` of every ``nn.Conv2d`` and ``nn.Linear`` (biases, BN and normalisation are
  never pruned), keyed by the full ``named_parameters`` name, e.g. ``net.layer1.0.conv1.weight``.
* density = kept / total over the prunable weights (density 0.1 keeps 10%); sparsity = 1 - density.

    mask = masks_from_scores({k: p.abs() for k, p in prunable_parameters(model).items()}, density=0.1)
    apply_mask(model, mask)          # buffers + hooks: masked weights stay exactly 0 through training
    print(sparsity_report(model, (3, 32, 32)).table())

Loading a sparse state_dict into a fresh model: ``attach_mask_buffers(model, sd); model.load_state_dict(sd)``.
"""
from .mask import (Mask, apply_mask, attach_mask_buffers, enforce_mask, get_mask, is_masked, load_model_state,
                   mask_optimizer_state, masks_from_scores, prunable_parameters, remove_mask)
from .report import LayerRow, SparsityReport, sparsity_report

__all__ = ["Mask", "prunable_parameters", "masks_from_scores", "apply_mask", "get_mask", "remove_mask",
           "enforce_mask", "is_masked", "mask_optimizer_state", "attach_mask_buffers", "load_model_state", "sparsity_report",
           "SparsityReport", "LayerRow"]
