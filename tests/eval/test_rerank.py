"""The hubness corrections of `eval.rerank` against brute force, and on the case they exist for."""

from __future__ import annotations

import numpy as np
import torch

from eval.rerank import DEFAULT_ISOFT_BETA, InvertedSoftmaxScorer
from eval.topk import CosineScorer


def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_inverted_softmax_matches_brute_force_for_mixed_query_domains() -> None:
    rng = np.random.default_rng(0)
    x = _unit(rng.normal(size=(30, 8)))
    domains = np.array(["a"] * 10 + ["b"] * 12 + ["c"] * 8)
    scorer = InvertedSoftmaxScorer(CosineScorer(x, device="cpu"), domains)
    queries = np.array([0, 3, 12, 25, 29])  # rows of three domains in one call
    gallery = np.arange(10, 22)  # domain b
    got = scorer.scores(queries, gallery).numpy()
    beta = DEFAULT_ISOFT_BETA
    for i, q in enumerate(queries):
        bank = np.flatnonzero(domains == domains[q])  # every image of the query's domain
        z = beta * (x[bank] @ x[gallery].T).astype(np.float64)
        log_norm = np.log(np.exp(z - z.max(0)).sum(0)) + z.max(0)
        want = beta * (x[q] @ x[gallery].T) - log_norm
        np.testing.assert_allclose(got[i], want, rtol=1e-4, atol=1e-3)


def test_inverted_softmax_takes_the_hub_away_from_every_query() -> None:
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
    isoft = InvertedSoftmaxScorer(CosineScorer(x, device="cpu"), domains)
    top = isoft.scores(np.arange(4), gallery).argmax(1)
    assert torch.equal(top, torch.arange(4))  # each query finds its own drawing
