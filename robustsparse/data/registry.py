"""Dataset registry: names -> (spec, reader), and the generic train/val/test carving.

A reader is two functions registered under a name:

* ``spec_fn(**options) -> DatasetSpec``
* ``load_fn(split, root, **options) -> (x, y)`` with ``split`` in {"train", "test"} (the *official* sets),
  ``x`` float32 in [0, 1] of shape (N, C, H, W) and ``y`` int64 of shape (N,).

The reader's options are the keyword-only parameters of ``load_fn``; ``spec_fn`` takes the same ones. A reader
with ``needs_root`` gets ``root=None`` when the user gave none and must then say which files it expects. Everything
else (validation split, option checking, output checks) happens here, once, for every dataset.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from robustsparse.errors import UserError

SPLITS = ("train", "val", "test", "trainval")
VAL_SEED = 0


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    channels: int
    size: tuple[int, int]  # (H, W)
    num_classes: int
    val_size: int  # training images held out as the validation split by default
    needs_root: bool  # True for on-disk datasets


@dataclass(frozen=True)
class _Reader:
    spec_fn: Callable[..., DatasetSpec]
    load_fn: Callable[..., tuple[torch.Tensor, torch.Tensor]]
    options: tuple[str, ...]


DATASETS: dict[str, _Reader] = {}


def register_dataset(name: str, spec_fn: Callable[..., DatasetSpec], load_fn: Callable) -> None:
    """Register a reader under ``name`` (see the module docstring for the two functions' contract)."""
    params = inspect.signature(load_fn).parameters.values()
    options = tuple(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)
    DATASETS[name] = _Reader(spec_fn, load_fn, options)


def list_datasets() -> list[str]:
    return sorted(DATASETS)


def _reader(name: str) -> _Reader:
    if name not in DATASETS:
        raise UserError(f"unknown dataset {name!r}; registered datasets: {', '.join(list_datasets())}")
    return DATASETS[name]


def _split_options(name: str, reader: _Reader, options: dict) -> tuple[int | None, dict]:
    options = dict(options)
    val_size = options.pop("val_size", None)
    unknown = sorted(set(options) - set(reader.options))
    if unknown:
        allowed = ", ".join(("val_size",) + reader.options)
        raise UserError(f"unknown option(s) {', '.join(unknown)} for dataset {name!r}; accepted: {allowed}")
    if val_size is not None and (isinstance(val_size, bool) or not isinstance(val_size, int) or val_size < 0):
        raise UserError(f"val_size must be an integer >= 0, got {val_size!r}")
    return val_size, options


def dataset_spec(name: str, **options) -> DatasetSpec:
    """The spec of ``name`` under ``options`` (``val_size=`` overrides the default validation size)."""
    reader = _reader(name)
    val_size, options = _split_options(name, reader, options)
    spec = reader.spec_fn(**options)
    return spec if val_size is None else dataclasses.replace(spec, val_size=val_size)


def stratified_indices(y: np.ndarray, k: int, seed: int) -> np.ndarray:
    """Sorted indices of ``k`` items of ``y`` chosen per class in proportion to class size, deterministically.

    Class quotas use the largest-remainder method (ties -> smaller class label). Within a class the items are taken
    in an order fixed by raw PCG64 output: numpy keeps bit-generator streams stable across versions (NEP 19), which
    it does not promise for ``Generator.permutation``, so the same split comes out on every machine.
    """
    y = np.asarray(y)
    n = len(y)
    if not 0 <= k <= n:
        raise UserError(f"cannot hold out {k} images from a set of {n}; choose a smaller val_size")
    classes, counts = np.unique(y, return_counts=True)
    quota = counts * k / max(n, 1)
    take = np.floor(quota).astype(np.int64)
    remainder = quota - take
    for i in np.argsort(-remainder, kind="stable")[: k - int(take.sum())]:
        take[i] += 1
    order = np.argsort(np.random.PCG64(seed).random_raw(n), kind="stable")
    chosen = [order[y[order] == c][:t] for c, t in zip(classes, take)]
    return np.sort(np.concatenate(chosen + [np.zeros(0, np.int64)])).astype(np.int64)


def _check_output(spec: DatasetSpec, x: torch.Tensor, y: torch.Tensor) -> None:
    # Catches a misbehaving (e.g. newly registered) reader here rather than deep inside training.
    c, (h, w) = spec.channels, spec.size
    if x.dtype != torch.float32 or x.dim() != 4 or tuple(x.shape[1:]) != (c, h, w):
        got = f"{x.dtype} {tuple(x.shape)}"
        raise UserError(f"dataset {spec.name!r} gave images {got}, expected float32 (N, {c}, {h}, {w})")
    if y.dtype != torch.int64 or y.shape != (x.shape[0],):
        raise UserError(f"dataset {spec.name!r} gave labels {y.dtype} {tuple(y.shape)}, expected int64 ({x.shape[0]},)")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise UserError(f"dataset {spec.name!r} has labels outside [0, {spec.num_classes})")


def load_dataset(
    name: str, split: str = "train", root: str | None = None, **options
) -> tuple[torch.Tensor, torch.Tensor]:
    """Load ``split`` of dataset ``name`` as (x float32 [0,1] (N,C,H,W), y int64 (N,)); never normalised.

    "trainval" is the official training set, "val" is a stratified, seeded selection of ``val_size`` of its images
    and "train" is the rest; "test" is the official test set.
    """
    reader = _reader(name)
    if split not in SPLITS:
        raise UserError(f"unknown split {split!r} for dataset {name!r}; valid splits: {', '.join(SPLITS)}")
    val_size, options = _split_options(name, reader, options)
    spec = reader.spec_fn(**options)
    if root is not None:
        root = os.path.expanduser(os.fspath(root))
    x, y = reader.load_fn("test" if split == "test" else "train", root, **options)
    _check_output(spec, x, y)
    if split in ("train", "val"):
        val = stratified_indices(y.numpy(), spec.val_size if val_size is None else val_size, VAL_SEED)
        if split == "val":
            idx = torch.from_numpy(val)
        else:
            keep = np.ones(len(y), dtype=bool)
            keep[val] = False
            idx = torch.from_numpy(np.flatnonzero(keep))
        x, y = x.index_select(0, idx), y.index_select(0, idx)  # index_select: ~2x faster than x[idx] on CPU
    return x.contiguous(), y.contiguous()


def load_split(cfg, split: str):
    """``split`` of the run's dataset as ``cfg.data`` says it (name, root, val_size, options): (x, y) on the CPU."""
    kwargs = {} if cfg.data.val_size is None else {"val_size": cfg.data.val_size}
    return load_dataset(cfg.data.name, split, root=cfg.data.root, **kwargs, **cfg.data.options)
