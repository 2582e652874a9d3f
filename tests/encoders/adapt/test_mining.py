"""Cross-domain correspondence mining (encoders/adapt/mining.py) on synthetic domains with a
known answer: each domain is a slightly rotated, noisy, shuffled copy of the same items."""

from __future__ import annotations

import numpy as np
import pytest

from cdir.core.errors import CdirError
from cdir.core.knn import nearest
from encoders.adapt.mining import (
    MATCHERS,
    Pairs,
    cycle_mask,
    cycle_rate,
    follow,
    hungarian_match,
    k_occurrence_skew,
    mine,
    mining_stats,
    mutual_nn,
    nn_map,
    pair_precision,
    pairs_to_map,
    sinkhorn_match,
    sinkhorn_plan,
    threshold,
)
from tests.helpers.vectors import l2


def _rotation(d: int, angle: float, rng: np.random.Generator) -> np.ndarray:
    """A random rotation close to the identity (exp of a small skew-symmetric matrix)."""
    s = rng.normal(size=(d, d))
    s = (s - s.T) / np.sqrt(2 * d) * angle
    vals, vecs = np.linalg.eig(s)
    return np.real(vecs @ np.diag(np.exp(vals)) @ np.linalg.inv(vecs))


def _domains(n: int = 300, d: int = 32, noise: float = 0.1, k: int = 2, seed: int = 0
             ) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """``k`` domains of the same ``n`` items: domain t holds item perms[t][r] in row r."""
    rng = np.random.default_rng(seed)
    base = l2(rng.normal(size=(n, d)))
    xs, perms = [], []
    for _ in range(k):
        # noise: relative to the unit signal (a row of norm about ``noise``)
        x = l2(base @ _rotation(d, 0.3, rng) + noise / np.sqrt(d) * rng.normal(size=(n, d)))
        perm = rng.permutation(n)
        xs.append(x[perm].astype(np.float32))
        perms.append(perm)
    return xs, perms


def _truth(pairs: Pairs, perm_a: np.ndarray, perm_b: np.ndarray) -> np.ndarray:
    return perm_a[pairs.a] == perm_b[pairs.b]


def test_nearest_is_blockwise_exact_with_ties_to_the_lower_index() -> None:
    # small integers: every dot product is exact, so ties are exact ties in every block
    rng = np.random.default_rng(1)
    a = rng.integers(-2, 3, size=(37, 8)).astype(np.float32)
    b = rng.integers(-2, 3, size=(23, 8)).astype(np.float32)
    b[5] = b[17]
    a[3] = b[5]
    few = rng.integers(-1, 2, size=(29, 3)).astype(np.float32)  # ties everywhere
    for qa, gb in ((a, b), (few, b[:, :3])):
        dense = qa @ gb.T
        for k in (1, 2, 4, 7):
            want = np.argsort(-dense, axis=1, kind="stable")[:, :k]
            for block, mb in ((4096, 256.0), (5, 256.0), (4096, 1e-4)):
                idx, sim = nearest(qa, gb, k, block, mb)
                np.testing.assert_array_equal(idx, want)
                np.testing.assert_array_equal(sim, np.take_along_axis(dense, want, 1))
    assert nearest(a, b, 1)[0][3, 0] == 5 and nn_map(a, b)[3] == 5
    idx, sim = nearest(a, b[:2], 3)  # k beyond the collection: padded
    assert (idx[:, 2] == -1).all() and np.isneginf(sim[:, 2]).all()


def test_mutual_nn_and_assignments_recover_the_permutation() -> None:
    (a, b), (pa, pb) = _domains(noise=0.1)
    mnn = mutual_nn(a, b)
    assert len(mnn) > 0.9 * len(a) and _truth(mnn, pa, pb).mean() > 0.97
    assert len(set(mnn.a)) == len(mnn) and len(set(mnn.b)) == len(mnn)
    np.testing.assert_allclose(mnn.similarity, (a[mnn.a] * b[mnn.b]).sum(1), atol=1e-5)

    sk = sinkhorn_match(a, b)
    assert sk.method == "sinkhorn" and sk.info["iterations"] >= 1
    assert len(sk) >= len(mnn) and _truth(sk, pa, pb).mean() > 0.97
    assert len(set(sk.a)) == len(sk) and len(set(sk.b)) == len(sk)  # one-to-one
    assert ((0 <= sk.confidence) & (sk.confidence <= 1.0 + 1e-5)).all()

    pytest.importorskip("scipy")
    hu = hungarian_match(a, b)
    assert len(hu) == len(a) and _truth(hu, pa, pb).mean() > 0.99
    assert set(MATCHERS) >= {"mutual-nn", "sinkhorn", "hungarian"}


def test_noise_lowers_mutual_nn_precision_and_coverage() -> None:
    (a, b), (pa, pb) = _domains(noise=0.1)
    (c, e), (pc, pe) = _domains(noise=1.0)
    clean, noisy = mutual_nn(a, b), mutual_nn(c, e)
    assert len(noisy) < len(clean)
    assert _truth(noisy, pc, pe).mean() < _truth(clean, pa, pb).mean()


def test_sinkhorn_plan_has_uniform_marginals() -> None:
    rng = np.random.default_rng(2)
    sim = rng.uniform(-1, 1, size=(40, 60)).astype(np.float32)
    plan, info = sinkhorn_plan(sim, eps=0.1, iters=500, tol=1e-6)
    np.testing.assert_allclose(plan.sum(1), 1 / 40, rtol=1e-3)
    np.testing.assert_allclose(plan.sum(0), 1 / 60, rtol=1e-3)
    assert info["marginal_error"] < 1e-5


def test_dense_matchers_fall_back_to_mutual_nn_above_their_size_limit() -> None:
    (a, b), _ = _domains(n=60)
    mnn = mutual_nn(a, b)
    for match in (sinkhorn_match, hungarian_match):
        try:
            p = match(a, b, max_size=50)
        except CdirError:  # hungarian without scipy
            continue
        assert p.method.startswith("mutual-nn (fallback")
        np.testing.assert_array_equal(p.a, mnn.a)
        np.testing.assert_array_equal(p.b, mnn.b)


def test_threshold_trades_coverage_for_precision() -> None:
    (a, b), (pa, pb) = _domains(noise=1.0)
    p = mutual_nn(a, b)
    precisions, sizes = [], []
    for q in (0.0, 0.5, 0.9):
        kept = threshold(p, quantile=q)
        sizes.append(len(kept))
        precisions.append(_truth(kept, pa, pb).mean())
    assert sizes[0] > sizes[1] > sizes[2] > 0
    assert precisions[0] < precisions[1] <= precisions[2]
    assert precisions[0] < 0.95  # the case is hard enough for the threshold to matter
    floor = float(np.median(p.confidence))
    assert (threshold(p, min_confidence=floor).confidence >= floor).all()


def test_cycle_consistency_filters_injected_wrong_pairs() -> None:
    (a, b, c), (pa, pb, pc) = _domains(noise=0.1, k=3)
    good = mutual_nn(a, b).select(slice(0, 100))
    good = good.select(_truth(good, pa, pb))
    rng = np.random.default_rng(3)
    wrong_b = rng.permutation(good.b)  # the same rows paired wrongly
    injected = Pairs(np.concatenate([good.a, good.a]), np.concatenate([good.b, wrong_b]),
                     np.ones(2 * len(good)))
    is_true = _truth(injected, pa, pb)
    back = [nn_map(b, c), nn_map(c, a)]
    forward = [nn_map(a, c), nn_map(c, b)]
    for fw in (None, forward):
        ok = cycle_mask(injected, back, fw)
        assert ok[is_true].mean() > 0.9  # the right pairs survive
        assert ok[~is_true].mean() < 0.05  # the injected ones do not
    # follow loses an index at a missing partner
    assert follow(np.array([0, 1]), [np.array([-1, 1]), np.array([5, 6])]).tolist() == [-1, 6]
    part = pairs_to_map(good, len(a))
    assert (part[good.a] == good.b).all() and (part >= 0).sum() == len(good)


def test_mining_stats_track_the_quality_without_labels() -> None:
    names = np.repeat(["p", "q", "r"], 200)
    clean_x, _ = _domains(n=200, noise=0.1, k=3)
    noisy_x, _ = _domains(n=200, noise=1.2, k=3)
    clean = mining_stats(np.concatenate(clean_x), names)
    noisy = mining_stats(np.concatenate(noisy_x), names)
    assert clean["mutual_nn_rate"] > 0.9 and clean["cycle_rate"] > 0.9
    assert noisy["mutual_nn_rate"] < clean["mutual_nn_rate"]
    assert noisy["cycle_rate"] < clean["cycle_rate"]
    assert set(clean["per_pair"]) == {f"{s}->{t}" for s in "pqr" for t in "pqr" if s != t}
    two = mining_stats(np.concatenate(clean_x[:2]), names[:400])
    assert np.isnan(two["cycle_rate"])
    a, b = clean_x[:2]
    assert cycle_rate([nn_map(a, b), nn_map(b, a)]) > 0.9
    # a hub: queries share a direction u and one gallery row is u: the k-occurrence skews
    u = l2(np.ones(a.shape[1], np.float32))
    shared = l2(a + 0.7 * u)
    hubbed = np.concatenate([b, u[None]])
    assert k_occurrence_skew(shared, hubbed, k=5) > k_occurrence_skew(a, b, k=5) + 3.0


@pytest.mark.parametrize("method", ["mutual-nn", "sinkhorn"])
def test_mine_over_three_domains(method: str) -> None:
    xs, perms = _domains(n=150, noise=0.9, k=3)
    x = np.concatenate(xs)
    dom = np.repeat(["c", "a", "b"], 150)  # not in byte order: rows are global, a < b in name
    label = np.concatenate(perms)  # the item each row shows: for scoring only
    plain = mine(x, dom, method, cycle=None)
    cyc = mine(x, dom, method, cycle="any")
    strict = mine(x, dom, method, cycle="any", quantile=0.5)
    assert len(plain.pairs) > len(cyc.pairs) > len(strict.pairs) > 0
    precision = [pair_precision(m.pairs, label) for m in (plain, cyc, strict)]
    assert precision[0] < precision[1] <= precision[2]
    assert precision[1] > 0.9
    assert (dom[plain.pairs.a] < dom[plain.pairs.b]).all()
    assert set(plain.per_pair) == {"a|b", "a|c", "b|c"}
    for counts in cyc.per_pair.values():
        assert counts["matched"] >= counts["after_cycle"] == counts["kept"]
        assert 0 < counts["cycle_consistent"] <= 1 and 0 < counts["mutual_agreement"] <= 1
    stats = strict.stats
    assert stats["pairs"] == len(strict.pairs)
    assert stats["coverage"] == pytest.approx(
        len(set(strict.pairs.a) | set(strict.pairs.b)) / len(x))
    assert pair_precision(Pairs(np.zeros(0), np.zeros(0), np.zeros(0)), label) != \
        pair_precision(Pairs(np.zeros(0), np.zeros(0), np.zeros(0)), label)  # NaN when empty
    with pytest.raises(CdirError, match="unknown matcher"):
        mine(x, dom, "greedy")
