"""Small CNN sized for the 8x8 scikit-learn digits (1 channel), usable at any input size.

conv3x3(in, w/2)-BN-ReLU, conv3x3(w/2, w)-BN-ReLU, maxpool2, conv3x3(w, 2w)-BN-ReLU, maxpool2, flatten,
Linear(2w * h * w', 256)-ReLU, Linear(256, num_classes), with ``w = width`` (default 64, i.e. 32/64/128 channels).
A max-pool is skipped when the map is already smaller than 2 pixels; before flattening, an adaptive average
pool brings the map to (min(H/4, 4), min(W/4, 4)) (at least 1x1), so 8x8 digits flatten 2x2 maps as in the
plain design while large inputs (32x32, 96x96) keep the first linear layer small.
"""

from __future__ import annotations

from torch import nn

from robustsparse.errors import UserError
from robustsparse.models.registry import register_model

_MAX_GRID = 4


def _conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    def __init__(self, in_channels: int, num_classes: int, input_size: tuple[int, int], width: int = 64,
                 hidden: int = 256):
        super().__init__()
        c1, c2, c3 = max(1, width // 2), width, 2 * width
        h, w = input_size
        layers = _conv_bn_relu(in_channels, c1) + _conv_bn_relu(c1, c2)
        for block in (None, _conv_bn_relu(c2, c3)):
            if block is not None:
                layers += block
            if min(h, w) >= 2:
                layers.append(nn.MaxPool2d(2))
                h, w = h // 2, w // 2
        grid = (max(1, min(h, _MAX_GRID)), max(1, min(w, _MAX_GRID)))
        layers += [nn.AdaptiveAvgPool2d(grid), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c3 * grid[0] * grid[1], hidden), nn.ReLU(inplace=True),
                                        nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("cnn")
def cnn(in_channels: int, num_classes: int, input_size: tuple[int, int], *, width: int = 64) -> nn.Module:
    if isinstance(width, bool) or not isinstance(width, int) or width < 1:
        raise UserError(f"cnn option width must be a positive integer (default 64), got {width!r}")
    return SmallCNN(in_channels, num_classes, input_size, width=width)
