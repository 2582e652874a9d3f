"""Retrieval modes: which vectors score a query against the gallery, and how modes are fused.

- ``visual``:   query image ↔ gallery image, any image encoder (``--encoder``).
- ``cm-text``:  query caption ↔ gallery caption, both through a text encoder (``--text-encoder``).
- ``cm-image``: query image (CLIP image tower) ↔ gallery caption (the same CLIP's text tower), the
                Caption-Matching paper's first formulation (``--clip``).
- ``fusion``:   a weighted sum of per-query standardised similarities of several modes
                (``zscore``), or reciprocal-rank fusion (``rrf``).

Every mode is a scorer over manifest rows (see ``eval.topk``), so the same blockwise top-k, index
and evaluation code serves all of them. numpy is imported inside the functions: the command line
reads `MODES` while it builds its parser.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cdir.core.errors import CdirError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from cdir.core.workspace import Workspace
    from eval.fusion import FusionScorer
    from eval.topk import CosineScorer


@dataclass(frozen=True)
class Mode:
    """What a mode scores with. ``model``: the `ModeConfig` field naming its model (None for
    fusion, which combines the others); ``query`` / ``gallery``: "image" or "caption" vectors of
    that model; ``needs``: how to give the model; ``about``: one line for reports."""

    model: str | None
    query: str
    gallery: str
    needs: str
    about: str

    @property
    def captions(self) -> bool:
        """Does the mode read a caption source?"""
        return "caption" in (self.query, self.gallery)


MODES: dict[str, Mode] = {
    "visual": Mode(
        "encoder", "image", "image", "--encoder",
        "query image against gallery images with an image encoder (CM v1's CLIP image-to-image "
        "ablation when the encoder is CLIP)"),
    "cm-text": Mode(
        "text_encoder", "caption", "caption", "--text-encoder (e.g. st:all-MiniLM-L6-v2)",
        "query caption against gallery captions, both through a text encoder "
        "(caption-to-caption; a variant the later CM versions may use, unverified)"),
    "cm-image": Mode(
        "clip", "image", "caption", "--clip (a clip: spec with image and text towers)",
        "query image (CLIP image tower) against the gallery's captions (the same CLIP's text "
        "tower): the CM paper's image-to-caption matching"),
    "fusion": Mode(
        None, "fused", "fused", "two single modes",
        "weighted sum of per-query standardised scores of the modes named"),
}
SINGLE_MODES = tuple(m for m, spec in MODES.items() if spec.model)  # the modes fusion combines


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
    from cdir.core.caption_store import resolve_source
    from cdir.core.store import EmbeddingStore
    from cdir.stages.embed import caption_embeddings_dir

    key = resolve_source(ws, captions)
    store = EmbeddingStore(caption_embeddings_dir(ws, key, text_spec))
    if not store.exists():
        raise CdirError(f"no embeddings of the captions {key!r} with {text_spec}: run "
                        f"`cdir embed -w {ws.root} --captions {key} --text-encoder {text_spec}`")
    return store.load(manifest)


def configured_modes(cfg: ModeConfig) -> list[str]:
    """The single modes the configuration provides vectors for."""
    return [m for m in SINGLE_MODES if getattr(cfg, MODES[m].model)
            and (cfg.captions is not None or not MODES[m].captions)]


def mode_models(mode: str, cfg: ModeConfig) -> list[str]:
    """The model specs a mode scores with (every configured one for fusion)."""
    return [spec for m in SINGLE_MODES if mode in (m, "fusion")
            for spec in [getattr(cfg, MODES[m].model)] if spec]


def mode_vectors(ws: Workspace, manifest: pd.DataFrame, mode: str, cfg: ModeConfig
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(query vectors, gallery vectors, valid rows) of a single mode."""
    if mode not in SINGLE_MODES:
        raise CdirError(f"unknown mode {mode!r}: choose from {', '.join(MODES)}")
    m = MODES[mode]
    spec = getattr(cfg, m.model)
    if not spec:
        raise CdirError(f"mode {mode} needs {m.needs}")

    def vectors(kind: str) -> tuple[np.ndarray, np.ndarray]:
        if kind == "image":
            return image_vectors(ws, manifest, spec)
        return caption_vectors(ws, manifest, cfg.captions, spec)

    q, ok = vectors(m.query)
    if m.gallery == m.query:
        return q, q, ok
    g, ok_g = vectors(m.gallery)
    return q, g, ok & ok_g


def build_scorer(ws: Workspace, manifest: pd.DataFrame, mode: str, cfg: ModeConfig,
                 device: str | None = None) -> tuple[CosineScorer | FusionScorer, np.ndarray]:
    """A scorer for ``mode`` over the rows that have every vector it needs.

    Returns (scorer, valid): rows without vectors (unreadable images, missing captions) are left
    out; the scorer is indexed by positions in ``manifest[valid]``.
    """
    import numpy as np

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
        if not sep or name.strip() not in SINGLE_MODES:
            raise CdirError(f"bad weight {part!r}: modes are {', '.join(SINGLE_MODES)}")
    return out
