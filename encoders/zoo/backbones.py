"""ResNet feature extractors: the backbones of the zoo (``MODELS`` entries of kind backbone).

``build_backbone(name, width=1.0, small_stem=False)`` returns ``(module, feature_dim)``; the module
maps images (B, 3, H, W) to global-average-pooled features (B, feature_dim); it has no classifier.

The trunk reuses torchvision's residual blocks and keeps torchvision's attribute names (``conv1``,
``bn1``, ``layer1`` ... ``layer4``), so at ``width=1`` with the ImageNet stem its ``state_dict`` has
exactly the keys and shapes of ``torchvision.models.resnetXX(weights=None)`` minus ``fc.*``. That is
what lets reference MoCo/SynCo checkpoints (``module.encoder_q.*``) load after stripping the prefix.

Stems:
- ImageNet (``resnet18``, ``resnet50``): 7x7 stride-2 conv + 3x3 stride-2 max-pool (224 px).
- CIFAR (``cifar_resnet18``, ``cifar_resnet50``): 3x3 stride-1 conv, no max-pool (32 px).
- small (``small_stem=True``): 3x3 stride-2 conv, no max-pool (64-96 px).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck

from cdir.core.errors import CdirError
from encoders.zoo import BACKBONE, MODELS, canonical_name
from encoders.zoo.common import resnet_stage

# the residual blocks of the trunks, by the name the zoo's table uses
BLOCKS: dict[str, type[nn.Module]] = {"basic": BasicBlock, "bottleneck": Bottleneck}


class ResNetTrunk(nn.Module):
    """A torchvision-compatible ResNet without the classifier; returns pooled features."""

    def __init__(
        self,
        block: str,
        layers: tuple[int, ...],
        width: float = 1.0,
        stem: str = "imagenet",
        embed_dim: int = 0,
        embed_grid: int = 1,
        cell_dim: int = 0,
    ) -> None:
        super().__init__()
        if width <= 0:
            raise CdirError(f"backbone width must be positive, got {width}")
        widths = [max(1, int(round(c * width))) for c in (64, 128, 256, 512)]
        unit = BLOCKS[block]
        if stem == "imagenet":
            self.conv1 = nn.Conv2d(3, widths[0], 7, stride=2, padding=3, bias=False)
            self.maxpool: nn.Module = nn.MaxPool2d(3, stride=2, padding=1)
        elif stem in ("cifar", "small"):
            stride = 1 if stem == "cifar" else 2
            self.conv1 = nn.Conv2d(3, widths[0], 3, stride=stride, padding=1, bias=False)
            self.maxpool = nn.Identity()
        else:
            raise CdirError(f"unknown stem {stem!r}; use imagenet, cifar or small")
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        inplanes = widths[0]
        self.layer1, inplanes = resnet_stage(unit, inplanes, widths[0], layers[0], 1)
        self.layer2, inplanes = resnet_stage(unit, inplanes, widths[1], layers[1], 2)
        self.layer3, inplanes = resnet_stage(unit, inplanes, widths[2], layers[2], 2)
        self.layer4, inplanes = resnet_stage(unit, inplanes, widths[3], layers[3], 2)
        self.out_dim = widths[3] * unit.expansion
        # a linear embedding after the pooling: what a label-free distilled student outputs;
        # embed_grid > 1 pools the last map to that many cells a side first (the layout kept)
        self.embed: nn.Module | None = None
        if embed_grid < 1 or (embed_grid > 1 and not embed_dim):
            raise CdirError(f"embed_grid must be 1, or more with an embed_dim, got {embed_grid}")
        self.avgpool = nn.AdaptiveAvgPool2d(int(embed_grid))
        # cell_dim > 0 maps every cell's channels to that many (a 1x1 convolution shared by
        # the cells) before the embedding: a head of C x cell_dim + cell_dim x n^2 x embed_dim
        # parameters instead of C x n^2 x embed_dim
        self.cell: nn.Module | None = None
        if cell_dim < 0 or (cell_dim and not embed_dim):
            raise CdirError(f"cell_dim must be 0, or positive with an embed_dim, got {cell_dim}")
        if embed_dim:
            if embed_dim < 1:
                raise CdirError(f"embed_dim must be positive, got {embed_dim}")
            cells = self.out_dim
            if cell_dim:
                self.cell = nn.Conv2d(self.out_dim, int(cell_dim), 1, bias=False)
                cells = int(cell_dim)
            self.embed = nn.Linear(cells * int(embed_grid) ** 2, int(embed_dim))
            self.out_dim = int(embed_dim)
        self.layer_dims = [c * unit.expansion for c in widths]  # channels of layer1..layer4
        # Same initialisation as torchvision's ResNet (zero_init_residual=False).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def feature_map(self, x: torch.Tensor) -> torch.Tensor:
        """The last stage's map (B, out_dim, h, w), before the global pooling."""
        return self.layer_maps(x, (4,))[0]

    def layer_maps(self, x: torch.Tensor, layers: tuple[int, ...]) -> list[torch.Tensor]:
        """The output maps of ``layers`` (1-4: layer1..layer4), computed once up to the
        deepest one asked for."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        maps = []
        for i, layer in enumerate((self.layer1, self.layer2, self.layer3, self.layer4)[
                :max(layers)], start=1):
            x = layer(x)
            if i in layers:
                maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = self.avgpool(self.feature_map(x))
        if self.cell is not None:
            pooled = self.cell(pooled)
        pooled = torch.flatten(pooled, 1)
        return pooled if self.embed is None else self.embed(pooled)


class GridPooled(nn.Module):
    """A ResNet's last map average-pooled to ``n`` x ``n`` cells, flattened (out_dim x n^2):
    keeps the layout that global pooling discards, which is what tells centred drawings of
    similar parts apart (measured on the emoji gallery: see README).

    ``layers`` (default the last): the maps pooled (1-4: layer1..layer4); with several (e.g.
    ``(3, 4)``: parts and whole objects), each layer's cells are L2-normalised as one block
    before they are joined, so every layer weighs the same in a cosine."""

    def __init__(self, trunk: ResNetTrunk, n: int, layers: tuple[int, ...] = (4,)) -> None:
        super().__init__()
        if n < 1:
            raise CdirError(f"grid must be at least 1, got {n}")
        if trunk.embed is not None:
            raise CdirError("this encoder ends in an embedding head (a distilled student): its "
                            "output is that embedding, so grid features do not apply")
        layers = tuple(sorted({int(k) for k in layers}))
        if not layers or not set(layers) <= {1, 2, 3, 4}:
            raise CdirError(f"grid layers must be among 1, 2, 3, 4, got {layers}")
        self.trunk, self.n, self.layers = trunk, int(n), layers
        self.out_dim = sum(trunk.layer_dims[k - 1] for k in layers) * self.n**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        blocks = [torch.flatten(nn.functional.adaptive_avg_pool2d(m, self.n), 1)
                  for m in self.trunk.layer_maps(x, self.layers)]
        if len(blocks) == 1:
            return blocks[0]
        return torch.cat([nn.functional.normalize(b, dim=1) for b in blocks], 1)


def build_backbone(name: str, **kwargs: object) -> tuple[nn.Module, int]:
    """Build a ResNet feature extractor by name; returns ``(module, feature_dim)``.

    Keyword options: ``width`` (float, channel multiplier, default 1.0), ``small_stem`` (bool,
    3x3 stride-2 stem without max-pool; only for the ImageNet-stem names), ``depths`` (four
    ints, the residual blocks of each stage, at most the named model's: a shallower trunk whose
    blocks are the first ones of the named model's stages), ``embed_dim`` (int, a linear
    embedding of that size after the pooling; 0: none), ``embed_grid`` (int, the last map
    pooled to that many cells a side before the embedding; default 1: global) and ``cell_dim``
    (int, each cell's channels mapped to that many by a shared 1x1 convolution before the
    embedding; default 0: none).
    """
    valid = ("width", "small_stem", "depths", "embed_dim", "embed_grid", "cell_dim")
    unknown = set(kwargs) - set(valid)
    if unknown:
        raise CdirError(f"unknown backbone option(s) {sorted(unknown)} for {name!r}; valid: "
                        + ", ".join(valid))
    width = float(kwargs.get("width", 1.0))  # type: ignore[arg-type]
    small_stem = bool(kwargs.get("small_stem", False))
    entry = MODELS[canonical_name(name, BACKBONE)]
    stem = entry.kwargs["stem"]
    if small_stem:
        if stem == "cifar":
            raise CdirError(f"{name!r} already has the CIFAR stem; drop small_stem or use "
                            f"{name.removeprefix('cifar_')!r}")
        stem = "small"
    embed_dim = int(kwargs.get("embed_dim", 0) or 0)  # type: ignore[call-overload]
    embed_grid = int(kwargs.get("embed_grid", 1) or 1)  # type: ignore[call-overload]
    cell_dim = int(kwargs.get("cell_dim", 0) or 0)  # type: ignore[call-overload]
    layers = tuple(entry.kwargs["layers"])
    depths = kwargs.get("depths")
    if depths is not None:
        try:
            depths = tuple(int(d) for d in depths)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            depths = ()
        if len(depths) != 4 or not all(1 <= d <= n for d, n in zip(depths, layers, strict=True)):
            raise CdirError(f"depths must be four block counts, each from 1 to {name!r}'s "
                            f"{list(layers)}, got {kwargs.get('depths')!r}")
        layers = depths
    model = ResNetTrunk(entry.kwargs["block"], layers, width=width, stem=stem,
                        embed_dim=embed_dim, embed_grid=embed_grid, cell_dim=cell_dim)
    return model, model.out_dim
