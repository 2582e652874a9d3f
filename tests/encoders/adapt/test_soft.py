"""xdomain's cross-domain neighbour targets (``method.soft_weight``): the targets' maths on a
tiny case, the loss against a hand computation, and a short run that trains with them and
resumes exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.encoders.adapt.test_adapt import _adapt, _recipe, tiny  # noqa: F401 (fixture)

torch.set_num_threads(1)


def test_soft_neighbours_cover_every_other_domain() -> None:
    from encoders.adapt.mining import soft_neighbours

    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 5)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    dom = np.array(["a"] * 4 + ["b"] * 5 + ["c"] * 3)
    idx, w = soft_neighbours(x, dom, k=2, temperature=0.1)
    assert idx.shape == w.shape == (12, 4)
    np.testing.assert_allclose(w.sum(1), 1.0, rtol=1e-6)
    for i in range(12):
        blocks = [idx[i, :2], idx[i, 2:]]
        others = sorted({"a", "b", "c"} - {dom[i]})
        for block, name, weight in zip(blocks, others, [w[i, :2], w[i, 2:]], strict=True):
            assert (dom[block] == name).all()
            np.testing.assert_allclose(weight.sum(), 0.5, rtol=1e-6)
            cand = np.flatnonzero(dom == name)
            sims = x[cand] @ x[i]
            assert block[0] == cand[sims.argmax()]  # the nearest first, with the most weight
            assert weight[0] >= weight[1]
            expect = np.exp(np.sort(sims)[::-1][:2] / 0.1)
            np.testing.assert_allclose(weight, 0.5 * expect / expect.sum(), rtol=1e-5)
    # a sharper temperature puts more weight on the nearest
    _, sharp = soft_neighbours(x, dom, k=2, temperature=0.01)
    assert (sharp[:, [0, 2]] >= w[:, [0, 2]] - 1e-6).all()


def test_soft_loss_is_the_cross_entropy_per_other_domain() -> None:
    from encoders.adapt.xdomain import XDomain, XDomainConfig
    from encoders.zoo.backbones import build_backbone

    backbone, feat_dim = build_backbone("resnet18", width=0.125, small_stem=True)
    model = XDomain(backbone, feat_dim, XDomainConfig(dim=8, soft_weight=1.0, soft_k=2))
    codes = torch.tensor([0, 0, 1, 1, 1, 2])
    model.set_domains(codes)
    g = torch.Generator().manual_seed(0)
    bank = torch.nn.functional.normalize(torch.randn(6, feat_dim, generator=g), dim=1)
    idx = torch.tensor([[2, 3, 5, 5], [4, 2, 5, 5], [0, 1, 5, 5], [1, 0, 5, 5], [0, 1, 5, 5],
                        [0, 1, 2, 3]])
    w = torch.tensor([[0.4, 0.1, 0.5, 0.0]] * 6)
    model.set_soft(idx, w, bank.half())
    feats = torch.randn(2, feat_dim, generator=g)
    rows = torch.tensor([0, 5])
    got = model.soft_loss(feats, rows)
    f = torch.nn.functional.normalize(feats, dim=1)
    logits = f @ model.bank.float().T / model.cfg.soft_student_t
    expect = []
    for r, i in enumerate(rows.tolist()):
        total = 0.0
        for j, weight in zip(idx[i].tolist(), w[i].tolist(), strict=True):
            same = codes == codes[j]
            total -= weight * torch.log_softmax(logits[r, same], 0)[
                int(same[:j].sum())].item()
        expect.append(total)
    assert got.item() == pytest.approx(float(np.mean(expect)), rel=1e-5)


def test_soft_targets_train_and_resume_exactly(tiny: tuple[Path, Path],  # noqa: F811
                                               tmp_path: Path) -> None:
    from encoders.engine.checkpoint import load_checkpoint, read_file

    ws, enc = tiny
    recipe = _recipe(tmp_path, epochs=3, soft_weight=1.0, soft_k=2)
    full = _adapt(ws, enc, recipe, tmp_path / "full")
    assert all(np.isfinite(full["losses"]))
    ckpt = load_checkpoint(tmp_path / "full" / "latest.pt")
    w = ckpt["model"]["soft_w"]  # 3 domains: 2 other domains x soft_k 2
    assert w.shape == (30, 4) and torch.allclose(w.sum(1), torch.ones(30))
    assert ckpt["model"]["bank"].float().norm(dim=1).sub(1).abs().max() < 1e-2
    start = read_file(enc)["encoder"]
    trained = ckpt["model"][f"{ckpt['encoder_prefix']}conv1.weight"]
    assert not torch.allclose(trained.float(), start["conv1.weight"].float())

    (tmp_path / "p").mkdir()
    plain = _adapt(ws, enc, _recipe(tmp_path / "p", epochs=1), tmp_path / "plain")
    assert plain["losses"] != full["losses"][:3]  # the targets change the loss

    part1 = _adapt(ws, enc, recipe, tmp_path / "part", stop_at=1)
    part2 = _adapt(ws, enc, recipe, tmp_path / "part", resume="auto")
    np.testing.assert_allclose(part1["losses"] + part2["losses"], full["losses"],
                               rtol=1e-6, atol=1e-7)
