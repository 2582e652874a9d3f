"""Blockwise top-k retrieval over a *scorer*, never materialising the full query x gallery matrix.

A scorer is any object with

    scores(query_rows: np.ndarray, gallery_rows: np.ndarray) -> torch.Tensor

returning a (len(query_rows), len(gallery_rows)) float tensor, higher = more similar. Rows are
manifest row positions. :class:`CosineScorer` is the plain one; score fusion adds others.

Ranking rule (deterministic, independent of ``torch.topk``'s unstable order):
    higher score first; among equal scores, the lower *gallery position* first (the position in
    ``gallery_rows``; evaluation passes ascending manifest rows, so that is the lower manifest row).
This is the order a stable descending sort gives, e.g. ``np.argsort(-s, kind="stable")``.

With ``exclude_self=True`` a gallery item that is the query's own manifest row is never returned:
its score is set to -inf, and if it still lands in the top k (only when k reaches the gallery size)
its position is reported as -1 (score -inf), which metrics count as a miss.
Scorers must not return NaN (a CdirError is raised); +/-inf scores are ranked like numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

import numpy as np
import torch

from cdir.core.device import resolve_device
from cdir.core.errors import CdirError

# Working memory one query block may use (score matrix plus the temporaries of the selection).
DEFAULT_MEMORY_BUDGET_MB = 256
# Bytes per (query, gallery) score cell: float32 score, bool masks, and an int64 cumulative count
# for the rare rows that need tie resolution.
_BYTES_PER_CELL = 16
_BYTES_PER_RESULT = 48  # values, indices and the sort temporaries of one returned (query, rank)
# Extra bytes per cell when each block is also ranked in full (mAP@All): the relevance mask and
# its comparison temporaries. The ranking itself works through the block in row chunks whose
# temporaries stay bounded: a sorted copy and the tie counts of at most _AP_CHUNK_CELLS cells
# (about 16 MB), and per-relevant-item arrays for at most _AP_CHUNK_RELEVANT items (about 20 MB).
_BYTES_PER_CELL_RANKED = 4
_AP_CHUNK_CELLS = 2**21
_AP_CHUNK_RELEVANT = 2**18
MAX_BLOCK_ROWS = 8192


class Scorer(Protocol):
    def scores(self, query_rows: np.ndarray, gallery_rows: np.ndarray) -> torch.Tensor: ...


def _as_rows(rows: np.ndarray | list[int] | range) -> np.ndarray:
    arr = np.asarray(rows, dtype=np.int64)
    if arr.ndim != 1:
        raise ValueError(f"row indices must be 1-d, got shape {arr.shape}")
    return arr


def _is_contiguous(rows: np.ndarray) -> bool:
    return len(rows) > 0 and int(rows[-1]) - int(rows[0]) == len(rows) - 1 and bool(
        np.all(np.diff(rows) == 1)
    )


class CosineScorer:
    """Cosine similarity between query vectors and gallery vectors, both indexed by manifest row.

    ``query_vecs`` and ``gallery_vecs`` are (n_rows, dim) float arrays, L2-normalised by the caller
    (pass ``normalize=True`` to normalise here). They may come from different towers (image vs
    caption embeddings); ``gallery_vecs=None`` uses ``query_vecs`` for both. Uses CUDA when present.
    """

    def __init__(
        self,
        query_vecs: np.ndarray | torch.Tensor,
        gallery_vecs: np.ndarray | torch.Tensor | None = None,
        device: str | torch.device | None = None,
        normalize: bool = False,
    ):
        self.device = resolve_device(device)
        q = self._to_tensor(query_vecs, normalize)
        g = q if gallery_vecs is None else self._to_tensor(gallery_vecs, normalize)
        if q.ndim != 2 or g.ndim != 2:
            raise CdirError("embedding matrices must be 2-d (rows x dim)")
        if q.shape[1] != g.shape[1]:
            raise CdirError(
                f"query vectors have dim {q.shape[1]} but gallery vectors dim {g.shape[1]}: "
                "score only embeddings that live in the same space"
            )
        if q.shape[0] != g.shape[0]:
            raise CdirError(
                f"query vectors have {q.shape[0]} rows but gallery vectors {g.shape[0]}: both must "
                "be indexed by the same manifest rows"
            )
        self.query_vecs, self.gallery_vecs = q, g
        self._gallery_cache: tuple[np.ndarray, torch.Tensor] | None = None

    def _to_tensor(self, x: np.ndarray | torch.Tensor, normalize: bool) -> torch.Tensor:
        t = torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray) else x
        t = t.to(device=self.device, dtype=torch.float32)
        if normalize:
            t = torch.nn.functional.normalize(t, dim=1)
        return t

    @property
    def num_rows(self) -> int:
        return int(self.query_vecs.shape[0])

    @property
    def dim(self) -> int:
        return int(self.query_vecs.shape[1])

    def _take(self, mat: torch.Tensor, rows: np.ndarray) -> torch.Tensor:
        if _is_contiguous(rows):  # a view, no copy: domains are contiguous in a sorted manifest
            return mat[int(rows[0]) : int(rows[-1]) + 1]
        return mat[torch.from_numpy(rows).to(mat.device)]

    def _gallery(self, rows: np.ndarray) -> torch.Tensor:
        # Every query block scores against the same gallery: gather it once, not once per block.
        cached = self._gallery_cache
        if cached is not None and (cached[0] is rows or np.array_equal(cached[0], rows)):
            return cached[1]
        g = self._take(self.gallery_vecs, rows)
        self._gallery_cache = (rows.copy(), g)
        return g

    def scores(self, query_rows: np.ndarray, gallery_rows: np.ndarray) -> torch.Tensor:
        q = self._take(self.query_vecs, _as_rows(query_rows))
        return q @ self._gallery(_as_rows(gallery_rows)).T


def block_rows_for_budget(n_gallery: int, k: int, memory_budget_mb: float,
                          full_ranking: bool = False) -> int:
    """How many query rows fit one block in ``memory_budget_mb`` of working memory
    (``full_ranking``: the block is also ranked in full, see :func:`average_precision_all`)."""
    cell = _BYTES_PER_CELL + (_BYTES_PER_CELL_RANKED if full_ranking else 0)
    per_row = cell * max(n_gallery, 1) + _BYTES_PER_RESULT * max(k, 1)
    return int(min(MAX_BLOCK_ROWS, max(1, memory_budget_mb * 2**20 // per_row)))


def select_topk(s: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k of each row of ``s`` under the ranking rule (score desc, then column asc).

    ``torch.topk`` picks an arbitrary subset of the items tied at the k-th value. Taking k + 1
    items shows where that matters: a row whose (k+1)-th value equals its k-th has a tie across
    the boundary, and only those rows are re-selected (the lowest columns among the tied items)
    with a pass over the full row. The k winners are then ordered by a stable sort.
    """
    n_cols = s.shape[1]
    if k > n_cols:
        raise ValueError(f"k = {k} exceeds the {n_cols} columns")
    vals, idx = torch.topk(s, min(k + 1, n_cols), dim=1, largest=True, sorted=True)
    if torch.isnan(vals).any():
        raise CdirError("the scorer returned NaN similarities: check the embeddings for NaN rows")
    if k < n_cols:
        tied = vals[:, k] == vals[:, k - 1]
        vals, idx = vals[:, :k].contiguous(), idx[:, :k].contiguous()
        if bool(tied.any()):
            rows = tied.nonzero().squeeze(1)
            st, kth = s[rows], vals[rows, k - 1 :]
            above = st > kth
            need = k - above.sum(dim=1, keepdim=True)
            equal = st == kth
            chosen = above | (equal & (equal.cumsum(dim=1) <= need))
            cols = chosen.nonzero()[:, 1].view(len(rows), k)  # row-major: columns ascending
            idx[rows] = cols
            vals[rows] = st.gather(1, cols)
    # Order the k winners: columns ascending first, then a stable sort by score descending.
    idx, order = idx.sort(dim=1)
    vals = vals.gather(1, order)
    vals, order = vals.sort(dim=1, descending=True, stable=True)
    return vals, idx.gather(1, order)


def _self_positions(query_rows: np.ndarray, gallery_rows: np.ndarray) -> np.ndarray | None:
    """Gallery position of each query's own row (-1 when absent); None when no query is in it."""
    order = np.argsort(gallery_rows, kind="stable")
    sorted_rows = gallery_rows[order]
    at = np.searchsorted(sorted_rows, query_rows)
    at_clip = np.minimum(at, len(sorted_rows) - 1)
    found = (at < len(sorted_rows)) & (sorted_rows[at_clip] == query_rows)
    if not found.any():
        return None
    return np.where(found, order[at_clip], -1)


def blockwise_topk(
    scorer: Scorer,
    query_rows: np.ndarray,
    gallery_rows: np.ndarray,
    k: int,
    block_size: int | None = None,
    exclude_self: bool = True,
    memory_budget_mb: float = DEFAULT_MEMORY_BUDGET_MB,
    on_block: Callable[[int, torch.Tensor, np.ndarray | None], None] | None = None,
) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
    """Yield ``(start, scores, gallery_positions)`` for consecutive blocks of queries.

    ``start`` is the offset of the block in ``query_rows``; ``scores`` (float32) and
    ``gallery_positions`` (int64, indices into ``gallery_rows``) are (block, min(k, n_gallery))
    arrays ranked by the module's rule. ``block_size=None`` picks the largest block whose working
    memory stays within ``memory_budget_mb``.

    ``on_block(start, s, own)``, when given, sees each block's full score matrix before the
    block is yielded (own items already at -inf; ``own``: each query's own gallery position,
    -1 when absent, or None), so that a metric over the whole ranking (mAP@All) reuses the
    scores instead of scoring twice; the automatic block size then leaves room for a full sort.
    """
    query_rows, gallery_rows = _as_rows(query_rows), _as_rows(gallery_rows)
    n_gallery = len(gallery_rows)
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if n_gallery == 0 or len(query_rows) == 0:
        return
    k_eff = min(k, n_gallery)
    if block_size is None:
        block_size = block_rows_for_budget(n_gallery, k_eff, memory_budget_mb,
                                           full_ranking=on_block is not None)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    self_pos = _self_positions(query_rows, gallery_rows) if exclude_self else None

    with torch.inference_mode():
        for start in range(0, len(query_rows), block_size):
            q = query_rows[start : start + block_size]
            s = scorer.scores(q, gallery_rows)
            if s.shape != (len(q), n_gallery):
                raise ValueError(f"scorer returned shape {tuple(s.shape)}, "
                                 f"expected {(len(q), n_gallery)}")
            s = s.float()
            sp = None
            if self_pos is not None:
                sp = self_pos[start : start + len(q)]
                has = np.flatnonzero(sp >= 0)
                if len(has):
                    s = s.clone()  # the scorer may hand out a tensor it still owns
                    s[torch.from_numpy(has).to(s.device),
                      torch.from_numpy(sp[has]).to(s.device)] = float("-inf")
            if on_block is not None:
                on_block(start, s, sp)
            vals, idx = select_topk(s, k_eff)
            vals_np = vals.cpu().numpy().astype(np.float32, copy=False)
            idx_np = idx.cpu().numpy().astype(np.int64, copy=False)
            if sp is not None:
                own = idx_np == sp[:, None]
                if own.any():
                    idx_np[own] = -1
                    vals_np[own] = -np.inf
            yield start, vals_np, idx_np


def _order_keys(x: np.ndarray) -> np.ndarray:
    """int64 keys in the order of the float32 values ``x`` (equal floats, equal keys; -0.0 is
    made +0.0 first): the sign-magnitude bits turned into two's complement."""
    bits = (np.asarray(x, dtype=np.float32) + np.float32(0.0)).view(np.int32)
    return (bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))).astype(np.int64)


def average_precision_all(s: torch.Tensor, relevant: torch.Tensor | np.ndarray) -> np.ndarray:
    """Average precision of each row over the *whole* ranking of its columns (mAP@All's term).

    ``s`` is a (queries, gallery) score block, ``relevant`` a bool mask of the same shape (a
    query's own item already cleared). The ranking is the module's rule (score descending, then
    the lower column); AP = (1/R) * sum over the R relevant items of (relevant items up to its
    rank) / its rank. Returns float64 in [0, 1], NaN for a row with no relevant item.

    Only the relevant items' ranks are needed: rank = 1 + (columns scoring higher), found by
    binary search in the sorted row, + (columns scoring the same with a lower index), counted
    directly for the few relevant items whose score another column shares (ties go to the lower
    column, as in the top-k). The work runs on the CPU (numpy's vectorised sort and indexing are
    much faster there than torch's), in row chunks whose temporaries stay bounded.
    """
    rel = (relevant.detach().to("cpu", torch.bool).numpy() if isinstance(relevant, torch.Tensor)
           else np.asarray(relevant, dtype=bool))
    if tuple(s.shape) != rel.shape:
        raise ValueError(f"scores {tuple(s.shape)} and relevant {rel.shape} differ")
    n, n_cols = s.shape
    if n == 0:
        return np.zeros(0)
    per_row = np.count_nonzero(rel, axis=1)
    max_rows = max(1, _AP_CHUNK_CELLS // max(n_cols, 1))
    parts, start = [], 0
    while start < n:
        stop = min(n, start + max_rows)
        within = np.cumsum(per_row[start:stop])
        stop = start + max(1, int(np.searchsorted(within, _AP_CHUNK_RELEVANT, side="right")))
        chunk = s[start:stop].detach().to("cpu", torch.float32).numpy()
        parts.append(_ap_rows(chunk, rel[start:stop]))
        start = stop
    return np.concatenate(parts)


def _ap_rows(s: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """:func:`average_precision_all` on one chunk of rows (numpy)."""
    n, n_cols = s.shape
    ap = np.full(n, np.nan)
    rows, cols = np.nonzero(rel)  # row-major: each row's items in column order
    if len(rows) == 0:
        return ap
    # Every row sorted ascending and keyed by (row, value): one flat sorted array, so a single
    # 1-d binary search serves every row.
    span = np.int64(1) << 33  # wider than the 2^32 keys of one row's values
    flat = (_order_keys(np.sort(s, axis=1)) + (np.arange(n, dtype=np.int64) * span)[:, None]
            ).ravel()
    base = rows.astype(np.int64)
    probe = _order_keys(s[rows, cols]) + base * span
    above = np.searchsorted(flat, probe, side="right") - base * n_cols
    below = np.searchsorted(flat, probe, side="left") - base * n_cols
    rank = n_cols - above + 1  # 1 + columns scoring strictly higher
    tied = np.flatnonzero(above - below > 1)
    if len(tied):
        # Ties go to the lower column: add the columns left of the item that score the same
        # (T x N comparisons for T tied items, in groups of bounded size).
        col_ids = np.arange(n_cols)
        step = max(1, _AP_CHUNK_CELLS // max(n_cols, 1))
        for i in range(0, len(tied), step):
            ti = tied[i:i + step]
            same = s[rows[ti]] == s[rows[ti], cols[ti]][:, None]
            rank[ti] += np.count_nonzero(same & (col_ids[None, :] < cols[ti, None]), axis=1)
    # The m-th relevant item of a row in rank order scores m / rank; rows stay grouped after
    # sorting by (row, rank), so m is the position within the row's group.
    order = np.argsort(base * (n_cols + 1) + rank, kind="stable")
    counts = np.bincount(rows, minlength=n)
    starts = np.cumsum(counts) - counts
    m = np.arange(len(rows)) - starts[rows] + 1  # rows are already grouped and ascending
    total = np.bincount(rows, weights=m / rank[order], minlength=n)
    has = counts > 0
    ap[has] = total[has] / counts[has]
    return ap


def dense_topk(
    scorer: Scorer,
    query_rows: np.ndarray,
    gallery_rows: np.ndarray,
    k: int,
    exclude_self: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Reference one-shot top-k: the full score matrix and a stable numpy argsort (same rule).

    Memory is O(queries x gallery); for tests and small galleries only.
    """
    query_rows, gallery_rows = _as_rows(query_rows), _as_rows(gallery_rows)
    with torch.inference_mode():
        s = scorer.scores(query_rows, gallery_rows).float().cpu().numpy().copy()
    self_pos = _self_positions(query_rows, gallery_rows) if exclude_self else None
    if self_pos is not None:
        has = np.flatnonzero(self_pos >= 0)
        s[has, self_pos[has]] = -np.inf
    k_eff = min(k, len(gallery_rows))
    order = np.argsort(-s, axis=1, kind="stable")[:, :k_eff]
    vals = np.take_along_axis(s, order, axis=1)
    if self_pos is not None:
        own = order == self_pos[:, None]
        order[own] = -1
        vals[own] = -np.inf
    return vals.astype(np.float32), order.astype(np.int64)
