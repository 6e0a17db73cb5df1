"""NTT, Neural Tangent Transfer (Liu & Zenke, ICML 2020): match the dense network's outputs and empirical NTK on
CLEAN training inputs, label-free, with periodic magnitude mask updates (search.py has the loss). It is AWT's
clean-point ablation and an at-init baseline.

``prune.preset=faithful`` is Liu & Zenke's recipe (method-notes §4(b).2): the layer-wise top-d |θ₀| start, batch 64
(32 + 32 for the kernel), Adam 5e-4, λ_ker 1e-3, λ_L2 1e-5, and the mask recomputed layer-wise from |θ_s| every 100
iterations, 10 times in 1100. Their 20 epochs are not the default; set ``prune.search_iters``. The default
``short`` preset runs 20 steps, so the magnitude mask is never updated (presets.py).
"""
from __future__ import annotations

from .registry import register_pruner
from .search import ntk_search


@register_pruner("ntt")
def prune(model, cfg, x, y, state_dir=None, progress=True):
    return ntk_search(model, cfg, x, y, points="clean", state_dir=state_dir, progress=progress)
