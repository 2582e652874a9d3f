"""Score fusion: several retrieval modes combined into one scorer, and its weights chosen without
peeking at the reported queries (swept on a deterministic half of the queries, by a hash of their
id; the other half is reported). numpy and torch are imported inside the functions: the command
line reads `FUSION_METHODS` while it builds its parser."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from cdir.core.errors import CdirError

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd
    import torch

RRF_K = 60  # the constant of Cormack et al. (2009)


def _zscore(s: torch.Tensor) -> torch.Tensor:
    """Each query's scores standardised over the gallery, so modes on different scales weigh as
    intended."""
    import torch

    mean = s.mean(dim=1, keepdim=True)
    std = s.std(dim=1, keepdim=True) if s.shape[1] > 1 else torch.ones_like(mean)
    return (s - mean) / std.clamp_min(1e-6)


def _rrf(s: torch.Tensor) -> torch.Tensor:
    """Reciprocal rank, 1 / (RRF_K + rank), with ranks over the gallery (ties: lower row first)."""
    import torch

    order = s.argsort(dim=1, descending=True, stable=True)
    ranks = torch.empty_like(order)
    ar = torch.arange(1, s.shape[1] + 1, device=s.device).expand_as(order)
    ranks.scatter_(1, order, ar)
    return 1.0 / (RRF_K + ranks.float())


# fusion method -> the per-query normaliser applied to each mode's scores before the weighted sum
FUSION_METHODS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "zscore": _zscore, "rrf": _rrf}


class FusionScorer:
    """Combine scorers: ``zscore`` standardises each mode's scores per query over the gallery
    (so modes on different scales weigh as intended) and sums them with the weights; ``rrf`` sums
    weight / (RRF_K + rank) with ranks over the gallery."""

    def __init__(self, scorers: list, weights: list[float], method: str = "zscore"):
        if method not in FUSION_METHODS:
            raise CdirError(f"unknown fusion method {method!r}: use {' or '.join(FUSION_METHODS)}")
        if len(scorers) != len(weights) or not scorers:
            raise CdirError("fusion needs one weight per fused mode")
        self.scorers, self.weights, self.method = scorers, [float(w) for w in weights], method

    @property
    def num_rows(self) -> int:
        return self.scorers[0].num_rows

    def scores(self, query_rows: np.ndarray, gallery_rows: np.ndarray) -> torch.Tensor:
        normalise = FUSION_METHODS[self.method]
        total = None
        for scorer, w in zip(self.scorers, self.weights, strict=True):
            if w == 0:
                continue
            part = normalise(scorer.scores(query_rows, gallery_rows).float())
            total = w * part if total is None else total + w * part
        if total is None:
            raise CdirError("every fusion weight is zero")
        return total


def tuning_half(ids: Sequence[str]) -> np.ndarray:
    """True for the queries used to tune: a stable half, independent of row order."""
    import numpy as np

    return np.array([hashlib.sha1(str(i).encode()).digest()[0] % 2 == 0 for i in ids], bool)


def weight_grid(n_modes: int, steps: int = 10) -> list[tuple[float, ...]]:
    """Every weight vector on the simplex with a resolution of 1/steps (sum = 1)."""
    grid = [c for c in itertools.product(range(steps + 1), repeat=n_modes) if sum(c) == steps]
    return [tuple(x / steps for x in c) for c in grid]


def sweep_weights(scorer: FusionScorer, manifest: pd.DataFrame,
                  pairs: list[tuple[str, str]] | None, ks: Sequence[int],
                  mode_names: Sequence[str], steps: int = 10
                  ) -> tuple[FusionScorer, dict[str, float], np.ndarray]:
    """Pick the weights with the best mean UCDIR P@(first k) on the tuning half; return the scorer
    set to them, the weights by mode, and the mask of the held-out queries to report on."""
    import numpy as np

    from eval.protocol import evaluate_pairs

    tune = tuning_half(manifest["id"].tolist())
    best, best_score = None, -np.inf
    for w in weight_grid(len(scorer.scorers), steps):
        scorer.weights = list(w)
        rows = evaluate_pairs(scorer, manifest, pairs=pairs, ks=(ks[0],), metrics=("ucdir_p",),
                              query_mask=tune, progress=False)
        score = rows[-1][f"P@{ks[0]}"]
        if score > best_score:  # strict: ties keep the earlier (more visual-weighted) point
            best, best_score = w, score
    scorer.weights = list(best)
    return scorer, dict(zip(mode_names, best, strict=True)), ~tune
