"""``smallcnn``: the 4-conv SmallCNN of the TRADES code (Zhang et al., ICML 2019; yaodongyu/TRADES
``models/small_cnn.py``), the model of the MNIST/Fashion-MNIST robustness literature.

    conv3x3(C, 32)-ReLU, conv3x3(32, 32)-ReLU, maxpool2, conv3x3(32, 64)-ReLU, conv3x3(64, 64)-ReLU, maxpool2,
    flatten, Linear(64·h·w, 200)-ReLU, Dropout(0.5), Linear(200, 200)-ReLU, Linear(200, classes)

Convolutions are unpadded and carry a bias, as in the reference; there is no BatchNorm. On 1×28×28 the maps are
28 → 26 → 24 → 12 → 10 → 8 → 4, so the first linear layer sees 64·4·4 = 1024 features and the network has
312,202 parameters (`reference_param_count`). Initialisation as the reference: Kaiming-normal conv weights
(fan_in, ReLU gain) with zero biases, PyTorch's default for the linear layers.

Any input size works: a convolution whose input is smaller than 3 pixels on a side pads by 1 (keeps the size)
instead of shrinking it to nothing, and a max-pool is skipped when the map is under 2 pixels (so 8×8 digits give
8 → 6 → 4 → 2 → 2 → 2 → 1). At 28×28 and 32×32 nothing is padded or skipped.

The ReLU before each max-pool runs after it (conv → maxpool → ReLU): the same function and, bit for bit, the same
gradients, on a quarter of the elements. Forward, max commutes with the monotone ReLU exactly. Backward, the pool
routes the gradient to the first maximum of its 2×2 window; when that maximum is positive it is the same element
either way, and when it is ≤ 0 the ReLU zeroes the gradient either way (`tests/test_small_cnn.py` checks outputs,
input gradients and weight gradients with `torch.equal` against the reference order). The ReLU's forward and
backward over the full-size map were ~13-25% of an attack step (`scripts/profile_step.py`).

Deliberate difference: the reference initialises the last layer to zero (weights and bias). We do not by default
(``zero_init_last=False``): with a zero classifier every gradient and every NTK entry of the layers below it is
zero at initialisation, so the pruners at initialisation (SNIP, GraSP, SynFlow, NTT, AWT) would see all-zero
scores and magnitude pruning of that layer would be all ties. ``zero_init_last=True`` restores the reference.
"""

from __future__ import annotations

import math
from collections import OrderedDict

from torch import nn

from robustsparse.errors import UserError
from robustsparse.models.registry import register_model

_CONVS = (32, 32, None, 64, 64, None)  # None: a 2x2 max-pool
_HIDDEN = 200


def reference_param_count(in_channels: int = 1, num_classes: int = 10, size: tuple[int, int] = (28, 28)) -> int:
    """Parameters of the reference SmallCNN (unpadded convs, no skipped pool): the closed form the test checks.

    h' = ((h − 4) // 2 − 4) // 2 (two valid 3×3 convs, pool, two valid 3×3 convs, pool); likewise w'.
    """
    h, w = (((s - 4) // 2 - 4) // 2 for s in size)
    convs = (9 * in_channels * 32 + 32) + (9 * 32 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 64 + 64)
    fcs = (64 * h * w * _HIDDEN + _HIDDEN) + (_HIDDEN * _HIDDEN + _HIDDEN) + (_HIDDEN * num_classes + num_classes)
    return convs + fcs


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, input_size: tuple[int, int], dropout: float = 0.5,
                 zero_init_last: bool = False):
        super().__init__()
        h, w = input_size
        layers: list[tuple[str, nn.Module]] = []
        cin, convs, pools = in_channels, 0, 0  # layer names as the reference's: conv1..conv4, maxpool1..2
        for cout in _CONVS:
            if cout is None:
                pools += 1
                if min(h, w) >= 2:  # pool before the ReLU of the conv above it: see the module docstring
                    layers.insert(len(layers) - 1, (f"maxpool{pools}", nn.MaxPool2d(2, 2)))
                    h, w = h // 2, w // 2
                continue
            convs += 1
            pad = 0 if min(h, w) >= 3 else 1  # a valid conv would leave no pixels: keep the size instead
            layers += [(f"conv{convs}", nn.Conv2d(cin, cout, 3, padding=pad)), (f"relu{convs}", nn.ReLU(inplace=True))]
            h, w, cin = h + 2 * pad - 2, w + 2 * pad - 2, cout
        self.features = nn.Sequential(OrderedDict(layers))
        self.classifier = nn.Sequential(OrderedDict([
            ("fc1", nn.Linear(cin * h * w, _HIDDEN)), ("relu1", nn.ReLU(inplace=True)), ("drop", nn.Dropout(dropout)),
            ("fc2", nn.Linear(_HIDDEN, _HIDDEN)), ("relu2", nn.ReLU(inplace=True)),
            ("fc3", nn.Linear(_HIDDEN, num_classes))]))
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init_last:
            nn.init.zeros_(self.classifier.fc3.weight)
            nn.init.zeros_(self.classifier.fc3.bias)

    def forward(self, x):
        return self.classifier(self.features(x).flatten(1))


@register_model("smallcnn")
def smallcnn(in_channels: int, num_classes: int, input_size: tuple[int, int], *, dropout: float = 0.5,
             zero_init_last: bool = False) -> nn.Module:
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not math.isfinite(dropout) \
            or not 0 <= dropout < 1:
        raise UserError(f"smallcnn option dropout must be a number in [0, 1) (default 0.5), got {dropout!r}")
    if not isinstance(zero_init_last, bool):
        raise UserError(f"smallcnn option zero_init_last must be true or false, got {zero_init_last!r}")
    return SmallCNN(in_channels, num_classes, input_size, dropout=float(dropout), zero_init_last=zero_init_last)
