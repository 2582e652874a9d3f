"""The domain-pair protocol on a tiny manifest whose answers are worked out by hand."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cdir.core.errors import CdirError
from eval.protocol import (
    default_ks,
    default_pairs,
    evaluate_pairs,
    one_relevant,
    split_examples,
)
from eval.topk import CosineScorer

torch.set_num_threads(1)

# domain a: rows 0-3, domain b: rows 4-7. Class 2 exists only in domain a.
VECS = np.array([
    [1.0, 0.0],  # 0 a c0
    [0.0, 1.0],  # 1 a c1
    [0.0, 1.0],  # 2 a c0 (looks like c1)
    [0.6, 0.8],  # 3 a c2
    [1.0, 0.0],  # 4 b c0
    [0.8, 0.6],  # 5 b c0
    [0.0, 1.0],  # 6 b c1
    [0.6, 0.8],  # 7 b c1
], dtype=np.float32)
LABELS = [0, 1, 0, 2, 0, 0, 1, 1]
DOMAINS = ["a"] * 4 + ["b"] * 4


def manifest() -> pd.DataFrame:
    names = ["cat", "dog", "eel"]
    return pd.DataFrame({
        "id": [f"{d}/{names[c]}/{i}" for i, (d, c) in enumerate(zip(DOMAINS, LABELS, strict=True))],
        "path": [f"/nonexistent/{i}.png" for i in range(8)],
        "domain": DOMAINS,
        "label": LABELS,
        "class_name": [names[c] for c in LABELS],
        "split": "all",
    })


def scorer() -> CosineScorer:
    return CosineScorer(VECS, device="cpu")


def test_every_directed_pair_with_hand_computed_metrics():
    res = evaluate_pairs(scorer(), manifest(), ks=(1, 2, 3), progress=False)
    assert [r["pair"] for r in res] == ["a→b", "b→a", "mean"]
    ab, ba, mean = res
    assert (ab["n_queries"], ab["n_gallery"]) == (4, 4)
    # a→b rankings (gallery rows 4..7): q0 hits 1100 R=2; q1 hits 1100 R=2; q2 0011 R=2;
    # q3 (class absent from b) R=0.
    expected_ab = {"P@1": 200 / 3, "P@2": 400 / 6, "P@3": 400 / 6,
                   "prec@1": 50.0, "prec@2": 50.0, "prec@3": 100 * (5 / 3) / 4,
                   "recall@1": 100 / 3, "recall@2": 200 / 3, "recall@3": 250 / 3,
                   "mAP@R": 200 / 3,
                   # whole rankings 1100, 1100, 0011: APs 1, 1, (1/3 + 2/4) / 2
                   "mAP@All": 100 * (2 + 5 / 12) / 3}
    # b→a rankings (gallery rows 0..3), exact ties going to the lower row:
    # q4 1001 R=2; q5 0101 R=2; q6 1000 R=1; q7 0100 R=1.
    expected_ba = {"P@1": 50.0, "P@2": 50.0, "P@3": 50.0,
                   "prec@1": 50.0, "prec@2": 50.0, "prec@3": 100 / 3,
                   "recall@1": 37.5, "recall@2": 75.0, "recall@3": 75.0,
                   "mAP@R": 43.75,
                   "mAP@All": 100 * (0.75 + 0.5 + 1 + 0.5) / 4}
    for key, val in expected_ab.items():
        assert ab[key] == pytest.approx(val), key
    for key, val in expected_ba.items():
        assert ba[key] == pytest.approx(val), key
        assert mean[key] == pytest.approx((val + expected_ab[key]) / 2), key
    assert mean["n_queries"] == 8 and mean["n_gallery"] is None
    assert (ab["min_relevant"], ab["max_relevant"]) == (0, 2)
    assert (ba["min_relevant"], ba["max_relevant"]) == (1, 2)
    assert (mean["min_relevant"], mean["max_relevant"]) == (0, 2)
    assert not one_relevant(res)


def _brute_map_all(x: np.ndarray, labels: np.ndarray, q: np.ndarray, g: np.ndarray) -> float:
    """mAP@All of queries ``q`` against gallery ``g`` from the full score matrix: stable argsort
    (ties to the lower row), the query's own row last and never relevant."""
    s = x[q] @ x[g].T
    own = q[:, None] == g[None, :]
    s[own] = -np.inf
    rel = (labels[q][:, None] == labels[g][None, :]) & ~own
    order = np.argsort(-s, axis=1, kind="stable")
    aps = []
    for i in range(len(q)):
        h = rel[i][order[i]]
        if h.any():
            aps.append((np.cumsum(h) / np.arange(1, len(h) + 1))[h].sum() / h.sum())
    return 100 * float(np.mean(aps))


@pytest.mark.parametrize("block_size", [1, 13, None])
def test_map_all_blockwise_equals_brute_force_with_ties(block_size):
    rng = np.random.default_rng(4)
    n = 90
    # coarse vectors: many exact score ties, decided by the lower row as in the top-k
    x = rng.integers(-1, 2, size=(n, 3)).astype(np.float32)
    labels = rng.integers(0, 4, size=n)
    domains = np.array(["a"] * 40 + ["b"] * 50)
    df = pd.DataFrame({"id": [str(i) for i in range(n)], "path": "", "domain": domains,
                       "label": labels, "class_name": [str(c) for c in labels]})
    res = evaluate_pairs(CosineScorer(x, device="cpu"), df, pairs=[("a", "b"), ("b", "a"),
                         ("b", "b")], ks=(1, 5), block_size=block_size, progress=False)
    a, b = np.flatnonzero(domains == "a"), np.flatnonzero(domains == "b")
    for row, (q, g) in zip(res, [(a, b), (b, a), (b, b)], strict=False):
        assert row["mAP@All"] == pytest.approx(_brute_map_all(x, labels, q, g), abs=1e-9)
    assert res[-1]["mAP@All"] == pytest.approx(np.mean([r["mAP@All"] for r in res[:3]]))


def test_one_relevant_item_per_query_is_recognised():
    # every class once per domain: R = 1 for every query, so P@k = prec@1 = mAP@R for every k
    x = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    df = pd.DataFrame({"id": [str(i) for i in range(8)], "path": "",
                       "domain": ["a"] * 4 + ["b"] * 4, "label": [0, 1, 2, 3] * 2})
    res = evaluate_pairs(CosineScorer(x, device="cpu", normalize=True), df, ks=(1, 2, 3),
                         progress=False)
    assert one_relevant(res)
    for r in res:
        assert r["P@1"] == r["P@2"] == r["P@3"] == r["prec@1"] == pytest.approx(r["mAP@R"])
        assert r["recall@3"] >= r["recall@1"]
    assert not one_relevant([])


def test_same_domain_pair_excludes_the_query_itself():
    (aa, _) = evaluate_pairs(scorer(), manifest(), pairs=[("a", "a")], ks=(1, 4), progress=False)
    # q0 ranks rows 3, 1, 2 (then itself, blanked): R = 1 (row 2); q2 ranks 1, 3, 0: R = 1;
    # q1 and q3 have no other image of their class.
    assert aa["P@1"] == pytest.approx(0.0)
    assert aa["recall@4"] == pytest.approx(100.0)
    assert aa["prec@4"] == pytest.approx(100 * (1 / 4 + 0 + 1 / 4 + 0) / 4)
    assert aa["mAP@R"] == pytest.approx(0.0)


def test_pairs_and_domains_are_checked():
    with pytest.raises(CdirError, match="'c'"):
        evaluate_pairs(scorer(), manifest(), pairs=[("a", "c")], progress=False)
    with pytest.raises(CdirError, match="rows"):
        evaluate_pairs(CosineScorer(VECS[:6], device="cpu"), manifest(), progress=False)
    with pytest.raises(CdirError, match="label"):
        evaluate_pairs(scorer(), manifest().drop(columns="label"), progress=False)


def test_block_size_does_not_change_results():
    rng = np.random.default_rng(0)
    n = 240
    x = rng.standard_normal((n, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    df = pd.DataFrame({"id": [str(i) for i in range(n)], "path": "", "split": "all",
                       "domain": rng.choice(["p", "q", "r"], size=n),
                       "label": rng.integers(0, 6, size=n)})
    df["class_name"] = df["label"].astype(str)
    base = evaluate_pairs(CosineScorer(x, device="cpu"), df, ks=(1, 5, 15), progress=False)
    assert len(base) == 6 + 1
    for bs in (1, 13):
        other = evaluate_pairs(CosineScorer(x, device="cpu"), df, ks=(1, 5, 15), block_size=bs,
                               progress=False)
        assert [r["pair"] for r in other] == [r["pair"] for r in base]
        for r, b in zip(other, base, strict=True):
            assert r.keys() == b.keys()
            for key, val in b.items():  # float sums may differ in the last bit
                assert r[key] == (val if isinstance(val, str | None) else pytest.approx(val))


def test_examples_keep_the_top_results_of_sample_queries():
    res = evaluate_pairs(scorer(), manifest(), ks=(1, 2, 3), keep_examples=2, example_k=4,
                         progress=False)
    rows, examples = split_examples(res)
    assert all("examples" not in r for r in rows)
    assert len(examples) == 4  # 2 per pair
    ex = examples[0]
    assert ex["pair"] == "a→b" and ex["query_row"] == 0 and ex["query_class_name"] == "cat"
    assert [it["row"] for it in ex["results"]] == [4, 5, 7, 6]
    assert [it["hit"] for it in ex["results"]] == [True, True, False, False]
    assert ex["results"][0]["path"] == "/nonexistent/4.png"


def test_defaults():
    assert default_ks("officehome") == (1, 5, 15)
    assert default_ks("Office-Home") == (1, 5, 15)
    assert default_ks("domainnet") == (50, 100, 200)
    assert default_ks("DomainNet-7") == (50, 100, 200)
    assert default_ks("emoji") == (1, 5, 15)
    assert default_pairs(["b", "a", "c", "a"]) == [("a", "b"), ("a", "c"), ("b", "a"),
                                                   ("b", "c"), ("c", "a"), ("c", "b")]
