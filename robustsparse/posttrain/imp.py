"""Adversarial IMP: iterative magnitude pruning with PGD-AT in every round and rewinding (lottery tickets:
Frankle & Carbin, ICLR 2019; rewinding to an early epoch: Frankle et al., ICML 2020). Method-notes §5.4 lists
LTH/IMP as an [INFERRED] comparator for AWT; this is the standard algorithm with the robust objective.

    round 0:  θ⁰ = the dense robust run (``train.method``, normally PGD-AT)
    round r:  d_r = d_{r−1} · (1 − prune.imp_rate)       (a fixed fraction of the REMAINING weights per round)
              m_r = TopK(|θ^{r−1}| on the weights m_{r−1} keeps, d_r)   ⇒ m_r ⊆ m_{r−1} (asserted)
              θ^r = train(m_r ⊙ θ_rewind)                  with the mask fixed, ``prune.imp_epochs`` epochs
    θ_rewind = θ₀ (``prune.imp_rewind_epoch=0``) or the dense run's weights after epoch k (its checkpoint
    ``epoch-<k>``, which pre-training keeps via ``train.keep_epochs``).

A round that would pass a requested density lands exactly on it instead, so the last round is exactly the
target, and one chain serves several densities (``compare`` runs one chain through all of its densities). The
ranking is global by default (``prune.scope=layer`` for per layer), with the layer-collapse guard. θ^{r−1} is
the round's ``best`` checkpoint (the one every evaluation reports). Each round's ticket is kept, evaluated with
``prune.imp_eval_suite`` and logged in ``rounds.jsonl`` with the attack's name. Each round trains from the
rewound weights with a fresh optimizer and the full LR schedule [our choice; LTH rewinding also rewinds the
schedule's position].
"""
from __future__ import annotations

import json
import os

import torch

from ..sparse import Mask, masks_from_scores, prunable_parameters
from ..api import eval_stage
from .after import Outcome, after_scope, register_after_training

ROUNDS_LOG = "rounds.jsonl"


def imp_schedule(densities: list[float], rate: float) -> list[tuple[float, bool]]:
    """(density, is_requested) per round: keep (1 − rate) of the previous round's density, landing exactly on
    each requested density that a round would pass; ends at the smallest."""
    rounds, d = [], 1.0
    for target in sorted(set(densities), reverse=True):
        while True:
            d = d * (1 - rate)
            if d <= target * (1 + 1e-9):
                rounds.append((target, True))
                d = target
                break
            rounds.append((d, False))
    return rounds


def next_mask(weights: dict[str, torch.Tensor], previous: Mask, density: float, scope: str = "global",
              min_layer_density: float = 0.0) -> Mask:
    """Magnitude top-``density`` among the weights ``previous`` keeps; pruned weights score −1 (below any
    magnitude), so they can never come back and the new mask is nested in ``previous``."""
    scores = {n: torch.where(previous[n].to(w.device) > 0, w.detach().abs(), torch.full_like(w, -1.0))
              for n, w in weights.items()}
    mask = masks_from_scores(scores, density, scope, min_layer_density)
    if not mask.is_nested_in(previous):
        raise RuntimeError("IMP produced a mask that is not nested in the previous round's (a bug)")
    return mask


def _logged_rounds(path: str) -> dict[int, dict]:
    if not os.path.exists(path):
        return {}
    rows = {}
    with open(path) as fh:
        for line in fh:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by a kill: that round is logged again
                    continue
                rows[row["round"]] = row
    return rows


@register_after_training("imp")
def pipeline(pipe) -> list[Outcome]:
    """Pre-trained dense run (round 0) → round-1/, round-2/, ... each with ticket/ and run/; rounds.jsonl."""
    p = pipe.cfg.prune
    epochs = p.imp_epochs or pipe.cfg.train.epochs
    log_path = pipe.path(ROUNDS_LOG)
    logged = _logged_rounds(log_path)
    previous = None
    stages, outcomes = [pipe.pretrain_cost()], []
    for r, (density, requested) in enumerate(imp_schedule(pipe.densities, p.imp_rate), start=1):
        ticket_dir, run_dir = pipe.path(f"round-{r}", "ticket"), pipe.path(f"round-{r}", "run")
        trained = pipe.pretrained_model() if r == 1 else pipe.load_run(pipe.path(f"round-{r - 1}", "run"))
        if previous is None:
            previous = Mask.ones_like(trained)
        if not pipe.has_ticket(ticket_dir):
            pipe.say(f"IMP round {r}: density {density:.4g}, PGD-AT for {epochs} epochs from the rewound weights")
            mask = next_mask(prunable_parameters(trained), previous, density, after_scope(pipe.cfg),
                             p.min_layer_density)
            pipe.write_ticket(ticket_dir, pipe.rewind_state(), mask,
                              {"method": "imp", "round": r, "density_target": density,
                               "rewind_epoch": p.imp_rewind_epoch})
        mask = pipe.ticket_mask(ticket_dir)
        nested = mask.is_nested_in(previous)
        if not nested:  # checked on every run, also for tickets written by an earlier invocation
            raise RuntimeError(f"IMP round {r}: the mask is not nested in round {r - 1}'s")
        cost = pipe.train(ticket_dir, run_dir, epochs=epochs, stage=f"IMP round {r}")
        if r not in logged:
            ev = eval_stage(run_dir, p.imp_eval_suite, name="round-eval", progress=pipe.progress)
            row = {"round": r, "density_target": density, "density": mask.density(), "kept": mask.kept(),
                   "nested_in_previous": nested, "requested": requested, "epochs": cost["epochs"],
                   "train_seconds": cost["seconds"], "split": pipe.cfg.eval.split, "n": ev["n"],
                   "accuracy": ev["accuracy"], "attacks": ev["attacks"], "points": ev.get("points", {})}
            with open(log_path, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            logged[r] = row
            pipe.say(f"IMP round {r}: density {mask.density():.4f}, " + ", ".join(
                f"{ev['attacks'][k]}: {v:.2%}" for k, v in ev["accuracy"].items()))
        stages.append(cost)
        if requested:
            outcomes.append(Outcome(density, run_dir, list(stages)))
        previous = mask
    return outcomes
