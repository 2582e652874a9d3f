"""The encoders shipped with the project, usable offline (no model hub): ``emoji_student.pt``,
the default (64 px, 512-d), distilled without labels from ``emoji_adapted.pt`` (128 px, trained
with SynCo and then `cdir adapt` on the emoji gallery), and ``emoji_synco.pt``, the SynCo encoder
the adapted one started from. ``default_encoder()`` is the spec the demo and `make run` use."""

from __future__ import annotations

import os
from pathlib import Path

DEFAULT_WEIGHTS = "emoji_student.pt"


def shipped(name: str) -> str:
    """The path of the shipped weights file ``name``, relative to the current folder when it is
    below it: the spec names the embeddings folder, so a short one keeps that name short."""
    path = Path(__file__).resolve().parent / name
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else str(path)


def default_encoder() -> str:
    """The spec of the default offline encoder: ``ckpt:<emoji_student.pt>`` (its embedding is
    its own 512-d output: no feature options)."""
    return f"ckpt:{shipped(DEFAULT_WEIGHTS)}"
