"""VGG-16 with batch norm (Simonyan & Zisserman 2015), CIFAR variant as in kuangliu/pytorch-cifar ``models/vgg.py``.

cfg [64,64,M,128,128,M,256,256,256,M,512,512,512,M,512,512,512,M], each number a conv3x3(+bias)-BN-ReLU, then an
adaptive average pool to 1x1 and a single Linear(512, num_classes). A max-pool ("M") is skipped when the map at
that point (computed from ``input_size``) is already smaller than 2 pixels, so 8x8 inputs keep 3 of the 5 pools
(8 -> 4 -> 2 -> 1); 32x32 and larger keep all five.
"""

from __future__ import annotations

from torch import nn

from robustsparse.models.registry import register_model

CFG16 = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


class VGG(nn.Module):
    def __init__(self, cfg, in_channels: int, num_classes: int, input_size: tuple[int, int]):
        super().__init__()
        layers, cin = [], in_channels
        h, w = input_size
        for v in cfg:
            if v == "M":
                if min(h, w) >= 2:
                    layers.append(nn.MaxPool2d(2, 2))
                    h, w = h // 2, w // 2
            else:
                layers += [nn.Conv2d(cin, v, 3, padding=1), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                cin = v
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(cin, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x))


@register_model("vgg16_bn")
def vgg16_bn(in_channels: int, num_classes: int, input_size: tuple[int, int]) -> nn.Module:
    return VGG(CFG16, in_channels, num_classes, input_size)
