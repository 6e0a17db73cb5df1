"""Batch-norm running statistics set from data (the search's ``prune.bn_stats=batch``, compare's NTK distance)."""
from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call


def calibrate_bn(model, params: dict | None, x) -> None:
    """Set every BN layer's running statistics to those of the batch ``x`` through ``model`` (with ``params`` in
    place of its parameters, if given); the model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms:
        return
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average: after one batch, exactly that batch's statistics
    model.train()
    with torch.no_grad():
        if params is None:
            model(x)
        else:
            functional_call(model, {k: v.detach() for k, v in params.items()}, (x,))
    model.eval()
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
