"""CIFAR ResNets of the testbed: the 6n+2 family (resnet8 ... resnet110, resnet8x4, resnet32x4)
and ``ResNet50``, the CIFAR-stem ResNet-50 used as a teacher.

Names and state-dict keys follow the testbed so its teacher checkpoints load:
- 6n+2: ``conv1 bn1 layer1..layer3.<i>.{conv1,bn1,conv2,bn2,downsample.0,downsample.1} fc``
  (torchvision's ``BasicBlock`` has exactly these names and this computation);
- ResNet50: ``conv1 bn1 layer1..layer4.<i>.{conv1..conv3,bn1..bn3,shortcut.0,shortcut.1}
  linear``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models.resnet import BasicBlock

from encoders.zoo.common import NetOutput, he_init, pool_flat, resnet_stage


class CifarResNet(nn.Module):
    """3x3 stem (no pooling), three stages of ``n = (depth - 2) / 6`` basic blocks at strides
    1, 2, 2, global pooling, a linear classifier. ``widths``: stem and the three stages."""

    def __init__(self, depth: int, widths: tuple[int, int, int, int],
                 num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        self.layer1, inplanes = resnet_stage(BasicBlock, widths[0], widths[1], n, 1)
        self.layer2, inplanes = resnet_stage(BasicBlock, inplanes, widths[2], n, 2)
        self.layer3, inplanes = resnet_stage(BasicBlock, inplanes, widths[3], n, 2)
        self.feat_dim = widths[3]
        self.fc = nn.Linear(self.feat_dim, num_classes)
        he_init(self)

    def forward(self, x: torch.Tensor) -> NetOutput:
        x = self.relu(self.bn1(self.conv1(x)))
        feat = pool_flat(self.layer3(self.layer2(self.layer1(x))))
        return NetOutput(feat, self.fc(feat))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 bottleneck with a projection ``shortcut`` when the shape
    changes (an empty Sequential, so no keys, when it does not)."""

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        out = planes * self.expansion
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out, 1, stride=stride, bias=False), nn.BatchNorm2d(out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet50(nn.Module):
    """ResNet-50 stages (3, 4, 6, 3 bottlenecks) behind a 3x3 stride-1 stem: 2048-d features."""

    def __init__(self, num_classes: int = 100, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(3, 64, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.layer1 = self._make_layer(64, blocks[0], 1)
        self.layer2 = self._make_layer(128, blocks[1], 2)
        self.layer3 = self._make_layer(256, blocks[2], 2)
        self.layer4 = self._make_layer(512, blocks[3], 2)
        self.feat_dim = 512 * Bottleneck.expansion
        self.linear = nn.Linear(self.feat_dim, num_classes)
        he_init(self)

    def _make_layer(self, planes: int, n: int, stride: int) -> nn.Sequential:
        mods = []
        for s in [stride] + [1] * (n - 1):
            mods.append(Bottleneck(self.in_planes, planes, s))
            self.in_planes = planes * Bottleneck.expansion
        return nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> NetOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feat = pool_flat(x)
        return NetOutput(feat, self.linear(feat))
