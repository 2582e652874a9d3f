"""Choosing fusion weights without peeking at the reported queries: the weights are swept on a
deterministic half of the queries (by a hash of their id) and the other half is reported."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

    from cdir.retrieval import FusionScorer


def tuning_half(ids: Sequence[str]) -> np.ndarray:
    """True for the queries used to tune: a stable half, independent of row order."""
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
