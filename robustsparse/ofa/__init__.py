"""Once-for-all adversarial training: one model, λ ∈ [0, 1] chosen at inference (0 = accurate, 1 = robust).

    smart.py        SMART: shared weights, a clean and an adversarial sparse expert (two masks), dual BN
    oat.py          OAT: FiLM after every BN conditioned on an encoding of λ, dual BN, λ sampled per sample
    float_noise.py  FLOAT: λ-scaled weight noise with a learnable per-layer scale, dual BN
    base.py         the registry, `at_lambda` (the plain module for one λ)
    cost.py         parameters, non-zero parameters, MACs and extra element-wise ops per inference path

Train with ``train.method=smart|oat|float`` (options in the ``ofa`` config section; the objectives are in
train/objectives/ofa.py); load one λ with ``rs.load(run, lam=0.3)``; sweep with ``rs.sweep(runs, lams, suite,
out)`` or ``robustsparse sweep`` (pipelines/sweep.py).
"""
from . import float_noise, oat, smart  # noqa: F401  importing a method registers it
from .base import OFA_METHODS, at_lambda, check_lambda, make_conditional, ofa_method_of, ofa_spec
from .cost import PathCost, cost_table, path_cost
from .smart import expert_mask_tensors, mask_iou, smart_path, split_layers

__all__ = ["OFA_METHODS", "at_lambda", "check_lambda", "make_conditional", "ofa_method_of", "ofa_spec",
           "PathCost", "path_cost", "cost_table", "expert_mask_tensors", "mask_iou", "smart_path", "split_layers"]
