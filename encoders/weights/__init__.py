"""The encoders shipped with the project, usable offline (no model hub): ``emoji_adapted.pt``,
trained with SynCo and then `cdir adapt` on the emoji gallery, and ``emoji_synco.pt``, the SynCo
encoder it started from. ``default_encoder()`` is the spec the demo and `make run` use."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_WEIGHTS = "emoji_adapted.pt"
# the features of the default encoder: a 4x4 grid of pooled stage-3 and stage-4 maps
DEFAULT_OPTIONS = "grid=4&layers=3,4"


def shipped(name: str) -> str:
    """The path of the shipped weights file ``name``, relative to the current folder when it is
    below it: the spec names the embeddings folder, so a short one keeps that name short."""
    path = Path(__file__).resolve().parent / name
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def default_encoder() -> str:
    """The spec of the default offline encoder: ``ckpt:<emoji_adapted.pt>?grid=4&layers=3,4``."""
    return f"ckpt:{shipped(DEFAULT_WEIGHTS)}?{DEFAULT_OPTIONS}"
