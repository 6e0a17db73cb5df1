"""SynFlow scores and the iterative SynFlow driver (Tanaka, Kunin, Yamins & Ganguli, 2020, "Pruning neural networks
without any data by iteratively conserving synaptic flow", NeurIPS; reference code ``ganguli-lab/Synaptic-Flow``,
``Pruners/pruners.py::SynFlow`` and ``prune.py::prune_loop``).

Data-free. In the "linearised" network where every parameter and floating buffer is replaced by its absolute value
(and the prunable weights are masked, ``|θ| ⊙ m``), run in eval mode on an all-ones input ``1`` of shape
``(1, C, H, W)``:

    R = 1ᵀ f_|θ|(1),    S(θ) = |θ ⊙ ∂R/∂θ|   (θ, ∂R/∂θ taken in the |·| network; |θ_abs| = |θ|)

Conventions: higher = keep; non-negative; computed in float64 (opt ``dtype``) on substituted tensors, so the model
itself is never touched; scores are returned in that precision (float64) to keep the wide dynamic range of deep
networks. The input shape is opt ``input_shape`` (without the batch dimension), else ``batches[0][0].shape[1:]``,
else the model's ``(in_channels, *input_size)`` (``ImageClassifier``). In eval mode BN with fresh running
statistics (mean 0, var 1) is an affine map with |γ|, |β|, as in the reference.

`synflow_iterative` is ``prune_loop`` with the exponential schedule: for t = 1..rounds, density_t =
density^(t/rounds); re-score with the current masks applied, give pruned entries the score −inf, and keep the top
``round(density_t · total)`` (``scope="global"``; per tensor for ``"local"``). Masks are therefore nested and the
final mask keeps exactly ``round(density · total)`` weights. The pipeline (``robustsparse prune``, prune/oneshot.py)
passes ``count=prune.keep_count`` (default ``reference``): each round keeps ``total − int((1 − density_t) · total)``
as the reference's ``_global_mask`` (k = int((1 − d)·N), prune ``score <= kthvalue(k)``); ties at the threshold
are broken by position here (the reference prunes them all) and already-pruned entries rank last (−inf; the
reference scores them 0).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch
from torch import Tensor, nn

from robustsparse.errors import UserError

from .scoring import _prunable, check_density, check_masks, device_of, forward_with, module_modes, topk_masks

REQUIRES_DATA = False


def _input_shape(model: nn.Module, batches, input_shape) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if batches:
        return tuple(batches[0][0].shape[1:])
    if hasattr(model, "in_channels") and hasattr(model, "input_size"):
        return (int(model.in_channels), *map(int, model.input_size))
    raise UserError("SynFlow needs the input shape: pass input_shape=(C, H, W) or a batch of data")


def score(model: nn.Module, batches=None, *, masks: dict[str, Tensor] | None = None,
          input_shape: tuple[int, ...] | None = None, dtype: torch.dtype = torch.float64) -> dict[str, Tensor]:
    shape = _input_shape(model, list(batches) if batches else None, input_shape)
    weights = _prunable(model)
    full = check_masks(weights, masks)

    def absolute(t: Tensor) -> Tensor:
        return t.detach().abs().to(dtype) if t.is_floating_point() else t.detach().clone()

    tensors = {n: absolute(p) for n, p in model.named_parameters()}
    tensors.update({n: absolute(b) for n, b in model.named_buffers()})
    leaves = {n: (absolute(w) * full[n].to(dtype)).requires_grad_(True) for n, w in weights.items()}
    tensors.update(leaves)
    names = list(leaves)
    with module_modes(model, False):
        x = torch.ones((1, *shape), dtype=dtype, device=device_of(model))
        r = forward_with(model, tensors, x).sum()
        grads = torch.autograd.grad(r, [leaves[n] for n in names], allow_unused=True)
    return {n: torch.zeros_like(leaves[n]).detach() if g is None else (g * leaves[n].detach()).abs()
            for n, g in zip(names, grads)}


def synflow_iterative(model: nn.Module, density: float, *, rounds: int = 100,
                      input_shape: tuple[int, ...] | None = None, scope: str = "global",
                      masks_from_scores: Callable[[Mapping[str, Tensor], float, str], dict[str, Tensor]] | None = None,
                      callback: Callable[[int, dict[str, Tensor]], None] | None = None) -> dict[str, Tensor]:
    """Final 0/1 masks (float32, keyed like the prunable weights) of iterative SynFlow at ``density`` (kept fraction).

    ``masks_from_scores(scores, density, scope)`` makes each round's masks from scores in which pruned entries are
    ``-inf`` (any mapping name -> 0/1 tensor; ``scope`` is passed through). Default: `topk_masks`, an exact top-k
    with deterministic tie-breaking (scope ``"global"`` or ``"local"``/``"layer"``). ``callback(t, masks)`` is
    called after each round t = 1..rounds with that round's masks (copies).
    """
    density = check_density(density)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise UserError(f"rounds must be a positive integer, got {rounds!r}")
    make = masks_from_scores or topk_masks
    masks = {n: torch.ones(w.shape, dtype=torch.float32, device=w.device) for n, w in _prunable(model).items()}
    for t in range(1, rounds + 1):
        density_t = density ** (t / rounds)
        scores = score(model, None, masks=masks, input_shape=input_shape)
        scores = {n: s.masked_fill(masks[n] == 0, float("-inf")) for n, s in scores.items()}
        new = make(scores, density_t, scope)
        # Already pruned entries stay pruned (a no-op with an exact top-k, since k never grows).
        masks = {n: (new[n].to(device=masks[n].device) != 0).to(torch.float32) * masks[n] for n in masks}
        if callback is not None:
            callback(t, {n: m.clone() for n, m in masks.items()})
    return masks
