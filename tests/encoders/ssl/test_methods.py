"""MoCo v2, SynCo and ISD: backbones, queue, EMA, losses, SynCo's generators, registry."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cdir.core.errors import CdirError
from encoders.engine.parts import (
    MemoryQueue,
    effective_splits,
    infonce_logits,
    infonce_loss,
    momentum_update,
    split_forward,
)
from encoders.ssl import synthetic as syn
from encoders.ssl.isd import ISDConfig, isd_loss
from encoders.ssl.plugin import build_method, method_options
from encoders.ssl.synco import synco_logits
from encoders.zoo.backbones import build_backbone

torch.set_num_threads(1)

TINY = {"width": 0.25}  # cifar_resnet18 at width 0.25: 128-d features, fast at 32 px


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def near(q: torch.Tensor, m: int, spread: float = 0.1, seed: int = 0) -> torch.Tensor:
    """(B, m, d) unit vectors scattered around each query: realistic 'hard' negatives."""
    g = torch.Generator().manual_seed(seed)
    return unit(q.unsqueeze(1) + spread * torch.randn(q.shape[0], m, q.shape[1], generator=g))


def tiny(name: str, **kw):
    return build_method(name, "cifar_resnet18", TINY, **kw)


def images(b: int = 8, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 32, 32, generator=g)
    return [x, x.flip(3) + 0.1 * torch.randn(x.shape, generator=g)]


# --------------------------------------------------------------------------------------------
# backbones and heads


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_backbone_matches_torchvision_keys(name: str) -> None:
    import torchvision

    net, dim = build_backbone(name)
    ref = getattr(torchvision.models, name)(weights=None).state_dict()
    ref = {k: v.shape for k, v in ref.items() if not k.startswith("fc.")}
    assert {k: v.shape for k, v in net.state_dict().items()} == ref
    assert dim == {"resnet18": 512, "resnet50": 2048}[name]


def test_backbone_variants_shapes() -> None:
    net, dim = build_backbone("cifar_resnet18", width=0.25)
    assert dim == 128 and net(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    assert net.conv1.stride == (1, 1) and isinstance(net.maxpool, torch.nn.Identity)
    net, dim = build_backbone("resnet18", width=0.25, small_stem=True)
    assert net.conv1.kernel_size == (3, 3) and net.conv1.stride == (2, 2)
    assert net(torch.randn(2, 3, 64, 64)).shape == (2, dim)
    net, dim = build_backbone("cifar_resnet50", width=0.125)
    assert dim == 256 and net(torch.randn(2, 3, 32, 32)).shape == (2, 256)
    with pytest.raises(CdirError):
        build_backbone("vgg16")
    with pytest.raises(CdirError):
        build_backbone("cifar_resnet18", small_stem=True)
    with pytest.raises(CdirError):
        build_backbone("resnet18", depth=3)


# --------------------------------------------------------------------------------------------
# queue, EMA, InfoNCE


def test_queue_init_rows_are_unit() -> None:
    torch.manual_seed(1)
    qu = MemoryQueue(50, 16)
    torch.manual_seed(2)
    assert torch.equal(qu.feats, MemoryQueue(50, 16).feats)  # same on every DDP rank
    assert torch.allclose(qu.feats.norm(dim=1), torch.ones(50), atol=1e-6)
    assert int(qu.ptr) == 0
    assert {"feats", "ptr"} <= {k for k, _ in qu.named_buffers()}


def test_queue_enqueue_wraps() -> None:
    qu = MemoryQueue(10, 2)
    init = qu.feats.clone()
    batches = [torch.full((4, 2), float(i)) for i in range(1, 4)]
    qu.enqueue(batches[0])
    qu.enqueue(batches[1])
    assert int(qu.ptr) == 8
    assert torch.equal(qu.feats[8:], init[8:])
    qu.enqueue(batches[2])  # rows 8, 9, then wraps to 0, 1
    assert int(qu.ptr) == 2
    expect = torch.tensor([3, 3, 1, 1, 2, 2, 2, 2, 3, 3], dtype=torch.float32)
    assert torch.equal(qu.feats[:, 0], expect)
    # a batch larger than the queue keeps its last rows, in FIFO positions
    big = torch.arange(13, dtype=torch.float32).unsqueeze(1).repeat(1, 2)
    qu.enqueue(big)  # 13 writes starting at 2: the last 10 values 3..12 land at 5..9, 0..4
    assert int(qu.ptr) == (2 + 13) % 10
    assert torch.equal(qu.feats[:, 0], torch.tensor([8., 9, 10, 11, 12, 3, 4, 5, 6, 7]))


def test_momentum_update_formula() -> None:
    torch.manual_seed(0)
    src, tgt = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    before = [p.clone() for p in tgt.parameters()]
    momentum_update(tgt, src, 0.9)
    for b, s, t in zip(before, src.parameters(), tgt.parameters(), strict=True):
        assert torch.allclose(t, 0.9 * b + 0.1 * s, atol=1e-7)


def test_infonce_matches_handwritten() -> None:
    torch.manual_seed(0)
    q, k, queue = unit(torch.randn(5, 8)), unit(torch.randn(5, 8)), unit(torch.randn(7, 8))
    tau = 0.2
    loss = infonce_loss(infonce_logits(q, k, queue), tau)
    ref = 0.0
    for i in range(5):
        pos = math.exp(float(q[i] @ k[i]) / tau)
        negs = sum(math.exp(float(q[i] @ queue[j]) / tau) for j in range(7))
        ref += -math.log(pos / (pos + negs))
    assert loss.item() == pytest.approx(ref / 5, rel=1e-5)


def test_split_forward_restores_order_and_shuffles() -> None:
    x = torch.arange(16, dtype=torch.float32).unsqueeze(1)
    seen: list[torch.Tensor] = []

    def fn(c: torch.Tensor) -> torch.Tensor:
        seen.append(c.clone())
        return c * 2

    torch.manual_seed(1)
    y = split_forward(fn, x, 4, shuffle=True)
    assert torch.equal(y, 2 * x)  # outputs back in input order
    assert len(seen) == 4 and all(len(c) == 4 for c in seen)
    assert sorted(torch.cat(seen).flatten().tolist()) == list(range(16))
    blocks = [list(range(i, i + 4)) for i in (0, 4, 8, 12)]
    assert sorted(sorted(c.flatten().tolist()) for c in seen) != blocks  # not the plain blocks
    seen.clear()
    split_forward(fn, x, 4, shuffle=False)
    assert [c.flatten().tolist() for c in seen] == blocks
    assert effective_splits(8, 4) == 4 and effective_splits(6, 4) == 3
    assert effective_splits(3, 4) == 1


# --------------------------------------------------------------------------------------------
# SynCo generators


B, M, D = 3, 4, 8


def _draw_u(shape, lo, hi, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g) * (hi - lo) + lo


def _small(seed: int = 0):
    g = torch.Generator().manual_seed(100 + seed)
    q = unit(torch.randn(B, D, generator=g))
    n = unit(torch.randn(B, M, D, generator=g))
    n2 = unit(torch.randn(B, M, D, generator=g))
    return q, n, n2


def test_generators_match_per_sample_reference() -> None:
    q, n, n2 = _small()
    seed = 7

    def gen() -> torch.Generator:
        return torch.Generator().manual_seed(seed)

    a = _draw_u((B, M, 1), 0, 0.5, seed)
    b = _draw_u((B, M, 1), 1, 1.5, seed)
    g = _draw_u((B, M, 1), 0, 1.0, seed)
    e = torch.randn((B, M, D), generator=gen()) * 0.01
    vec = {
        "interp": syn.interpolate(q, n, 0.5, gen()),
        "extra_q": syn.extrapolate(q, n, 1.5, "query", gen()),
        "extra_n": syn.extrapolate(q, n, 1.5, "negative", gen()),
        "mixup": syn.mixup(n, n2, 1.0, gen()),
        "noise": syn.add_noise(n, 0.01, gen()),
        "perturb": syn.perturb(q, n, 0.01),
        "adv": syn.adversarial(q, n, 0.01),
    }
    for i in range(B):
        for j in range(M):
            qi, nij = q[i], n[i, j]
            # types 5/6 the way the reference computes them: autograd of q.n w.r.t. n
            nv = nij.clone().requires_grad_(True)
            (grad,) = torch.autograd.grad(qi @ nv, nv)
            ref = {
                "interp": a[i, j] * qi + (1 - a[i, j]) * nij,
                "extra_q": qi + b[i, j] * (nij - qi),
                "extra_n": nij + b[i, j] * (nij - qi),
                "mixup": g[i, j] * nij + (1 - g[i, j]) * n2[i, j],
                "noise": nij + e[i, j],
                "perturb": nij + 0.01 * grad,
                "adv": nij + 0.01 * torch.sign(grad),
            }
            for key, r in ref.items():
                torch.testing.assert_close(vec[key][i, j], unit(r), atol=1e-6, rtol=1e-5,
                                           msg=f"{key} at ({i},{j})")


def test_finite_difference_legacy_is_nearly_a_copy() -> None:
    q, n, _ = _small()
    seed, eps = 3, 1e-5
    p = torch.randn((B, M, D), generator=torch.Generator().manual_seed(seed)) * eps
    out5 = syn.perturb(q, n, 0.01, "finite_difference", eps, torch.Generator().manual_seed(seed))
    out6 = syn.adversarial(q, n, 0.01, "finite_difference", eps,
                           torch.Generator().manual_seed(seed))
    for i in range(B):
        for j in range(M):
            gdir = float(q[i] @ p[i, j]) / eps
            torch.testing.assert_close(out5[i, j], unit(n[i, j] + 0.01 * gdir * p[i, j]))
            torch.testing.assert_close(out6[i, j], unit(n[i, j] + 0.01 * math.copysign(1, gdir)
                                                        * p[i, j]))
    # the displacement is ~delta*eps: in effect a copy of the hard negative (spec §1.5)
    assert (out5 - n).abs().max() < 1e-5 and (out6 - n).abs().max() < 1e-5


def test_generators_unit_norm_and_relations() -> None:
    torch.manual_seed(0)
    q = unit(torch.randn(16, 128))
    n = near(q, 32, seed=1)
    n2 = near(q, 32, seed=2)
    sim_n = torch.einsum("bd,bmd->bm", q, n)
    outs = {
        "interp": syn.interpolate(q, n),
        "extra_q": syn.extrapolate(q, n, generator=torch.Generator().manual_seed(5)),
        "extra_n": syn.extrapolate(q, n, extrapolate_from="negative",
                                   generator=torch.Generator().manual_seed(5)),
        "mixup": syn.mixup(n, n2),
        "noise": syn.add_noise(n, 0.01),
        "perturb": syn.perturb(q, n),
        "adv": syn.adversarial(q, n),
    }
    for key, s in outs.items():
        assert s.shape == (16, 32, 128), key
        assert torch.allclose(s.norm(dim=-1), torch.ones(16, 32), atol=1e-5), key
    sim = {k: torch.einsum("bd,bmd->bm", q, s) for k, s in outs.items()}
    # interpolation and the gradient step pull the negative toward the query: harder
    assert (sim["interp"] >= sim_n - 1e-6).all() and (sim["interp"] > sim_n).float().mean() > 0.99
    assert (sim["perturb"] > sim_n).all()
    # extrapolation pushes it away; the paper's literal formula pushes further than the code's
    assert (sim["extra_q"] <= sim_n + 1e-6).all()
    assert (sim["extra_n"] <= sim["extra_q"] + 1e-6).all()
    # mixup of two positively-similar negatives is at least as similar as the less similar one
    sim_n2 = torch.einsum("bd,bmd->bm", q, n2)
    both = (sim_n > 0) & (sim_n2 > 0)
    assert both.float().mean() > 0.9
    assert (sim["mixup"] >= torch.minimum(sim_n, sim_n2) - 1e-6)[both].all()
    # noise: a small move of about sigma * sqrt(d)
    dist = (outs["noise"] - n).norm(dim=-1)
    assert dist.max() < 5 * 0.01 * math.sqrt(128) and dist.min() > 0
    # adversarial: a step along sign(q), harder on average for hard negatives
    assert sim["adv"].mean() > sim_n.mean()
    step = outs["adv"] - n
    assert (torch.einsum("bmd,bd->bm", step, torch.sign(q)) > 0).all()


def test_generators_carry_no_gradient() -> None:
    q = unit(torch.randn(4, 16)).requires_grad_(True)
    n = unit(torch.randn(4, 6, 16)).requires_grad_(True)
    for s in (syn.interpolate(q, n), syn.extrapolate(q, n), syn.mixup(n, n), syn.add_noise(n),
              syn.perturb(q, n), syn.adversarial(q, n)):
        assert not s.requires_grad and s.grad_fn is None


def test_select_hard_and_synthesize_counts() -> None:
    torch.manual_seed(0)
    queue = unit(torch.randn(200, 16))
    q = unit(torch.randn(5, 16))
    neg = q @ queue.t()
    hard = syn.select_hard(neg, 20)
    assert hard.shape == (5, 20)
    for i in range(5):
        assert set(hard[i].tolist()) == set(neg[i].topk(20).indices.tolist())
    cfg = syn.SyntheticConfig(n_hard=20, n1=3, n2=4, n3=5, n4=2, n5=1, n6=6)
    s = syn.synthesize(q, queue, hard, cfg)
    assert s.shape == (5, cfg.total, 16) and cfg.total == 21
    assert torch.allclose(s.norm(dim=-1), torch.ones(5, 21), atol=1e-5)
    # every synthetic negative comes from the query's own hard set: with every coefficient
    # switched off, types 4-6 are exact copies of hard negatives
    cfg0 = syn.SyntheticConfig(n_hard=20, n1=0, n2=0, n3=0, n4=5, n5=5, n6=5, sigma=0.0,
                               delta=0.0, eta=0.0)
    s0 = syn.synthesize(q, queue, hard, cfg0)
    for i in range(5):
        d = torch.cdist(s0[i], queue[hard[i]])
        assert (d.min(dim=1).values < 1e-5).all()


def test_synthesize_matches_manual_composition() -> None:
    """The fused draw/gather equals drawing sources and calling each generator in order."""
    torch.manual_seed(0)
    queue = unit(torch.randn(100, 8))
    q = unit(torch.randn(4, 8))
    hard = syn.select_hard(q @ queue.t(), 10)
    cfg = syn.SyntheticConfig(n_hard=10, n1=2, n2=3, n3=2, n4=0, n5=3, n6=1)
    out = syn.synthesize(q, queue, hard, cfg, torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)
    pos = torch.randint(10, (4, 2 + 3 + 2 + 0 + 3 + 1 + 2), generator=g)
    src = queue[hard.gather(1, pos)]
    parts = src.split([2, 3, 2, 0, 3, 1, 2], dim=1)  # second mixup sources last
    ref = torch.cat([
        syn.interpolate(q, parts[0], 0.5, g),
        syn.extrapolate(q, parts[1], 1.5, "query", g),
        syn.mixup(parts[2], parts[6], 1.0, g),
        syn.perturb(q, parts[4], 0.01),  # n4 = 0 disables type 4, not type 5 (swapped-flag fix)
        syn.adversarial(q, parts[5], 0.01),
    ], dim=1)
    torch.testing.assert_close(out, ref)


def test_synthetic_config_validation() -> None:
    cfg = syn.SyntheticConfig()
    assert cfg.counts == (256, 256, 256, 64, 64, 64) and cfg.total == 960 and cfg.n_hard == 1024
    cfg.validate(65536)
    with pytest.raises(CdirError):
        syn.SyntheticConfig(n_hard=100).validate()  # n_hard < n1
    with pytest.raises(CdirError):
        syn.SyntheticConfig().validate(queue_size=512)  # n_hard > K
    with pytest.raises(CdirError):
        syn.SyntheticConfig(extrapolate_from="far").validate()
    with pytest.raises(CdirError):
        syn.SyntheticConfig(perturb_impl="autograd").validate()


# --------------------------------------------------------------------------------------------
# SynCo loss and method


def test_synco_loss_gradient_only_through_query() -> None:
    """Synthetic negatives are constants: the loss and q's gradient equal a hand-written
    InfoNCE over [pos | queue | synthetic] with the synthetic vectors fixed."""
    torch.manual_seed(0)
    queue = unit(torch.randn(64, 16))
    q0, k = unit(torch.randn(6, 16)), unit(torch.randn(6, 16))
    cfg = syn.SyntheticConfig(n_hard=8, n1=4, n2=4, n3=4, n4=2, n5=2, n6=2, logits="materialize")
    q = q0.clone().requires_grad_(True)
    logits, s = synco_logits(q, k, queue, cfg, torch.Generator().manual_seed(3))
    assert logits.shape == (6, 1 + 64 + 18) and not s.requires_grad
    loss = infonce_loss(logits, 0.2)
    loss.backward()

    qr = q0.clone().requires_grad_(True)
    s_ref = syn.synthesize(q0, queue, syn.select_hard(q0 @ queue.t(), 8), cfg,
                           torch.Generator().manual_seed(3))
    torch.testing.assert_close(s, s_ref)
    ref = 0.0
    for i in range(6):
        row = torch.cat([(qr[i] @ k[i]).view(1), queue @ qr[i], s_ref[i] @ qr[i]]) / 0.2
        ref = ref - torch.log_softmax(row, 0)[0]
    ref = ref / 6
    ref.backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(q.grad, qr.grad)


@pytest.mark.parametrize("extrapolate_from", syn.EXTRAPOLATE_FROM)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_closed_form_synthetic_logits_equal_the_materialised_ones(extrapolate_from, seed):
    """Every type: the closed-form logits (no synthetic vectors) have the values and the
    gradient with respect to q of the materialised ones, draw for draw."""
    torch.manual_seed(seed)
    queue = unit(torch.randn(512, 32))
    q0, k = unit(torch.randn(8, 32)), unit(torch.randn(8, 32))
    kw = dict(n_hard=64, n1=16, n2=16, n3=16, n4=8, n5=8, n6=8, sigma=0.1, delta=0.05,
              eta=0.05, extrapolate_from=extrapolate_from)
    out = {}
    for how in syn.LOGITS:
        cfg = syn.SyntheticConfig(**kw, logits=how)
        q = q0.clone().requires_grad_(True)
        logits, vectors = synco_logits(q, k, queue, cfg, torch.Generator().manual_seed(seed))
        weights = torch.randn(logits.shape, generator=torch.Generator().manual_seed(9))
        (logits * weights).sum().backward()  # any downstream loss: a random linear one
        out[how] = (logits.detach(), q.grad, vectors)
    assert out["closed_form"][2] is None and out["materialize"][2].shape == (8, 72, 32)
    torch.testing.assert_close(out["closed_form"][0], out["materialize"][0], atol=2e-6, rtol=0)
    torch.testing.assert_close(out["closed_form"][1], out["materialize"][1], atol=2e-5, rtol=0)


def test_closed_form_refuses_the_finite_difference_perturbation():
    cfg = syn.SyntheticConfig(n_hard=8, n1=0, n2=0, n3=0, n4=0, n5=2, n6=2,
                              perturb_impl="finite_difference")
    q, queue = unit(torch.randn(2, 8)), unit(torch.randn(16, 8))
    hard = syn.select_hard(q @ queue.t(), 8)
    with pytest.raises(CdirError, match="closed_form"):
        syn.synthetic_logits(q, q @ queue.t(), queue, hard, cfg)
    logits, vectors = synco_logits(q, q, queue, cfg)  # falls back to the vectors
    assert vectors is not None and logits.shape == (2, 1 + 16 + 4)
    with pytest.raises(CdirError, match="logits"):
        syn.SyntheticConfig(logits="lazy").validate()


def test_synco_warmup_gating() -> None:
    torch.manual_seed(0)
    m = tiny("synco", queue_size=64, n_hard=16, n1=4, n2=4, n3=4, n4=2, n5=2, n6=2,
             warmup_epochs=2)
    q, k, queue = unit(torch.randn(4, 128)), unit(torch.randn(4, 128)), unit(torch.randn(64, 128))
    assert m.epoch == 0 and not m.synthetic_active
    m.set_epoch(1)
    logits, logs = m._logits(q, k, queue)
    assert logits.shape == (4, 65) and float(logs["n_syn"]) == 0
    assert float(m(images())["n_syn"]) == 0
    m.set_epoch(2)  # 0-based epoch == warmup_epochs: on, all at once (no ramp)
    logits, logs = m._logits(q, k, queue)
    assert logits.shape == (4, 65 + 18) and float(logs["n_syn"]) == 18
    out = m(images())
    assert float(out["n_syn"]) == 18 and torch.isfinite(out["loss"])


# --------------------------------------------------------------------------------------------
# ISD


def test_isd_kl_matches_reference() -> None:
    torch.manual_seed(0)
    s0, t, queue = unit(torch.randn(5, 8)), unit(torch.randn(5, 8)), unit(torch.randn(11, 8))
    s = s0.clone().requires_grad_(True)
    loss, _, _ = isd_loss(s, t, queue, temp_s=0.1, temp_t=0.01)
    ref = 0.0
    for i in range(5):
        lt = [float(t[i] @ queue[j]) / 0.01 for j in range(11)]
        ls = [float(s0[i] @ queue[j]) / 0.1 for j in range(11)]
        zt = max(lt) + math.log(sum(math.exp(v - max(lt)) for v in lt))
        zs = max(ls) + math.log(sum(math.exp(v - max(ls)) for v in ls))
        ref += sum(math.exp(a - zt) * ((a - zt) - (b - zs)) for a, b in zip(lt, ls, strict=True))
    assert loss.item() == pytest.approx(ref / 5, rel=1e-5, abs=1e-6)
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    # KL(p, p) = 0
    zero, _, _ = isd_loss(t, t, queue, 0.05, 0.05)
    assert abs(zero.item()) < 1e-6


def test_isd_variants_heads_and_views() -> None:
    m = tiny("isd", queue_size=32)
    assert m.views == ("strong", "strong") and m.queue.feats.shape == (32, 128)
    assert m.cfg.temp_t == m.cfg.temp_s == 0.02 and m.cfg.momentum == 0.999
    assert m.cfg.queue_size == 32
    assert isinstance(m.proj_q, torch.nn.Identity)
    lin = m.predictor[0]
    assert lin.bias is None and lin.out_features == 128
    p = tiny("isd_plus", queue_size=32)
    assert p.views == ("weak", "strong")
    assert (p.cfg.temp_t, p.cfg.temp_s, p.cfg.momentum) == (0.01, 0.1, 0.99)
    assert p.queue.feats.shape == (32, 32)  # f/4 with f = 128
    assert p.proj_q[0].out_features == 256 and p.predictor[0].in_features == 32
    assert tiny("isd_plus", queue_size=32, augmentation="strong/weak").views == ("strong", "weak")
    with pytest.raises(CdirError):
        tiny("isd", augmentation="weak")
    assert ISDConfig().queue_size == 128000 and ISDConfig().augmentation == "strong/strong"


# --------------------------------------------------------------------------------------------
# method-level behaviour shared by all methods


def seeded_tiny(name: str) -> torch.nn.Module:
    """A tiny ``name`` model built after seeding torch (SynCo with every kind of synthetic
    negative from the first step)."""
    torch.manual_seed(0)
    kw: dict = {"queue_size": 32}
    if name == "synco":
        kw.update(n_hard=8, n1=2, n2=2, n3=2, n4=1, n5=1, n6=1, warmup_epochs=0)
    return tiny(name, **kw)


@pytest.mark.parametrize("name", ["moco", "synco", "isd", "isd_plus"])
def test_method_step(name: str) -> None:
    m = seeded_tiny(name)
    m.train()
    prefix, mom = m.encoder_prefix, m.momentum_prefix
    opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
    out = m(images())
    assert out["loss"].requires_grad and out["loss"].dim() == 0
    assert all(not v.requires_grad for k, v in out.items() if k != "loss")
    out["loss"].backward()
    # the momentum/teacher side gets no gradient at all
    for n_, p in m.named_parameters():
        if n_.startswith(mom) or n_.startswith(("head_k.", "proj_k.")):
            assert not p.requires_grad and p.grad is None, n_
        else:
            assert p.requires_grad, n_
    assert any(p.grad is not None and p.grad.abs().sum() > 0
               for n_, p in m.named_parameters() if n_.startswith(prefix))
    # enqueue: one batch of unit rows at the pointer
    assert int(m.queue.ptr) == 8
    assert torch.allclose(m.queue.feats.norm(dim=1), torch.ones(32), atol=1e-5)
    opt.step()
    opt.zero_grad()
    # EMA: the next forward moves the momentum encoder by (1 - m) toward the query encoder
    q_params = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(prefix)}
    k_before = {k: v.clone() for k, v in m.state_dict().items() if k.startswith(mom)}
    assert any(not torch.equal(q_params[prefix + k[len(mom):]], v) for k, v in k_before.items()
               if "running" not in k and v.dtype.is_floating_point)  # the step moved the query
    m(images(seed=1))
    mo = m.cfg.momentum
    sd = m.state_dict()
    for k, before in k_before.items():
        if before.dtype.is_floating_point and "running" not in k:
            qk = prefix + k[len(mom):]
            torch.testing.assert_close(sd[k], mo * before + (1 - mo) * q_params[qk])
    assert int(m.queue.ptr) == 16
    # the retrieval backbone loads into a fresh build_backbone strictly
    enc = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    net, _ = build_backbone(m.encoder_arch["name"], **m.encoder_arch["kwargs"])
    net.load_state_dict(enc, strict=True)
    assert "queue.feats" in sd and "queue.ptr" in sd


@pytest.mark.parametrize("name", ["synco", "isd_plus"])
def test_method_under_bf16_autocast(name: str) -> None:
    m = seeded_tiny(name)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(images())
    assert out["loss"].dtype == torch.float32 and torch.isfinite(out["loss"])
    assert m.queue.feats.dtype == torch.float32
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_eval_mode_forward_changes_no_state() -> None:
    torch.manual_seed(0)
    m = tiny("moco", queue_size=32).eval()
    v = images()
    before = {k: t.clone() for k, t in m.state_dict().items()}
    with torch.no_grad():
        a = m(v)["loss"]
        b = m(v)["loss"]
    assert torch.equal(a, b)  # no EMA step, no enqueue, no shuffle: a pure function
    for k, t in m.state_dict().items():
        assert torch.equal(t, before[k]), k


def test_single_process_shuffle_bn_changes_key_statistics() -> None:
    """Keys come from shuffled BN sub-batches: with shuffle-BN off the keys differ."""
    torch.manual_seed(0)
    m = tiny("moco", queue_size=32, bn_splits=4)
    x = images(16)[1]
    with torch.no_grad():
        torch.manual_seed(1)
        k_split, k_all = m._encode_key(x)
        assert k_split is k_all and k_split.shape == (16, 128)
        m.cfg.shuffle_bn = False
        k_full, _ = m._encode_key(x)
        m.eval()
        k_eval, _ = m._encode_key(x)
    assert not torch.allclose(k_split, k_full, atol=1e-4)
    # in eval mode BN uses running statistics: keys are per-sample, no batch effects
    assert k_eval.shape == (16, 128)


def test_registry_defaults_and_errors() -> None:
    m = tiny("synco")
    c = m.cfg
    assert (c.dim, c.queue_size, c.momentum, c.temperature, c.mlp) == (128, 65536, 0.999, 0.2, True)
    s = c.synthetic
    assert (s.n_hard, s.counts, s.sigma, s.delta, s.eta) == (
        1024, (256, 256, 256, 64, 64, 64), 0.01, 0.01, 0.01)
    assert (s.alpha_max, s.beta_max, s.gamma_max) == (0.5, 1.5, 1.0)
    assert c.warmup_epochs == 10 and s.extrapolate_from == "query"
    assert s.perturb_impl == "closed_form"
    assert m.head_q[0].out_features == 128 and m.head_q[2].out_features == 128  # f -> f -> 128
    assert m.encoder_arch == {"name": "cifar_resnet18", "kwargs": TINY}
    assert "sigma" in method_options("synco") and "temp_s" in method_options("isd_plus")
    with pytest.raises(CdirError):
        tiny("simclr")
    with pytest.raises(CdirError):
        tiny("moco", n_hard=4)
    with pytest.raises(CdirError):
        tiny("synco", queue_size=64)  # n_hard 1024 > K
    with pytest.raises(CdirError):
        tiny("moco", temperature=0)


@pytest.mark.parametrize("group", [4, 8])
def test_select_hard_is_the_exact_top_n_however_the_groups_fall(group) -> None:
    """The grouped selection picks exactly the top-N set of every row: random rows, rows with
    many ties, a row whose top entries crowd into a few column groups (many in one group, the
    case a group's maximum alone would miss), a row with its top entries in the columns past
    the last whole group, and widths the groups do not divide."""
    g = torch.Generator().manual_seed(0)
    for width in (8192, 8197):
        x = torch.rand(7, width, generator=g)
        x[1] = torch.randint(0, 50, (width,), generator=g).float()  # ties
        groups = width // group
        x[2, 5::groups] += 10.0  # every member of group 5 on top ...
        x[2, 6::groups] += 10.0  # ... and of group 6
        x[3] = -x[3]
        x[4, group * groups:] += 10.0  # the tail columns (none when the group divides the width)
        x[5, :64] += 10.0  # a block of neighbours: 64 groups, one member each
        for n in (64, 100):
            got = syn.select_hard(x, n, group).sort(1).values
            want = torch.topk(x, n, dim=1).indices.sort(1).values
            for r in (0, 2, 3, 4, 5, 6):
                assert torch.equal(got[r], want[r]), (width, n, r)
            # with ties the set may differ among equal values; the values selected may not
            vals = x[1, got[1]].sort().values
            torch.testing.assert_close(vals, torch.topk(x[1], n).values.sort().values)
    wide = torch.rand(3, 100, generator=g)  # hard set a large part of the row: plain top-k
    assert torch.equal(syn.select_hard(wide, 40, group).sort(1).values,
                       torch.topk(wide, 40, dim=1).indices.sort(1).values)
    assert syn.select_hard(torch.rand(0, 100), 10, group).shape == (0, 10)
