"""Retrieval modes: which vectors score a query against the gallery, and how modes are fused.

- ``visual``:   query image ↔ gallery image, any image encoder (``--encoder``).
- ``cm-text``:  query caption ↔ gallery caption, both through a text encoder (``--text-encoder``).
- ``cm-image``: query image (CLIP image tower) ↔ gallery caption (the same CLIP's text tower), the
                Caption-Matching paper's first formulation (``--clip``).
- ``fusion``:   a weighted sum of per-query standardised similarities of several modes
                (``zscore``), or reciprocal-rank fusion (``rrf``).

Every mode is a scorer over manifest rows (see ``eval.topk``), so the same blockwise top-k, index
and evaluation code serves all of them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from cdir.core.errors import CdirError

if TYPE_CHECKING:
    import pandas as pd

    from cdir.core.workspace import Workspace

MODES = ("visual", "cm-text", "cm-image", "fusion")


@dataclass
class ModeConfig:
    encoder: str | None = None  # image encoder of `visual`
    text_encoder: str | None = None  # text encoder of `cm-text`
    clip: str | None = None  # CLIP of `cm-image` (image tower for queries, text tower for captions)
    captions: str | None = None  # caption source key
    fusion: tuple[str, ...] = ()  # the modes fused; default: every other mode that is configured
    weights: dict[str, float] = field(default_factory=dict)
    fusion_method: str = "zscore"


def image_vectors(ws: Workspace, manifest: pd.DataFrame, spec: str
                  ) -> tuple[np.ndarray, np.ndarray]:
    from cdir.core.store import EmbeddingStore

    store = EmbeddingStore(ws.embeddings_dir(spec))
    if not store.exists():
        raise CdirError(f"no image embeddings for {spec} in {ws.root}: "
                        f"run `cdir embed -w {ws.root} --encoder {spec}` first")
    return store.load(manifest)


def caption_vectors(ws: Workspace, manifest: pd.DataFrame, captions: str | None,
                    text_spec: str) -> tuple[np.ndarray, np.ndarray]:
    from cdir.core.store import EmbeddingStore
    from cdir.stages.embed_captions import caption_embeddings_dir, resolve_caption_source

    key = resolve_caption_source(ws, captions)
    store = EmbeddingStore(caption_embeddings_dir(ws, key, text_spec))
    if not store.exists():
        raise CdirError(f"no embeddings of the captions {key!r} with {text_spec}: run "
                        f"`cdir embed -w {ws.root} --captions {key} --text-encoder {text_spec}`")
    return store.load(manifest)


def configured_modes(cfg: ModeConfig) -> list[str]:
    """The single modes the configuration provides vectors for."""
    modes = []
    if cfg.encoder:
        modes.append("visual")
    if cfg.text_encoder and cfg.captions is not None:
        modes.append("cm-text")
    if cfg.clip and cfg.captions is not None:
        modes.append("cm-image")
    return modes


def mode_vectors(ws: Workspace, manifest: pd.DataFrame, mode: str, cfg: ModeConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query vectors, gallery vectors, valid rows) of a single mode."""
    if mode == "visual":
        if not cfg.encoder:
            raise CdirError("mode visual needs --encoder")
        x, ok = image_vectors(ws, manifest, cfg.encoder)
        return x, x, ok
    if mode == "cm-text":
        if not cfg.text_encoder:
            raise CdirError("mode cm-text needs --text-encoder (e.g. st:all-MiniLM-L6-v2)")
        t, ok = caption_vectors(ws, manifest, cfg.captions, cfg.text_encoder)
        return t, t, ok
    if mode == "cm-image":
        if not cfg.clip:
            raise CdirError("mode cm-image needs --clip (a clip: spec with image and text towers)")
        img, ok_i = image_vectors(ws, manifest, cfg.clip)
        txt, ok_t = caption_vectors(ws, manifest, cfg.captions, cfg.clip)
        return img, txt, ok_i & ok_t
    raise CdirError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")


def build_scorer(ws: Workspace, manifest: pd.DataFrame, mode: str, cfg: ModeConfig,
                 device: str | None = None):
    """A scorer for ``mode`` over the rows that have every vector it needs.

    Returns (scorer, valid): rows without vectors (unreadable images, missing captions) are left
    out; the scorer is indexed by positions in ``manifest[valid]``.
    """
    from eval.topk import CosineScorer

    if mode != "fusion":
        q, g, ok = mode_vectors(ws, manifest, mode, cfg)
        return CosineScorer(q[ok], g[ok], device=device), ok
    parts = list(cfg.fusion) or configured_modes(cfg)
    if len(parts) < 2:
        raise CdirError("fusion needs at least two modes: give --encoder and --captions with "
                        "--text-encoder and/or --clip, or --fuse MODE,MODE")
    vecs = [mode_vectors(ws, manifest, m, cfg) for m in parts]
    ok = np.logical_and.reduce([v[2] for v in vecs])
    scorers = [CosineScorer(q[ok], g[ok], device=device) for q, g, _ in vecs]
    weights = [cfg.weights.get(m, 1.0) for m in parts]
    from eval.fusion import FusionScorer

    return FusionScorer(scorers, weights, cfg.fusion_method), ok


def parse_weights(text: str | None) -> dict[str, float]:
    """'visual=0.3,cm-text=0.7' → {'visual': 0.3, 'cm-text': 0.7}."""
    out: dict[str, float] = {}
    for part in filter(None, (text or "").split(",")):
        name, sep, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise CdirError(f"bad weight {part!r}: use MODE=NUMBER, e.g. visual=0.3") from None
        if not sep or name.strip() not in MODES[:3]:
            raise CdirError(f"bad weight {part!r}: modes are {', '.join(MODES[:3])}")
    return out
