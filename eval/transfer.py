"""The transfer linear probe of the distillation testbed (CRD / RepDistiller protocol).

A student trained on CIFAR-100 is frozen and its classifier replaced by a new
``nn.Linear(feat_dim, num_classes)`` for the target set (STL-10: 10 classes, Tiny-ImageNet: 200);
only that head is trained, and the result is top-1 on the target's test set.

The recipe (the :class:`ProbeConfig` defaults are the testbed's):

- head weights N(0, 0.01), bias 0; it is the only thing in the optimiser;
- SGD lr 0.05, momentum 0.9, weight decay 5e-4, batch 64, 120 epochs, lr x0.1 after epochs 30,
  60 and 90 (epoch 31 is the first at 0.005, as in the testbed's ``adjust_learning_rate``);
- the frozen network runs in **eval mode** throughout: its BatchNorm layers normalise with the
  source (CIFAR-100) running statistics and never update them. That is a choice: re-estimating
  the statistics on the target set (AdaBN) would help the numbers but would no longer probe the
  student's representation as distilled. Its parameters and buffers are left bit-for-bit as they
  were (the forward pass runs under ``no_grad``; nothing of it reaches the optimiser), and its
  mode and device are restored afterwards;
- train-time augmentation (RandomCrop(32, padding 4) + horizontal flip in the testbed) belongs to
  the ``train`` dataset handed in, so with augmentation every epoch runs the frozen network on
  fresh crops: training features cannot be cached. ``cache_features=True`` embeds the training
  set once instead (hand it an **un-augmented** training set: one random crop frozen for all
  epochs would be the worst of both) and trains the head on the cached features, which is much
  faster and runs somewhat below the augmented protocol;
- the test set has no augmentation and the network is frozen, so its features are the same every
  epoch: they are always embedded once, and each evaluation is a matrix product.

Reported: ``last``, top-1 after the final epoch (the result), and ``best`` / ``best_epoch``, the
highest top-1 over the evaluated epochs. ``best`` is selected **on the test set**, as the
reference does, so it is optimistic: it is reported beside ``last``, never instead of it.

Datasets yield ``(image, label, ok)`` triples (``cdir.core.images.ImageList``'s);
rows with ``ok`` False (unreadable images) are dropped and counted in ``skipped``.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from cdir.core.device import resolve_device
from cdir.core.errors import CdirError


@dataclass
class ProbeConfig:
    """The head's training recipe; the defaults are the testbed's."""

    epochs: int = 120
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 64
    milestones: tuple[int, ...] = (30, 60, 90)
    gamma: float = 0.1
    workers: int = 2
    seed: int = 0
    eval_every: int = 1  # epochs between test evaluations (the last is always evaluated)
    # True: embed the (un-augmented) train set once and train the head on cached features:
    # much faster, no augmentation
    cache_features: bool = False

    def validate(self) -> None:
        """Raise CdirError on a setting the probe cannot run with."""
        for name in ("epochs", "batch_size", "eval_every"):
            if int(getattr(self, name)) < 1:
                raise CdirError(f"probe {name} must be at least 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise CdirError(f"probe workers must be 0 or more, got {self.workers}")
        if not self.lr > 0:
            raise CdirError(f"probe lr must be positive, got {self.lr}")
        if any(m < 1 for m in self.milestones):
            raise CdirError(f"probe milestones must be epochs >= 1, got {self.milestones}")


class StudentFeatures(nn.Module):
    """A zoo model seen as a feature extractor: ``forward(x)`` is ``model(x).feat``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.feat_dim = getattr(model, "feat_dim", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).feat


def student_features(model: nn.Module) -> nn.Module:
    """Wrap a zoo model (``NetOutput(feat, logits)``) so that its forward returns ``feat``; the
    wrapper keeps ``feat_dim``."""
    return StudentFeatures(model)


def _as_features(out: Any) -> torch.Tensor:
    # a tensor, or a NetOutput-like object: the pooled features are its .feat
    if isinstance(out, torch.Tensor):
        return out
    feat = getattr(out, "feat", None)
    if isinstance(feat, torch.Tensor):
        return feat
    raise CdirError(f"the feature module returned {type(out).__name__}: expected a tensor "
                    "(B, feat_dim) or an object with .feat (wrap zoo models in student_features)")


def _unpack(batch: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if not isinstance(batch, (list, tuple)) or len(batch) not in (2, 3):
        raise CdirError("probe datasets must yield (image, label, ok) triples")
    x, y = batch[0], torch.as_tensor(batch[1], dtype=torch.long)
    ok = (torch.as_tensor(batch[2]).bool() if len(batch) == 3
          else torch.ones(len(y), dtype=torch.bool))
    return x, y, ok


class _Frozen:
    """The frozen network on the probe's device, in eval mode, checked against ``feat_dim``."""

    def __init__(self, module: nn.Module, feat_dim: int, num_classes: int,
                 device: torch.device) -> None:
        self.module, self.feat_dim, self.num_classes, self.device = (
            module, feat_dim, num_classes, device)

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        f = _as_features(self.module(x.to(self.device, non_blocking=True)))
        if f.dim() != 2 or f.shape[1] != self.feat_dim:
            raise CdirError(f"feat_dim is {self.feat_dim} but the feature module produces "
                            f"features of shape {tuple(f.shape)}")
        return f.float()

    def check_labels(self, y: torch.Tensor) -> None:
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
            raise CdirError(f"label {bad} is outside 0..{self.num_classes - 1} "
                            f"(num_classes {self.num_classes})")

    def batches(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        """(features, labels on device, rows dropped) of each batch, unreadable rows removed."""
        for batch in loader:
            x, y, ok = _unpack(batch)
            if not bool(ok.any()):
                yield torch.empty(0, self.feat_dim, device=self.device), y[:0], len(y)
                continue
            keep = ok.nonzero().flatten()
            x, y = (x, y) if len(keep) == len(y) else (x[keep], y[keep])
            self.check_labels(y)
            yield self.embed(x), y.to(self.device), int((~ok).sum())

    def embed_all(self, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, int]:
        feats, labels, skipped = [], [], 0
        for f, y, drop in self.batches(loader):
            feats.append(f)
            labels.append(y)
            skipped += drop
        if not feats:
            return torch.empty(0, self.feat_dim, device=self.device), torch.empty(
                0, dtype=torch.long, device=self.device), skipped
        return torch.cat(feats), torch.cat(labels), skipped


def _loader(data: Dataset, cfg: ProbeConfig, shuffle: bool, device: torch.device,
            seed: int) -> DataLoader:
    return DataLoader(
        data, batch_size=cfg.batch_size, shuffle=shuffle, num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        # 120 epochs: re-spawning workers every epoch would cost more than the head
        persistent_workers=cfg.workers > 0 and shuffle,
        generator=torch.Generator().manual_seed(seed),
    )


@torch.no_grad()
def _top1(head: nn.Linear, feats: torch.Tensor, labels: torch.Tensor, chunk: int = 4096) -> float:
    hits = sum(int((head(feats[s:s + chunk]).argmax(1) == labels[s:s + chunk]).sum())
               for s in range(0, len(feats), chunk))
    return 100.0 * hits / len(feats)


def transfer_probe(
    features: nn.Module,
    feat_dim: int,
    train: Dataset,
    test: Dataset,
    num_classes: int,
    cfg: ProbeConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> dict[str, Any]:
    """Train a new linear head on the frozen ``features`` for ``train``; top-1 (%) on ``test``.

    ``features`` maps images (B, 3, H, W) to (B, ``feat_dim``) features, as a tensor or an object
    with ``.feat`` (a zoo model itself, or :func:`student_features` of it). Returns ``last`` (the
    result), ``best`` and ``best_epoch`` (chosen on the test set: for information only),
    ``epochs``, ``history`` (per epoch: ``epoch``, ``lr`` used in it, mean train ``loss``, and
    ``top1`` or None where not evaluated), ``train_images`` / ``test_images`` (readable rows
    used), ``skipped`` (unreadable rows dropped, train and test) and ``seconds``."""
    cfg = cfg or ProbeConfig()
    cfg.validate()
    if int(num_classes) < 2:
        raise CdirError(f"num_classes must be at least 2, got {num_classes}")
    if int(feat_dim) < 1:
        raise CdirError(f"feat_dim must be positive, got {feat_dim}")
    dev = resolve_device(device)
    start = time.perf_counter()

    param = next(features.parameters(), None)
    orig_device = param.device if param is not None else None
    was_training = features.training
    features.eval()  # source BatchNorm statistics, never updated (see the module docstring)
    features.to(dev)
    frozen = _Frozen(features, int(feat_dim), int(num_classes), dev)
    try:
        # fork_rng: seeding the augmentation draws (torch's global RNG when workers == 0)
        # without touching the caller's RNG state
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(cfg.seed)
            return _run(frozen, train, test, cfg, dev, progress, start)
    finally:
        if orig_device is not None:
            features.to(orig_device)
        features.train(was_training)


def _run(frozen: _Frozen, train: Dataset, test: Dataset, cfg: ProbeConfig, dev: torch.device,
         progress: bool, start: float) -> dict[str, Any]:
    test_feats, test_labels, skipped = frozen.embed_all(_loader(test, cfg, False, dev, cfg.seed))
    if not len(test_feats):
        raise CdirError("the probe's test set has no readable images")

    g = torch.Generator().manual_seed(cfg.seed)
    head = nn.Linear(frozen.feat_dim, frozen.num_classes)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 0.01)
        head.bias.zero_()
    head.to(dev)
    opt = torch.optim.SGD(head.parameters(), lr=cfg.lr, momentum=cfg.momentum,
                          weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(cfg.milestones), cfg.gamma)
    loss_fn = nn.CrossEntropyLoss()

    cached = None
    loader = _loader(train, cfg, not cfg.cache_features, dev, cfg.seed + 1)
    if cfg.cache_features:
        cached = frozen.embed_all(loader)
        skipped += cached[2]
        n_train = len(cached[0])
        if not n_train:
            raise CdirError("the probe's training set has no readable images")

    def epoch_batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        if cached is None:
            yield from frozen.batches(loader)
            return
        order = torch.randperm(len(cached[0]), generator=g).to(dev)
        for s in range(0, len(order), cfg.batch_size):
            rows = order[s:s + cfg.batch_size]
            yield cached[0][rows], cached[1][rows], 0

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.epochs, desc="transfer probe", unit="epoch", file=sys.stderr,
                   leave=False)
    history: list[dict[str, Any]] = []
    best, best_epoch = -1.0, 0
    try:
        for epoch in range(1, cfg.epochs + 1):
            lr = float(opt.param_groups[0]["lr"])
            total, seen, dropped = 0.0, 0, 0
            head.train()
            for f, y, drop in epoch_batches():
                dropped += drop
                if not len(y):
                    continue
                loss = loss_fn(head(f), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(y)
                seen += len(y)
            if cached is None and epoch == 1:
                # every epoch meets the same unreadable rows: count them once
                skipped += dropped
                n_train = seen
            if not seen:
                raise CdirError("the probe's training set has no readable images")
            sched.step()
            mean_loss = total / seen
            if not math.isfinite(mean_loss):
                raise CdirError(f"transfer probe diverged at epoch {epoch}; lower lr (now {lr})")
            top1 = None
            if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
                head.eval()
                top1 = _top1(head, test_feats, test_labels)
                if top1 > best:
                    best, best_epoch = top1, epoch
            history.append({"epoch": epoch, "lr": lr, "loss": mean_loss, "top1": top1})
            if bar is not None:
                bar.set_postfix(loss=f"{mean_loss:.3f}",
                                top1="-" if top1 is None else f"{top1:.1f}")
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return {
        "last": history[-1]["top1"],
        "best": best,
        "best_epoch": best_epoch,
        "epochs": cfg.epochs,
        "history": history,
        "train_images": n_train,
        "test_images": len(test_feats),
        "skipped": skipped,
        "seconds": time.perf_counter() - start,
    }
