"""Cost of one inference path: parameters, non-zero parameters, MACs and extra element-wise operations.

Counted on a real forward pass (batch 1, eval mode, no grad) of the module that serves one λ, with hooks:

* ``params``: the parameters of every leaf module the pass runs, thop-style (conv, linear, BN affine, FiLM MLPs,
  FLOAT's α). A dual BN contributes only the branch the path uses, so a dual-BN model counts as with one BN.
  This is how resnet_OAT.py's docstring counts: ResNet-34 on 3×32×32 has 21,282,122 parameters dense and
  31,403,978 with OAT's FiLM layers at FiLM input size 1 (method-notes §3(b).3).
* ``nonzero_params``: the same minus the zero entries of the conv/linear weights the pass computes with
  (W ⊙ M for masked and SMART layers); other parameters (BN, biases, FiLM) count in full.
* ``macs`` / ``sparse_macs``: conv and linear multiply-accumulates, dense and over non-zero weights only.
* SMART's logit mixture (0 < λ < 1) runs both experts: each expert's split weights count as its own tensor, the
  shared layers (the classifier at least) once; its MACs are both passes'.
* ``extra_ops``: element-wise operations a method adds to the base network per image: FiLM's multiply and add
  per activation, FLOAT's noise scale and add per weight (0 at λ < 0.1), the logit mixture's mixing.
* ``stored_params``: every parameter the deployed once-for-all model keeps to serve all λ (both BNs, all FiLM
  MLPs, all α; SMART's trainable mask scores excluded, its two masks counted as ``mask_bits``).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import UserError

_SKIP_PARAMS = ("score_clean", "score_adv")  # SMART's learned-mask scores: training only


@dataclass
class PathCost:
    params: int
    nonzero_params: int
    macs: int
    sparse_macs: int
    extra_ops: int
    stored_params: int | None = None
    mask_bits: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


def _effective_weight(module: nn.Module) -> torch.Tensor:
    if hasattr(module, "routed_weight"):
        return module.routed_weight().detach()
    mask = module._buffers.get("weight_mask")
    return module.weight.detach() if mask is None else module.weight.detach() * mask


def _own_params(module: nn.Module):
    return [(n, p) for n, p in module.named_parameters(recurse=False) if n not in _SKIP_PARAMS]


@torch.no_grad()
def path_cost(module: nn.Module, input_shape, conditional: nn.Module | None = None) -> PathCost:
    """Measure ``module`` (a plain model, or what `at_lambda` returns) at one image of ``input_shape`` (C, H, W).
    ``conditional``, when given, is the once-for-all model whose stored parameters and masks are reported."""
    first = next(module.parameters(), None)
    if first is None:
        raise UserError("the module has no parameters to count")
    ran: dict[int, nn.Module] = {}
    seen: set[int] = set()
    counts = {"macs": 0, "sparse_macs": 0, "extra_ops": 0, "params": 0, "nonzero": 0}

    def hook(mod, args, out):
        if hasattr(mod, "extra_ops"):
            counts["extra_ops"] += int(mod.extra_ops(out))
        if next(mod.children(), None) is not None or id(mod) in ran:
            return
        ran[id(mod)] = mod
        weight_nonzero = None
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            w = _effective_weight(mod)
            kept, total = int(w.count_nonzero()), w.numel()
            if isinstance(mod, nn.Conv2d):
                macs = out.numel() * (mod.in_channels // mod.groups) * mod.kernel_size[0] * mod.kernel_size[1]
            else:
                macs = out.numel() * mod.in_features
            counts["macs"] += macs
            counts["sparse_macs"] += macs // total * kept
            weight_nonzero = kept
        for name, p in _own_params(mod):
            if id(p) in seen:  # a tensor two modules share (the logit mixture's common layers) counts once
                continue
            seen.add(id(p))
            counts["params"] += p.numel()
            # structural count: only masked-out weights are zeros; a BN bias that happens to be 0 still counts
            counts["nonzero"] += weight_nonzero if name == "weight" and weight_nonzero is not None else p.numel()

    handles = [m.register_forward_hook(hook) for m in module.modules()]
    modes = {m: m.training for m in module.modules()}
    try:
        module.eval()
        module(torch.zeros((1, *input_shape), device=first.device, dtype=first.dtype))
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    stored, bits = None, 0
    if conditional is not None:
        stored = sum(p.numel() for m in conditional.modules() for _, p in _own_params(m))
        bits = sum(b.numel() for n, b in conditional.named_buffers() if n.endswith(("mask_clean", "mask_adv")))
    return PathCost(params=counts["params"], nonzero_params=counts["nonzero"], macs=counts["macs"],
                    sparse_macs=counts["sparse_macs"], extra_ops=counts["extra_ops"], stored_params=stored,
                    mask_bits=bits)


def cost_table(rows: list[dict]) -> str:
    """Markdown: one row per (run, λ) with a ``cost`` dict (PathCost.to_dict) plus ``label``, ``method``, ``lam``."""
    lines = ["| run | method | λ | mix | params (path, thop-style) | non-zero params (path) | MACs dense "
             "| MACs non-zero | extra element-wise ops | stored params (all λ) | mask bits |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        c = r["cost"]
        lam = "–" if r.get("lam") is None else f"{r['lam']:g}"
        stored = c["stored_params"] if c["stored_params"] is not None else c["params"]
        lines.append(f"| {r['label']} | {r['method']} | {lam} | {r.get('mix') or '–'} | {c['params']:,} | "
                     f"{c['nonzero_params']:,} | {c['macs']:,} | {c['sparse_macs']:,} | {c['extra_ops']:,} | "
                     f"{stored:,} | {c['mask_bits']:,} |")
    return "\n".join(lines)
