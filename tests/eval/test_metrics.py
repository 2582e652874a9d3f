"""Retrieval metrics on hand-computed cases, the blockwise top-k, and FAISS against brute force."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from eval.metrics import (
    MetricAccumulator,
    compute_metrics,
    hits_from_positions,
    map_at_all,
    map_at_r,
    metric_columns,
    precision_at_k,
    recall_at_k,
    ucdir_precision_at_k,
)
from eval.topk import (
    CosineScorer,
    average_precision_all,
    blockwise_topk,
    dense_topk,
    select_topk,
)

torch.set_num_threads(1)


def H(*rows: str) -> np.ndarray:
    """Hit matrix from strings like "10100" (1 = hit)."""
    return np.array([[c == "1" for c in r] for r in rows], dtype=bool)


# --------------------------------------------------------------------------------- hand cases


def test_single_query_with_fewer_relevant_than_k():
    hits, R = H("10100"), np.array([2])
    # t = min(5, 2) = 2, one hit in the top 2
    assert ucdir_precision_at_k(hits, R, 5) == pytest.approx(50.0)
    assert precision_at_k(hits, 5) == pytest.approx(40.0)  # 2 / 5
    assert recall_at_k(hits, R, 5) == pytest.approx(100.0)  # 2 / 2
    assert map_at_r(hits, R) == pytest.approx(50.0)  # (P@1 * 1 + P@2 * 0) / 2


def test_three_queries_one_class_absent_from_gallery():
    hits = H("11010", "01000", "00000")
    R = np.array([3, 1, 0])  # query 3's class has no image in the gallery
    m = compute_metrics(hits, R, ks=(1, 3, 5))
    # P@1: t = [1, 1, 0], correct = [1, 0, 0] -> 1/2
    assert m["P@1"] == pytest.approx(50.0)
    # P@3 and P@5: t = [3, 1, 0], correct = [2, 0, 0] -> 2/4 (micro, not the macro 33.3)
    assert m["P@3"] == pytest.approx(50.0)
    assert m["P@5"] == pytest.approx(50.0)
    # standard precision averages over all three queries
    assert m["prec@1"] == pytest.approx(100 / 3)
    assert m["prec@3"] == pytest.approx(100 * (2 / 3 + 1 / 3 + 0) / 3)
    assert m["prec@5"] == pytest.approx(100 * (3 / 5 + 1 / 5 + 0) / 3)
    # recall and mAP@R leave out the query with R = 0
    assert m["recall@1"] == pytest.approx(100 * (1 / 3 + 0) / 2)
    assert m["recall@3"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert m["recall@5"] == pytest.approx(100.0)
    assert m["mAP@R"] == pytest.approx(100 * ((1 + 1) / 3 + 0) / 2)
    assert list(m) == metric_columns((1, 3, 5))


def test_map_at_r_uses_precision_at_each_relevant_rank():
    # R = 4: hits at ranks 1, 3, 4 within the top R; the hit at rank 5 is beyond R
    hits, R = H("10111"), np.array([4])
    assert map_at_r(hits, R) == pytest.approx(100 * (1 + 2 / 3 + 3 / 4) / 4)


def test_all_queries_without_relevant_items_give_nan():
    m = compute_metrics(H("000", "000"), np.array([0, 0]), ks=(1,))
    assert math.isnan(m["P@1"]) and math.isnan(m["recall@1"]) and math.isnan(m["mAP@R"])
    assert m["prec@1"] == 0.0


def test_too_few_ranks_is_an_error():
    with pytest.raises(ValueError, match="mAP@R"):
        map_at_r(H("10"), np.array([3]))
    with pytest.raises(ValueError, match="P@5"):
        ucdir_precision_at_k(H("10"), np.array([4]), 5)


def test_accumulating_blocks_equals_one_shot():
    rng = np.random.default_rng(0)
    hits = rng.random((103, 40)) < 0.3
    R = rng.integers(0, 41, size=103)
    top_k_only = ("ucdir_p", "precision", "recall", "map_r")  # R is not the hits' count here
    one = compute_metrics(hits, R, ks=(1, 5, 15), metrics=top_k_only)
    acc = MetricAccumulator((1, 5, 15), top_k_only)
    for s in range(0, 103, 17):
        acc.update(hits[s:s + 17], R[s:s + 17])
    assert acc.n_queries == 103
    assert acc.result() == pytest.approx(one)
    # the whole ranking (every hit of each row is one of its R relevant items): mAP@All too
    R = hits.sum(axis=1)
    one = compute_metrics(hits, R, ks=(1, 5, 15))
    acc = MetricAccumulator((1, 5, 15))
    for s in range(0, 103, 17):
        acc.update(hits[s:s + 17], R[s:s + 17])
    assert acc.result() == pytest.approx(one)
    assert not math.isnan(one["mAP@All"]) and list(one)[-2:] == ["mAP@R", "mAP@All"]


def test_map_at_all_ranks_every_relevant_item():
    # R = 3 over the whole ranking: hits at ranks 1, 3 and 6 (mAP@R sees only the first 3 ranks)
    hits, R = H("101001"), np.array([3])
    assert map_at_all(hits, R) == pytest.approx(100 * (1 + 2 / 3 + 3 / 6) / 3)
    assert map_at_r(hits, R) == pytest.approx(100 * (1 + 2 / 3) / 3)
    # a query with R = 0 is left out, like mAP@R
    assert map_at_all(H("101001", "000000"), np.array([3, 0])) == pytest.approx(
        100 * (1 + 2 / 3 + 3 / 6) / 3)


def test_map_at_all_refuses_a_truncated_ranking_without_ap_all():
    with pytest.raises(ValueError, match="mAP@All"):
        map_at_all(H("10"), np.array([2]))  # the second relevant item is beyond the ranks held
    got = compute_metrics(H("10"), np.array([2]), ks=(1,), metrics=("map_all",),
                          ap_all=np.array([0.75]))
    assert got == {"mAP@All": pytest.approx(75.0)}


def _brute_ap(s: np.ndarray, rel: np.ndarray) -> np.ndarray:
    """AP of each row over the full stable ranking (score desc, then the lower column)."""
    order = np.argsort(-s, axis=1, kind="stable")
    out = np.full(len(s), np.nan)
    for i in range(len(s)):
        h = rel[i][order[i]]
        if h.any():
            out[i] = (np.cumsum(h) / np.arange(1, len(h) + 1))[h].sum() / h.sum()
    return out


def test_average_precision_all_in_small_row_chunks(monkeypatch):
    # chunks of a few rows (by cells and by relevant items) give the same APs as one chunk
    import eval.topk as topk

    rng = np.random.default_rng(9)
    s = rng.integers(0, 6, size=(37, 50)).astype(np.float32)
    rel = rng.random((37, 50)) < 0.4
    whole = average_precision_all(torch.from_numpy(s), torch.from_numpy(rel))
    monkeypatch.setattr(topk, "_AP_CHUNK_CELLS", 150)  # 3 rows
    monkeypatch.setattr(topk, "_AP_CHUNK_RELEVANT", 30)  # about 1-2 rows
    chunked = average_precision_all(torch.from_numpy(s), torch.from_numpy(rel))
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-12)
    np.testing.assert_allclose(chunked, _brute_ap(s, rel), rtol=0, atol=1e-12)


@pytest.mark.parametrize("tied", [False, True])
def test_average_precision_all_equals_brute_force_numpy(tied):
    rng = np.random.default_rng(5 + tied)
    for _ in range(20):
        n, n_cols = int(rng.integers(1, 30)), int(rng.integers(1, 80))
        # a few score levels make most relevant items tie with other columns
        s = (rng.integers(0, 4, size=(n, n_cols)) if tied
             else rng.standard_normal((n, n_cols))).astype(np.float32)
        s[rng.random((n, n_cols)) < 0.05] = -np.inf  # like an excluded own item
        rel = rng.random((n, n_cols)) < 0.3
        rel[0] = False  # a query with no relevant item: NaN
        got = average_precision_all(torch.from_numpy(s), torch.from_numpy(rel))
        np.testing.assert_allclose(got, _brute_ap(s, rel), rtol=0, atol=1e-12)
        assert np.isnan(got[0])


def test_hits_from_positions_treats_missing_items_as_misses():
    pos = np.array([[2, 0, -1]])
    hits = hits_from_positions(pos, np.array([7]), np.array([7, 1, 7]))
    assert hits.tolist() == [[True, True, False]]


# --------------------------------------------------------------------------------- top-k


class MatrixScorer:
    """Scores from a fixed (n_rows x n_rows) matrix, to test exact ties."""

    def __init__(self, m: np.ndarray):
        self.m = torch.as_tensor(m, dtype=torch.float32)

    def scores(self, q: np.ndarray, g: np.ndarray) -> torch.Tensor:
        return self.m[torch.as_tensor(q)][:, torch.as_tensor(g)]


def test_ties_go_to_the_lower_gallery_position():
    m = np.array([[0.5, 0.9, 0.5, 0.9, 0.5, 0.1],
                  [0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    sc = MatrixScorer(m)
    q, g = np.array([0, 1]), np.arange(6)
    (_, vals, pos), = blockwise_topk(sc, q, g, 4, exclude_self=False)
    assert pos.tolist() == [[1, 3, 0, 2], [0, 1, 2, 3]]
    assert vals[0].tolist() == pytest.approx([0.9, 0.9, 0.5, 0.5])


def test_select_topk_resolves_ties_at_the_kth_value_many_times():
    # many exact ties at every boundary: the torch result must equal a stable numpy sort
    rng = np.random.default_rng(1)
    s = rng.integers(0, 5, size=(64, 300)).astype(np.float32)
    vals, idx = select_topk(torch.from_numpy(s), 20)
    ref = np.argsort(-s, axis=1, kind="stable")[:, :20]
    assert np.array_equal(idx.numpy(), ref)
    assert np.array_equal(vals.numpy(), np.take_along_axis(s, ref, axis=1))
    # k equal to the row length (no (k+1)-th value to compare with)
    _, idx = select_topk(torch.zeros(2, 5), 5)
    assert idx.tolist() == [[0, 1, 2, 3, 4]] * 2


@pytest.mark.parametrize("block_size", [1, 7, 64, None])
def test_blockwise_equals_dense_on_random_data(block_size):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    y = rng.standard_normal((300, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    y /= np.linalg.norm(y, axis=1, keepdims=True)
    sc = CosineScorer(x, y, device="cpu")
    q = np.arange(0, 120)
    g = np.concatenate([np.arange(100, 180), np.arange(200, 300)])  # not contiguous, overlaps q
    ref_v, ref_p = dense_topk(sc, q, g, 25)
    got_v = np.zeros_like(ref_v)
    got_p = np.full_like(ref_p, -2)
    for start, v, p in blockwise_topk(sc, q, g, 25, block_size=block_size):
        got_v[start:start + len(v)], got_p[start:start + len(p)] = v, p
    assert np.array_equal(got_p, ref_p)
    np.testing.assert_allclose(got_v, ref_v, rtol=1e-5, atol=1e-6)
    # the 20 queries that are also gallery items never retrieve themselves
    own = np.searchsorted(g, q[100:])
    assert not (got_p[100:] == own[:, None]).any()


def test_exclude_self_when_k_reaches_the_gallery_size():
    x = np.eye(3, dtype=np.float32)
    sc = CosineScorer(x, device="cpu")
    (_, vals, pos), = blockwise_topk(sc, np.arange(3), np.arange(3), 5)
    assert pos.shape == (3, 3)
    assert pos[:, -1].tolist() == [-1, -1, -1]  # self, pushed to the end and blanked
    assert np.isneginf(vals[:, -1]).all()
    assert pos[0, :2].tolist() == [1, 2] and pos[2, :2].tolist() == [0, 1]


def test_block_size_from_memory_budget_is_bounded():
    from eval.topk import block_rows_for_budget

    assert block_rows_for_budget(100_000, 200, 256) == 256 * 2**20 // (16 * 100_000 + 48 * 200)
    assert block_rows_for_budget(10**9, 10, 1) == 1
    # ranking the whole block (mAP@All) keeps a relevance mask per cell: smaller blocks
    assert block_rows_for_budget(100_000, 200, 256, full_ranking=True) == 256 * 2**20 // (
        20 * 100_000 + 48 * 200)


def test_cosine_scorer_rejects_mismatched_towers():
    from cdir.core.errors import CdirError

    with pytest.raises(CdirError, match="dim"):
        CosineScorer(np.zeros((4, 3), np.float32), np.zeros((4, 5), np.float32), device="cpu")
    with pytest.raises(CdirError, match="rows"):
        CosineScorer(np.zeros((4, 3), np.float32), np.zeros((5, 3), np.float32), device="cpu")


def test_nan_scores_are_reported():
    from cdir.core.errors import CdirError

    x = np.ones((4, 2), np.float32)
    x[2] = np.nan
    with pytest.raises(CdirError, match="NaN"):
        list(blockwise_topk(CosineScorer(x, device="cpu"), np.arange(4), np.arange(4), 2))


# --------------------------------------------------------------------------------- FAISS


def test_faiss_flat_ip_agrees_with_brute_force_numpy():
    import faiss

    rng = np.random.default_rng(3)
    g = rng.standard_normal((2000, 64)).astype(np.float32)
    q = rng.standard_normal((50, 64)).astype(np.float32)
    faiss.normalize_L2(g)
    faiss.normalize_L2(q)
    index = faiss.IndexFlatIP(64)
    index.add(g)
    D, I = index.search(q, 10)  # noqa: E741

    s = q @ g.T
    ref = np.argsort(-s, axis=1, kind="stable")[:, :10]
    assert np.array_equal(I, ref)
    np.testing.assert_allclose(D, np.take_along_axis(s, ref, axis=1), rtol=1e-5, atol=1e-5)

    # and the torch blockwise path ranks the same way
    sc = CosineScorer(np.concatenate([q, g]), device="cpu")
    got = np.concatenate([p for _, _, p in blockwise_topk(sc, np.arange(50), np.arange(50, 2050),
                                                          10, block_size=16)])
    assert np.array_equal(got, I)
