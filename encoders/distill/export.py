"""The files a distillation run writes for its student, and reading them back.

Labelled runs (zoo models) write ``last.pt`` / ``best.pt`` in the testbed's format, so its own
tools and ``load_teacher`` read them, plus what this project needs to use the model alone::

    {"model": state_dict, "epoch": E, "accuracy": top-1 % on the test set,
     "zoo_arch": "resnet8x4", "num_classes": 100, "classes": [...], "dataset": "cifar100",
     "selected_on": "last" | "val" | "test",
     "preprocess": {"size": 32, "mean": [...], "std": [...], "eval_resize": 1.0}, "version": 1}

``ckpt:PATH`` loads such a file as an image encoder (its pooled penultimate features), which is
how ``cdir eval transfer`` and ``cdir embed`` use a student. Label-free students are ordinary
backbone encoders (``encoders.engine.checkpoint.export_encoder``) with an embedding head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdir.core.errors import CdirError

ZOO_KEY = "zoo_arch"


def save_zoo_model(path: str | os.PathLike, model: nn.Module, name: str, num_classes: int,
                   preprocess: dict[str, Any], **meta: Any) -> Path:
    """Write a zoo model's weights (fp32, CPU) with its name and preprocessing, atomically."""
    from encoders.engine.checkpoint import save_checkpoint

    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return save_checkpoint(path, {"version": 1, "model": sd, ZOO_KEY: name,
                                  "num_classes": int(num_classes), "preprocess": preprocess,
                                  **meta})


def is_zoo_file(ckpt: Any) -> bool:
    return isinstance(ckpt, dict) and ZOO_KEY in ckpt and "model" in ckpt


class PooledFeatures(nn.Module):
    """A zoo model as a feature extractor: images -> its pooled penultimate features."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.out_dim = int(model.feat_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).feat


def load_zoo_model(ckpt: dict, path: str | os.PathLike) -> nn.Module:
    """The zoo model of a student/teacher file written by :func:`save_zoo_model` (strict keys),
    in eval mode."""
    from encoders.zoo import create_model

    model = create_model(ckpt[ZOO_KEY], int(ckpt.get("num_classes", 100)))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in ckpt["model"].items()}
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CdirError(f"{path}: weights do not fit {ckpt[ZOO_KEY]}: missing "
                        f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return model.eval()


def zoo_preprocess(ckpt: dict) -> dict[str, Any]:
    pp = dict(ckpt.get("preprocess") or {})
    return {"size": int(pp.get("size", 32)), "mean": list(pp.get("mean", (0.5, 0.5, 0.5))),
            "std": list(pp.get("std", (0.5, 0.5, 0.5))),
            "eval_resize": float(pp.get("eval_resize", 1.0))}
