"""``mnist`` / ``fashion_mnist``: 28x28 grey images in the IDX format of http://yann.lecun.com/exdb/mnist/
(Fashion-MNIST: https://github.com/zalandoresearch/fashion-mnist uses the same file names and format).

Files: ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
``t10k-labels-idx1-ubyte``, each optionally ``.gz``-compressed, directly in ``root`` or in torchvision's layout
``root/MNIST/raw/`` (``root/FashionMNIST/raw/``). ``fashion_mnist`` without a root reads Debian's package
``dataset-fashion-mnist`` (the four ``.gz`` files in /usr/share/datasets/fashion-mnist; ``scripts/setup.sh``
installs it when run as root). Debian packages no MNIST, so ``mnist`` always needs a root. An IDX file is a big-endian header (two zero bytes, type code 0x08
for unsigned bytes, number of dimensions, then one uint32 per dimension) followed by the raw bytes.
"""

from __future__ import annotations

import gzip
import math
import os

import numpy as np
import torch

from robustsparse.errors import UserError

from .registry import DatasetSpec

_PREFIX = {"train": "train", "test": "t10k"}
_SUBFOLDER = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
#: Where a dataset is read from when no root is given: the folder of its Debian package.
DEFAULT_ROOT = {"fashion_mnist": "/usr/share/datasets/fashion-mnist"}
DEBIAN_PACKAGE = {"fashion_mnist": "dataset-fashion-mnist"}


def _layout(name: str) -> str:
    files = ", ".join(f"{p}-{k}-ubyte" for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1"))
    return f"expected {{{files}}} (each optionally .gz) in <root> or in <root>/{_SUBFOLDER[name]}/raw/"


def _read_idx(path: str, ndim: int) -> np.ndarray:
    try:
        with (gzip.open if path.endswith(".gz") else open)(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:  # includes corrupt or truncated gzip streams
        raise UserError(f"cannot read IDX file {path}: {e}") from None
    header = 4 + 4 * ndim
    if len(data) < header or data[:4] != bytes([0, 0, 8, ndim]):
        raise UserError(f"{path} is not an IDX file of {ndim}-D unsigned bytes (bad magic number)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    if len(data) != header + math.prod(shape):
        raise UserError(f"{path}: header says {shape} but the file has {len(data) - header} data bytes (truncated?)")
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape)


def _how_to_get(name: str) -> str:
    if name not in DEBIAN_PACKAGE:
        return ""
    return (f"; install Debian's package with `sudo apt-get install {DEBIAN_PACKAGE[name]}` (or run "
            f"`bash scripts/setup.sh` as root), which puts the files in {DEFAULT_ROOT[name]}, or set "
            f"data.root=<folder> (Python: root=) to a folder that holds them")


def _find(name: str, root: str, file: str) -> str:
    for folder in (root, os.path.join(root, _SUBFOLDER[name], "raw")):
        for candidate in (file, file + ".gz"):
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
    raise UserError(f"{name}: {file}[.gz] not found under {root!r}; {_layout(name)}{_how_to_get(name)}")


def _load(name: str, split: str, root: str | None) -> tuple[torch.Tensor, torch.Tensor]:
    if root is None and name in DEFAULT_ROOT:
        root = DEFAULT_ROOT[name]
        if not os.path.isdir(root):
            raise UserError(f"{name} is not installed: {root} does not exist{_how_to_get(name)}; {_layout(name)}")
    if root is None or not os.path.isdir(root):
        raise UserError(f"{name} needs root=<folder> (data.root), got {root!r}; {_layout(name)}{_how_to_get(name)}")
    images_path = _find(name, root, f"{_PREFIX[split]}-images-idx3-ubyte")
    labels_path = _find(name, root, f"{_PREFIX[split]}-labels-idx1-ubyte")
    x, y = _read_idx(images_path, 3), _read_idx(labels_path, 1)
    if x.shape[1:] != (28, 28):
        raise UserError(f"{images_path}: images are {x.shape[1:]}, expected 28x28")
    if len(y) != len(x):
        raise UserError(f"{labels_path} has {len(y)} labels but {images_path} has {len(x)} images")
    if len(y) and y.max() >= 10:
        raise UserError(f"{labels_path}: labels must lie in [0, 10), found up to {y.max()}")
    x = torch.from_numpy(x.copy()).unsqueeze(1).to(torch.float32).div_(255.0)
    return x, torch.from_numpy(y.astype(np.int64))


def spec_mnist() -> DatasetSpec:
    return DatasetSpec("mnist", 1, (28, 28), 10, val_size=5000, needs_root=True)


def spec_fashion() -> DatasetSpec:
    return DatasetSpec("fashion_mnist", 1, (28, 28), 10, val_size=5000, needs_root=True)


def load_mnist(split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _load("mnist", split, root)


def load_fashion(split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _load("fashion_mnist", split, root)
