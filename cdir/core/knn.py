"""Blockwise nearest neighbours by cosine: rows of ``a`` against all rows of ``b`` (both
L2-normalised, so the cosine is the dot product), a block of rows of ``a`` at a time, so that
never more than one block of the similarity matrix is in memory.

A block holds at most ``block`` rows and, with ``memory_mb``, no more rows than fit that budget of
float32 cells. Used by the correspondence mining of adaptation (``encoders.adapt.mining``) and by
the hubness corrections of the search-time normalisation (``indexes.normalize``, CSLS).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from cdir.core.errors import CdirError

DEFAULT_BLOCK = 4096
# Working memory of one block of similarities (float32 cells).
DEFAULT_MEMORY_MB = 256


def as_matrix(x: np.ndarray, what: str = "embeddings") -> np.ndarray:
    """``x`` as a float32 (rows x dim) array; CdirError when it is not 2-d or not finite."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise CdirError(f"{what} must be a 2-d array (rows x dim), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise CdirError(f"{what} hold non-finite values")
    return x


def block_rows(block: int, n_cols: int, memory_mb: float) -> int:
    """Rows per block: at most ``block``, and at most what ``memory_mb`` holds of ``n_cols``
    float32 cells a row; at least one."""
    return max(1, min(block, int(memory_mb * 2**20 // (4 * max(n_cols, 1)))))


def similarity_blocks(a: np.ndarray, b: np.ndarray, block: int = DEFAULT_BLOCK,
                      memory_mb: float = DEFAULT_MEMORY_MB, cells_per_column: int = 1
                      ) -> Iterator[tuple[slice, np.ndarray]]:
    """(rows of ``a``, their similarities to every row of ``b``) a block at a time;
    ``cells_per_column``: the float32 cells the caller keeps per similarity (its masks too)."""
    step = block_rows(block, cells_per_column * len(b), memory_mb)
    for s in range(0, len(a), step):
        rows = slice(s, min(s + step, len(a)))
        yield rows, a[rows] @ b.T


def top_k(sims: np.ndarray, k: int) -> np.ndarray:
    """Column indices of the k largest entries of each row, best first, ties to the lower
    column (also at the k-th place, where argpartition alone picks arbitrarily)."""
    n = sims.shape[1]
    kth = np.partition(sims, n - k, axis=1)[:, n - k][:, None]
    chosen = sims > kth
    need = k - chosen.sum(1)  # places left for entries equal to the k-th value
    equal = sims == kth
    tied = np.flatnonzero(equal.sum(1) > need)  # rows where not every equal entry fits
    chosen |= equal
    if len(tied):
        extra = np.cumsum(equal[tied], axis=1) > need[tied][:, None]
        chosen[tied] &= ~(equal[tied] & extra)
    top = np.nonzero(chosen)[1].reshape(len(sims), k)  # ascending columns per row
    order = np.argsort(-np.take_along_axis(sims, top, 1), axis=1, kind="stable")
    return np.take_along_axis(top, order, axis=1)


def nearest(a: np.ndarray, b: np.ndarray, k: int = 1, block: int = DEFAULT_BLOCK,
            memory_mb: float = DEFAULT_MEMORY_MB) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` nearest rows of ``b`` to each row of ``a``: (indices [n_a, k] int64,
    similarities [n_a, k] float32), best first, ties to the lower index. Columns beyond len(b)
    hold index -1 and similarity -inf."""
    a, b = as_matrix(a, "a"), as_matrix(b, "b")
    k = max(1, int(k))
    kk = min(k, len(b))
    idx = np.full((len(a), k), -1, np.int64)
    sim = np.full((len(a), k), -np.inf, np.float32)
    if kk == 0:
        return idx, sim
    # the similarities plus the selection masks of top_k
    for rows, sims in similarity_blocks(a, b, block, memory_mb, cells_per_column=2):
        top = sims.argmax(1)[:, None] if kk == 1 else top_k(sims, kk)
        idx[rows, :kk] = top
        sim[rows, :kk] = np.take_along_axis(sims, top, 1)
    return idx, sim


def neighbourhood_mean(a: np.ndarray, b: np.ndarray, k: int = 10, block: int = DEFAULT_BLOCK,
                       memory_mb: float = DEFAULT_MEMORY_MB) -> np.ndarray:
    """r(x) for each row x of ``a``: the mean cosine to its ``k`` nearest rows of ``b``; k is
    capped at len(b)."""
    a, b = as_matrix(a), as_matrix(b)
    if len(b) == 0:
        raise CdirError("neighbourhood_mean needs a non-empty second collection")
    k = max(1, min(int(k), len(b)))
    out = np.empty(len(a), np.float32)
    for rows, sims in similarity_blocks(a, b, block, memory_mb):
        top = np.partition(sims, len(b) - k, axis=1)[:, len(b) - k:]
        out[rows] = top.mean(1, dtype=np.float64)
    return out
