"""AWT, adversarial winning tickets (Shi et al., AISTATS 2022), reconstructed per method-notes §4(b).3.

A sparse sub-network at initialisation whose outputs and empirical NTK match the dense network's AT ADVERSARIAL
points x̃ = PGD_k(f(·; θ₀), x, y) (or against the current student, ``prune.attack_target=student``; or half clean,
half adversarial, ``prune.points=both``), so that adversarial training of the ticket from scratch follows the
dense dynamics:

    min  γ_ker ‖Θ_{m⊙θ_s}(x̃₁, x̃₂) − Θ_{θ₀}(x̃₁, x̃₂)‖²_F/numel + γ_out ‖f(x̃; m⊙θ_s) − f(x̃; θ₀)‖²/numel + (γ₂/d)‖m⊙θ_s‖²

The loop is search.py's; ``prune.mode`` chooses between weights that move (R1, default) and mask-only (R2).
``prune.preset`` (presets.py): ``short`` (default) starts from SynFlow's global mask and runs 20 steps, so the mask
never moves (a variant tuned on digits for cost). ``faithful`` is §4(b).3: the layer-wise magnitude start, NTT's
loss and settings at these points, and the mask recomputed from |θ_s| every 100 of 1100 iterations.
The ticket is then trained with PGD-AT (or TRADES) with its mask fixed: ``robustsparse train CONFIG --ticket DIR``.
"""
from __future__ import annotations

from .registry import register_pruner
from .search import ntk_search


@register_pruner("awt")
def prune(model, cfg, x, y, state_dir=None, progress=True):
    return ntk_search(model, cfg, x, y, points=cfg.prune.points, state_dir=state_dir, progress=progress)
