"""Evaluate a model that was not trained here: code named by the user builds it, a safetensors file gives it weights.

    robustsparse eval --model mypkg.nets:build --weights w.safetensors --data cifar10 --suite clean,pgd-20 --eps 8/255
    rs.eval.evaluate_external("mypkg.nets:build", "w.safetensors", "cifar10", suite="clean,pgd-20", eps=8 / 255)

* ``--model package.module:function``: the module is imported (from the current directory or the environment;
  this runs the user's own code, which they named explicitly) and ``function()`` is called with no arguments; it
  must return an ``nn.Module`` mapping float images in [0, 1], (N, C, H, W), to logits (N, classes). Any input
  normalisation must happen inside that module: the attacks perturb [0, 1] pixels and the budget ε is in them.
* ``--weights``: a safetensors file only, loaded with ``load_state_dict(strict=True)``. The file's header is read
  before anything else (8-byte little-endian length, then a JSON object); a pickle or ``torch.save`` file (zip
  or legacy) is refused by its first bytes, never unpickled, whatever its name.
* The data: the dataset's ``split`` (default test) from the registry; a one-image probe checks that the model
  takes the dataset's image shape and returns one logit per class before any attack runs.

Then the one evaluator (`evaluate`) runs with its sanity checks and, with ``state_path``, its resumable state
(whose signature includes a digest of the weights, so a state from other weights is refused).
"""
from __future__ import annotations

import importlib
import json
import os
import re
import struct
import sys

import torch
from torch import nn

from ..errors import UserError
from .evaluator import EvalResult, evaluate, parse_eps, point_count

_SPEC = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*$")
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit on the JSON header
_SAVE_HINT = ("Save the weights with safetensors instead: from safetensors.torch import save_file; "
              "save_file(model.state_dict(), 'weights.safetensors')")


def import_builder(spec: str):
    """The function named by ``package.module:function`` (the current directory is importable too)."""
    if not isinstance(spec, str) or not _SPEC.match(spec):
        raise UserError(f"--model must name a function as package.module:function (e.g. mynets.cifar:build), "
                        f"got {spec!r}")
    module_name, func_name = spec.split(":")
    cwd_added = os.getcwd() not in sys.path and "" not in sys.path  # the console script does not put it there
    if cwd_added:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        where = "" if exc.name == module_name else f" (it imports {exc.name!r}, which is missing)"
        raise UserError(f"--model {spec}: cannot import {module_name}{where}; run from the folder that holds it or "
                        "install it") from exc
    finally:
        if cwd_added:
            sys.path.remove(os.getcwd())
    builder = getattr(module, func_name, None)
    if not callable(builder):
        raise UserError(f"--model {spec}: {module_name} has no function {func_name!r}")
    return builder


def check_safetensors(path: str) -> None:
    """Raise a UserError unless ``path`` starts like a safetensors file (8-byte little-endian length n, then n
    bytes of a JSON object); reads only those bytes, never unpickles. A refusal names a pickle or torch.save file
    by its first bytes (pickle protocol byte 0x80, zip magic PK) so that the user knows what to convert."""
    if not isinstance(path, str) or not os.path.isfile(path):
        raise UserError(f"--weights {path}: no such file")
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
        header = fh.read(n) if 1 < n <= min(_MAX_HEADER, size - 8) else b""
    try:
        meta = json.loads(header.decode("utf-8")) if header[:1] == b"{" else None
    except (UnicodeDecodeError, ValueError):
        meta = None
    if isinstance(meta, dict):
        return
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":
        kind = "a torch.save zip archive" if head[:2] == b"PK" else "a pickle (or legacy torch.save) file"
        raise UserError(f"--weights {path} is {kind}; robustsparse never unpickles (unpickling runs arbitrary "
                        f"code), so it was not loaded. {_SAVE_HINT}")
    raise UserError(f"--weights {path} is not a safetensors file (no safetensors JSON header); only safetensors "
                    f"weights are accepted. {_SAVE_HINT}")


def load_external_model(model: str, weights: str, device: str | torch.device = "cpu") -> nn.Module:
    """Build ``model`` (``package.module:function``), load the safetensors ``weights`` strictly; eval mode."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    check_safetensors(weights)  # before the user's code runs: a refused file costs nothing
    builder = import_builder(model)
    try:
        net = builder()
    except Exception as exc:  # noqa: BLE001 - the user's code: report it in one line (call it in Python to debug)
        raise UserError(f"--model {model}: {builder.__name__}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(net, nn.Module):
        raise UserError(f"--model {model}: {builder.__name__}() returned {type(net).__name__}, not a torch nn.Module")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as exc:
        raise UserError(f"--weights {weights}: not a readable safetensors file ({exc})") from exc
    try:
        net.load_state_dict(tensors, strict=True)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:400]
        raise UserError(f"--weights {weights} do not fit --model {model}: {detail}") from exc
    return net.to(device).eval()


def _probe(net: nn.Module, x: torch.Tensor, num_classes: int, model: str, data: str) -> None:
    device = next(iter(net.parameters()), torch.empty(0)).device
    try:
        with torch.no_grad():
            out = net(x[:1].to(device))
    except Exception as exc:  # noqa: BLE001 - usually a shape mismatch between the model and the dataset
        raise UserError(f"--model {model} fails on one {data} image of shape {tuple(x.shape[1:])}: "
                        f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from exc
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (1, num_classes):
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise UserError(f"--model {model} returned {got} for one {data} image; expected logits of shape "
                        f"(1, {num_classes}), one per class")


def evaluate_external(model: str, weights: str, data: str, suite="clean,pgd-20", eps=8 / 255, norm: str = "Linf",
                      split: str = "test", n: int | None = None, data_root: str | None = None, batch_size: int = 256,
                      seed: int = 0, state_path: str | None = None, progress: bool = True,
                      device: str | torch.device | None = None, autoattack_n: int | None = None) -> EvalResult:
    """Evaluate the model built by ``model`` with ``weights`` on ``split`` of dataset ``data`` (see module doc).
    ``eps`` may be a fraction such as ``"8/255"``; ``n`` keeps the first ``n`` images of the split, and
    ``autoattack_n`` runs AutoAttack on the first ``autoattack_n`` of those only (the evaluator's protocol)."""
    from ..data import dataset_spec, load_dataset

    eps = parse_eps(eps)
    if n is not None and n < 1:
        raise UserError(f"--n must be >= 1, got {n}")
    if batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {batch_size}")
    spec = dataset_spec(data)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = load_external_model(model, weights, device)
    x, y = load_dataset(data, split, root=data_root)
    if n is not None:
        x, y = x[:n], y[:n]
    _probe(net, x, spec.num_classes, model, data)
    return evaluate(net, x, y, suite=suite, eps=eps, norm=norm, num_classes=spec.num_classes,
                    batch_size=batch_size, seed=seed, state_path=state_path, progress=progress,
                    autoattack_n=autoattack_n)


def evaluate_cli_args(args) -> EvalResult:
    """``robustsparse eval --model ... --weights ... --data ...``: check the option combination, then evaluate."""
    missing = [flag for flag, value in (("--model", args.model), ("--weights", args.weights), ("--data", args.data))
               if value is None]
    if missing:
        raise UserError(f"evaluating a model built elsewhere needs --model, --weights and --data; missing "
                        f"{', '.join(missing)}")
    stray = [flag for flag, value in (("RUN", args.path), ("--which", args.which != "best" or None),
                                      ("--lam", args.lam), ("--mix", args.mix)) if value is not None]
    if stray:
        raise UserError(f"{', '.join(stray)} belong to evaluating a run of robustsparse, not --model/--weights")
    return evaluate_external(args.model, args.weights, args.data, suite=args.suite or "clean,pgd-20,autoattack",
                             eps=8 / 255 if args.eps is None else args.eps, norm=args.norm or "Linf",
                             split=args.split or "test", n=point_count(args.n, None, "--n"),
                             data_root=args.data_root, batch_size=args.batch_size or 256, seed=args.seed,
                             state_path=args.state, progress=not args.no_progress,
                             autoattack_n=point_count(args.autoattack_n, None, "--autoattack-n"))
