"""Reading back the files of zoo models (a distillation student or teacher of this project)::

    {"model": state_dict, "zoo_arch": "resnet8x4", "num_classes": 100,
     "preprocess": {"size": 32, "mean": [...], "std": [...], "eval_resize": 1.0}, "version": 1,
     ... what the run adds (epoch, accuracy, classes, dataset, selected_on)}

``ckpt:PATH`` loads such a file as an image encoder (its pooled penultimate features), which is
how ``cdir eval transfer`` and ``cdir embed`` use a student. The distillation run writes them
(``encoders.distill.export.save_zoo_model``).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from cdir.core.errors import CdirError

ZOO_KEY = "zoo_arch"


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
