"""VGG with BatchNorm for CIFAR (vgg8, vgg11, vgg13, vgg16, vgg19): five conv blocks, no fully
connected layers but the classifier, 512-d features.

State-dict keys as in the testbed: ``block0..block4.<j>`` (conv, BN, ReLU triples with each
block's last ReLU left out, so indices run 0, 1, 3, 4, ...) and ``classifier``; the pools have
no weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.zoo.common import NetOutput, he_init, pool_flat

# conv widths of the five blocks
CONFIGS: dict[int, tuple[tuple[int, ...], ...]] = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512)),
    19: ((64, 64), (128, 128), (256,) * 4, (512,) * 4, (512,) * 4),
}


def _block(widths: tuple[int, ...], in_ch: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for w in widths:
        mods += [nn.Conv2d(in_ch, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True)]
        in_ch = w
    # the block ends on BN: the ReLU is applied in forward (the testbed reads pre-activations)
    return nn.Sequential(*mods[:-1])


class VGG(nn.Module):
    def __init__(self, depth: int, num_classes: int = 100) -> None:
        super().__init__()
        cfg = CONFIGS[depth]
        ins = (3,) + tuple(c[-1] for c in cfg[:-1])
        for i, (widths, in_ch) in enumerate(zip(cfg, ins, strict=True)):
            self.add_module(f"block{i}", _block(widths, in_ch))
        self.feat_dim = cfg[-1][-1]
        self.classifier = nn.Linear(self.feat_dim, num_classes)
        he_init(self, linear_std=0.01)

    def forward(self, x: torch.Tensor) -> NetOutput:
        h = x.shape[2]
        x = F.max_pool2d(F.relu(self.block0(x)), 2)
        x = F.max_pool2d(F.relu(self.block1(x)), 2)
        x = F.max_pool2d(F.relu(self.block2(x)), 2)
        x = F.relu(self.block3(x))
        if h == 64:  # as the testbed: a fourth pooling only for 64 px input (Tiny-ImageNet)
            x = F.max_pool2d(x, 2)
        feat = pool_flat(F.relu(self.block4(x)))
        return NetOutput(feat, self.classifier(feat))
