"""The public API behind ``import robustsparse as rs``: load a trained model, and evaluate a run on its own data
with its own threat model (``evaluate_run``; ``eval_stage`` caches that in the run folder, resumably)."""
from __future__ import annotations

import json
import os

import torch
from torch import nn

from .config import config_from_dict
from .data import load_split
from .errors import UserError
from .eval import evaluate
from .eval.evaluator import is_autoattack_item, parse_suite, point_count
from .ofa import at_lambda, ofa_method_of
from .runs.atomic import write_json_atomic
from .runs.checkpoint import find_checkpoint, load_checkpoint, read_meta
from .sparse import load_model_state
from .train.spec import build_from_spec


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
    tensors, meta = load_checkpoint(find_checkpoint(path, prefer=which))
    model = build_from_spec(meta["model_spec"])
    load_model_state(model, {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")},
                     source=f"checkpoint {path} ({meta['model_spec']['name']})")
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
    return read_meta(find_checkpoint(path, prefer=which))


def evaluate_run(path, suite=None, eps=None, norm=None, split=None, n=None, which="best", data_root=None,
                 batch_size=None, seed=0, state=None, progress=True, lam=None, mix=None, autoattack_n=None):
    """Evaluate a run/checkpoint on its own dataset with the run's threat model and protocol unless overridden:
    (EvalResult, its config). What ``robustsparse eval`` runs.

    ``n`` (the first n points of the split) and ``autoattack_n`` (AutoAttack on the first autoattack_n of those)
    default to the run's ``eval.n`` and ``eval.autoattack_n``; ``"all"`` overrides either with every point. The
    run's ``autoattack_n`` is ignored by a suite without AutoAttack (``--suite clean --n 200`` of a run whose
    protocol attacks the first 1,000); with AutoAttack in the suite, a subset larger than ``n`` is refused."""
    meta = load_meta(path, which)
    cfg = config_from_dict(meta["config"])
    if data_root is not None:
        cfg.data.root = data_root
    n = point_count(n, cfg.eval.n, "--n")
    given_autoattack_n = autoattack_n
    autoattack_n = point_count(autoattack_n, cfg.eval.autoattack_n, "--autoattack-n")
    model = load(path, which=which, device=_eval_device(), lam=lam, mix=mix)
    x, y = load_split(cfg, cfg.eval.split if split is None else split)
    if n is not None:
        x, y = x[:n], y[:n]
    suite = cfg.eval.suite if suite is None else suite
    if given_autoattack_n is None and not any(map(is_autoattack_item, parse_suite(suite))):
        autoattack_n = None  # the run's AutoAttack subset means nothing to a suite without AutoAttack
    if eps is None:
        eps = cfg.eval.eps if cfg.eval.eps is not None else cfg.attack.eps
    return evaluate(model, x, y, suite=suite, eps=eps,
                    norm=norm or cfg.attack.norm, num_classes=meta["model_spec"]["num_classes"],
                    batch_size=batch_size or cfg.eval.batch_size, seed=seed, state_path=state,
                    progress=progress, autoattack_n=autoattack_n), cfg


def _eval_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def eval_stage(run_dir: str, suite: str, name: str = "eval", progress: bool = True) -> dict:
    """Evaluate a run's best checkpoint with ``suite`` into ``<run>/<name>.json`` (resumable via
    ``<name>-state.json``); a finished evaluation is read back, not recomputed."""
    path = os.path.join(run_dir, f"{name}.json")
    if os.path.exists(path):
        with open(path) as fh:
            return json.load(fh)
    result, _ = evaluate_run(run_dir, suite=suite, state=os.path.join(run_dir, f"{name}-state.json"),
                             progress=progress)
    data = result.to_dict()
    write_json_atomic(path, data, sort_keys=False)
    return data
