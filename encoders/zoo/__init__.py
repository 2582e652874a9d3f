"""The model zoo: one name -> model table, ``MODELS`` (like timm's registry), of two kinds.

- Backbones (``build_backbone(name, **options)`` in :mod:`encoders.zoo.backbones`): feature
  extractors without a classifier, what the self-supervised, adaptation and label-free
  distillation runs train and ``ckpt:`` encoders load. torchvision-compatible ResNet trunks:
  resnet18/34/50 (ImageNet stem) and cifar_resnet18/34/50 (3x3 stride-1 stem).
- Classifiers (``create_model(name, num_classes=100)``): the distillation testbed's models; every
  one maps images (B, 3, H, W) to ``NetOutput(feat, logits)`` (``encoders.zoo.common``): the
  pooled penultimate features (B, model.feat_dim) and the logits (B, num_classes).

Classifier names are the CRD testbed's (RepDistiller), because its teacher folders are named
after them (``<name>_vanilla/ckpt_epoch_240.pth``), and the state-dict keys are the testbed's
too, so its published teacher checkpoints load with ``load_teacher``:

- CIFAR (32 px): resnet8/14/20/32/44/56/110 (64-d), resnet8x4/resnet32x4 (256), wrn_16_1 and
  wrn_40_1 (64), wrn_16_2 and wrn_40_2 (128), vgg8/11/13/16/19 with BN (512), MobileNetV2
  (the testbed's half-width variant, 1280; its older name ``mobile_half`` is accepted too),
  ShuffleV1 (960), ShuffleV2 (1024), ResNet50 (the CIFAR-stem ResNet-50, 2048).
- ImageNet: resnet18_imagenet, resnet34_imagenet (512), resnet50_imagenet (2048): torchvision
  models and keys. (Named apart from the CIFAR ``ResNet50``, which differs only in case.)

The architecture modules (and torch) are imported when a model is built, so listing the names
is cheap. Architectures are kept apart only where they really differ (the testbed's key names,
CIFAR vs ImageNet stems); the residual stages are built once (``common.resnet_stage``).
"""

from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError

if TYPE_CHECKING:
    import torch
    from torch import nn

# the input normalisation of models trained on ImageNet (torchvision's, MoCo's)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

_SMALL = (16, 16, 32, 64)  # stem and stage widths of resnet8 ... resnet110
_X4 = (32, 64, 128, 256)  # the 4x-wide resnet8x4 / resnet32x4

BACKBONE, CLASSIFIER = "backbone", "classifier"


@dataclass(frozen=True)
class Model:
    """A zoo entry: ``module.cls(**kwargs)`` (module under encoders.zoo) builds it; ``kind``:
    :data:`BACKBONE` (pooled features, :func:`encoders.zoo.backbones.build_backbone`) or
    :data:`CLASSIFIER` (``NetOutput``, :func:`create_model`)."""

    module: str
    cls: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    kind: str = CLASSIFIER


def _trunk(block: str, layers: tuple[int, ...], stem: str) -> Model:
    return Model("backbones", "ResNetTrunk", {"block": block, "layers": layers, "stem": stem},
                 BACKBONE)


MODELS: dict[str, Model] = {
    "resnet18": _trunk("basic", (2, 2, 2, 2), "imagenet"),
    "resnet34": _trunk("basic", (3, 4, 6, 3), "imagenet"),
    "resnet50": _trunk("bottleneck", (3, 4, 6, 3), "imagenet"),
    "cifar_resnet18": _trunk("basic", (2, 2, 2, 2), "cifar"),
    "cifar_resnet34": _trunk("basic", (3, 4, 6, 3), "cifar"),
    "cifar_resnet50": _trunk("bottleneck", (3, 4, 6, 3), "cifar"),
    "resnet8": Model("resnet", "CifarResNet", {"depth": 8, "widths": _SMALL}),
    "resnet14": Model("resnet", "CifarResNet", {"depth": 14, "widths": _SMALL}),
    "resnet20": Model("resnet", "CifarResNet", {"depth": 20, "widths": _SMALL}),
    "resnet32": Model("resnet", "CifarResNet", {"depth": 32, "widths": _SMALL}),
    "resnet44": Model("resnet", "CifarResNet", {"depth": 44, "widths": _SMALL}),
    "resnet56": Model("resnet", "CifarResNet", {"depth": 56, "widths": _SMALL}),
    "resnet110": Model("resnet", "CifarResNet", {"depth": 110, "widths": _SMALL}),
    "resnet8x4": Model("resnet", "CifarResNet", {"depth": 8, "widths": _X4}),
    "resnet32x4": Model("resnet", "CifarResNet", {"depth": 32, "widths": _X4}),
    "ResNet50": Model("resnet", "CifarResNet50", {}),
    "wrn_16_1": Model("wrn", "WideResNet", {"depth": 16, "widen": 1}),
    "wrn_16_2": Model("wrn", "WideResNet", {"depth": 16, "widen": 2}),
    "wrn_40_1": Model("wrn", "WideResNet", {"depth": 40, "widen": 1}),
    "wrn_40_2": Model("wrn", "WideResNet", {"depth": 40, "widen": 2}),
    "vgg8": Model("vgg", "VGG", {"depth": 8}),
    "vgg11": Model("vgg", "VGG", {"depth": 11}),
    "vgg13": Model("vgg", "VGG", {"depth": 13}),
    "vgg16": Model("vgg", "VGG", {"depth": 16}),
    "vgg19": Model("vgg", "VGG", {"depth": 19}),
    "MobileNetV2": Model("mobilenetv2", "MobileNetV2", {"expansion": 6, "width": 0.5}),
    "ShuffleV1": Model("shufflenet", "ShuffleNetV1", {}),
    "ShuffleV2": Model("shufflenet", "ShuffleNetV2", {}),
    "resnet18_imagenet": Model("imagenet", "TorchvisionResNet", {"arch": "resnet18"}),
    "resnet34_imagenet": Model("imagenet", "TorchvisionResNet", {"arch": "resnet34"}),
    "resnet50_imagenet": Model("imagenet", "TorchvisionResNet", {"arch": "resnet50"}),
}
# earlier names of a model: RepDistiller called MobileNetV2 mobile_half before renaming it
_ALIASES = {"mobile_half": "MobileNetV2"}

# prefixes that wrappers (DataParallel, DDP) put in front of every key
_WRAPPER_PREFIXES = ("module.",)


def list_models(kind: str = CLASSIFIER) -> list[str]:
    """The zoo's names of one kind (aliases not included)."""
    return [n for n, m in MODELS.items() if m.kind == kind]


def canonical_name(name: str, kind: str = CLASSIFIER) -> str:
    """``name`` with aliases resolved; a name that is not a model of ``kind`` raises CdirError
    listing those that are."""
    name = _ALIASES.get(name, name)
    if name not in MODELS or MODELS[name].kind != kind:
        raise CdirError(f"unknown {'backbone' if kind == BACKBONE else 'model'} {name!r}; "
                        f"choose one of {', '.join(list_models(kind))}")
    return name


def build(name: str, kind: str, **kwargs: Any) -> nn.Module:
    """Zoo model ``name`` of ``kind``, randomly initialised, with more constructor arguments."""
    entry = MODELS[canonical_name(name, kind)]
    mod = importlib.import_module(f"encoders.zoo.{entry.module}")
    return getattr(mod, entry.cls)(**entry.kwargs, **kwargs)


def create_model(name: str, num_classes: int = 100) -> nn.Module:
    """A randomly initialised classifier; it has ``feat_dim`` and returns ``NetOutput``."""
    canonical_name(name)
    if int(num_classes) < 1:
        raise CdirError(f"num_classes must be positive, got {num_classes}")
    return build(name, CLASSIFIER, num_classes=int(num_classes))


def teacher_name_from_path(path: str | os.PathLike) -> str:
    """The model name the testbed encodes in a teacher's folder (``<name>_vanilla/...``): the
    longest zoo name that the folder name starts with, followed by ``_`` or nothing."""
    folder = Path(path).parent.name
    names = list_models()
    hits = [n for n in (*names, *_ALIASES) if folder == n or folder.startswith(n + "_")]
    if not hits:
        raise CdirError(f"cannot tell the teacher model from the folder name {folder!r}; "
                        f"name it <model>_vanilla with a model from {', '.join(names)}")
    return canonical_name(max(hits, key=len))


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    import torch

    if not path.is_file():
        raise CdirError(f"no teacher checkpoint at {path}")
    try:
        # student checkpoints of the testbed keep their argparse options: allow that class only
        with torch.serialization.safe_globals([argparse.Namespace]):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure becomes one line
        from cdir.core.errors import unreadable

        raise unreadable(path, e, "teacher checkpoint") from None
    if isinstance(ckpt, dict):
        for key in ("model", "state_dict"):
            if isinstance(ckpt.get(key), dict):
                ckpt = ckpt[key]
                break
    if not isinstance(ckpt, dict) or not ckpt or not all(
            isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise CdirError(f"{path} holds no state dict (expected {{'model': state_dict}} or a "
                        "bare state dict)")
    for prefix in _WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in ckpt):
            ckpt = {k[len(prefix):]: v for k, v in ckpt.items()}
    return ckpt


def _few(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


def load_teacher(path: str | os.PathLike, name: str, num_classes: int = 100,
                 sha256: str | None = None) -> nn.Module:
    """Build zoo model ``name`` and load a testbed checkpoint into it, strictly.

    Accepts ``{'model': state_dict}`` (RepDistiller's format; extra entries such as ``epoch``,
    ``accuracy`` or ``optimizer`` are ignored), ``{'state_dict': ...}`` or a bare state dict,
    with or without a ``module.`` prefix. ``sha256`` (hex): the file must hash to it. Returns the
    model in eval mode with its parameters frozen.
    """
    from cdir.core.io import sha256_file

    path = Path(path)
    if sha256 is not None:
        if not path.is_file():
            raise CdirError(f"no teacher checkpoint at {path}")
        actual = sha256_file(path)
        if actual.lower() != sha256.strip().lower():
            raise CdirError(f"{path}: sha256 is {actual}, expected {sha256.strip().lower()}")
    sd = _read_state_dict(path)
    model = create_model(name, num_classes)
    own = model.state_dict()
    # checkpoints from before PyTorch 0.4.1 lack BatchNorm's counters; loading fills them in
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise CdirError(
            f"{path} does not fit {name}: {len(missing)} missing key(s) ({_few(missing)}), "
            f"{len(unexpected)} unexpected ({_few(unexpected)})")
    wrong = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
             if k in sd and sd[k].shape != v.shape]
    if wrong:
        raise CdirError(f"{path} does not fit {name} with {num_classes} classes: {len(wrong)} "
                        f"tensor(s) of another shape ({_few(wrong)})")
    model.load_state_dict(sd, strict=True)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model
