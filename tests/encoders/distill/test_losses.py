"""Distillation losses (KD, CRD, CRD-FIFO, DCD, RRD), their memories, the registry and the
student objective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cdir.core.errors import CdirError
from encoders.distill.losses import LOSSES, build_loss, loss_options
from encoders.distill.losses.crd import nce_loss
from encoders.distill.losses.dcd import dcd_loss
from encoders.distill.losses.kd import kd_divergence
from encoders.distill.losses.objective import StudentObjective

torch.set_num_threads(1)

B, S_DIM, T_DIM = 8, 12, 20


def feats(seed: int = 0, b: int = B) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, S_DIM, generator=g).requires_grad_(True),
            torch.randn(b, T_DIM, generator=g))


def unit(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=1)


# --------------------------------------------------------------------------------------------
# registry


def test_registry_names_and_options() -> None:
    assert list(LOSSES) == ["kd", "crd", "crd_fifo", "dcd", "rrd"]
    assert {"queue_size", "temp_s", "temp_t", "enqueue_before_loss",
            "freeze_teacher_proj"} <= set(loss_options("rrd"))
    with pytest.raises(CdirError, match="unknown distillation loss 'fitnet'.*rrd"):
        build_loss("fitnet", S_DIM, T_DIM)
    with pytest.raises(CdirError, match=r"unknown option\(s\) \['tau'\] for loss 'rrd'"):
        build_loss("rrd", S_DIM, T_DIM, tau=0.1)
    with pytest.raises(CdirError, match="crd needs n_data"):
        build_loss("crd", S_DIM, T_DIM)


def test_spec_defaults() -> None:
    rrd = build_loss("rrd", S_DIM, T_DIM)
    assert (rrd.queue.size, rrd.queue.dim, rrd.temp_s, rrd.temp_t) == (16384, 128, 0.1, 0.02)
    assert rrd.enqueue_before_loss and not any(p.requires_grad for p in rrd.embed_t.parameters())
    crd = build_loss("crd", S_DIM, T_DIM, 50000)
    c = crd.contrast
    assert (c.bank_s.shape, c.k, c.temperature, c.momentum) == ((50000, 128), 16384, 0.07, 0.5)
    fifo = build_loss("crd_fifo", S_DIM, T_DIM)
    assert (fifo.queue.size, fifo.temperature, fifo.enqueue_before_loss) == (16384, 0.07, False)
    dcd = build_loss("dcd", S_DIM, T_DIM)
    assert dcd.alpha == 0.5 and dcd.max_tau == 10.0 and float(dcd.bias.detach()) == 0.0
    assert math.isclose(float(dcd.tau().detach()), math.e, rel_tol=1e-6)
    assert build_loss("kd", S_DIM, T_DIM).temperature == 4.0


def test_state_lives_in_the_state_dict() -> None:
    """Memories are buffers and learnable scalars parameters: a checkpoint holds them."""
    keys = {name: set(build_loss(name, S_DIM, T_DIM, 30, **kw).state_dict())
            for name, kw in [("rrd", {"queue_size": 16}), ("crd_fifo", {"queue_size": 16}),
                             ("crd", {"nce_k": 4}), ("dcd", {})]}
    assert {"queue.feats", "queue.ptr", "embed_s.weight", "embed_t.weight"} <= keys["rrd"]
    assert {"queue.feats", "queue.ptr"} <= keys["crd_fifo"]
    assert {"contrast.bank_s", "contrast.bank_t", "contrast.z_s", "contrast.z_t"} <= keys["crd"]
    assert {"log_tau", "bias", "embed_s.weight", "embed_t.weight"} <= keys["dcd"]


# --------------------------------------------------------------------------------------------
# KD and the objective


def test_kd_matches_a_hand_computation() -> None:
    zs = torch.tensor([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]])
    zt = torch.tensor([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]])
    t = 4.0
    expect = 0.0
    for i in range(2):
        es = [math.exp(v / t) for v in zs[i].tolist()]
        et = [math.exp(v / t) for v in zt[i].tolist()]
        ps = [e / sum(es) for e in es]
        pt = [e / sum(et) for e in et]
        expect += sum(q * math.log(q / p) for p, q in zip(ps, pt, strict=True))
    expect = expect / 2 * t * t
    assert math.isclose(float(kd_divergence(zs, zt, t)), expect, rel_tol=1e-5)
    kd = build_loss("kd", S_DIM, T_DIM)
    assert math.isclose(float(kd(None, None, zs, zt)), expect, rel_tol=1e-5)
    with pytest.raises(CdirError, match="logits"):
        kd(zs, zt)


def test_objective_weighs_the_terms() -> None:
    g = torch.Generator().manual_seed(0)
    zs = torch.randn(4, 5, generator=g, requires_grad=True)
    zt, y = torch.randn(4, 5, generator=g), torch.tensor([0, 1, 2, 3])
    method = (zs ** 2).mean()
    obj = StudentObjective(alpha=0.9, beta=0.8, gamma=0.1)
    total, parts = obj(zs, y, zt, method)
    expect = 0.1 * F.cross_entropy(zs, y) + 0.9 * kd_divergence(zs, zt, 4.0) + 0.8 * method
    assert torch.allclose(total, expect) and set(parts) == {"ce", "kd", "distill"}
    assert not any(v.requires_grad for v in parts.values())
    total.backward()
    assert zs.grad is not None
    # a zero weight skips its term (no teacher logits needed without KD)
    total, parts = StudentObjective(alpha=0.0, beta=1.0)(zs, y, None, method)
    assert set(parts) == {"ce", "distill"}
    with pytest.raises(CdirError, match="teacher's logits"):
        StudentObjective(alpha=1.0, beta=0.0)(zs, y)
    with pytest.raises(CdirError, match="method's loss"):
        StudentObjective(alpha=0.0, beta=1.0)(zs, y)
    with pytest.raises(CdirError):
        StudentObjective(alpha=0.0, beta=0.0, gamma=0.0)


def test_objective_recipes_are_the_readme_weights() -> None:
    def weights(o: StudentObjective) -> tuple[float, float, float]:
        return o.gamma, o.alpha, o.beta

    assert weights(StudentObjective.recipe("kd")) == (0.1, 0.9, 0.0)
    assert weights(StudentObjective.recipe("crd")) == (1.0, 0.0, 0.8)
    assert weights(StudentObjective.recipe("crd", with_kd=True)) == (1.0, 1.0, 0.8)
    for name in ("dcd", "rrd"):
        assert weights(StudentObjective.recipe(name)) == (1.0, 0.0, 1.0)
        assert weights(StudentObjective.recipe(name, with_kd=True)) == (1.0, 1.0, 1.0)
    assert StudentObjective.recipe("dcd").kd_temperature == 4.0


# --------------------------------------------------------------------------------------------
# DCD


def test_dcd_matches_its_definition() -> None:
    g = torch.Generator().manual_seed(3)
    zs, zt = unit(torch.randn(5, 4, generator=g)), unit(torch.randn(5, 4, generator=g))
    tau, b = torch.tensor(2.5), torch.tensor(0.3)
    z = tau * zs @ zt.t() + b
    p, qt = z.softmax(dim=1), z.softmax(dim=0).t()
    contrast = -torch.log(torch.diagonal(p)).mean()
    consist = (qt * (qt.log() - p.log())).sum(dim=1).mean()
    assert torch.allclose(dcd_loss(zs, zt, tau, b, alpha=0.5), contrast + 0.5 * consist)


def test_dcd_scale_and_bias_are_trained_parameters() -> None:
    torch.manual_seed(0)
    loss_fn = build_loss("dcd", S_DIM, T_DIM, feat_dim=16)
    params = dict(loss_fn.named_parameters())
    assert {"log_tau", "bias", "embed_s.weight", "embed_t.weight"} <= set(params)
    opt = torch.optim.SGD(loss_fn.parameters(), lr=0.5)
    assert any(p is loss_fn.log_tau for grp in opt.param_groups for p in grp["params"])
    assert any(p is loss_fn.bias for grp in opt.param_groups for p in grp["params"])
    f_s, f_t = feats()
    loss_fn(f_s, f_t).backward()
    assert loss_fn.log_tau.grad is not None and abs(float(loss_fn.log_tau.grad)) > 1e-4
    assert loss_fn.embed_t.weight.grad is not None  # the teacher projection trains too
    # b is in the graph, but a constant added to every logit cancels in both softmaxes: its
    # gradient is zero up to rounding (the reference behaves the same)
    assert loss_fn.bias.grad is not None and abs(float(loss_fn.bias.grad)) < 1e-5
    before = float(loss_fn.log_tau.detach())
    opt.step()
    assert float(loss_fn.log_tau.detach()) != before
    zs, zt = unit(torch.randn(4, 3)), unit(torch.randn(4, 3))
    assert torch.allclose(dcd_loss(zs, zt, torch.tensor(3.0), torch.tensor(0.0)),
                          dcd_loss(zs, zt, torch.tensor(3.0), torch.tensor(7.0)), atol=1e-5)


def test_dcd_tau_is_clamped_at_10() -> None:
    loss_fn = build_loss("dcd", S_DIM, T_DIM, feat_dim=16)
    with torch.no_grad():
        loss_fn.log_tau.fill_(5.0)  # exp(5) = 148
    assert float(loss_fn.tau().detach()) == 10.0
    f_s, f_t = feats()
    loss_fn(f_s, f_t).backward()
    assert float(loss_fn.log_tau.grad) == 0.0  # no push beyond the clamp


# --------------------------------------------------------------------------------------------
# FIFO queues (RRD, CRD-FIFO)


@pytest.mark.parametrize("name", ["rrd", "crd_fifo"])
def test_queue_init_is_row_normalised(name: str) -> None:
    q = build_loss(name, S_DIM, T_DIM, queue_size=64, feat_dim=16).queue.feats
    assert torch.allclose(q.norm(dim=1), torch.ones(64), atol=1e-6)
    assert not torch.allclose(q.norm(dim=0), torch.ones(16), atol=0.1)  # not the columns


@pytest.mark.parametrize("name", ["rrd", "crd_fifo"])
def test_fifo_pointer_wraps(name: str) -> None:
    loss_fn = build_loss(name, S_DIM, T_DIM, queue_size=12, feat_dim=8)
    init = loss_fn.queue.feats.clone()
    keys = []
    for step in range(2):
        f_s, f_t = feats(step)
        loss_fn(f_s, f_t)
        keys.append(unit(loss_fn.embed_t(f_t)).detach())
    assert int(loss_fn.queue.ptr) == (8 + 8) % 12
    q = loss_fn.queue.feats
    # step 0 filled rows 0-7; step 1 filled 8-11, then wrapped to 0-3
    assert torch.allclose(q[8:], keys[1][:4], atol=1e-6)
    assert torch.allclose(q[:4], keys[1][4:], atol=1e-6)
    assert torch.allclose(q[4:8], keys[0][4:], atol=1e-6)
    assert not torch.equal(q, init)


def test_rrd_is_infonce_as_tau_t_goes_to_zero() -> None:
    """Enqueue-before: each sample's own teacher key is in the memory; with a near-zero tau_t
    the target is one-hot on it and RRD is InfoNCE (positive: own key, negatives: the rest of
    the queue) at temperature tau_s."""
    torch.manual_seed(0)
    loss_fn = build_loss("rrd", S_DIM, T_DIM, queue_size=32, feat_dim=16, temp_t=1e-4)
    old = loss_fn.queue.feats.clone()
    f_s, f_t = feats()
    got = loss_fn(f_s, f_t)
    z_s, z_t = unit(loss_fn.embed_s(f_s)), unit(loss_fn.embed_t(f_t))
    pos = (z_s * z_t).sum(1, keepdim=True)
    neg = z_s @ old[B:].t()  # the queue rows the batch did not overwrite
    others = z_s @ z_t.t()  # the batch's other keys are negatives too
    others = others.masked_fill(torch.eye(B, dtype=torch.bool), float("-inf"))
    infonce = F.cross_entropy(torch.cat([pos, others, neg], 1) / 0.1,
                              torch.zeros(B, dtype=torch.long))
    assert torch.allclose(got, infonce, atol=1e-4)
    assert torch.allclose(loss_fn.queue.feats[:B], z_t.detach(), atol=1e-6)


def test_rrd_matches_its_definition_in_both_orders() -> None:
    for before in (True, False):
        torch.manual_seed(0)
        loss_fn = build_loss("rrd", S_DIM, T_DIM, queue_size=16, feat_dim=8,
                             enqueue_before_loss=before)
        old = loss_fn.queue.feats.clone()
        f_s, f_t = feats()
        got = loss_fn(f_s, f_t)
        z_s, z_t = unit(loss_fn.embed_s(f_s)), unit(loss_fn.embed_t(f_t))
        mem = old.clone()
        if before:
            mem[:B] = z_t
        p_t = (z_t @ mem.t() / 0.02).softmax(1)
        expect = -(p_t * (z_s @ mem.t() / 0.1).log_softmax(1)).sum(1).mean()
        assert torch.allclose(got, expect, atol=1e-5), before
        assert torch.allclose(loss_fn.queue.feats[:B], z_t.detach(), atol=1e-6)  # enqueued


def test_rrd_teacher_projection_gets_no_gradient_unless_asked() -> None:
    f_s, f_t = feats()
    frozen = build_loss("rrd", S_DIM, T_DIM, queue_size=16, feat_dim=8)
    frozen(f_s, f_t).backward()
    assert frozen.embed_t.weight.grad is None and frozen.embed_s.weight.grad is not None
    live = build_loss("rrd", S_DIM, T_DIM, queue_size=16, feat_dim=8,
                      freeze_teacher_proj=False)
    live(f_s, f_t).backward()
    assert live.embed_t.weight.grad is not None and live.embed_t.weight.grad.abs().sum() > 0
    with pytest.raises(CdirError, match="enqueue_before_loss"):
        build_loss("rrd", S_DIM, T_DIM, freeze_teacher_proj=False, enqueue_before_loss=False)


def test_eval_mode_changes_no_state() -> None:
    for name, kw in [("rrd", {"queue_size": 16}), ("crd_fifo", {"queue_size": 16}),
                     ("crd", {"nce_k": 4})]:
        loss_fn = build_loss(name, S_DIM, T_DIM, 30, feat_dim=8, **kw).eval()
        before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
        f_s, f_t = feats()
        loss = loss_fn(f_s, f_t, idx=torch.arange(B))
        assert torch.isfinite(loss)
        for k, v in loss_fn.state_dict().items():
            assert torch.equal(v, before[k]), (name, k)


def test_queue_must_hold_a_batch() -> None:
    loss_fn = build_loss("rrd", S_DIM, T_DIM, queue_size=4, feat_dim=8)
    with pytest.raises(CdirError, match="at least one global batch"):
        loss_fn(*feats())


def test_rrd_under_autocast_stays_float32() -> None:
    loss_fn = build_loss("rrd", S_DIM, T_DIM, queue_size=16, feat_dim=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(*feats())
    assert loss.dtype == torch.float32


def test_crd_fifo_is_infonce_against_past_keys() -> None:
    torch.manual_seed(0)
    loss_fn = build_loss("crd_fifo", S_DIM, T_DIM, queue_size=16, feat_dim=8)
    old = loss_fn.queue.feats.clone()
    f_s, f_t = feats()
    got = loss_fn(f_s, f_t)
    z_s, z_t = unit(loss_fn.embed_s(f_s)), unit(loss_fn.embed_t(f_t))
    logits = torch.cat([(z_s * z_t).sum(1, keepdim=True), z_s @ old.t()], 1) / 0.07
    assert torch.allclose(got, F.cross_entropy(logits, torch.zeros(B, dtype=torch.long)),
                          atol=1e-5)
    got.backward()
    assert loss_fn.embed_t.weight.grad is not None  # through the positive


# --------------------------------------------------------------------------------------------
# CRD with momentum memory banks


def test_crd_banks_init_uniform() -> None:
    c = build_loss("crd", S_DIM, T_DIM, 40, feat_dim=12, nce_k=4).contrast
    bound = 1 / math.sqrt(12 / 3)
    for bank in (c.bank_s, c.bank_t):
        assert bank.abs().max() <= bound and bank.abs().max() > 0.9 * bound
    assert float(c.z_s) == -1.0 and float(c.z_t) == -1.0


def test_crd_memory_momentum_update_on_the_indexed_rows() -> None:
    torch.manual_seed(0)
    n, k = 40, 6
    loss_fn = build_loss("crd", S_DIM, T_DIM, n, feat_dim=8, nce_k=k)
    c = loss_fn.contrast
    old_s, old_t = c.bank_s.clone(), c.bank_t.clone()
    idx = torch.tensor([3, 7, 11, 20, 21, 30, 33, 39])
    f_s, f_t = feats()
    loss_fn(f_s, f_t, idx=idx)
    v_s, v_t = unit(loss_fn.embed_s(f_s)).detach(), unit(loss_fn.embed_t(f_t)).detach()
    assert torch.allclose(c.bank_s[idx], unit(0.5 * old_s[idx] + 0.5 * v_s), atol=1e-6)
    assert torch.allclose(c.bank_t[idx], unit(0.5 * old_t[idx] + 0.5 * v_t), atol=1e-6)
    assert torch.allclose(c.bank_s[idx].norm(dim=1), torch.ones(B), atol=1e-6)
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(c.bank_s[rest], old_s[rest]) and torch.equal(c.bank_t[rest], old_t[rest])
    # the normalisation constants are fixed by the first batch
    z = (float(c.z_s), float(c.z_t))
    assert min(z) > 0
    loss_fn(*feats(1), idx=idx)
    assert (float(c.z_s), float(c.z_t)) == z


def test_crd_scores_and_nce_match_a_direct_computation() -> None:
    torch.manual_seed(0)
    n, k, t = 40, 5, 0.07
    loss_fn = build_loss("crd", S_DIM, T_DIM, n, feat_dim=8, nce_k=k)
    c = loss_fn.contrast
    bank_s, bank_t = c.bank_s.clone(), c.bank_t.clone()
    idx = torch.arange(B) * 3
    rows = torch.randint(0, n, (B, k + 1))
    rows[:, 0] = idx
    f_s, f_t = feats()
    got = loss_fn(f_s, f_t, idx=idx, contrast_idx=rows)
    v_s, v_t = unit(loss_fn.embed_s(f_s)), unit(loss_fn.embed_t(f_t))
    out_s = torch.exp(torch.einsum("bkd,bd->bk", bank_t[rows], v_s) / t)
    out_t = torch.exp(torch.einsum("bkd,bd->bk", bank_s[rows], v_t) / t)
    out_s, out_t = out_s / (out_s.mean() * n), out_t / (out_t.mean() * n)

    def nce(x: torch.Tensor) -> torch.Tensor:  # log D(positive) + sum log(1 - D(negative))
        pn = k / n
        return -(torch.log(x[:, 0] / (x[:, 0] + pn + 1e-7)).sum()
                 + torch.log(pn / (x[:, 1:] + pn + 1e-7)).sum()) / x.shape[0]

    assert torch.allclose(got, nce(out_s) + nce(out_t), rtol=1e-5)
    assert torch.allclose(nce_loss(out_s, n), nce(out_s))
    got.backward()
    assert loss_fn.embed_t.weight.grad is not None and f_s.grad is not None


def test_crd_input_errors() -> None:
    loss_fn = build_loss("crd", S_DIM, T_DIM, 40, feat_dim=8, nce_k=4)
    f_s, f_t = feats()
    with pytest.raises(CdirError, match="needs idx"):
        loss_fn(f_s, f_t)
    with pytest.raises(CdirError, match="contrast_idx"):
        loss_fn(f_s, f_t, idx=torch.arange(B), contrast_idx=torch.zeros(B, 3, dtype=torch.long))


def test_crd_negatives_come_from_other_classes_when_labels_exist() -> None:
    """RepDistiller's sampler: no negative of an anchor shares its label (so none is its own
    row), and every row of the other classes can be drawn."""
    from encoders.distill.losses.objective import StudentObjective
    from encoders.distill.student import Distiller

    torch.manual_seed(0)
    labels = torch.tensor([2, 0, 1, 0, 2, 2, 1, 0, 0, 1, 2, 1])
    n = len(labels)
    loss_fn = build_loss("crd", S_DIM, T_DIM, n, feat_dim=8, nce_k=64)
    # the labelled trainer hands its labels to the loss
    Distiller(torch.nn.Linear(3, 3), labels, StudentObjective.recipe("crd"), loss=loss_fn)
    idx = torch.arange(n)
    rows = loss_fn.contrast.rows(idx, None)
    assert rows.shape == (n, 65) and torch.equal(rows[:, 0], idx)
    negatives = rows[:, 1:]
    assert not (labels[negatives] == labels[:, None]).any()
    for i in range(n):  # 64 draws of 8 rows: each other-class row turns up
        others = torch.nonzero(labels != labels[i]).flatten()
        assert set(negatives[i].tolist()) == set(others.tolist())
    # draws from many anchors of one class are spread evenly over the other classes' rows
    many = loss_fn.contrast.rows(torch.full((200,), 1), None)[:, 1:].reshape(-1)
    counts = torch.bincount(many, minlength=n)[labels != 0].float()
    assert counts.min() > 0.8 * counts.mean()
    with pytest.raises(CdirError, match="same label"):
        loss_fn.set_labels(torch.zeros(n, dtype=torch.long))
    with pytest.raises(CdirError, match="3 labels"):
        loss_fn.set_labels(torch.zeros(3, dtype=torch.long))


def test_crd_without_labels_never_draws_the_anchors_own_row() -> None:
    torch.manual_seed(0)
    n = 6
    loss_fn = build_loss("crd", S_DIM, T_DIM, n, feat_dim=8, nce_k=50)
    idx = torch.tensor([0, 3, 5, 5, 1, 2, 4, 0])
    rows = loss_fn.contrast.rows(idx, None)
    assert not (rows[:, 1:] == idx[:, None]).any()
    for i, a in enumerate(idx.tolist()):
        assert set(rows[i, 1:].tolist()) == set(range(n)) - {a}
    # labels given and then taken away: back to excluding the own row only
    loss_fn.set_labels(torch.tensor([0, 0, 0, 1, 1, 1]))
    loss_fn.set_labels(None)
    rows = loss_fn.contrast.rows(torch.tensor([0]), None)
    assert set(rows[0, 1:].tolist()) == {1, 2, 3, 4, 5}


def test_crd_scores_through_the_whole_bank_equal_the_gathered_rows() -> None:
    """When more rows are drawn than the bank holds, CRD scores the bank once and picks; the
    values and the gradient equal scoring the gathered rows."""
    from encoders.distill.losses.crd import ContrastMemory

    torch.manual_seed(0)
    mem = ContrastMemory(16, n_data=40, k=30)
    v = F.normalize(torch.randn(4, 16), dim=1).requires_grad_()
    rows = mem.rows(torch.arange(4), None)
    assert rows.numel() > 40  # the whole-bank path
    z = torch.tensor(1.0)
    fast = mem._score(mem.bank_t, v, rows, z)
    (g_fast,) = torch.autograd.grad(fast.sum(), v)
    w = mem.bank_t[rows]
    slow = torch.exp(torch.einsum("bkd,bd->bk", w, v) / mem.temperature)
    (g_slow,) = torch.autograd.grad(slow.sum(), v)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-5, atol=1e-6)
