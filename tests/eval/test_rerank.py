"""The hubness corrections of `eval.rerank` against brute force, and on the case they exist for."""

from __future__ import annotations

import numpy as np
import torch

from eval.rerank import DEFAULT_DUAL_SOFTMAX_BETA, CSLSScorer, DualSoftmaxScorer
from eval.topk import CosineScorer


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _log_sum_exp(z: np.ndarray, axis: int) -> np.ndarray:
    top = z.max(axis, keepdims=True)
    return (np.log(np.exp(z - top).sum(axis, keepdims=True)) + top).squeeze(axis)


def test_dual_softmax_matches_brute_force_for_mixed_query_domains() -> None:
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(30, 8)))
    domains = np.array(["a"] * 10 + ["b"] * 12 + ["c"] * 8)
    scorer = DualSoftmaxScorer(CosineScorer(x, device="cpu"), domains)
    queries = np.array([0, 3, 12, 25, 29])  # rows of three domains in one call
    gallery = np.arange(10, 22)  # domain b
    got = scorer.scores(queries, gallery).numpy()
    beta = DEFAULT_DUAL_SOFTMAX_BETA
    for i, q in enumerate(queries):
        bank = np.flatnonzero(domains == domains[q])  # every image of the query's domain
        z = beta * (x[bank] @ x[gallery].T).astype(np.float64)
        row = z[bank == q][0]
        want = (row - _log_sum_exp(row, 0)) + (row - _log_sum_exp(z, 0))
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-3)


def test_dual_softmax_takes_the_hub_away_from_every_query() -> None:
    # four objects in domain a; in domain b their drawings, each further from its object than a
    # hub that is equally close to all four (cosine 0.45 against 0.5)
    e = np.eye(16, dtype=np.float32)
    a = e[:4]
    b = _unit(e[:4] + 2.0 * e[4:8])
    hub = _unit(a.sum(0, keepdims=True))
    x = np.concatenate([a, b, hub])
    domains = np.array(["a"] * 4 + ["b"] * 5)
    gallery = np.arange(4, 9)
    plain = CosineScorer(x, device="cpu").scores(np.arange(4), gallery)
    assert (plain.argmax(1) == 4).all()  # the hub wins every query on plain cosine
    dual = DualSoftmaxScorer(CosineScorer(x, device="cpu"), domains)
    assert torch.equal(dual.scores(np.arange(4), gallery).argmax(1), torch.arange(4))


def test_csls_matches_its_formula() -> None:
    rng = np.random.default_rng(2)
    x = _unit(rng.normal(size=(20, 6)))
    domains = np.array(["a"] * 9 + ["b"] * 11)
    got = CSLSScorer(CosineScorer(x, device="cpu"), domains, k=3).scores(
        np.arange(9), np.arange(9, 20)).numpy()
    cos = x[:9] @ x[9:].T
    r_q = np.sort(cos, 1)[:, -3:].mean(1)
    r_g = np.sort(cos, 0)[-3:, :].mean(0)
    np.testing.assert_allclose(got, 2 * cos - r_q[:, None] - r_g[None, :], atol=1e-5)
