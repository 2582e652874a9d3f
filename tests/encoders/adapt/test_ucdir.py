"""UCDIR (encoders/adapt/ucdir.py) on a tiny backbone and random tensors: k-means with a known
answer, the bank and k-means schedule, the loss terms, in-domain negatives, checkpoint shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cdir.core.errors import CdirError
from encoders.adapt.ucdir import UCDIR, UCDIRConfig, cosine_distances, spherical_kmeans
from encoders.zoo.backbones import build_backbone

N_PER_DOMAIN = 12
CODES = torch.tensor([0, 1] * N_PER_DOMAIN)  # interleaved, as a manifest may be
SIZE = 16


def _model(**kw: object) -> UCDIR:
    torch.manual_seed(0)
    net, feat_dim = build_backbone("resnet18", width=0.125, small_stem=True)
    cfg = UCDIRConfig(dim=16, num_cluster=3, warmup_epochs=2, cross_start=4,
                      kmeans_iters=5, kmeans_restarts=2, **kw)  # type: ignore[arg-type]
    m = UCDIR(net, feat_dim, cfg)
    m.set_domains(CODES)
    return m


@pytest.fixture(autouse=True)
def _one_thread() -> object:
    """One torch thread: the machines running the tests have few cores."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


IMAGES = torch.randn(len(CODES), 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def _embed(module: torch.nn.Module) -> np.ndarray:
    """The trainer's embed, on fixed tensors instead of images."""
    was = module.training
    module.eval()
    with torch.no_grad():
        z = module(IMAGES).numpy()
    module.train(was)
    return z


def _batch(n: int = 8, seed: int = 2) -> tuple[list[torch.Tensor], torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randperm(len(CODES), generator=g)[:n]
    x = IMAGES[rows]
    views = [x + 0.1 * torch.randn(x.shape, generator=g), x + 0.1 * torch.randn(x.shape,
                                                                                generator=g)]
    return views, torch.stack([rows, rows], dim=1)


def test_spherical_kmeans_known_answer_and_deterministic() -> None:
    g = torch.Generator().manual_seed(0)
    centres = F.normalize(torch.randn(3, 8, generator=g), dim=1)
    truth = torch.arange(3).repeat_interleave(30)
    x = centres[truth] + 0.05 * torch.randn(90, 8, generator=g)
    perm = torch.randperm(90, generator=g)
    x, truth = x[perm], truth[perm]
    cent, assign, inertia = spherical_kmeans(x, 3, iters=10, restarts=3,
                                             generator=torch.Generator().manual_seed(5))
    # one predicted cluster per true cluster, a bijection
    pairs = set(zip(truth.tolist(), assign.tolist(), strict=True))
    assert len(pairs) == 3 and len({a for _, a in pairs}) == 3
    assert torch.allclose(cent.norm(dim=1), torch.ones(3), atol=1e-5)
    assert 0 <= inertia < 90 * 0.05
    again = spherical_kmeans(x, 3, iters=10, restarts=3,
                             generator=torch.Generator().manual_seed(5))
    assert torch.equal(again[0], cent) and torch.equal(again[1], assign)
    with pytest.raises(ValueError):
        spherical_kmeans(x[:2], 3)


def test_begin_epoch_fills_bank_once_and_clusters_after_warmup() -> None:
    m = _model()
    assert m.begin_epoch(0, _embed) == {}
    assert bool(m.bank_ready) and not bool(m.kmeans_ready)
    assert torch.allclose(m.bank.norm(dim=1), torch.ones(len(CODES)), atol=1e-5)
    assert (m.assign == -1).all()
    m.bank[0] = F.normalize(torch.ones(m.cfg.dim), dim=0)
    marked = m.bank.clone()
    m.begin_epoch(1, _embed)  # still warm-up: neither refill nor k-means
    assert torch.equal(m.bank, marked) and not bool(m.kmeans_ready)
    logs = m.begin_epoch(2, _embed)
    assert torch.equal(m.bank, marked) and bool(m.kmeans_ready)
    assert set(logs) == {"kmeans_inertia", "kmeans_smallest_cluster"}
    assert ((m.assign >= 0) & (m.assign < 3)).all()
    assert torch.allclose(m.centroids.norm(dim=2), torch.ones(2, 3), atol=1e-5)
    # the same epoch on the same bank gives the same clusters (a resumed run)
    assign, cent = m.assign.clone(), m.centroids.clone()
    m.begin_epoch(2, _embed)
    assert torch.equal(m.assign, assign) and torch.equal(m.centroids, cent)


def test_unreadable_rows_stay_out_of_the_bank_and_kmeans() -> None:
    m = _model()

    def embed(module: torch.nn.Module) -> np.ndarray:
        z = _embed(module)
        z[3] = np.nan
        return z

    m.begin_epoch(2, embed)
    assert (m.bank[3] == 0).all() and int(m.assign[3]) == -1
    assert (m.assign[torch.arange(len(CODES)) != 3] >= 0).all()


def test_loss_terms_follow_the_schedule_and_gradients() -> None:
    m = _model(conf_threshold=0.0)
    m.train()
    m.begin_epoch(0, _embed)
    views, idx = _batch()
    out = m(views, idx)
    assert out["loss_instance"] > 0
    assert out["loss_cluster"] == 0 and out["loss_entropy"] == 0 and out["loss_dod"] == 0
    assert torch.allclose(out["loss"].detach(), out["loss_instance"])

    m.begin_epoch(4, _embed)  # cross_start
    before_k = [p.clone() for p in m.encoder_k.parameters()]
    out = m(views, idx)
    for name in ("loss_instance", "loss_cluster", "loss_entropy", "loss_dod"):
        assert torch.isfinite(out[name]) and out[name] > 0, name
    m.zero_grad()
    out["loss"].backward()
    assert all(p.grad is not None for p in m.encoder_q.parameters())
    assert all(p.grad is None for p in m.encoder_k.parameters())
    # the momentum update moved the key encoder, and the bank holds the new keys
    assert any(not torch.equal(a, b) for a, b in zip(before_k, m.encoder_k.parameters(),
                                                      strict=True))
    assert torch.allclose(m.bank[idx[:, 0]].norm(dim=1), torch.ones(len(idx)), atol=1e-5)


def test_cluster_weight_ramp() -> None:
    m = _model()
    w = [m.cluster_weight_at(e) for e in range(6)]
    assert w == pytest.approx([0.0, 0.0, 0.0, 0.25, 0.5, 0.5])


def test_instance_loss_uses_only_own_domain_rows() -> None:
    m = _model()
    m.begin_epoch(0, _embed)
    m.eval()  # eval: no momentum update and no bank write, so forward is repeatable
    views, idx = _batch(n=24)
    keep = CODES[idx[:, 0]] == 0  # one anchor, of domain 0 (eval-mode BatchNorm takes one)
    views, idx = [v[keep][:1] for v in views], idx[keep][:1]
    with torch.no_grad():
        q = F.normalize(m.head_q(m.encoder_q(views[0])), dim=1)
        base = m(views, idx)["loss_instance"]
        anchor, dom = int(idx[0, 0]), 0
        foreign = int((CODES != dom).nonzero()[0])
        m.bank[foreign] = q[0]
        assert torch.allclose(m(views, idx)["loss_instance"], base)
        m.bank[anchor] = q[0]  # its own row is no negative either
        assert torch.allclose(m(views, idx)["loss_instance"], base)
        same = int(((CODES == dom) & (torch.arange(len(CODES)) != anchor)).nonzero()[0])
        m.bank[same] = q[0]
        assert m(views, idx)["loss_instance"] > base


def test_set_domains_rejects_a_small_domain() -> None:
    m = _model()
    with pytest.raises(CdirError, match="method.num_cluster"):
        m.set_domains(torch.tensor([0] * 10 + [1] * 2))


def test_state_dict_round_trip() -> None:
    m = _model()
    m.train()
    m.begin_epoch(2, _embed)
    views, idx = _batch()
    m(views, idx)["loss"].backward()
    fresh = _model()
    fresh.load_state_dict(m.state_dict())
    for (name, a), b in zip(m.state_dict().items(), fresh.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert bool(fresh.kmeans_ready) and bool(fresh.bank_ready)


def test_config_validation_and_registry() -> None:
    from encoders.ssl.plugin import build_method

    for bad in ({"temperature": 0.0}, {"momentum": 1.5}, {"num_cluster": 0},
                {"warmup_epochs": 10, "cross_start": 5}, {"kmeans_source": "faiss"},
                {"dod_temperature": -1.0}):
        with pytest.raises(CdirError, match="ucdir"):
            UCDIRConfig(**bad).validate()  # type: ignore[arg-type]
    m = build_method("ucdir", "resnet18", {"width": 0.125, "small_stem": True}, num_cluster=3)
    assert isinstance(m, UCDIR) and m.cfg.num_cluster == 3 and m.takes_index


def test_cosine_distances() -> None:
    p = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])
    d = cosine_distances(p)
    assert torch.allclose(d, torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0], [1.0, 1.0, 0.0]]),
                          atol=1e-6)


def test_kmeans_on_eval_features() -> None:
    m = _model(kmeans_source="eval")
    m.begin_epoch(0, _embed)
    m.bank.zero_()  # the eval source ignores the bank
    m.bank[:, 0] = 1.0
    m.begin_epoch(2, _embed)
    assert bool(m.kmeans_ready) and len(set(m.assign.tolist())) == 3
