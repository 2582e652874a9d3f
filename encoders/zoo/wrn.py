"""Wide ResNets WRN-depth-k of the testbed (wrn_16_1, wrn_16_2, wrn_40_1, wrn_40_2).

Pre-activation blocks; state-dict keys ``conv1 block1..block3.layer.<i>.{bn1,conv1,bn2,conv2,
convShortcut} bn1 fc`` as in the testbed (``convShortcut`` only where the width changes).
Features: 64k-d (128 for k = 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.zoo.common import NetOutput, he_init, pool_flat


class WideBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus a shortcut. When the width changes, the shortcut is
    a 1x1 conv of the *pre-activated* input; otherwise it is the raw input."""

    def __init__(self, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, padding=1, bias=False)
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else nn.Conv2d(
            in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.convShortcut is None else self.convShortcut(act))


class WideStage(nn.Module):
    """``n`` wide blocks; the first one changes width and stride (kept under ``.layer`` so the
    keys read ``block1.layer.0...``)."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int) -> None:
        super().__init__()
        self.layer = nn.Sequential(*[
            WideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1)
            for i in range(n)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen: int, num_classes: int = 100) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.block1 = WideStage(n, widths[0], widths[1], 1)
        self.block2 = WideStage(n, widths[1], widths[2], 2)
        self.block3 = WideStage(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.feat_dim = widths[3]
        self.fc = nn.Linear(self.feat_dim, num_classes)
        he_init(self, zero_linear_bias=True)

    def forward(self, x: torch.Tensor) -> NetOutput:
        x = self.block3(self.block2(self.block1(self.conv1(x))))
        feat = pool_flat(F.relu(self.bn1(x)))
        return NetOutput(feat, self.fc(feat))
