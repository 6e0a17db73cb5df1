"""The public API behind ``import robustsparse as rs``: load models and data, train, evaluate."""
from __future__ import annotations

import os

import torch
from torch import nn

from .errors import UserError
from .runs.checkpoint import find_checkpoint, load_checkpoint


def load(path: str, which: str = "best", device: str | torch.device = "cpu", lam: float | None = None,
         mix: str | None = None) -> nn.Module:
    """Load a trained model: ``path`` is a run folder (``which`` = "best" or "last"), a checkpoint ``.json`` or
    its ``.safetensors``. Returns an ``nn.Module`` in eval mode mapping [0, 1] NCHW images to logits.

    A sparse model (a ticket, or a run trained from one) comes back with its mask applied.
    A once-for-all model (``train.method`` oat, float or smart) needs ``lam`` in [0, 1] (0 = most accurate, 1 = most
    robust) and comes back as the plain module for that λ, the one the evaluator should attack; ``mix`` overrides
    SMART's ``ofa.mix`` (switch | weight | logit). ``lam`` for any other model is refused.
    "best" is the checkpoint with the highest validation robust accuracy (PGD-k on the held-out val split, never
    the test split); a run without validation data has only "last", which is then returned.
    """
    if which not in ("best", "last"):
        raise UserError(f"which must be 'best' or 'last', got {which!r}")
    if not os.path.exists(path):
        raise UserError(f"{path} does not exist (expected a run folder or a checkpoint file)")
    from .train.trainer import build_from_spec

    tensors, meta = load_checkpoint(find_checkpoint(path, prefer=which))
    model = build_from_spec(meta["model_spec"])
    from .pipelines.ticket import load_model_state
    load_model_state(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                     source=f"checkpoint {path} ({meta['model_spec']['name']})")
    from .ofa import at_lambda, ofa_method_of
    method = ofa_method_of(model)
    if method is None:
        if lam is not None or mix is not None:
            raise UserError(f"{path} is not a once-for-all model (no λ to choose); load it without lam/mix")
        return model.to(device).eval()
    if lam is None:
        raise UserError(f"{path} is a once-for-all model (train.method={method}): choose the trade-off with "
                        "lam=<0..1> (0 = most accurate, 1 = most robust), e.g. rs.load(path, lam=1) or --lam 1")
    return at_lambda(model.to(device), lam, mix)


def load_meta(path: str, which: str = "best") -> dict:
    """The JSON metadata of a run's or checkpoint's weights (config, model spec, epoch, best metric)."""
    from .runs.checkpoint import read_meta
    return read_meta(find_checkpoint(path, prefer=which))
