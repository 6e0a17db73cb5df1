"""What an NTT/AWT search costs, counted so that its share of the training that follows can be reported apart
from the wall clock (which depends on the machine and its load).

The unit is one image's forward and backward pass, which is also the unit of training. One epoch of PGD-k
adversarial training costs n_train · (k + 1) of them: k attack steps, each a backward to the input, and one
weight step. One search iteration on a batch of B points (B/2 + B/2 for the kernel) with K outputs costs:

    attack        k · B        PGD-k against the teacher (or the student); 0 when matching at clean points
    outputs       B            the student's output term, forward and backward (the teacher's forward is free
                               beside it and not counted)
    ntk           2 · r · B    per-sample Jacobian rows, teacher and student: r = K for the full or trace kernel
                               (one vector-Jacobian product per output), 1 for ``projected``

Each Jacobian row is counted as one pass. The student's rows are differentiated once more (double backward), and
that cost is not counted, so the total is a lower bound. The measured seconds are the exact cost on their
machine.
"""
from __future__ import annotations

from .presets import mask_update_iterations


def per_iteration(settings: dict, attack_steps: int, num_outputs: int, points: str) -> dict:
    b = settings["search_batch"]
    rows = 1 if settings["ntk_mode"] == "projected" else num_outputs
    attack = 0 if points == "clean" else attack_steps * b
    ntk = 2 * rows * b if settings["ntk_weight"] > 0 else 0
    return {"attack": attack, "outputs": b, "ntk": ntk}


def search_cost(settings: dict, attack_steps: int, num_outputs: int, points: str, n_train: int,
                seconds: float) -> dict:
    """The cost record of one finished search (``ticket.info["cost"]``); the module docstring has the units."""
    iters = settings["search_iters"]
    one = per_iteration(settings, attack_steps, num_outputs, points)
    passes = iters * sum(one.values())
    epoch = n_train * (attack_steps + 1)
    updates = len(mask_update_iterations(iters, settings["mask_update_every"])) if settings["mode"] == "weights" \
        else iters
    return {"seconds": seconds, "iterations": iters, "mask_updates": updates, "passes_per_iteration": one,
            "image_passes": passes, "pgd_at_epoch_image_passes": epoch,
            "pgd_at_epochs_equivalent": passes / epoch if epoch else None}
