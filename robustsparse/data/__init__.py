"""Datasets as (x, y) tensors: x float32 in [0, 1] of shape (N, C, H, W), y int64 labels; never normalised.

Adding a dataset: write a reader module (``spec`` and ``load`` functions, see ``registry``) and add one
``register_dataset`` line below.
"""

from . import cifar, digits, mnist, svhn, synthetic
from .augment import augment
from .registry import DATASETS, DatasetSpec, dataset_spec, list_datasets, load_dataset, load_split, register_dataset

register_dataset("digits", digits.spec, digits.load)
register_dataset("synthetic", synthetic.spec, synthetic.load)
register_dataset("cifar10", cifar.spec10, cifar.load10)
register_dataset("cifar100", cifar.spec100, cifar.load100)
register_dataset("svhn", svhn.spec, svhn.load)
register_dataset("mnist", mnist.spec_mnist, mnist.load_mnist)
register_dataset("fashion_mnist", mnist.spec_fashion, mnist.load_fashion)

__all__ = ["DATASETS", "DatasetSpec", "augment", "dataset_spec", "list_datasets", "load_dataset", "load_split",
           "register_dataset"]
