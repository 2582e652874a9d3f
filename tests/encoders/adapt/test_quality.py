"""The label-free precision estimate of mined pairs (encoders/adapt/quality.py) against the true
precision on synthetic instance galleries whose noise level sets it, and the guard of
`cdir adapt` that acts on it."""

from __future__ import annotations

import numpy as np
import pytest

from encoders.adapt.mining import mine, pair_precision
from encoders.adapt.quality import estimate_precision, link_model, spearman, synthetic_gallery
from tests.encoders.adapt.test_adapt import _adapt, _recipe, tiny  # noqa: F401 (fixture)
from tests.helpers.vectors import l2


@pytest.mark.parametrize("families", [0, 30])
def test_the_estimate_tracks_the_true_precision(families: int) -> None:
    est, true = [], []
    for noise in (0.7, 0.9, 1.1, 1.3, 1.5, 1.8, 2.2):
        x, labels, dom = synthetic_gallery(noise, families)
        pairs = mine(x, dom, cycle=None).pairs
        est.append(estimate_precision(x, dom, pairs))
        true.append(pair_precision(pairs, labels))  # labels: only to score the estimate
    assert max(true) > 0.93 and min(true) < 0.25  # the sweep spans the range it claims
    assert spearman(est, true) >= 0.9, (est, true)
    err = np.abs(np.array(est) - np.array(true))
    # roughly calibrated (as the module docstring says: low in the middle of the sweep)
    assert err.mean() < 0.2 and err.max() < 0.45, (est, true)


def test_clean_and_hopeless_galleries_and_two_domains() -> None:
    x, labels, dom = synthetic_gallery(0.2)
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


# -- the guard of `cdir adapt` -------------------------------------------------------------------


class _Degrading:
    """A ``prepare`` for the adaptation loop that ignores the encoder's features and returns a
    synthetic instance gallery (one item per category per domain, category = position in its
    domain) at the noise of the current round, so the true precision of every round is known.
    The loop calls it twice a round (mining, then the selection criterion)."""

    def __init__(self, noises: list[float]) -> None:
        self.noises, self.calls, self.truth = noises, 0, []

    def __call__(self, feats: np.ndarray, names: np.ndarray) -> np.ndarray:
        noise = self.noises[min(self.calls // 2, len(self.noises) - 1)]
        self.calls += 1
        doms = sorted(set(names.tolist()))
        n = int((names == doms[0]).sum())
        x, labels, _ = synthetic_gallery(noise, n=n, d=16, domains=len(doms), seed=self.calls // 2)
        out = np.zeros((len(names), x.shape[1]), np.float32)
        truth = np.zeros(len(names), np.int64)
        for t, d in enumerate(doms):
            rows = np.flatnonzero(names == d)
            out[rows], truth[rows] = x[t * n:(t + 1) * n], labels[t * n:(t + 1) * n]
        if self.calls % 2 == 1:  # the mining call: the labels score the round, nothing else
            self.truth.append(pair_precision(mine(out, names, cycle=None).pairs, truth))
        return out


@pytest.mark.parametrize("guard", ["stop", "off"])
def test_the_guard_stops_a_run_whose_pairs_degrade(tiny, tmp_path, monkeypatch,  # noqa: F811
                                                   capsys, guard: str) -> None:
    import json

    import cdir.stages.adapt as stage
    from encoders.engine.checkpoint import read_file

    ws, enc = tiny
    prepare = _Degrading([0.1, 0.1, 3.0])  # rounds at epochs 0, 2, 4: the last one is lost
    monkeypatch.setattr(stage, "_whitening", lambda normalize: prepare)
    out = tmp_path / guard
    res = _adapt(ws, enc, _recipe(tmp_path, epochs=6, guard=guard), out)
    assert prepare.truth[0] == 1.0 and prepare.truth[2] < 0.5  # the true precision degrades
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    est = [r["mine_estimated_precision"] for r in lines if "mine_estimated_precision" in r]
    assert est[0] > 0.9 and est[1] > 0.9
    err = capsys.readouterr().err
    assert "the estimated precision of the mined pairs fell to" in err
    if guard == "stop":
        # the round at epoch 4 fired: epochs 5 and 6 never ran, encoder.pt was still exported
        assert res["epochs_done"] == 4 and len(lines) == 4 and "training stops here" in err
    else:
        assert res["epochs_done"] == 6 and len(lines) == 6 and est[2] < est[0] - 0.05
    # encoder.pt: the best candidate by the label-free criterion, never worse than the start
    start = lines[0]["select_mutual_nn_rate"]
    assert res["selected"]["value"] >= start and res["selected"]["epoch"] in (0, 2)
    assert read_file(out / "encoder.pt")["epoch"] == res["selected"]["epoch"]


def test_a_healthy_run_is_unchanged_by_the_guard(tiny, tmp_path, monkeypatch,  # noqa: F811
                                                 capsys) -> None:
    import cdir.stages.adapt as stage

    ws, enc = tiny
    runs = {}
    for guard in ("stop", "off"):
        monkeypatch.setattr(stage, "_whitening", lambda normalize: _Degrading([0.1]))
        runs[guard] = _adapt(ws, enc, _recipe(tmp_path, epochs=4, guard=guard),
                             tmp_path / guard)
    assert runs["stop"]["epochs_done"] == 4
    assert runs["stop"]["losses"] == runs["off"]["losses"]
    assert "fell to" not in capsys.readouterr().err
