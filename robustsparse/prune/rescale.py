"""Rescale the searched ticket for the batch-norm network that training sees [INFERRED; our option].

Two rules, ``prune.rescale`` (``none`` leaves the ticket as the search made it):

``filter``: a conv whose only consumer is a batch-norm layer is scale invariant per output channel in training mode:
BN(c·W * x) = BN(W * x) for c > 0. Its gradient and its share of the NTK scale by 1/c and 1/c², so SGD's
effective step on that filter scales by 1/c². The search runs in eval mode, where BN at θ₀'s statistics is the
identity, and changes filter norms to match the un-normalised network's outputs; training never sees that
network, but it does see the changed step size. ``prune.rescale=filter`` therefore gives every such filter of
the ticket back its norm in m⊙θ₀, keeping the direction the search found (the training-mode function is
unchanged).

``dense``: under batch-statistics BN, masking at density 0.1 shrinks the kernel ~13x (digits CNN: the
un-normalised linear layers pass a signal √d as large forward and backward). Each row is rescaled so that the
ticket's kernel has about the dense magnitude (``restore_dense_scale``).

Measured on digits at density 0.1 (PGD-20, seeds 0-3; docs/results/digits.md): neither helps. ``filter`` loses
1.8 points on average against the same ticket unrescaled (same training-mode function, larger filters, hence
smaller effective steps), and ``dense`` halves the batch-statistics NTK distance but loses 1.0 point.
"""
from __future__ import annotations

import torch
from torch import nn


def conv_bn_pairs(model: nn.Module) -> dict[str, str]:
    """{conv weight name: BN module name} for each conv whose output feeds nothing but a BatchNorm (found by
    symbolic tracing; a model that cannot be traced yields {} and is left as it is)."""
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # noqa: BLE001 - untraceable models (data-dependent control flow) are simply not rescaled
        return {}
    modules = dict(model.named_modules())
    pairs = {}
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.modules.conv._ConvNd):
            continue
        users = list(node.users)
        if len(users) == 1 and users[0].op == "call_module" \
                and isinstance(modules.get(users[0].target), nn.modules.batchnorm._BatchNorm):
            pairs[f"{node.target}.weight"] = users[0].target
    return pairs


def _row_norms(t: torch.Tensor) -> torch.Tensor:
    return t.flatten(1).norm(dim=1)


def _with_row_norms(weight: torch.Tensor, m: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """``weight`` with the rows of m⊙weight scaled to norms ``want``; empty rows (either side) are left alone."""
    now = _row_norms(weight * m)
    scale = torch.where((now > 0) & (want > 0), want / now.clamp_min(1e-30), torch.ones_like(now))
    return weight * scale.reshape(-1, *([1] * (weight.dim() - 1)))


def restore_filter_norms(weights: dict, reference: dict, mask, pairs: dict) -> dict:
    """``weights`` with each paired conv's output-channel norms set to those of ``reference`` (both under
    ``mask``)."""
    out = dict(weights)
    for name in pairs:
        if name in weights and name in reference:
            m = mask[name] if name in mask else torch.ones_like(weights[name])
            out[name] = _with_row_norms(weights[name], m, _row_norms(reference[name] * m))
    return out


def restore_dense_scale(weights: dict, reference: dict, mask, pairs: dict) -> dict:
    """``weights`` rescaled per output unit towards the dense network's kernel under batch-statistics BN:
    a layer whose output is not normalised gets its dense row norm ‖θ₀_i‖ back (the forward signal of the dense
    network; masking alone shrinks it by about √d per layer), a conv feeding a BN gets √d_i·‖θ₀_i‖ (its own
    share of the dense kernel: BN scales its gradient by 1/‖w_i‖, and it keeps a d_i fraction of the weights)."""
    out = dict(weights)
    for name, m in mask.items():
        if name in weights and name in reference:
            want = _row_norms(reference[name])
            if name in pairs:
                want = want * m.flatten(1).mean(1).sqrt()
            out[name] = _with_row_norms(weights[name], m, want)
    return out


def rescale_ticket(mode: str, weights: dict, theta0: dict, mask, model: nn.Module) -> dict:
    """The ticket's weights under ``prune.rescale`` = ``mode`` (none | filter | dense)."""
    if mode == "none":
        return weights
    rule = {"filter": restore_filter_norms, "dense": restore_dense_scale}[mode]
    return rule(weights, theta0, mask, conv_bn_pairs(model))
