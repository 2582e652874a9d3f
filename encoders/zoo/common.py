"""What every zoo classifier returns, the weight initialisations of the testbed's models, and
the residual stage of the ResNets built on torchvision's blocks."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn


class NetOutput(NamedTuple):
    """A zoo model's output; unpacks as ``feat, logits = model(x)``.

    ``feat`` (B, feat_dim) is the pooled penultimate vector (the testbed's ``feat[-1]``, what
    CRD, DCD and RRD distil); ``logits`` (B, num_classes) is the classifier applied to it.
    """

    feat: torch.Tensor
    logits: torch.Tensor


def he_init(model: nn.Module, linear_std: float | None = None,
            zero_linear_bias: bool = False) -> None:
    """Conv weights N(0, 2 / (k*k*out_channels)) with zero bias, BatchNorm weight 1 and bias 0.

    ``linear_std``: draw Linear weights from N(0, linear_std) with zero bias (VGG, MobileNetV2);
    otherwise Linear layers keep PyTorch's default, with ``zero_linear_bias`` zeroing the bias
    (WRN).
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            if linear_std is not None:
                nn.init.normal_(m.weight, 0.0, linear_std)
                nn.init.zeros_(m.bias)
            elif zero_linear_bias:
                nn.init.zeros_(m.bias)


def pool_flat(x: torch.Tensor) -> torch.Tensor:
    """Global average pooling to (B, C). The testbed pools with fixed windows sized for 32 px
    input (8x8, 4x4, 2x2), which is the same thing there; global pooling also serves 64 px."""
    return torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet's channel shuffle: (B, g*c, H, W) viewed as (B, g, c) -> (B, c, g) -> back."""
    b, ch, h, w = x.shape
    return x.view(b, groups, ch // groups, h, w).transpose(1, 2).reshape(b, ch, h, w)


def resnet_stage(block: type[nn.Module], inplanes: int, planes: int, blocks: int,
                 stride: int) -> tuple[nn.Sequential, int]:
    """``blocks`` torchvision residual blocks (``BasicBlock`` or ``Bottleneck``), the first one
    strided and with a 1x1 conv + BN ``downsample`` when the shape changes; returns the stage
    and its output channels. Keys: ``<i>.{conv1,bn1,...,downsample.0,downsample.1}``."""
    downsample = None
    out = planes * block.expansion
    if stride != 1 or inplanes != out:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, out, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out),
        )
    mods = [block(inplanes, planes, stride, downsample)]
    mods += [block(out, planes) for _ in range(1, blocks)]
    return nn.Sequential(*mods), out
