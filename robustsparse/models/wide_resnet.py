"""Wide ResNet WRN-D-K (Zagoruyko & Komodakis 2016), as in the TRADES / OAT ``WideResNet`` code.

Stem 3x3 conv to 16 channels, three stages of n = (D-4)/6 BasicBlocks with 16K, 32K, 64K channels (strides 1,
2, 2), final BN-ReLU, global average pool, linear. A block is BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3 with a
1x1 conv shortcut (taken from the pre-activated input) when in != out channels. Convs have no bias, the linear
layer has one; init as in TRADES (He-normal with fan_out for convs, BN 1/0, zero linear bias).
Unlike TRADES' file there is no unused ``sub_block1``, so parameter counts are the standard ones
(WRN-28-10: 36,479,194; WRN-34-10: 46,160,474).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import nn

from robustsparse.errors import UserError
from robustsparse.models.registry import register_model


class WideBasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.dropout = dropout
        self.equal_in_out = cin == cout
        self.shortcut = None if self.equal_in_out else nn.Conv2d(cin, cout, 1, stride=stride, bias=False)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.equal_in_out else self.shortcut(pre))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, in_channels: int, num_classes: int, dropout: float = 0.0):
        super().__init__()
        n = (depth - 4) // 6
        channels = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, channels[0], 3, stride=1, padding=1, bias=False)
        stages = []
        for i, stride in enumerate((1, 2, 2)):
            stages.append(nn.Sequential(*[
                WideBasicBlock(channels[i] if j == 0 else channels[i + 1], channels[i + 1],
                               stride if j == 0 else 1, dropout) for j in range(n)]))
        self.block1, self.block2, self.block3 = stages
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels[3], num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(self.pool(out).flatten(1))


@register_model("wrn-{depth}-{widen}")
def wide_resnet(in_channels: int, num_classes: int, input_size: tuple[int, int], *, depth: int, widen: int,
                dropout: float = 0.0) -> nn.Module:
    if depth < 10 or (depth - 4) % 6 != 0:
        raise UserError(f"wrn-{depth}-{widen}: depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 34, 40, ...), "
                        f"got {depth}")
    if widen < 1:
        raise UserError(f"wrn-{depth}-{widen}: width factor must be >= 1, got {widen}")
    if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
        raise UserError(f"wrn option dropout must be a number in [0, 1) (default 0.0), got {dropout!r}")
    return WideResNet(depth, widen, in_channels, num_classes, float(dropout))


def _named(depth: int, widen: int):
    def build(in_channels: int, num_classes: int, input_size: tuple[int, int], *, dropout: float = 0.0):
        return wide_resnet(in_channels, num_classes, input_size, depth=depth, widen=widen, dropout=dropout)
    return build


for _depth, _widen in ((16, 8), (28, 4), (34, 10), (40, 2)):
    register_model(f"wrn-{_depth}-{_widen}")(_named(_depth, _widen))
