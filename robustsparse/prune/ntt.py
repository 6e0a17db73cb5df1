"""NTT, Neural Tangent Transfer (Liu & Zenke, ICML 2020): match the dense network's outputs and empirical NTK on
CLEAN training inputs, label-free, with periodic magnitude mask updates (search.py has the loss). It is AWT's
clean-point ablation and an at-init baseline.
"""
from __future__ import annotations

from .registry import register_pruner
from .search import ntk_search


@register_pruner("ntt")
def prune(model, cfg, x, y, state_dir=None, progress=True):
    return ntk_search(model, cfg, x, y, points="clean", state_dir=state_dir, progress=progress)
