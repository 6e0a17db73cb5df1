"""Score-and-threshold pruners at initialisation: random, magnitude, SNIP, GraSP, SynFlow (method-notes §5.4).

Each scores every prunable weight (scoring.py and one file per method), then keeps the top ``density`` fraction
(global by default, as in the Synaptic-Flow code) with the layer-collapse guard of ``masks_from_scores``, in the
shape ``prune.structure`` asks for (`robustsparse.sparse.structured`). SynFlow is
iterative: ``synflow_rounds`` rounds with the exponential schedule density^(t/T). The ticket's weights are θ₀.
"""
from __future__ import annotations

import functools

import torch

from ..utils.progress import progress_bar
from ..sparse import Mask, apply_mask
from ..sparse.structured import select_mask, structured_masks
from . import grasp, magnitude, random_prune, snip, synflow
from .registry import Ticket, register_pruner, scope_of


def _batches(cfg, x, y, num_classes):
    n = cfg.prune.samples or 10 * num_classes
    g = torch.Generator().manual_seed(cfg.prune.seed)
    idx = torch.randperm(len(y), generator=g)[:n]
    return [(x[idx[i:i + 256]], y[idx[i:i + 256]]) for i in range(0, len(idx), 256)]


def _ticket_from_mask(model, mask: Mask) -> Ticket:
    import copy
    ticket_model = apply_mask(copy.deepcopy(model), mask)
    return Ticket(mask=mask, state={k: v.detach().clone() for k, v in ticket_model.state_dict().items()})


def _one_shot(scorer, needs_data: bool):
    def prune(model, cfg, x, y):
        num_classes = int(y.max()) + 1
        batches = _batches(cfg, x, y, num_classes) if needs_data else None
        opts = {"seed": cfg.prune.seed} if scorer is random_prune.score else {}
        scores = scorer(model, batches, **opts)
        mask = select_mask(scores, cfg.prune, scope_of(cfg))  # prune.structure: unstructured, channel or N:M
        return _ticket_from_mask(model, mask)
    return prune


register_pruner("random")(_one_shot(random_prune.score, needs_data=False))
register_pruner("magnitude")(_one_shot(magnitude.score, needs_data=False))
register_pruner("snip")(_one_shot(snip.score, needs_data=True))
register_pruner("grasp")(_one_shot(grasp.score, needs_data=True))


@register_pruner("synflow")
def prune_synflow(model, cfg, x, y, progress=True):
    select = functools.partial(structured_masks, min_layer_density=cfg.prune.min_layer_density,
                               structure=cfg.prune.structure, count=cfg.prune.keep_count)
    with progress_bar(total=cfg.prune.synflow_rounds, desc="SynFlow rounds", unit="round", enabled=progress) as bar:
        masks = synflow.synflow_iterative(model, cfg.prune.density, rounds=cfg.prune.synflow_rounds,
                                          input_shape=tuple(x.shape[1:]), scope=scope_of(cfg),
                                          masks_from_scores=select, callback=lambda t, m: bar.update(1))
    mask = masks if isinstance(masks, Mask) else Mask(dict(masks))
    return _ticket_from_mask(model, mask)
