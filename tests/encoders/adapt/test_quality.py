"""The label-free precision estimate of mined pairs (encoders/adapt/quality.py) against the true
precision on synthetic instance galleries whose noise level sets it."""

from __future__ import annotations

import numpy as np
import pytest

from encoders.adapt.mining import mine, pair_precision
from encoders.adapt.quality import estimate_precision, link_model
from tests.helpers.vectors import l2


def _gallery(noise: float, families: int = 0, n: int = 300, d: int = 64, domains: int = 3,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One item per category per domain: its category's centre, a shift shared by the domain,
    noise. ``families``: centres drawn around that many family centres (confusable groups)."""
    rng = np.random.default_rng(seed)
    if families:
        fam = l2(rng.normal(size=(families, d)))
        centres = l2(fam[rng.integers(0, families, n)] + 0.6 * rng.normal(size=(n, d)) / d**0.5)
    else:
        centres = l2(rng.normal(size=(n, d)))
    xs = []
    for _ in range(domains):
        z = centres + 0.5 * l2(rng.normal(size=d)) + noise * rng.normal(size=(n, d)) / d**0.5
        xs.append(l2(z - z.mean(0)))
    dom = np.repeat([f"d{t}" for t in range(domains)], n)
    return np.concatenate(xs).astype(np.float32), np.tile(np.arange(n), domains), dom


def _ranks(v: list[float]) -> np.ndarray:
    return np.argsort(np.argsort(v)).astype(float)


@pytest.mark.parametrize("families", [0, 30])
def test_the_estimate_tracks_the_true_precision(families: int) -> None:
    est, true = [], []
    for noise in (0.7, 0.9, 1.1, 1.3, 1.5, 1.8, 2.2):
        x, labels, dom = _gallery(noise, families)
        pairs = mine(x, dom, cycle=None).pairs
        est.append(estimate_precision(x, dom, pairs))
        true.append(pair_precision(pairs, labels))  # labels: only to score the estimate
    assert max(true) > 0.93 and min(true) < 0.25  # the sweep spans the range it claims
    spearman = float(np.corrcoef(_ranks(est), _ranks(true))[0, 1])
    assert spearman >= 0.9, (est, true)
    err = np.abs(np.array(est) - np.array(true))
    # roughly calibrated (as the module docstring says: low in the middle of the sweep)
    assert err.mean() < 0.2 and err.max() < 0.45, (est, true)


def test_clean_and_hopeless_galleries_and_two_domains() -> None:
    x, labels, dom = _gallery(0.2)
    pairs = mine(x, dom).pairs
    assert pair_precision(pairs, labels) == 1.0
    assert estimate_precision(x, dom, pairs) > 0.98
    rng = np.random.default_rng(1)
    noise = l2(rng.normal(size=x.shape)).astype(np.float32)  # no correspondence at all
    assert estimate_precision(noise, dom, mine(noise, dom, cycle=None).pairs) < 0.15
    model = link_model(x, dom)
    assert sorted(model) == ["d0|d1", "d0|d2", "d1|d2"]
    for rec in model.values():
        assert 0.0 <= rec["c6"] <= 1.0 and rec["c3"] > 0.9 and rec["mutual_rate"] > 0.9
    two = np.isin(dom, ["d0", "d1"])
    assert np.isnan(estimate_precision(x[two], dom[two], mine(x[two], dom[two]).pairs))
    # pairs weight the domain pairs: a set inside one domain pair gets that pair's value
    only = pairs.select((dom[pairs.a] == "d0") & (dom[pairs.b] == "d2"))
    assert estimate_precision(x, dom, only) == pytest.approx(model["d0|d2"]["precision"])

