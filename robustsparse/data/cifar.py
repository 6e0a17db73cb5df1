"""``cifar10`` / ``cifar100``: CIFAR as distributed at https://www.cs.toronto.edu/~kriz/cifar.html (32x32 RGB).

Both official distributions are accepted (binary preferred when both are present):

* binary: ``cifar-10-batches-bin/data_batch_{1..5}.bin``, ``test_batch.bin``, records of 1 label byte + 3072 pixel
  bytes; ``cifar-100-binary/train.bin``, ``test.bin``, records of 1 coarse + 1 fine label byte + 3072 pixel bytes
  (the fine label is used).
* python: ``cifar-10-batches-py/data_batch_{1..5}``, ``test_batch``; ``cifar-100-python/train``, ``test``: pickled
  dicts with b"data" (N, 3072) uint8 and b"labels" (CIFAR-100: b"fine_labels").

Pixels are stored as the red, green, then blue 32x32 plane, each row-major (CHW order). ``root`` may be the batches
folder itself or the folder that contains it.

Security: the python batches are pickles, and unpickling runs whatever callables the file names. They are never
unpickled: ``pickle_subset.py`` reads the stream with its own small stack machine for the few opcodes such files use
(protocols 2 to 4), and the only names it resolves are the ones these files refer to (numpy's ``_reconstruct``,
``numpy.ndarray``, ``numpy.dtype``, and ``_codecs.encode``/``bytes`` that protocol 2 uses for byte strings), each
mapped to an inert stand-in defined in this module; every other name and opcode is refused. The stand-ins rebuild
the pixel array with ``np.frombuffer`` after checking dtype, shape and size.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch

from robustsparse.errors import UserError

from . import pickle_subset
from .registry import DatasetSpec

_RECORD = 3072
# {classes: {format: (subfolder, train files, test files)}}
_LAYOUT = {
    10: {
        "binary": ("cifar-10-batches-bin", [f"data_batch_{i}.bin" for i in range(1, 6)], ["test_batch.bin"]),
        "python": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    },
    100: {
        "binary": ("cifar-100-binary", ["train.bin"], ["test.bin"]),
        "python": ("cifar-100-python", ["train"], ["test"]),
    },
}


# ---- inert stand-ins for the only names CIFAR python batches refer to (read by pickle_subset, never unpickled) ----

class _Refused(Exception):
    pass


_NDARRAY = object()  # stands for the class argument numpy.ndarray; never called
_PLAIN_DTYPES = {"u1", "i1", "u2", "i2", "u4", "i4", "u8", "i8", "f4", "f8", "b1"}


def _text(value) -> str:
    if isinstance(value, bytes):  # Python 2 strings arrive as bytes (encoding="bytes")
        value = value.decode("latin1")
    if not isinstance(value, str):
        raise _Refused(f"expected a string, got {type(value).__name__}")
    return value


class _Dtype:
    """Stand-in for ``numpy.dtype(name, align, copy)`` limited to plain numeric dtypes."""

    def __init__(self, name, align=False, copy=True):
        if _text(name) not in _PLAIN_DTYPES:
            raise _Refused(f"dtype {name!r}")
        self.dtype = np.dtype(_text(name))

    def __setstate__(self, state):
        order = _text(state[1])  # state = (version, byte order, ...)
        if order in ("<", ">"):
            self.dtype = self.dtype.newbyteorder(order)


class _Array:
    """Stand-in for ``numpy.core.multiarray._reconstruct(ndarray, shape, typecode)`` plus its ``__setstate__``."""

    def __init__(self, cls, shape, typecode):
        if cls is not _NDARRAY:
            raise _Refused("_reconstruct of something other than numpy.ndarray")
        self.array = None

    def __setstate__(self, state):
        shape, dtype, fortran, raw = state[-4:]  # (version, shape, dtype, is_fortran, raw) or the 4-tuple
        if not (isinstance(dtype, _Dtype) and isinstance(raw, bytes) and all(type(s) is int and s >= 0 for s in shape)):
            raise _Refused("malformed array state")
        if math.prod(shape) * dtype.dtype.itemsize != len(raw):
            raise _Refused("array data size does not match its shape")
        self.array = np.frombuffer(raw, dtype.dtype).reshape(shape, order="F" if fortran else "C")


def _latin1_encode(text, encoding="utf-8"):  # stand-in for _codecs.encode, which protocol 2 uses for bytes
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused("_codecs.encode with unexpected arguments")
    return text.encode("latin1")


def _empty_bytes():  # stand-in for bytes(), which protocol 2 uses for b""
    return b""


_STAND_INS = {
    ("numpy.core.multiarray", "_reconstruct"): _Array,
    ("numpy._core.multiarray", "_reconstruct"): _Array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _Dtype,
    ("_codecs", "encode"): _latin1_encode,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,
}


def _read_python(path: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            batch = pickle_subset.load(f.read(), _STAND_INS, buildable=(_Array, _Dtype))
        if not isinstance(batch, dict):
            raise _Refused("top-level object is not a dict")
        batch = {_text(k): v for k, v in batch.items()}
        data, labels = batch.get("data"), batch.get(label_key)
        if not (isinstance(data, _Array) and data.array is not None):
            raise _Refused("no 'data' array")
        x = data.array
        if isinstance(labels, _Array) and labels.array is not None:
            y = labels.array
        elif isinstance(labels, list) and all(type(v) is int for v in labels):
            y = np.array(labels, dtype=np.int64)
        else:
            raise _Refused(f"no '{label_key}' list")
        if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != _RECORD:
            raise _Refused("'data' must be uint8 of shape (N, 3072)")
        if y.shape != (len(x),) or y.dtype.kind not in "iu":
            raise _Refused(f"'{label_key}' must hold one integer per row of 'data'")
    except OSError as e:
        raise UserError(f"cannot read CIFAR batch {path}: {e}") from None
    except Exception as e:  # Refused/_Refused, or anything a malformed stream makes the stand-ins raise
        raise UserError(f"{path} is not a CIFAR python batch: {e}") from None
    return x.reshape(-1, 3, 32, 32), y.astype(np.int64)


def _read_binary(path: str, label_bytes: int) -> tuple[np.ndarray, np.ndarray]:
    raw = np.fromfile(path, dtype=np.uint8)
    record = label_bytes + _RECORD
    if raw.size == 0 or raw.size % record:
        raise UserError(
            f"{path}: {raw.size} bytes is not a whole number of {record}-byte CIFAR records "
            "(truncated download, or not a CIFAR binary batch)"
        )
    raw = raw.reshape(-1, record)
    return raw[:, label_bytes:].reshape(-1, 3, 32, 32), raw[:, label_bytes - 1].astype(np.int64)


def _layout(classes: int) -> str:
    parts = []
    for fmt, (sub, train, test) in _LAYOUT[classes].items():
        parts.append(f"<root>/{sub}/{{{', '.join(train + test)}}} ({fmt} version)")
    return (
        f"expected either {' or '.join(parts)}, as unpacked from https://www.cs.toronto.edu/~kriz/cifar.html; "
        "root may also be that batches folder itself"
    )


def _load(classes: int, split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    if root is None or not os.path.isdir(root):
        raise UserError(f"CIFAR-{classes} needs root=<folder>, got {root!r}; {_layout(classes)}")
    candidates = [(root, fmt) for fmt in _LAYOUT[classes]]
    candidates += [(os.path.join(root, sub), fmt) for fmt, (sub, _, _) in _LAYOUT[classes].items()]
    for folder, fmt in candidates:
        _, train, test = _LAYOUT[classes][fmt]
        if any(os.path.isfile(os.path.join(folder, f)) for f in train + test):
            break
    else:
        raise UserError(f"CIFAR-{classes} not found under {root!r}; {_layout(classes)}")
    xs, ys = [], []
    for name in train if split == "train" else test:
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise UserError(f"CIFAR-{classes}: missing file {path}; {_layout(classes)}")
        if fmt == "binary":
            x, y = _read_binary(path, label_bytes=1 if classes == 10 else 2)
        else:
            x, y = _read_python(path, "labels" if classes == 10 else "fine_labels")
        if len(y) and (y.min() < 0 or y.max() >= classes):
            raise UserError(f"{path}: labels must lie in [0, {classes}), found {y.min()}..{y.max()}")
        xs.append(x)
        ys.append(y)
    x = torch.from_numpy(np.concatenate(xs)).to(torch.float32).div_(255.0)
    return x, torch.from_numpy(np.concatenate(ys))


def spec10() -> DatasetSpec:
    return DatasetSpec("cifar10", 3, (32, 32), 10, val_size=5000, needs_root=True)


def spec100() -> DatasetSpec:
    return DatasetSpec("cifar100", 3, (32, 32), 100, val_size=5000, needs_root=True)


def load10(split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _load(10, split, root)


def load100(split: str, root: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _load(100, split, root)
