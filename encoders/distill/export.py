"""The files a distillation run writes for its student.

Labelled runs (zoo models) write ``last.pt`` / ``best.pt`` in the testbed's format, so its own
tools and ``load_teacher`` read them, plus what this project needs to use the model alone
(the layout and the reading side: :mod:`encoders.zoo.files`)::

    {"model": state_dict, "epoch": E, "accuracy": top-1 % on the test set,
     "zoo_arch": "resnet8x4", "num_classes": 100, "classes": [...], "dataset": "cifar100",
     "selected_on": "last" | "val" | "test",
     "preprocess": {"size": 32, "mean": [...], "std": [...], "eval_resize": 1.0}, "version": 1}

Label-free students are ordinary backbone encoders (``encoders.engine.checkpoint.export_encoder``)
with an embedding head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from torch import nn

from encoders.engine.checkpoint import save_checkpoint
from encoders.zoo.files import ZOO_KEY


def save_zoo_model(path: str | os.PathLike, model: nn.Module, name: str, num_classes: int,
                   preprocess: dict[str, Any], **meta: Any) -> Path:
    """Write a zoo model's weights (fp32, CPU) with its name and preprocessing, atomically."""
    sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    return save_checkpoint(path, {"version": 1, "model": sd, ZOO_KEY: name,
                                  "num_classes": int(num_classes), "preprocess": preprocess,
                                  **meta})
