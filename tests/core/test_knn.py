"""Blockwise nearest neighbours (cdir/core/knn.py) against dense numpy on random data: any block
size (one row, sizes that do not divide the rows, all rows), any memory budget, exact ties."""

from __future__ import annotations

import numpy as np
import pytest

from cdir.core.errors import CdirError
from cdir.core.knn import (
    as_matrix,
    block_rows,
    nearest,
    neighbourhood_mean,
    similarity_blocks,
    top_k,
)

# (block, memory_mb): unbounded, one row a block, blocks that do not divide the rows, a budget
# so small that it alone forces one row a block
BLOCKINGS = ((4096, 256.0), (1, 256.0), (3, 256.0), (7, 256.0), (4096, 1e-5))


def _dense_top(sims: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The reference: per row, columns by decreasing similarity, ties by increasing column."""
    cols = np.arange(sims.shape[1])
    idx = np.stack([np.lexsort((cols, -row))[:k] for row in sims])
    return idx, np.take_along_axis(sims, idx, 1)


def _random(seed: int, n_a: int, n_b: int, d: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n_a, d)).astype(np.float32)
    b = rng.normal(size=(n_b, d)).astype(np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True), b / np.linalg.norm(b, axis=1,
                                                                             keepdims=True)


def _tied(seed: int, n_a: int, n_b: int, d: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Small integers: every dot product is exact, and most rows have equal similarities,
    at the top and at the k-th place."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-1, 2, size=(n_a, d)).astype(np.float32),
            rng.integers(-1, 2, size=(n_b, d)).astype(np.float32))


@pytest.mark.parametrize("make", [_random, _tied])
def test_nearest_equals_dense_top_k_at_every_blocking(make) -> None:
    for seed in range(3):
        a, b = make(seed, 23, 17)
        dense = a @ b.T
        for k in (1, 2, 5, 17):
            want_idx, want_sim = _dense_top(dense, k)
            for block, mb in BLOCKINGS:
                idx, sim = nearest(a, b, k, block, mb)
                assert idx.dtype == np.int64 and sim.dtype == np.float32
                np.testing.assert_array_equal(idx, want_idx)
                np.testing.assert_allclose(sim, want_sim, atol=1e-6)


def test_ties_go_to_the_lower_column_also_at_the_kth_place() -> None:
    sims = np.array([[1.0, 3.0, 3.0, 2.0, 3.0],  # three tied at the top, k = 2 keeps two
                     [0.0, 0.0, 0.0, 0.0, 0.0],  # all tied
                     [5.0, 1.0, 1.0, 1.0, 4.0]], np.float32)  # tie at the k-th place (k = 3)
    assert top_k(sims, 2).tolist() == [[1, 2], [0, 1], [0, 4]]
    assert top_k(sims, 3).tolist() == [[1, 2, 4], [0, 1, 2], [0, 4, 1]]


def test_k_beyond_the_collection_is_padded() -> None:
    a, b = _random(0, 4, 3)
    idx, sim = nearest(a, b, 5)
    want, _ = _dense_top(a @ b.T, 3)
    np.testing.assert_array_equal(idx[:, :3], want)
    assert (idx[:, 3:] == -1).all() and np.isneginf(sim[:, 3:]).all()
    idx, sim = nearest(a, b[:0], 2)  # nothing to find
    assert (idx == -1).all() and np.isneginf(sim).all()


@pytest.mark.parametrize("make", [_random, _tied])
def test_neighbourhood_mean_equals_dense(make) -> None:
    a, b = make(1, 29, 13)
    dense = np.sort(a @ b.T, axis=1)[:, ::-1]
    for k in (1, 4, 13, 50):  # k is capped at len(b)
        want = dense[:, :min(k, 13)].mean(1)
        for block, mb in BLOCKINGS:
            np.testing.assert_allclose(neighbourhood_mean(a, b, k, block, mb), want, atol=1e-6)
    with pytest.raises(CdirError, match="non-empty"):
        neighbourhood_mean(a, b[:0])


def test_blocks_cover_every_row_once_within_the_budget() -> None:
    a, b = _random(2, 10, 6)
    assert block_rows(4096, 6, 256.0) == 4096
    assert block_rows(3, 6, 256.0) == 3
    assert block_rows(4096, 2**20, 1.0) == 1  # one row already over the budget: still one
    assert block_rows(4096, 1024, 1.0) == 256  # 1 MiB of float32 cells, 1024 a row
    for block in (1, 3, 4, 10, 11):
        seen = []
        for rows, sims in similarity_blocks(a, b, block):
            assert sims.shape == (rows.stop - rows.start, 6) and len(sims) <= block
            np.testing.assert_allclose(sims, a[rows] @ b.T)
            seen.extend(range(rows.start, rows.stop))
        assert seen == list(range(10))


def test_as_matrix_refuses_what_is_not_finite_rows() -> None:
    assert as_matrix([[1, 2], [3, 4]]).dtype == np.float32
    with pytest.raises(CdirError, match="2-d"):
        as_matrix(np.zeros(3), "queries")
    with pytest.raises(CdirError, match="queries hold non-finite"):
        as_matrix(np.array([[0.0, np.nan]]), "queries")
