"""The transfer linear probe (eval.transfer): a frozen random zoo student and a tiny synthetic
two-class set (dark vs bright 32 px images) whose class its features carry."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset
from torchvision import transforms

from cdir.core.errors import CdirError
from encoders.zoo import create_model
from eval.transfer import ProbeConfig, student_features, transfer_probe

torch.set_num_threads(1)


class Brightness(Dataset):
    """``n`` 32 px images, class 0 dark and class 1 bright, with pixel noise; rows in ``bad`` are
    unreadable (ok False, a zero image). ``augment``: the testbed's crop + flip."""

    def __init__(self, n: int = 40, seed: int = 0, bad: tuple[int, ...] = (),
                 augment: bool = False) -> None:
        g = torch.Generator().manual_seed(seed)
        self.y = torch.arange(n) % 2
        level = torch.where(self.y == 1, 0.8, -0.8)
        self.x = level[:, None, None, None] + 0.3 * torch.randn(n, 3, 32, 32, generator=g)
        self.bad = set(bad)
        self.aug = transforms.Compose([transforms.RandomCrop(32, padding=4),
                                       transforms.RandomHorizontalFlip()]) if augment else None

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        if i in self.bad:
            return torch.zeros(3, 32, 32), 0, False
        x = self.x[i] if self.aug is None else self.aug(self.x[i])
        return x, int(self.y[i]), True


class _Shifted(Brightness):
    """Labels 1 and 2: one past the last class of a two-class probe."""

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, bool]:
        x, y, ok = super().__getitem__(i)
        return x, y + 1, ok


class _Dict(nn.Module):
    """A module whose output is neither a tensor nor has ``.feat``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"feat": self.conv(x).mean((2, 3))}


def _student() -> nn.Module:
    torch.manual_seed(0)
    return create_model("resnet8", 100)


def _cfg(**kw: object) -> ProbeConfig:
    base = {"epochs": 6, "batch_size": 16, "workers": 0, "milestones": (4,)}
    return ProbeConfig(**{**base, **kw})


def test_probe_learns_and_leaves_the_student_untouched() -> None:
    model = _student()
    model.train()  # the probe switches to eval for its run and restores the mode afterwards
    before = {k: v.clone() for k, v in model.state_dict().items()}
    res = transfer_probe(student_features(model), model.feat_dim, Brightness(augment=True),
                         Brightness(20, seed=1), 2, _cfg())
    assert res["last"] >= 90.0
    assert res["train_images"] == 40 and res["test_images"] == 20 and res["skipped"] == 0
    # parameters and BatchNorm buffers bit-for-bit as they were
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert model.training and all(p.requires_grad for p in model.parameters())
    # last / best / best_epoch agree with the history
    hist = res["history"]
    assert [h["epoch"] for h in hist] == list(range(1, 7)) and res["epochs"] == 6
    assert res["last"] == hist[-1]["top1"]
    assert res["best"] == max(h["top1"] for h in hist)
    assert hist[res["best_epoch"] - 1]["top1"] == res["best"]
    assert all(h["top1"] < res["best"] for h in hist[: res["best_epoch"] - 1])  # first best
    assert all(h["loss"] > 0 for h in hist) and res["seconds"] > 0


def test_zoo_model_directly_and_cached_features() -> None:
    model = _student()
    # the zoo model itself (its NetOutput's .feat), on cached un-augmented train features
    res = transfer_probe(model, model.feat_dim, Brightness(), Brightness(20, seed=1), 2,
                         _cfg(cache_features=True, eval_every=4))
    assert res["last"] >= 90.0 and res["train_images"] == 40
    tops = [h["top1"] for h in res["history"]]
    assert tops[:3] == [None] * 3 and tops[3] is not None and tops[4] is None
    assert tops[5] == res["last"]  # the last epoch is always evaluated
    assert res["best_epoch"] in (4, 6)
    # seeded: the same run gives the same numbers
    again = transfer_probe(model, model.feat_dim, Brightness(), Brightness(20, seed=1), 2,
                           _cfg(cache_features=True, eval_every=4))
    assert [h["loss"] for h in again["history"]] == [h["loss"] for h in res["history"]]


def test_only_the_head_is_optimised_with_plain_module() -> None:
    # a plain module returning a tensor; its gradients stay None (no_grad forward)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    before = [p.clone() for p in net.parameters()]
    res = transfer_probe(net, 8, Brightness(), Brightness(20, seed=1), 2, _cfg(lr=0.5))
    assert res["last"] >= 90.0
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
    assert all(p.grad is None for p in net.parameters())


def test_unreadable_rows_are_dropped_and_counted() -> None:
    model = _student()
    for cache in (False, True):
        res = transfer_probe(student_features(model), model.feat_dim,
                             Brightness(bad=(0, 5, 7)), Brightness(20, seed=1, bad=(2,)), 2,
                             _cfg(epochs=2, cache_features=cache))
        assert res["skipped"] == 4  # counted once, not once per epoch
        assert res["train_images"] == 37 and res["test_images"] == 19


def test_lr_schedule_steps_at_milestones() -> None:
    model = _student()
    res = transfer_probe(student_features(model), model.feat_dim, Brightness(),
                         Brightness(10, seed=1), 2,
                         _cfg(epochs=4, milestones=(1, 3), lr=0.05, cache_features=True))
    lrs = [h["lr"] for h in res["history"]]
    assert lrs == pytest.approx([0.05, 0.005, 0.005, 0.0005])


def test_defaults_are_the_testbed_recipe() -> None:
    cfg = ProbeConfig()
    assert (cfg.epochs, cfg.lr, cfg.momentum, cfg.weight_decay, cfg.batch_size) == (
        120, 0.05, 0.9, 5e-4, 64)
    assert cfg.milestones == (30, 60, 90) and cfg.gamma == 0.1 and not cfg.cache_features


def test_input_errors() -> None:
    model = _student()
    feats = student_features(model)
    assert feats.feat_dim == 64
    with pytest.raises(CdirError, match=r"feat_dim is 32 .*\(16, 64\)"):
        transfer_probe(feats, 32, Brightness(), Brightness(20), 2, _cfg(epochs=1))
    with pytest.raises(CdirError, match="num_classes must be at least 2"):
        transfer_probe(feats, 64, Brightness(), Brightness(20), 1, _cfg(epochs=1))
    with pytest.raises(CdirError, match=r"label 2 is outside 0\.\.1"):
        transfer_probe(feats, 64, Brightness(), _Shifted(), 2, _cfg(epochs=1))
    with pytest.raises(CdirError, match="no readable images"):
        transfer_probe(feats, 64, Brightness(), Brightness(4, bad=(0, 1, 2, 3)), 2,
                       _cfg(epochs=1))
    with pytest.raises(CdirError, match="epochs must be at least 1"):
        transfer_probe(feats, 64, Brightness(), Brightness(20), 2, _cfg(epochs=0))
    with pytest.raises(CdirError, match="expected a tensor"):
        transfer_probe(_Dict(), 64, Brightness(), Brightness(20), 2, _cfg(epochs=1))


def test_augmented_runs_are_seeded_with_workers_and_leave_the_callers_rng() -> None:
    model = _student()
    state = torch.get_rng_state()
    runs = [transfer_probe(student_features(model), model.feat_dim, Brightness(augment=True),
                           Brightness(10, seed=1), 2, _cfg(epochs=2, workers=w))
            for w in (0, 0, 1)]
    assert runs[0]["history"] == runs[1]["history"]
    assert runs[2]["train_images"] == 40 and runs[2]["last"] is not None
    assert torch.equal(state, torch.get_rng_state())
