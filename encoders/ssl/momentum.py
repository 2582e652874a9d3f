"""The momentum encoder and its projection head of a checkpoint, as one feature extractor: the
features UCDIR and ProtoOT evaluate (``ckpt:PATH?features=head``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdir.core.errors import CdirError
from encoders.engine.checkpoint import load_strict, read_file, reference_encoder
from encoders.ssl.heads import mlp


def _reference_momentum_head(ckpt: Any, path: Path) -> tuple[nn.Module, int]:
    """Momentum encoder + ``fc`` head of a reference MoCo/SynCo checkpoint (``encoder_k.*``)."""
    from encoders.zoo.backbones import build_backbone

    sd = ckpt.get("state_dict", ckpt.get("model")) if isinstance(ckpt, dict) else None
    sub: dict[str, torch.Tensor] = {}
    if isinstance(sd, dict):
        for prefix in ("module.encoder_k.", "encoder_k."):
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if "conv1.weight" in sub:
                break
    fc = {k[len("fc."):]: v for k, v in sub.items() if k.startswith("fc.")}
    if "conv1.weight" not in sub or not fc:
        raise CdirError(f"{path}: features=head needs the momentum encoder and its projection "
                        "head, which this file does not hold: use the full training checkpoint "
                        "of `cdir train` (latest.pt or checkpoint_XXXX.pt; an exported "
                        "encoder.pt has only the backbone) or a MoCo checkpoint with encoder_k")
    if "weight" in fc:  # MoCo v1: one linear layer
        head: nn.Module = nn.Linear(fc["weight"].shape[1], fc["weight"].shape[0])
    elif {"0.weight", "2.weight"} <= set(fc):  # MoCo v2 MLP: Linear, ReLU, Linear
        head = mlp(fc["0.weight"].shape[1], fc["0.weight"].shape[0], fc["2.weight"].shape[0])
    else:
        raise CdirError(f"{path}: unknown projection head layout {sorted(fc)[:6]}")
    backbone_sd, arch = reference_encoder({"state_dict": sub, "arch": ckpt.get("arch")}, path)
    backbone, _ = build_backbone(arch["name"], **arch.get("kwargs", {}))
    load_strict(backbone, backbone_sd, path, arch["name"])
    load_strict(head, fc, path, "the projection head")
    out_dim = head.out_features if isinstance(head, nn.Linear) else head[-1].out_features
    return nn.Sequential(backbone, head), int(out_dim)


def load_momentum_head(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, int]:
    """The momentum encoder followed by its projection head, ``(module, head_dim)``: the features
    UCDIR and ProtoOT evaluate (``ckpt:PATH?features=head``).

    Needs a full training checkpoint of this project (MoCo/SynCo ``encoder_k`` + ``head_k``, ISD
    ``encoder_k`` + ``proj_k``) or a reference MoCo checkpoint (``module.encoder_k.*`` with its
    ``fc`` head); an exported encoder holds the backbone only and raises CdirError."""
    from encoders.ssl.plugin import build_method

    path = Path(path)
    ckpt = read_file(path, map_location)
    if not (isinstance(ckpt, dict) and "encoder_arch" in ckpt):
        model, dim = _reference_momentum_head(ckpt, path)
        return model.to(map_location).eval(), dim
    if "model" not in ckpt or not ckpt.get("method"):
        raise CdirError(f"{path} is an exported encoder: it holds only the backbone, not the "
                        "momentum encoder and its projection head; features=head needs the full "
                        "training checkpoint of `cdir train` (latest.pt or checkpoint_XXXX.pt)")
    arch = ckpt["encoder_arch"]
    kwargs = dict((ckpt.get("config") or {}).get("method_kwargs") or {})
    # the method as it was trained, so every key of its momentum encoder and head must fit
    method = build_method(ckpt["method"], arch["name"], dict(arch.get("kwargs", {})), **kwargs)
    name = "head_k" if hasattr(method, "head_k") else "proj_k"
    model = nn.Sequential(method.encoder_k, getattr(method, name))
    for i, prefix in enumerate(("encoder_k.", f"{name}.")):
        part = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
        load_strict(model[i], part, path, f"{ckpt['method']}'s {prefix.rstrip('.')}")
    with torch.no_grad():  # the head's output size (MoCo's queue dim, UCDIR's bank dim)
        size = int(ckpt.get("config", {}).get("aug", {}).get("size", 224))
        dim = model.eval()(torch.zeros(2, 3, size, size)).shape[1]
    return model.to(map_location).eval(), int(dim)
