"""MobileNetV2 of the testbed (once ``mobile_half``): expansion 6, width 0.5, a 1280-d last conv.

It differs from torchvision's: the first block keeps its 1x1 expansion conv (t = 1), the last
conv stays 1280 wide at width 0.5, and the stem is stride 2 (32 px input ends on 2x2 maps).
State-dict keys: ``conv1.{0,1} blocks.<stage>.<i>.conv.{0,1,3,4,6,7} conv2.{0,1}
classifier.0``.
"""

from __future__ import annotations

import torch
from torch import nn

from encoders.zoo.common import NetOutput, he_init, pool_flat

# (expansion, channels, blocks, first stride) of the seven stages; expansion None = T
STAGES: tuple[tuple[int | None, int, int, int], ...] = (
    (1, 16, 1, 1), (None, 24, 2, 1), (None, 32, 3, 2), (None, 64, 4, 2),
    (None, 96, 3, 1), (None, 160, 3, 2), (None, 320, 1, 1),
)


def _conv_bn_relu(inp: int, out: int, k: int, stride: int = 1, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(inp, out, k, stride, k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(out), nn.ReLU(inplace=True)]


class InvertedResidual(nn.Module):
    """1x1 expand -> 3x3 depthwise (strided) -> 1x1 linear projection; residual when the shape
    is kept."""

    def __init__(self, inp: int, out: int, stride: int, expand: int) -> None:
        super().__init__()
        mid = inp * expand
        self.residual = stride == 1 and inp == out
        self.conv = nn.Sequential(
            *_conv_bn_relu(inp, mid, 1),
            *_conv_bn_relu(mid, mid, 3, stride, groups=mid),
            nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


class MobileNetV2(nn.Module):
    def __init__(self, num_classes: int = 100, expansion: int = 6, width: float = 0.5) -> None:
        super().__init__()
        ch = int(32 * width)
        self.conv1 = nn.Sequential(*_conv_bn_relu(3, ch, 3, 2))
        self.blocks = nn.ModuleList()
        for t, c, n, s in STAGES:
            out = int(c * width)
            stage = []
            for i in range(n):
                stage.append(InvertedResidual(ch, out, s if i == 0 else 1, t or expansion))
                ch = out
            self.blocks.append(nn.Sequential(*stage))
        self.feat_dim = int(1280 * width) if width > 1.0 else 1280
        self.conv2 = nn.Sequential(*_conv_bn_relu(ch, self.feat_dim, 1))
        self.classifier = nn.Sequential(nn.Linear(self.feat_dim, num_classes))
        he_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> NetOutput:
        x = self.conv1(x)
        for stage in self.blocks:
            x = stage(x)
        feat = pool_flat(self.conv2(x))
        return NetOutput(feat, self.classifier(feat))
