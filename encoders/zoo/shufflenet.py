"""ShuffleNet V1 (groups 3, 960-d) and V2 (1x, 1024-d) for CIFAR, as in the testbed: a 1x1
stride-1 stem with 24 channels, three stages that each halve the resolution, PyTorch's default
initialisation.

State-dict keys: V1 ``conv1 bn1 layer1..layer3.<i>.{conv1..conv3,bn1..bn3} linear``;
V2 ``conv1 bn1 layer1..layer3.<i>.{conv1..conv5,bn1..bn5} conv2 bn2 linear`` (``<i> = 0`` is
the down-sampling block, with five convs; the others have three).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.zoo.common import NetOutput, channel_shuffle, pool_flat


def _dw(ch: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(ch, ch, 3, stride=stride, padding=1, groups=ch, bias=False)


def _pw(inp: int, out: int, groups: int = 1) -> nn.Conv2d:
    return nn.Conv2d(inp, out, 1, groups=groups, bias=False)


# --------------------------------------------------------------------------------------------
# V1


class ShuffleUnitV1(nn.Module):
    """Grouped 1x1 -> shuffle -> 3x3 depthwise -> grouped 1x1. The strided unit concatenates an
    average-pooled shortcut, so its branch produces ``out_planes - in_planes`` channels."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, groups: int) -> None:
        super().__init__()
        self.stride = stride
        branch = out_planes - in_planes if stride == 2 else out_planes
        mid = branch // 4
        # the stem's 24 channels do not split into groups: the first 1x1 is dense there
        self.g1 = 1 if in_planes == 24 else groups
        self.conv1 = _pw(in_planes, mid, self.g1)
        self.bn1 = nn.BatchNorm2d(mid)
        self.conv2 = _dw(mid, stride)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _pw(mid, branch, groups)
        self.bn3 = nn.BatchNorm2d(branch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = channel_shuffle(F.relu(self.bn1(self.conv1(x))), self.g1)
        out = self.bn3(self.conv3(F.relu(self.bn2(self.conv2(out)))))
        if self.stride == 2:
            return F.relu(torch.cat([out, F.avg_pool2d(x, 3, stride=2, padding=1)], 1))
        return F.relu(out + x)


class ShuffleNetV1(nn.Module):
    def __init__(self, num_classes: int = 100, out_planes: tuple[int, ...] = (240, 480, 960),
                 blocks: tuple[int, ...] = (4, 8, 4), groups: int = 3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_planes = 24
        for i, (out, n) in enumerate(zip(out_planes, blocks, strict=True), start=1):
            units = [ShuffleUnitV1(in_planes if j == 0 else out, out, 2 if j == 0 else 1, groups)
                     for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            in_planes = out
        self.feat_dim = out_planes[-1]
        self.linear = nn.Linear(self.feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> NetOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        feat = pool_flat(self.layer3(self.layer2(self.layer1(x))))
        return NetOutput(feat, self.linear(feat))


# --------------------------------------------------------------------------------------------
# V2


class ShuffleUnitV2(nn.Module):
    """Channel split: half passes through, half goes 1x1 -> 3x3 depthwise -> 1x1; then the
    halves are concatenated and shuffled."""

    def __init__(self, ch: int) -> None:
        super().__init__()
        self.half = ch // 2
        self.conv1 = _pw(self.half, self.half)
        self.bn1 = nn.BatchNorm2d(self.half)
        self.conv2 = _dw(self.half, 1)
        self.bn2 = nn.BatchNorm2d(self.half)
        self.conv3 = _pw(self.half, self.half)
        self.bn3 = nn.BatchNorm2d(self.half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        keep, x2 = x[:, :self.half], x[:, self.half:]
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x2)))))
        out = F.relu(self.bn3(self.conv3(out)))
        return channel_shuffle(torch.cat([keep, out], 1), 2)


class DownUnitV2(nn.Module):
    """The strided unit: both branches see the whole input (left: 3x3 depthwise -> 1x1;
    right: 1x1 -> 3x3 depthwise -> 1x1), each giving half of the output channels."""

    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        mid = out // 2
        self.conv1 = _dw(inp, 2)
        self.bn1 = nn.BatchNorm2d(inp)
        self.conv2 = _pw(inp, mid)
        self.bn2 = nn.BatchNorm2d(mid)
        self.conv3 = _pw(inp, mid)
        self.bn3 = nn.BatchNorm2d(mid)
        self.conv4 = _dw(mid, 2)
        self.bn4 = nn.BatchNorm2d(mid)
        self.conv5 = _pw(mid, mid)
        self.bn5 = nn.BatchNorm2d(mid)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        left = F.relu(self.bn2(self.conv2(self.bn1(self.conv1(x)))))
        right = self.bn4(self.conv4(F.relu(self.bn3(self.conv3(x)))))
        right = F.relu(self.bn5(self.conv5(right)))
        return channel_shuffle(torch.cat([left, right], 1), 2)


class ShuffleNetV2(nn.Module):
    def __init__(self, num_classes: int = 100,
                 channels: tuple[int, ...] = (116, 232, 464, 1024),
                 blocks: tuple[int, ...] = (3, 7, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 24, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(24)
        in_ch = 24
        for i, (out, n) in enumerate(zip(channels[:3], blocks, strict=True), start=1):
            units = [DownUnitV2(in_ch, out)] + [ShuffleUnitV2(out) for _ in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*units))
            in_ch = out
        self.conv2 = _pw(in_ch, channels[3])
        self.bn2 = nn.BatchNorm2d(channels[3])
        self.feat_dim = channels[3]
        self.linear = nn.Linear(self.feat_dim, num_classes)

    def forward(self, x: torch.Tensor) -> NetOutput:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        feat = pool_flat(F.relu(self.bn2(self.conv2(x))))
        return NetOutput(feat, self.linear(feat))
