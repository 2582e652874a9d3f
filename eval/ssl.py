"""Evaluation of self-supervised encoders on any labelled folder: weighted kNN and linear probe.

Both protocols extract features **once** (centre crop, backbone in eval mode) and work on the
cached features:

- :func:`knn_eval`: DINO-style weighted kNN. The k nearest training features (cosine) vote with
  weight exp(sim / T); T = 0.07, k = 20 by default, plus 1-NN. Without a test set it is
  leave-one-out on the training set.
- :func:`linear_probe`: the MoCo linear protocol (SGD momentum 0.9, lr 30, weight decay 0, batch
  256, 100 epochs, lr x0.1 at epochs 60 and 80, fc initialised N(0, 0.01), bias 0) **on cached
  features**. That is the documented departure from MoCo's ``main_lincls.py``: no
  RandomResizedCrop/flip augmentation of the training images, so an epoch costs a matrix product
  rather than a forward pass, and the numbers run somewhat below the augmented protocol on large
  sets. Features are L2-normalised by default (``normalize="l2"``) so that lr 30 is stable for any
  backbone; ``"standardize"`` is ISD's protocol (L2, then per-dimension standardisation with the
  training statistics); ``"none"`` uses raw pooled features. Without a test set a stratified,
  seeded ``test_fraction`` of the images is held out. The last epoch's accuracy is the result; the
  best epoch is reported beside it, never instead of it (selecting on the test set inflates it).

``encoder`` is an ``nn.Module`` (pass ``preprocess``) or a checkpoint path (project or reference
MoCo/SynCo/ISD; the preprocessing is read from it).

:func:`make_monitor` builds the trainer's per-epoch kNN / P@1 monitor from the same pieces (the
mean P@1 over domain pairs that `cdir eval` reports is handed in by the caller, which scores it
as the evaluate stage does).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np
import torch
from torch import nn

from cdir.core.device import resolve_device
from cdir.core.errors import CdirError
from cdir.core.images import ImageList
from encoders.ssl.data import LabelledSet, labelled_set

if TYPE_CHECKING:
    from encoders.engine.config import MonitorConfig


def _resolve_encoder(
    encoder: nn.Module | str | os.PathLike, preprocess: dict | None
) -> tuple[nn.Module, dict]:
    from encoders.engine.checkpoint import encoder_preprocess, load_encoder

    if isinstance(encoder, nn.Module):
        return encoder, preprocess or {}
    model, _ = load_encoder(encoder)
    return model, {**encoder_preprocess(encoder), **(preprocess or {})}


def _eval_transform(preprocess: dict):  # noqa: ANN202
    from encoders.ssl.augment import AugConfig, build_eval_transform

    cfg = AugConfig(
        size=int(preprocess.get("size", 224)),
        **{k: preprocess[k] for k in ("mean", "std", "eval_resize") if k in preprocess},
    )
    return build_eval_transform(cfg), cfg.size


@torch.no_grad()
def extract_features(
    encoder: nn.Module,
    data: LabelledSet,
    preprocess: dict | None = None,
    *,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    workers: int = 0,
    progress: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Features (N, d) float32 on CPU and a bool mask of the readable images, in ``data`` order.

    The encoder runs in eval mode (frozen BN statistics); its mode is restored afterwards."""
    dev = resolve_device(device)
    transform, size = _eval_transform(preprocess or {})
    loader = torch.utils.data.DataLoader(
        ImageList(data.paths, transform, (3, size, size), labels=data.labels, say=True),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=dev.type == "cuda",
    )
    was_training = encoder.training
    encoder.eval()
    param = next(encoder.parameters(), None)
    orig_device = param.device if param is not None else dev
    encoder.to(dev)
    feats, oks = [], []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(data), desc="features", unit="img", file=sys.stderr, leave=False)
    try:
        for x, _, ok in loader:
            feats.append(encoder(x.to(dev, non_blocking=True)).float().cpu())
            oks.append(ok)
            if bar is not None:
                bar.update(len(x))
    finally:
        if bar is not None:
            bar.close()
        encoder.to(orig_device)
        encoder.train(was_training)
    return torch.cat(feats), torch.cat(oks).bool()


def _l2n(x: torch.Tensor) -> torch.Tensor:
    return nn.functional.normalize(x.float(), dim=1)


@torch.no_grad()
def knn_classify(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    *,
    k: int = 20,
    temperature: float = 0.07,
    weighted: bool = True,
    num_classes: int | None = None,
    chunk: int = 1024,
) -> dict[str, float]:
    """Top-1/top-5 accuracy (in %) of a kNN classifier on features (cosine similarity).

    ``weighted``: DINO's exp(sim/T) votes; otherwise one vote per neighbour. Without test
    features it is leave-one-out on the training set (each image's own row excluded)."""
    train = _l2n(train_feats)
    train_labels = torch.as_tensor(train_labels, dtype=torch.long)
    loo = test_feats is None
    test = train if loo else _l2n(test_feats)
    test_labels = train_labels if loo else torch.as_tensor(test_labels, dtype=torch.long)
    c = int(num_classes or int(max(train_labels.max(), test_labels.max())) + 1)
    k = min(k, len(train) - (1 if loo else 0))
    if k < 1:
        raise CdirError("kNN needs at least two training images")
    top1 = top5 = 0
    for s in range(0, len(test), chunk):
        sim = test[s : s + chunk] @ train.T
        if loo:
            rows = torch.arange(s, min(s + chunk, len(test)))
            sim[rows - s, rows] = -float("inf")
        vals, idx = sim.topk(k, dim=1)
        w = (vals / temperature).exp() if weighted else torch.ones_like(vals)
        votes = torch.zeros(len(sim), c).scatter_add_(1, train_labels[idx], w)
        pred = votes.topk(min(5, c), dim=1).indices
        y = test_labels[s : s + chunk, None]
        top1 += int((pred[:, :1] == y).any(1).sum())
        top5 += int((pred == y).any(1).sum())
    n = len(test)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n}


@torch.no_grad()
def retrieval_p1(
    feats: torch.Tensor,
    labels: Sequence[int] | torch.Tensor,
    domains: Sequence[str] | None = None,
    chunk: int = 1024,
) -> float:
    """Precision@1 of nearest-neighbour retrieval (cosine), excluding the query itself, in
    percent (like every other figure of this project).

    With ``domains`` only images of *other* domains are candidates (cross-domain P@1, averaged over
    all queries): the number the emoji gallery is judged by."""
    f = _l2n(feats)
    y = torch.as_tensor(labels, dtype=torch.long)
    dom = None
    if domains is not None:
        names = {d: i for i, d in enumerate(sorted(set(domains)))}
        dom = torch.tensor([names[d] for d in domains])
    hits = 0
    for s in range(0, len(f), chunk):
        sim = f[s : s + chunk] @ f.T
        rows = torch.arange(s, min(s + chunk, len(f)))
        sim[rows - s, rows] = -float("inf")
        if dom is not None:
            sim[dom[rows, None] == dom[None, :]] = -float("inf")
        nn_idx = sim.argmax(dim=1)
        hits += int((y[nn_idx] == y[rows]).sum())
    return 100.0 * hits / len(f)


def stratified_split(
    labels: Sequence[int], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Rows split per class (at least one training row per class), reproducible by ``seed``."""
    if not 0 < test_fraction < 1:
        raise CdirError(f"test_fraction must be in (0, 1), got {test_fraction}")
    rng = np.random.default_rng(seed)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    train, test = [], []
    for rows in by_class.values():
        rows = list(rng.permutation(rows))
        n_test = min(len(rows) - 1, int(round(len(rows) * test_fraction)))
        test += rows[:n_test]
        train += rows[n_test:]
    return sorted(int(i) for i in train), sorted(int(i) for i in test)


def _normalise(
    train: torch.Tensor, test: torch.Tensor, mode: str
) -> tuple[torch.Tensor, torch.Tensor]:
    if mode == "none":
        return train.float(), test.float()
    if mode not in ("l2", "standardize"):
        raise CdirError(f"normalize must be none, l2 or standardize, got {mode!r}")
    train, test = _l2n(train), _l2n(test)
    if mode == "standardize":
        mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
        train, test = (train - mean) / std, (test - mean) / std
    return train, test


def linear_probe_features(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    lr: float = 30.0,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    milestones: Sequence[int] = (60, 80),
    gamma: float = 0.1,
    normalize: str = "l2",
    seed: int = 0,
    device: str | torch.device | None = None,
) -> dict[str, Any]:
    """Train a linear classifier on cached features; accuracies in %.

    Returns ``top1``/``top5`` of the last epoch (the result), ``best_top1`` and ``best_epoch``
    (for information only), and ``epochs``."""
    dev = resolve_device(device)
    xtr, xte = _normalise(train_feats, test_feats, normalize)
    ytr = torch.as_tensor(train_labels, dtype=torch.long)
    yte = torch.as_tensor(test_labels, dtype=torch.long)
    c = int(num_classes or int(max(ytr.max(), yte.max())) + 1)
    xtr, ytr, xte, yte = xtr.to(dev), ytr.to(dev), xte.to(dev), yte.to(dev)
    g = torch.Generator().manual_seed(seed)
    fc = nn.Linear(xtr.shape[1], c).to(dev)
    with torch.no_grad():
        fc.weight.copy_(torch.randn(fc.weight.shape, generator=g) * 0.01)
        fc.bias.zero_()
    opt = torch.optim.SGD(fc.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, list(milestones), gamma)
    loss_fn = nn.CrossEntropyLoss()

    def accuracy() -> tuple[float, float]:
        with torch.no_grad():
            pred = fc(xte).topk(min(5, c), dim=1).indices
        hit = pred == yte[:, None]
        return 100.0 * float(hit[:, :1].any(1).float().mean()), 100.0 * float(
            hit.any(1).float().mean()
        )

    best, best_epoch = -1.0, -1
    top1 = top5 = 0.0
    for epoch in range(epochs):
        order = torch.randperm(len(xtr), generator=g).to(dev)
        for s in range(0, len(xtr), batch_size):
            rows = order[s : s + batch_size]
            loss = loss_fn(fc(xtr[rows]), ytr[rows])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sched.step()
        top1, top5 = accuracy()
        if not np.isfinite(float(loss.detach())):
            raise CdirError(f"linear probe diverged at epoch {epoch + 1}; lower lr (now {lr})")
        if top1 > best:
            best, best_epoch = top1, epoch + 1
    return {
        "top1": top1,
        "top5": top5,
        "best_top1": best,
        "best_epoch": best_epoch,
        "epochs": epochs,
        "normalize": normalize,
    }


class _Features(NamedTuple):
    """The features of a labelled set's readable images, their labels, and those images."""

    feats: torch.Tensor
    labels: torch.Tensor
    data: LabelledSet


def _features_for(encoder: nn.Module, preprocess: dict, data: LabelledSet,
                  **kw: Any) -> _Features:
    feats, ok = extract_features(encoder, data, preprocess, **kw)
    if not bool(ok.all()):
        keep = ok.nonzero().flatten().tolist()
        print(f"dropped {len(data) - len(keep)} unreadable image(s)", file=sys.stderr)
        feats, data = feats[keep], data.subset(keep)
    return _Features(feats, torch.tensor(data.labels), data)


def _train_test_features(
    encoder: nn.Module | str | os.PathLike, preprocess: dict | None,
    train: str | os.PathLike | LabelledSet, test: str | os.PathLike | LabelledSet | None,
    **kw: Any,
) -> tuple[_Features, _Features | None]:
    """The features of ``train`` and of ``test`` (None without one) under ``encoder`` (a module
    or a checkpoint path, see the module docstring); the two sets must share their classes."""
    model, prep = _resolve_encoder(encoder, preprocess)
    tr = _features_for(model, prep, labelled_set(train), **kw)
    if test is None:
        return tr, None
    te = labelled_set(test)
    if te.class_names != tr.data.class_names:
        raise CdirError("the train and test folders have different class lists")
    return tr, _features_for(model, prep, te, **kw)


def knn_eval(
    encoder: nn.Module | str | os.PathLike,
    train: str | os.PathLike | LabelledSet,
    test: str | os.PathLike | LabelledSet | None = None,
    *,
    k: Sequence[int] = (20, 1),
    temperature: float = 0.07,
    preprocess: dict | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    workers: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Weighted kNN accuracy on a labelled folder or manifest (leave-one-out when ``test`` is None).

    Returns ``{"knn": {"k20": {"top1", "top5"}, "k1": {...}}, "n_train", "n_test", "p1", ...}``;
    ``top1``/``top5`` and ``p1`` are percentages; ``p1`` is nearest-neighbour retrieval
    precision@1 on ``train`` (cross-domain when it has domains)."""
    tr, te = _train_test_features(encoder, preprocess, train, test, batch_size=batch_size,
                                  device=device, workers=workers, progress=progress)
    ftr, ytr = tr.feats, tr.labels
    fte, yte = (None, None) if te is None else (te.feats, te.labels)
    n_test = len(tr.data if te is None else te.data)
    c = len(tr.data.class_names)
    out: dict[str, Any] = {"knn": {}, "n_train": len(tr.data), "n_test": n_test, "classes": c,
                           "temperature": temperature, "leave_one_out": test is None}
    for kk in k:
        out["knn"][f"k{kk}"] = knn_classify(
            ftr, ytr, fte, yte, k=kk, temperature=temperature, num_classes=c
        )
    domains = tr.data.domains
    out["p1"] = retrieval_p1(ftr, ytr, domains)
    out["p1_cross_domain"] = domains is not None and len(set(domains)) > 1
    return out


def linear_probe(
    encoder: nn.Module | str | os.PathLike,
    train: str | os.PathLike | LabelledSet,
    test: str | os.PathLike | LabelledSet | None = None,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    preprocess: dict | None = None,
    batch_size: int = 256,
    device: str | torch.device | None = None,
    workers: int = 0,
    progress: bool = True,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Linear-probe accuracy on a labelled folder or manifest (MoCo protocol on cached features).

    Without ``test`` a stratified ``test_fraction`` of ``train`` is held out (seeded).
    ``probe_kwargs`` go to :func:`linear_probe_features` (epochs, lr, normalize, ...)."""
    tr, te = _train_test_features(encoder, preprocess, train, test, batch_size=batch_size,
                                  device=device, workers=workers, progress=progress)
    ftr, ytr = tr.feats, tr.labels
    if te is None:
        rows_tr, rows_te = stratified_split(tr.data.labels, test_fraction, seed)
        fte, yte = ftr[rows_te], ytr[rows_te]
        ftr, ytr = ftr[rows_tr], ytr[rows_tr]
    else:
        fte, yte = te.feats, te.labels
    res = linear_probe_features(
        ftr, ytr, fte, yte, num_classes=len(tr.data.class_names), seed=seed, device=device,
        **probe_kwargs,
    )
    res.update({"n_train": len(ftr), "n_test": len(fte), "classes": len(tr.data.class_names)})
    return res


# pairs(unit features, labels, domain names) -> figures (the caller's mean P@1 over domain pairs)
PairFigures = Callable[[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]


def make_monitor(
    cfg: MonitorConfig, preprocess: dict, *, seed: int = 0, workers: int = 0,
    pairs: PairFigures | None = None,
) -> Callable[[nn.Module, torch.device], dict[str, float]]:
    """The training monitor: ``monitor(encoder, device)`` -> figures on the labelled set
    ``cfg.path``, or a fixed random subset of ``cfg.max_images`` of it (drawn from ``seed``):

    - ``knn_top1`` / ``knn_top5``: leave-one-out weighted kNN accuracy;
    - with two domains or more, what ``pairs(features, labels, domains)`` returns: the caller's
      mean P@1 over directed domain pairs (`cdir eval`'s figures, e.g. ``p1`` and
      ``p1_domain-whiten``), and ``p1_any_other_domain``: a query's nearest image in *any* other
      domain has its label (not a figure `cdir eval` reports);
    - without domains, ``p1_any_other_image``: the same over every other image.

    The features are ``encoder``'s outputs at the eval transform, L2-normalised (as `cdir embed`
    stores them); unreadable images are left out."""
    data = labelled_set(cfg.path)
    if cfg.max_images and len(data) > cfg.max_images:
        g = torch.Generator().manual_seed(seed)
        rows = sorted(torch.randperm(len(data), generator=g)[: cfg.max_images].tolist())
        data = data.subset(rows)

    def monitor(encoder: nn.Module, device: torch.device) -> dict[str, float]:
        feats, ok = extract_features(encoder, data, preprocess, batch_size=cfg.batch_size,
                                     device=device, workers=workers, progress=False)
        keep = ok.nonzero().flatten()
        feats = _l2n(feats[keep].flatten(1))
        labels = torch.tensor(data.labels)[keep]
        res = knn_classify(feats, labels, k=cfg.k, temperature=cfg.temperature,
                           num_classes=len(data.class_names))
        out = {"knn_top1": res["top1"], "knn_top5": res["top5"]}
        if data.domains is None or len(set(data.domains)) < 2:
            out["p1_any_other_image"] = retrieval_p1(feats, labels)
            return out
        domains = [data.domains[i] for i in keep.tolist()]
        if pairs is not None:
            out.update(pairs(feats.numpy(), labels.numpy(), np.asarray(domains)))
        out["p1_any_other_domain"] = retrieval_p1(feats, labels, domains)
        return out

    return monitor
