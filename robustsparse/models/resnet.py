"""ResNet-18/34 (CIFAR variant) and PreActResNet-18.

* ``resnet18`` / ``resnet34``: He et al. 2016, as in kuangliu/pytorch-cifar ``models/resnet.py``: 3x3 stem conv
  (stride 1, no max-pool), BasicBlocks [2,2,2,2] / [3,4,6,3] with 64-128-256-512 channels, 1x1 conv + BN
  shortcut when the shape changes, global average pool, linear.
* ``preact_resnet18``: He et al. 2016 "Identity mappings", as used by Rice, Wong & Kolter 2020 "Overfitting in
  adversarially robust deep learning" (``preactresnet.py``): BN-ReLU before each conv, 1x1 conv shortcut (no BN)
  taken from the pre-activated input, final BN-ReLU before pooling.

Global pooling is adaptive, so any input size works (8x8 ends at 1x1 after the three stride-2 stages).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import nn

from robustsparse.models.registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class ResNet(nn.Module):
    def __init__(self, block, num_blocks, in_channels: int, num_classes: int, preact: bool = False):
        super().__init__()
        self.preact = preact
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        if not preact:
            self.bn1 = nn.BatchNorm2d(64)
        cin, stages = 64, []
        for i, (cout, n) in enumerate(zip((64, 128, 256, 512), num_blocks)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        if preact:
            self.bn = nn.BatchNorm2d(512)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(512, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        if not self.preact:
            out = F.relu(self.bn1(out))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        if self.preact:
            out = F.relu(self.bn(out))
        return self.linear(self.pool(out).flatten(1))


@register_model("resnet18")
def resnet18(in_channels: int, num_classes: int, input_size: tuple[int, int]) -> nn.Module:
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels, num_classes)


@register_model("resnet34")
def resnet34(in_channels: int, num_classes: int, input_size: tuple[int, int]) -> nn.Module:
    return ResNet(BasicBlock, (3, 4, 6, 3), in_channels, num_classes)


@register_model("preact_resnet18")
def preact_resnet18(in_channels: int, num_classes: int, input_size: tuple[int, int]) -> nn.Module:
    return ResNet(PreActBlock, (2, 2, 2, 2), in_channels, num_classes, preact=True)
