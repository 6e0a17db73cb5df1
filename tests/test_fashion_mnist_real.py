"""The real Fashion-MNIST files (Debian's dataset-fashion-mnist, which scripts/setup.sh installs as root).

Without the files this fails under CI (CI=true: the set-up was meant to install them) and skips elsewhere, with
the fix in the message either way.
"""
import os

import numpy as np
import pytest
import torch

from robustsparse.data import dataset_spec, load_dataset
from robustsparse.data.mnist import DEFAULT_ROOT
from robustsparse.errors import UserError

ROOT = DEFAULT_ROOT["fashion_mnist"]
FIX = (f"Fashion-MNIST is not installed in {ROOT}: run `bash scripts/setup.sh` as root (it runs "
       "`apt-get install dataset-fashion-mnist`), or `sudo apt-get install dataset-fashion-mnist`")


def _installed() -> bool:
    names = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    return all(os.path.isfile(os.path.join(ROOT, n)) or os.path.isfile(os.path.join(ROOT, n + ".gz")) for n in names)


@pytest.fixture(scope="module")
def fmnist():
    if not _installed():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(FIX)
        pytest.skip(FIX)
    return {split: load_dataset("fashion_mnist", split) for split in ("trainval", "test", "train", "val")}


def test_official_sets_have_the_published_shapes_and_balanced_labels(fmnist):
    for split, n, per_class in (("trainval", 60000, 6000), ("test", 10000, 1000)):
        x, y = fmnist[split]
        assert x.shape == (n, 1, 28, 28) and x.dtype == torch.float32
        assert y.shape == (n,) and y.dtype == torch.int64
        assert torch.bincount(y, minlength=10).tolist() == [per_class] * 10
        assert float(x.min()) == 0.0 and float(x.max()) == 1.0
        # 8-bit pixels divided by 255: every value is k/255 exactly (float32 rounding aside)
        k = x[:500] * 255
        assert torch.allclose(k, k.round(), atol=1e-4)


def test_train_val_carving_is_stratified_and_disjoint(fmnist):
    """Our carving of the official 60,000: the default 5,000 validation images (500 per class), 55,000 train."""
    assert dataset_spec("fashion_mnist").val_size == 5000
    (xt, yt), (xv, yv), (xa, ya) = fmnist["train"], fmnist["val"], fmnist["trainval"]
    assert xt.shape == (55000, 1, 28, 28) and xv.shape == (5000, 1, 28, 28)
    assert torch.bincount(yv, minlength=10).tolist() == [500] * 10
    assert torch.bincount(yt, minlength=10).tolist() == [5500] * 10
    # train + val is the official set: the same multiset of images (compared by per-image pixel sums)
    def sums(x):
        return (x.flatten(1).double() * 255).round().sum(1).numpy()
    assert np.array_equal(np.sort(np.concatenate([sums(xt), sums(xv)])), np.sort(sums(xa)))


def test_default_root_and_override(fmnist, tmp_path):
    # an explicit root still wins over the default: an empty folder is refused, naming the package and data.root
    with pytest.raises(UserError, match="dataset-fashion-mnist.*data.root"):
        load_dataset("fashion_mnist", "test", root=str(tmp_path))
    x, _ = load_dataset("fashion_mnist", "test", root=ROOT)
    assert torch.equal(x, fmnist["test"][0])
