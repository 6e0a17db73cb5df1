"""Tests for robustsparse.data: registry and splits, every reader on tiny fake files, and augment."""

from __future__ import annotations

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
import scipy.io
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from robustsparse.data import (
    DATASETS,
    DatasetSpec,
    augment,
    dataset_spec,
    list_datasets,
    load_dataset,
    register_dataset,
)
from robustsparse.errors import UserError


def _images(n: int, c: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, c, h, w), dtype=np.uint8)


def _assert_pixels(x: torch.Tensor, expected_uint8: np.ndarray) -> None:
    assert x.dtype == torch.float32 and x.is_contiguous()
    torch.testing.assert_close(x, torch.from_numpy(expected_uint8.astype(np.float32) / 255), rtol=0, atol=1e-7)


# ---------------------------------------------------------------- registry, digits, synthetic


def test_registry_lists_all_readers():
    assert {"digits", "synthetic", "cifar10", "cifar100", "svhn", "mnist", "fashion_mnist"} <= set(list_datasets())
    assert dataset_spec("digits") == DatasetSpec("digits", 1, (8, 8), 10, 180, False)
    assert dataset_spec("cifar10").val_size == dataset_spec("svhn").val_size == dataset_spec("mnist").val_size == 5000
    assert dataset_spec("cifar100").num_classes == 100 and dataset_spec("cifar100").needs_root
    assert dataset_spec("digits", val_size=7).val_size == 7


def test_digits_splits():
    splits = {s: load_dataset("digits", s) for s in ("train", "val", "test", "trainval")}
    for x, y in splits.values():
        assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.is_contiguous()
        assert x.shape[1:] == (1, 8, 8) and x.shape[0] == y.shape[0]
        assert 0 <= x.min() and x.max() <= 1 and 0 <= y.min() and y.max() < 10
    assert len(splits["test"][0]) == 360 and len(splits["val"][0]) == 180
    assert len(splits["train"][0]) + len(splits["val"][0]) == len(splits["trainval"][0]) == 1797 - 360
    # stratified: 360 of ~180 images per class -> about 36 each
    assert all(abs(n - 36) <= 1 for n in torch.bincount(splits["test"][1], minlength=10).tolist())
    assert all(abs(n - 18) <= 1 for n in torch.bincount(splits["val"][1], minlength=10).tolist())
    # same split on every call, whatever the global RNG state
    torch.manual_seed(123)
    np.random.seed(123)
    for split in ("test", "val"):
        x2, y2 = load_dataset("digits", split)
        assert torch.equal(x2, splits[split][0]) and torch.equal(y2, splits[split][1])


def test_digits_splits_are_disjoint_and_cover_the_dataset():
    from sklearn.datasets import load_digits

    full = load_digits()
    index = {(row / 16).astype(np.float32).tobytes(): i for i, row in enumerate(full.data)}
    assert len(index) == 1797  # digits has no duplicate images, so an image identifies its index

    def indices(split):
        x, y = load_dataset("digits", split)
        idx = [index[row.tobytes()] for row in x.reshape(len(x), -1).numpy()]
        assert np.array_equal(full.target[idx], y.numpy())  # labels travel with their images
        return set(idx)

    train, val, test, trainval = (indices(s) for s in ("train", "val", "test", "trainval"))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val == trainval and len(train | val | test) == 1797


def test_val_size_option_and_errors():
    x, _ = load_dataset("digits", "val", val_size=0)
    assert x.shape == (0, 1, 8, 8)
    assert torch.equal(load_dataset("digits", "train", val_size=0)[0], load_dataset("digits", "trainval")[0])
    assert len(load_dataset("digits", "val", val_size=25)[0]) == 25
    with pytest.raises(UserError, match="val_size"):
        load_dataset("digits", "val", val_size=-1)
    with pytest.raises(UserError, match="val_size"):
        load_dataset("digits", "train", val_size=5000)
    with pytest.raises(UserError, match="trainval"):
        load_dataset("digits", "validation")
    with pytest.raises(UserError, match="cifar10.*digits"):
        load_dataset("imagenet")
    with pytest.raises(UserError, match="bogus"):
        load_dataset("digits", bogus=1)
    with pytest.raises(UserError, match="bogus"):
        dataset_spec("synthetic", bogus=1)
    needs_root = (("cifar10", "data_batch_1"), ("svhn", "train_32x32.mat"), ("mnist", "MNIST/raw"))
    for name, expected in needs_root:
        with pytest.raises(UserError, match=f"needs root=.*{expected}"):
            load_dataset(name)


def test_fashion_mnist_defaults_to_the_debian_package_folder(tmp_path, monkeypatch):
    from robustsparse.data import mnist
    assert mnist.DEFAULT_ROOT["fashion_mnist"] == "/usr/share/datasets/fashion-mnist"
    monkeypatch.setitem(mnist.DEFAULT_ROOT, "fashion_mnist", str(tmp_path / "absent"))
    with pytest.raises(UserError, match="not installed.*apt-get install dataset-fashion-mnist.*data.root") as exc:
        load_dataset("fashion_mnist", "test")
    assert "\n" not in str(exc.value)
    (tmp_path / "absent").mkdir()  # the folder without its files: the same fix is named
    with pytest.raises(UserError, match="t10k-images.*dataset-fashion-mnist.*data.root"):
        load_dataset("fashion_mnist", "test")
    sets = _write_mnist(tmp_path / "absent", gz=True)  # Debian ships the four files gzipped, directly in the folder
    x, y = load_dataset("fashion_mnist", "test")
    _assert_pixels(x, sets["t10k"][0])
    assert y.tolist() == sets["t10k"][1]


def test_synthetic_is_deterministic_and_honours_options():
    x, y = load_dataset("synthetic", "trainval")
    assert x.shape == (512, 3, 32, 32) and y.shape == (512,) and 0 <= x.min() and x.max() <= 1
    assert len(load_dataset("synthetic", "test")[0]) == 256 and len(load_dataset("synthetic", "val")[0]) == 64
    x2, y2 = load_dataset("synthetic", "trainval")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    opts = dict(shape=(1, 5, 7), num_classes=3, n_train=30, n_test=12, seed=4)
    assert dataset_spec("synthetic", **opts) == DatasetSpec("synthetic", 1, (5, 7), 3, 15, False)
    xs, ys = load_dataset("synthetic", "trainval", **opts)
    assert xs.shape == (30, 1, 5, 7) and set(ys.tolist()) == {0, 1, 2}
    assert not torch.equal(xs, load_dataset("synthetic", "trainval", **{**opts, "seed": 5})[0])
    # the test set does not depend on n_train
    test_a = load_dataset("synthetic", "test", **opts)[0]
    assert torch.equal(test_a, load_dataset("synthetic", "test", **{**opts, "n_train": 50})[0])
    with pytest.raises(UserError, match="shape"):
        load_dataset("synthetic", shape=(3, 32))


def test_synthetic_is_learnable():
    opts = dict(shape=(1, 6, 6), num_classes=4, n_train=128, seed=1)
    x, y = load_dataset("synthetic", "trainval", **opts)
    torch.manual_seed(0)
    model = torch.nn.Linear(36, 4)
    losses = []
    for _ in range(30):  # plain gradient descent (torch.optim's first import alone takes seconds)
        model.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x.flatten(1)), y)
        loss.backward()
        with torch.no_grad():
            for param in model.parameters():
                param -= 0.5 * param.grad
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_register_dataset(monkeypatch):
    def spec(*, n=10):
        return DatasetSpec("tiny", 1, (2, 2), 2, 2, False)

    def load(split, root, *, n=10):
        y = torch.arange(n) % 2
        return torch.full((n, 1, 2, 2), 0.5), y

    monkeypatch.setitem(DATASETS, "tiny", None)
    register_dataset("tiny", spec, load)
    assert "tiny" in list_datasets()
    x, y = load_dataset("tiny", "val", n=20)
    assert x.shape == (2, 1, 2, 2) and sorted(y.tolist()) == [0, 1]
    with pytest.raises(UserError, match="accepted: val_size, n"):
        load_dataset("tiny", m=1)


# ---------------------------------------------------------------- CIFAR


def _write_cifar_bin(path, x: np.ndarray, fine, coarse=None) -> None:
    labels = [np.array(fine, np.uint8)[:, None]]
    if coarse is not None:
        labels.insert(0, np.array(coarse, np.uint8)[:, None])
    path.write_bytes(np.concatenate(labels + [x.reshape(len(x), -1)], axis=1).tobytes())


def _py2_cifar_batch(data: np.ndarray, labels, label_key: bytes = b"labels") -> bytes:
    """A batch pickled the way the real CIFAR python files are: Python 2 cPickle, protocol 2, numpy.core names,
    str (-> BINSTRING) keys and pixel data."""

    def string(b: bytes) -> bytes:
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def integer(v: int) -> bytes:
        return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)

    shape = b"(" + b"".join(integer(d) for d in data.shape) + b"t"
    dtype = b"cnumpy\ndtype\n" + string(b"u1") + integer(0) + integer(1) + b"\x87R"
    dtype += b"(" + integer(3) + string(b"|") + b"NNN" + integer(-1) + integer(-1) + integer(0) + b"tb"
    array = b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n" + integer(0) + b"\x85" + string(b"b") + b"\x87R"
    array += b"(" + integer(1) + shape + dtype + b"\x89" + string(data.tobytes()) + b"tb"
    label_list = b"](" + b"".join(integer(v) for v in labels) + b"e"
    extra = string(b"batch_label") + string(b"training batch 1 of 5")
    return b"\x80\x02}(" + string(b"data") + array + string(label_key) + label_list + extra + b"u."


def _cifar10_tree(tmp_path, fmt: str, n_per_batch: int = 3):
    """Fake CIFAR-10 in the given format; returns (root, train pixels, train labels, test pixels, test labels)."""
    folder = tmp_path / ("cifar-10-batches-bin" if fmt == "bin" else "cifar-10-batches-py")
    folder.mkdir()
    parts = []
    for i, name in enumerate([f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]):
        x = _images(n_per_batch, 3, 32, 32, seed=i)
        y = [(i + j) % 10 for j in range(n_per_batch)]
        if fmt == "bin":
            _write_cifar_bin(folder / f"{name}.bin", x, y)
        elif fmt == "py2":
            (folder / name).write_bytes(_py2_cifar_batch(x.reshape(len(x), -1), y))
        else:
            (folder / name).write_bytes(pickle.dumps({b"data": x.reshape(len(x), -1), b"labels": y}, protocol=2))
        parts.append((x, y))
    train_x = np.concatenate([p[0] for p in parts[:5]])
    train_y = sum((p[1] for p in parts[:5]), [])
    return tmp_path, train_x, train_y, parts[5][0], parts[5][1]


@pytest.mark.parametrize("fmt", ["bin", "py2", "py3"])
def test_cifar10_round_trip(tmp_path, fmt):
    root, train_x, train_y, test_x, test_y = _cifar10_tree(tmp_path, fmt)
    x, y = load_dataset("cifar10", "trainval", root=str(root))
    _assert_pixels(x, train_x)
    assert y.tolist() == train_y
    x, y = load_dataset("cifar10", "test", root=str(root))
    _assert_pixels(x, test_x)
    assert y.tolist() == test_y
    # root may also be the batches folder itself; val carving works on the on-disk set too
    folder = next(root.iterdir())
    assert torch.equal(load_dataset("cifar10", "test", root=str(folder))[0], x)
    assert len(load_dataset("cifar10", "val", root=str(root), val_size=5)[0]) == 5


def test_cifar10_python_accepts_numpy1_module_name(tmp_path):
    root, *_, test_x, test_y = _cifar10_tree(tmp_path, "py3")
    path = root / "cifar-10-batches-py" / "test_batch"
    data = path.read_bytes()
    assert b"numpy._core.multiarray" in data
    path.write_bytes(data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    x, y = load_dataset("cifar10", "test", root=str(root))
    _assert_pixels(x, test_x)
    assert y.tolist() == test_y


@pytest.mark.parametrize("fmt", ["bin", "py"])
def test_cifar100_round_trip(tmp_path, fmt):
    x_train, x_test = _images(4, 3, 32, 32, 1), _images(2, 3, 32, 32, 2)
    fine_train, fine_test = [99, 0, 57, 3], [12, 98]
    folder = tmp_path / ("cifar-100-binary" if fmt == "bin" else "cifar-100-python")
    folder.mkdir()
    for name, x, fine in (("train", x_train, fine_train), ("test", x_test, fine_test)):
        if fmt == "bin":
            _write_cifar_bin(folder / f"{name}.bin", x, fine, coarse=[19] * len(fine))
        else:
            batch = {b"data": x.reshape(len(x), -1), b"fine_labels": fine, b"coarse_labels": [19] * len(fine)}
            (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    x, y = load_dataset("cifar100", "trainval", root=str(tmp_path))
    _assert_pixels(x, x_train)
    assert y.tolist() == fine_train
    x, y = load_dataset("cifar100", "test", root=str(tmp_path))
    _assert_pixels(x, x_test)
    assert y.tolist() == fine_test


def test_cifar_missing_and_malformed(tmp_path):
    with pytest.raises(UserError, match=r"cifar-10-batches-bin.*data_batch_1\.bin.*cifar-10-batches-py"):
        load_dataset("cifar10", root=str(tmp_path))
    with pytest.raises(UserError, match="needs root.*cifar-100-binary"):
        load_dataset("cifar100", root=str(tmp_path / "nowhere"))
    root, *_ = _cifar10_tree(tmp_path, "bin")
    folder = root / "cifar-10-batches-bin"
    os.remove(folder / "data_batch_4.bin")
    with pytest.raises(UserError, match="missing file .*data_batch_4.bin"):
        load_dataset("cifar10", root=str(root))
    data = (folder / "test_batch.bin").read_bytes()
    (folder / "test_batch.bin").write_bytes(data[:-100])
    with pytest.raises(UserError, match="test_batch.bin.*truncated"):
        load_dataset("cifar10", "test", root=str(root))
    (folder / "test_batch.bin").write_bytes(b"\x0a" + data[1:])  # label 10 in a 10-class file
    with pytest.raises(UserError, match="test_batch.bin.*labels"):
        load_dataset("cifar10", "test", root=str(root))


class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize(
    "payload",
    [
        lambda m: {b"data": _Hostile(m), b"labels": [1]},
        lambda m: _Hostile(m),
        lambda m: [1, 2, 3],
        lambda m: {b"data": np.zeros((1, 3072), np.float64), b"labels": [1]},  # not uint8
        lambda m: {b"data": np.zeros((1, 3072), np.uint8), b"labels": [1, 2]},  # count mismatch
    ],
)
def test_cifar_python_refuses_hostile_or_foreign_pickles(tmp_path, payload):
    marker = tmp_path / "pwned"
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "test_batch").write_bytes(pickle.dumps(payload(marker), protocol=2))
    with pytest.raises(UserError, match="not a CIFAR python batch"):
        load_dataset("cifar10", "test", root=str(tmp_path))
    assert not marker.exists()


def test_cifar_python_refuses_truncated_pickle(tmp_path):
    root, *_ = _cifar10_tree(tmp_path, "py2")
    path = root / "cifar-10-batches-py" / "test_batch"
    path.write_bytes(path.read_bytes()[:-50])
    with pytest.raises(UserError, match="not a CIFAR python batch"):
        load_dataset("cifar10", "test", root=str(root))


# ---------------------------------------------------------------- SVHN


def _write_svhn(path, x_nchw: np.ndarray, labels) -> None:
    scipy.io.savemat(path, {"X": x_nchw.transpose(2, 3, 1, 0), "y": np.array(labels, np.uint8)[:, None]})


def test_svhn_round_trip(tmp_path):
    x_train, x_test = _images(5, 3, 32, 32, 1), _images(1, 3, 32, 32, 2)
    _write_svhn(tmp_path / "train_32x32.mat", x_train, [10, 1, 2, 9, 10])
    _write_svhn(tmp_path / "test_32x32.mat", x_test, [7])
    x, y = load_dataset("svhn", "trainval", root=str(tmp_path))
    _assert_pixels(x, x_train)
    assert y.tolist() == [0, 1, 2, 9, 0]  # 10 means digit 0
    x, y = load_dataset("svhn", "test", root=str(tmp_path))  # one image: MATLAB drops the trailing dimension
    _assert_pixels(x, x_test)
    assert y.tolist() == [7]


def test_svhn_errors(tmp_path):
    with pytest.raises(UserError, match="train_32x32.mat.*test_32x32.mat"):
        load_dataset("svhn", root=str(tmp_path))
    _write_svhn(tmp_path / "test_32x32.mat", _images(2, 3, 32, 32), [3, 11])
    with pytest.raises(UserError, match="test_32x32.mat.*labels"):
        load_dataset("svhn", "test", root=str(tmp_path))
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(UserError, match="test_32x32.mat"):
        load_dataset("svhn", "test", root=str(tmp_path))


# ---------------------------------------------------------------- MNIST / Fashion-MNIST


def _idx(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 8, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_mnist(folder, gz: bool, n_train: int = 4, n_test: int = 3):
    folder.mkdir(parents=True, exist_ok=True)
    sets = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        x = _images(n, 1, 28, 28, seed=n)[:, 0]
        y = np.arange(n, dtype=np.uint8) % 10
        for kind, arr in (("images-idx3", x), ("labels-idx1", y)):
            data = _idx(arr)
            name = f"{prefix}-{kind}-ubyte"
            if gz:
                (folder / f"{name}.gz").write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
        sets[prefix] = (x[:, None], y.tolist())
    return sets


@pytest.mark.parametrize(
    "name,sub,gz",
    [("mnist", "", False), ("mnist", "MNIST/raw", True), ("fashion_mnist", "FashionMNIST/raw", False)],
)
def test_mnist_round_trip(tmp_path, name, sub, gz):
    sets = _write_mnist(tmp_path / sub if sub else tmp_path, gz)
    x, y = load_dataset(name, "trainval", root=str(tmp_path))
    _assert_pixels(x, sets["train"][0])
    assert y.tolist() == sets["train"][1]
    x, y = load_dataset(name, "test", root=str(tmp_path))
    _assert_pixels(x, sets["t10k"][0])
    assert y.tolist() == sets["t10k"][1]


def test_mnist_errors(tmp_path):
    with pytest.raises(UserError, match="train-images-idx3-ubyte.*t10k-labels-idx1-ubyte.*MNIST/raw"):
        load_dataset("mnist", root=str(tmp_path))
    _write_mnist(tmp_path, gz=False)
    images = tmp_path / "t10k-images-idx3-ubyte"
    good = images.read_bytes()
    images.write_bytes(good[:-10])
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.*truncated"):
        load_dataset("mnist", "test", root=str(tmp_path))
    images.write_bytes(b"\x00\x00\x08\x01" + good[4:])  # labels' magic on an image file
    with pytest.raises(UserError, match="t10k-images-idx3-ubyte.*magic"):
        load_dataset("mnist", "test", root=str(tmp_path))
    images.write_bytes(good)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.array([1, 10, 2], np.uint8)))
    with pytest.raises(UserError, match="t10k-labels-idx1-ubyte.*labels"):
        load_dataset("mnist", "test", root=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.array([1, 2], np.uint8)))
    with pytest.raises(UserError, match="2 labels.*3 images"):
        load_dataset("mnist", "test", root=str(tmp_path))
    (tmp_path / "train-images-idx3-ubyte").unlink()
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(good)[:-20])
    with pytest.raises(UserError, match="train-images-idx3-ubyte.gz"):
        load_dataset("mnist", "train", root=str(tmp_path))


# ---------------------------------------------------------------- augment


def _shifted(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """img moved by (dy, dx) with zero fill: out[i, j] = img[i + dy, j + dx]."""
    h, w = img.shape[-2:]
    out = torch.zeros_like(img)
    out[:, max(0, -dy) : min(h, h - dy), max(0, -dx) : min(w, w - dx)] = img[
        :, max(0, dy) : min(h, h + dy), max(0, dx) : min(w, w + dx)
    ]
    return out


def test_augment_identity_when_disabled():
    x = torch.rand(4, 3, 5, 5)
    assert augment(x) is x


def test_augment_crop_is_a_shift_per_image():
    p = 2
    x = torch.rand(64, 3, 6, 7) + 0.1  # no zeros, so the shift is identified uniquely
    out = augment(x, crop_padding=p, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    shifts = []
    for i in range(len(x)):
        offsets = [(dy, dx) for dy in range(-p, p + 1) for dx in range(-p, p + 1)]
        found = [(dy, dx) for dy, dx in offsets if torch.equal(out[i], _shifted(x[i], dy, dx))]
        assert len(found) == 1
        shifts.append(found[0])
    assert len(set(shifts)) > 5  # each image draws its own offset


def test_augment_flip():
    x = torch.rand(64, 2, 4, 5)
    out = augment(x, flip=True, generator=torch.Generator().manual_seed(0))
    flipped = [torch.equal(o, xi.flip(-1)) for o, xi in zip(out, x)]
    kept = [torch.equal(o, xi) for o, xi in zip(out, x)]
    assert all(f or k for f, k in zip(flipped, kept)) and any(flipped) and any(kept)


def test_augment_reproducible():
    x = torch.rand(16, 3, 8, 8)
    a = augment(x, 3, True, torch.Generator().manual_seed(7))
    b = augment(x, 3, True, torch.Generator().manual_seed(7))
    c = augment(x, 3, True, torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(UserError, match="crop_padding"):
        augment(x, crop_padding=-1)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 5),
    c=st.integers(1, 3),
    h=st.integers(1, 9),
    w=st.integers(1, 9),
    p=st.integers(0, 5),
    flip=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_augment_property(n, c, h, w, p, flip, seed):
    x = torch.rand(n, c, h, w, generator=torch.Generator().manual_seed(seed))
    out = augment(x, crop_padding=p, flip=flip, generator=torch.Generator().manual_seed(seed))
    assert out.shape == x.shape and out.dtype == x.dtype
    if n:
        assert 0 <= out.min() and out.max() <= 1
        # every output pixel is either zero padding or some input pixel of the same image and channel
        for i in range(n):
            values = set(x[i].flatten().tolist()) | {0.0}
            assert set(out[i].flatten().tolist()) <= values
