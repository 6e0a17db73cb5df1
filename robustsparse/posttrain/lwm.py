"""LWM: one-shot least-weight-magnitude pruning after robust pre-training (HYDRA's baseline, method-notes §5.3).

    m = TopK_layer(|W_pre|, k)        per layer (``prune.scope=global``: one ranking over all layers)

then fine-tune m ⊙ W_pre with the mask fixed, exactly as HYDRA's fine-tune (``prune.finetune_epochs``,
``prune.finetune_lr``). This is HYDRA's scaled score init with no score updates: within a layer the scale
sqrt(6/fan_in)/max|W| is a positive constant, so the ranking is the magnitude ranking.
"""
from __future__ import annotations

import time

from torch import Tensor

from ..sparse import Mask, masks_from_scores, prunable_parameters
from .after import Outcome, after_scope, register_after_training


def lwm_mask(weights: dict[str, Tensor], density: float, scope: str = "layer", min_layer_density: float = 0.0) -> Mask:
    """The top-``density`` magnitudes of the (pre-trained) prunable ``weights``."""
    return masks_from_scores({n: w.detach().abs() for n, w in weights.items()}, density, scope, min_layer_density)


@register_after_training("lwm")
def pipeline(pipe) -> list[Outcome]:
    """Pre-trained dense run → magnitude mask (ticket/) → fine-tune (finetune/)."""
    ticket_dir = pipe.path("ticket")
    if pipe.has_ticket(ticket_dir):
        cost = pipe.read_stage_cost("prune")
    else:
        started = time.perf_counter()
        model = pipe.pretrained_model()
        p = pipe.cfg.prune
        mask = lwm_mask(prunable_parameters(model), p.density, after_scope(pipe.cfg), p.min_layer_density)
        cost = {"epochs": 0, "seconds": time.perf_counter() - started}
        pipe.write_stage_cost("prune", cost)
        pipe.write_ticket(ticket_dir, model.state_dict(), mask, {"method": "lwm"})
    run_dir, finetune_cost = pipe.finetune(ticket_dir, pipe.path("finetune"))
    stages = [pipe.pretrain_cost(), {"stage": "magnitude prune", **cost}, finetune_cost]
    return [Outcome(pipe.densities[0], run_dir, stages)]
