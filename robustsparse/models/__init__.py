"""Image classifiers for adversarially robust sparse training.

``build_model(name, in_channels, num_classes, input_size, mean=None, std=None, **options)`` returns an
`ImageClassifier` (``nn.Sequential`` with children ``normalize`` and ``net``) mapping images in [0, 1] of shape
(N, in_channels, H, W) to logits (N, num_classes); ``normalize`` is a `Normalize` when mean/std are given, else
``nn.Identity``. All conv/linear layers are plain ``nn.Conv2d``/``nn.Linear`` and all BN layers ``nn.BatchNorm2d``
(until `convert_to_dual_bn`, which swaps them for `DualBatchNorm2d`).

Names (case-insensitive): see `list_models()`; plus any ``wrn-D-K`` with (D-4) % 6 == 0, D >= 10, K >= 1.
To add an architecture: write one file with a ``@register_model("name")`` builder and import it below.
"""

from robustsparse.models.dual_bn import DualBatchNorm2d, bn_route, convert_to_dual_bn, set_bn_route
from robustsparse.models.normalize import Normalize
from robustsparse.models.registry import (MODEL_PATTERNS, MODELS, ImageClassifier, build_model, list_models,
                                          register_model)

# Architecture files; importing one registers its models.
from robustsparse.models import cnn, resnet, small_cnn, vgg, wide_resnet  # noqa: E402,F401  isort: skip

__all__ = ["build_model", "register_model", "MODELS", "MODEL_PATTERNS", "list_models", "ImageClassifier",
           "Normalize", "DualBatchNorm2d", "convert_to_dual_bn", "bn_route", "set_bn_route"]
