"""The distillation model zoo: a name -> constructor registry (like timm's ``create_model``).

``create_model(name, num_classes=100)`` builds a randomly initialised model; every model maps
images (B, 3, H, W) to ``NetOutput(feat, logits)`` (``encoders.zoo.common``): the
pooled penultimate features (B, model.feat_dim) and the logits (B, num_classes).

Names are the CRD testbed's (RepDistiller), because its teacher folders are named after them
(``<name>_vanilla/ckpt_epoch_240.pth``), and the state-dict keys are the testbed's too, so its
published teacher checkpoints load with ``load_teacher``:

- CIFAR (32 px): resnet8/14/20/32/44/56/110 (64-d), resnet8x4/resnet32x4 (256), wrn_16_1 and
  wrn_40_1 (64), wrn_16_2 and wrn_40_2 (128), vgg8/11/13/16/19 with BN (512), MobileNetV2
  (the testbed's half-width variant, 1280; its older name ``mobile_half`` is accepted too),
  ShuffleV1 (960), ShuffleV2 (1024), ResNet50 (the CIFAR-stem ResNet-50, 2048).
- ImageNet: resnet18_imagenet, resnet34_imagenet (512), resnet50_imagenet (2048): torchvision
  models and keys. (Named apart from the CIFAR ``ResNet50``, which differs only in case.)

The architecture modules (and torch) are imported when a model is built, so listing the names
is cheap.
"""

from __future__ import annotations

import argparse
import importlib
import os
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

# name -> (module under encoders.zoo, class, constructor keyword arguments)
_MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "resnet8": ("resnet", "CifarResNet", {"depth": 8, "widths": _SMALL}),
    "resnet14": ("resnet", "CifarResNet", {"depth": 14, "widths": _SMALL}),
    "resnet20": ("resnet", "CifarResNet", {"depth": 20, "widths": _SMALL}),
    "resnet32": ("resnet", "CifarResNet", {"depth": 32, "widths": _SMALL}),
    "resnet44": ("resnet", "CifarResNet", {"depth": 44, "widths": _SMALL}),
    "resnet56": ("resnet", "CifarResNet", {"depth": 56, "widths": _SMALL}),
    "resnet110": ("resnet", "CifarResNet", {"depth": 110, "widths": _SMALL}),
    "resnet8x4": ("resnet", "CifarResNet", {"depth": 8, "widths": _X4}),
    "resnet32x4": ("resnet", "CifarResNet", {"depth": 32, "widths": _X4}),
    "ResNet50": ("resnet", "CifarResNet50", {}),
    "wrn_16_1": ("wrn", "WideResNet", {"depth": 16, "widen": 1}),
    "wrn_16_2": ("wrn", "WideResNet", {"depth": 16, "widen": 2}),
    "wrn_40_1": ("wrn", "WideResNet", {"depth": 40, "widen": 1}),
    "wrn_40_2": ("wrn", "WideResNet", {"depth": 40, "widen": 2}),
    "vgg8": ("vgg", "VGG", {"depth": 8}),
    "vgg11": ("vgg", "VGG", {"depth": 11}),
    "vgg13": ("vgg", "VGG", {"depth": 13}),
    "vgg16": ("vgg", "VGG", {"depth": 16}),
    "vgg19": ("vgg", "VGG", {"depth": 19}),
    "MobileNetV2": ("mobilenetv2", "MobileNetV2", {"expansion": 6, "width": 0.5}),
    "ShuffleV1": ("shufflenet", "ShuffleNetV1", {}),
    "ShuffleV2": ("shufflenet", "ShuffleNetV2", {}),
    "resnet18_imagenet": ("imagenet", "TorchvisionResNet", {"arch": "resnet18"}),
    "resnet34_imagenet": ("imagenet", "TorchvisionResNet", {"arch": "resnet34"}),
    "resnet50_imagenet": ("imagenet", "TorchvisionResNet", {"arch": "resnet50"}),
}
# earlier names of a model: RepDistiller called MobileNetV2 mobile_half before renaming it
_ALIASES = {"mobile_half": "MobileNetV2"}

# prefixes that wrappers (DataParallel, DDP) put in front of every key
_WRAPPER_PREFIXES = ("module.",)


def list_models() -> list[str]:
    """The zoo's model names (aliases not included)."""
    return list(_MODELS)


def canonical_name(name: str) -> str:
    """``name`` with aliases resolved; unknown names raise CdirError listing the known ones."""
    name = _ALIASES.get(name, name)
    if name not in _MODELS:
        raise CdirError(f"unknown model {name!r}; choose one of {', '.join(_MODELS)}")
    return name


def create_model(name: str, num_classes: int = 100) -> nn.Module:
    """A randomly initialised zoo model; it has ``feat_dim`` and returns ``NetOutput``."""
    module, cls, kwargs = _MODELS[canonical_name(name)]
    if int(num_classes) < 1:
        raise CdirError(f"num_classes must be positive, got {num_classes}")
    mod = importlib.import_module(f"encoders.zoo.{module}")
    return getattr(mod, cls)(num_classes=int(num_classes), **kwargs)


def teacher_name_from_path(path: str | os.PathLike) -> str:
    """The model name the testbed encodes in a teacher's folder (``<name>_vanilla/...``): the
    longest zoo name that the folder name starts with, followed by ``_`` or nothing."""
    folder = Path(path).parent.name
    hits = [n for n in (*_MODELS, *_ALIASES) if folder == n or folder.startswith(n + "_")]
    if not hits:
        raise CdirError(f"cannot tell the teacher model from the folder name {folder!r}; "
                        f"name it <model>_vanilla with a model from {', '.join(_MODELS)}")
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
        why = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise CdirError(f"cannot read teacher checkpoint {path}: {why}") from e
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
