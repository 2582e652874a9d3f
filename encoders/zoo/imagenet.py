"""torchvision ResNet-18/34/50 for ImageNet distillation (ResNet-34 -> ResNet-18 is the CRD
pair), built by ``torchvision.models`` with ``weights=None``.

The torchvision modules are adopted as this module's children, so the state-dict keys are
torchvision's own (``conv1 bn1 layer1..layer4 fc``) and torchvision checkpoints load as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from encoders.zoo.common import NetOutput


class TorchvisionResNet(nn.Module):
    def __init__(self, arch: str, num_classes: int = 1000) -> None:
        super().__init__()
        import torchvision

        net = getattr(torchvision.models, arch)(weights=None, num_classes=num_classes)
        for name, child in net.named_children():
            self.add_module(name, child)
        self.feat_dim = net.fc.in_features

    def forward(self, x: torch.Tensor) -> NetOutput:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        feat = torch.flatten(self.avgpool(x), 1)
        return NetOutput(feat, self.fc(feat))
