"""``ucdir``: UCDIR (Hu & Lee, ECCV 2022), unsupervised cross-domain retrieval with in-domain
instance and cluster contrast and cross-domain prototype alignment.

A MoCo-style query encoder + MLP head and a momentum copy. A memory bank holds one L2-normalised
momentum feature per image (filled at the first epoch with eval-transform features, then
overwritten in place by each batch's keys); the rows of a domain are that domain's bank. Losses,
each averaged over the anchors of a domain, then over the domains of the batch:

1. instance contrast (always): positive the other view's key, negatives the anchor's own
   domain's bank rows except its own, temperature ``temperature``;
2. cluster contrast (from ``warmup_epochs``, weight ramping linearly from 0 to
   ``cluster_weight`` at ``cross_start``): per-domain k-means on the bank; the positives of an
   anchor are the bank rows of its cluster in its domain (its own row included), the
   denominator its whole domain's bank (a supervised-contrastive term); an anchor counts only
   when its key's softmax over its domain's centroids gives its own centroid more than
   ``conf_threshold``;
3. self-entropy (from ``cross_start``): the entropy of the query's softmax over each domain's
   centroids (its own and every other) is minimised, so a feature commits to one prototype of
   every domain;
4. distance-of-distance (from ``cross_start``): within each domain's share of the batch, the
   pairwise cosine distances of the soft assignments to domain A's centroids and to domain B's
   must agree (squared L2 per row, summed over the row, averaged), for every domain pair.

There is no explicit cross-domain positive pair; labels are never read. The per-image state
(``domain_of``, ``bank``, ``centroids``, ``assign`` and two ready flags) is held in buffers, so a
checkpoint holds it and a resumed run continues with the same bank and clusters.

Differences from the official code:
- a batch is the trainer's shuffled mix of all domains (the official draws the same number of
  images from each of two domains), hence the per-domain averaging above; with more than two
  domains self-entropy covers every domain's centroids and distance-of-distance every pair;
- k-means is spherical and runs in torch, seeded from the epoch (the official uses faiss'
  Euclidean k-means on the unit vectors with seed 0 and normalises the centroids afterwards);
  by default it clusters the bank rows (``kmeans_source="bank"``), while the official re-embeds
  every image with the momentum encoder each epoch (``kmeans_source="eval"``, one more pass);
- the starting encoder holds a backbone only, so both heads start from random weights (the
  official loads the pretrained MoCo v2 head too);
- the exported encoder (``encoder_prefix``) is the query backbone; the features UCDIR is
  scored with, and the label-free selection reads, are the momentum encoder's head output (as
  the official evaluation), kept for the chosen epoch in ``best.pt``
  (``ckpt:OUT/best.pt?features=head``);
- an unreadable image keeps a zero bank row, which no loss and no k-means uses.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cdir.core.dist import concat_all_gather
from cdir.core.errors import CdirError
from encoders.engine.parts import encode_momentum, frozen_copy, momentum_update, no_autocast
from encoders.ssl.heads import moco_head
from encoders.ssl.moco import SSLMethod

KMEANS_SOURCES = {
    "bank": "the memory bank rows (the momentum keys of the last epoch's training views)",
    "eval": "every image re-embedded by the momentum encoder at the eval transform",
}

# embed(module) -> module's outputs on every image (eval transform, manifest order, NaN rows for
# unreadable images), supplied by the trainer
Embed = Callable[[nn.Module], np.ndarray]


@dataclass
class UCDIRConfig:
    """Defaults: the official Office-Home script (DomainNet values in the comments)."""

    dim: int = 128  # projection head output
    hidden_dim: int | None = None  # None: the backbone feature dim
    momentum: float = 0.999
    temperature: float = 0.2  # instance and cluster contrast
    # keys: BatchNorm over shuffled splits of the batch (the official SplitBatchNorm of 2)
    shuffle_bn: bool = True
    bn_splits: int = 2
    warmup_epochs: int = 20  # instance loss only before
    num_cluster: int = 65  # k per domain; DomainNet 7
    cluster_weight: float = 0.5  # reached at cross_start; DomainNet 1.0
    conf_threshold: float = 0.2
    cross_start: int = 100  # self-entropy and distance-of-distance from this epoch
    selfentropy_weight: float = 1.0  # DomainNet 0.5
    selfentropy_temperature: float = 0.01  # DomainNet 0.1
    dod_weight: float = 0.5  # DomainNet 0.1
    dod_temperature: float = 0.01
    kmeans_iters: int = 20
    kmeans_restarts: int = 5
    kmeans_source: str = "bank"  # see KMEANS_SOURCES
    # how often the trainer measures the label-free selection criterion (k-means itself runs
    # every epoch after the warm-up)
    round_epochs: int = 10

    def validate(self) -> None:
        if self.dim < 1 or (self.hidden_dim is not None and self.hidden_dim < 1):
            raise CdirError("ucdir: dim and hidden_dim must be positive")
        if min(self.temperature, self.selfentropy_temperature, self.dod_temperature) <= 0:
            raise CdirError("ucdir: temperature, selfentropy_temperature and dod_temperature "
                            "must be positive")
        if not 0.0 <= self.momentum <= 1.0:
            raise CdirError(f"ucdir: momentum must be in [0, 1], not {self.momentum}")
        if self.num_cluster < 1:
            raise CdirError(f"ucdir: num_cluster must be >= 1, not {self.num_cluster}")
        if not 0.0 <= self.conf_threshold < 1.0:
            raise CdirError(f"ucdir: conf_threshold must be in [0, 1), not "
                            f"{self.conf_threshold}")
        if self.warmup_epochs < 0 or self.cross_start < self.warmup_epochs:
            raise CdirError(f"ucdir: need 0 <= warmup_epochs <= cross_start, not "
                            f"{self.warmup_epochs} and {self.cross_start}")
        if min(self.cluster_weight, self.selfentropy_weight, self.dod_weight) < 0:
            raise CdirError("ucdir: loss weights must be >= 0")
        if min(self.kmeans_iters, self.kmeans_restarts, self.round_epochs, self.bn_splits) < 1:
            raise CdirError("ucdir: kmeans_iters, kmeans_restarts, round_epochs and bn_splits "
                            "must be >= 1")
        if self.kmeans_source not in KMEANS_SOURCES:
            raise CdirError(f"ucdir: kmeans_source must be one of {', '.join(KMEANS_SOURCES)}, "
                            f"not {self.kmeans_source!r}")


# --------------------------------------------------------------------------------------------
# helpers


@torch.no_grad()
def spherical_kmeans(x: torch.Tensor, k: int, iters: int = 20, restarts: int = 5,
                     generator: torch.Generator | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Cosine k-means of the rows of ``x``: (unit centroids (k, d), assignment (n,), inertia).

    Each restart starts from ``k`` distinct random rows (drawn from ``generator``, a CPU
    generator, so the result does not depend on the device) and runs ``iters`` assign/update
    steps; the restart with the lowest inertia (sum of 1 - cos to the own centroid) wins.
    Centroid sums are one-hot matmuls rather than scatter-adds, which are not deterministic on
    GPUs."""
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k-means needs 1 <= k <= n, got k={k}, n={n}")
    x = F.normalize(x.float(), dim=1)
    best: tuple[torch.Tensor, torch.Tensor, float] | None = None
    for _ in range(restarts):
        c = x[torch.randperm(n, generator=generator)[:k].to(x.device)]
        for _ in range(iters):
            sim, assign = (x @ c.T).max(dim=1)
            sums = F.one_hot(assign, k).to(x.dtype).T @ x
            empty = sums.abs().sum(1) == 0
            if bool(empty.any()):
                # an empty cluster restarts at the rows the others fit worst
                sums[empty] = x[sim.argsort()[:int(empty.sum())]]
            c = F.normalize(sums, dim=1)
        sim, assign = (x @ c.T).max(dim=1)
        inertia = float((1.0 - sim).sum())
        if best is None or inertia < best[2]:
            best = (c, assign, inertia)
    assert best is not None
    return best


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of ``softmax(logits)`` along the last dimension."""
    logp = F.log_softmax(logits, dim=-1)
    return -(logp.exp() * logp).sum(-1)


def cosine_distances(p: torch.Tensor) -> torch.Tensor:
    """1 - cos between every two rows of ``p`` (..., n, m) -> (..., n, n)."""
    u = F.normalize(p, dim=-1)
    return 1.0 - u @ u.transpose(-1, -2)


def per_domain_mean(values: torch.Tensor, dom: torch.Tensor, n_domains: int,
                    weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of ``values`` over the anchors of each domain, then the plain mean over the
    domains present in the batch (a domain whose weights are all zero contributes 0)."""
    w = torch.ones_like(values) if weight is None else weight.to(values.dtype)
    sums = values.new_zeros(n_domains).index_add(0, dom, values * w)
    wsum = values.new_zeros(n_domains).index_add(0, dom, w)
    present = torch.bincount(dom, minlength=n_domains) > 0
    return (sums[present] / (wsum[present] + 1e-8)).mean()


# --------------------------------------------------------------------------------------------
# the method


class UCDIR(SSLMethod):
    """Query backbone + MLP head, momentum copies, a per-image memory bank and per-domain
    centroids; see the module docstring.

    Call ``set_domains`` before loading a checkpoint and ``begin_epoch`` before each epoch.
    ``forward(views, idx)``: ``views = [x_q, x_k]`` two views of the same images, ``idx`` (B, 2)
    with the image index in column 0."""

    views = ("strong", "strong")
    takes_index = True
    encoder_prefix = "encoder_q."
    keeps_heads = True  # the scored features include the head: keep the chosen full checkpoint

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: UCDIRConfig | None = None
                 ) -> None:
        super().__init__()
        self.cfg = cfg or UCDIRConfig()
        self.cfg.validate()
        c = self.cfg
        self.encoder_q = backbone
        self.head_q = moco_head(feat_dim, c.dim, c.hidden_dim)
        self.encoder_k = frozen_copy(self.encoder_q)
        self.head_k = frozen_copy(self.head_q)
        self.register_buffer("domain_of", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bank", torch.zeros(0, c.dim))
        self.register_buffer("bank_ready", torch.zeros((), dtype=torch.long))
        self.register_buffer("centroids", torch.zeros(0, c.num_cluster, c.dim))
        self.register_buffer("assign", torch.zeros(0, dtype=torch.long))
        self.register_buffer("kmeans_ready", torch.zeros((), dtype=torch.long))

    @property
    def n_domains(self) -> int:
        return int(self.centroids.shape[0])

    def retrieval(self) -> nn.Module:
        """The features UCDIR is scored with, so the ones the label-free selection reads: the
        momentum encoder and its head (``ckpt:PATH?features=head``), as the official
        evaluation."""
        key = nn.Sequential(self.encoder_k, self.head_k)
        return key.train(self.encoder_k.training)  # a new wrapper must not change their mode

    def scored_options(self) -> str:
        """The ``ckpt:`` spec options that give :meth:`retrieval`'s features (they need a full
        training checkpoint: see ``keeps_heads``)."""
        return "features=head"

    def set_domains(self, codes: torch.Tensor, names: Sequence[str] | None = None) -> None:
        """Allocate the per-image state for ``len(codes)`` images with domain codes 0..D-1
        (``names``, when given, only for the error message)."""
        dev = self.bank.device
        codes = torch.as_tensor(codes, dtype=torch.long).to(dev)
        if codes.ndim != 1 or len(codes) == 0 or int(codes.min()) < 0:
            raise CdirError("ucdir: set_domains needs one domain code >= 0 per image")
        counts = torch.bincount(codes).tolist()
        k = self.cfg.num_cluster
        for d, n in enumerate(counts):
            if n < k:
                name = names[d] if names is not None else f"code {d}"
                raise CdirError(f"ucdir: domain {name} has {n} images, fewer than num_cluster "
                                f"{k}; use --set method.num_cluster=K with K <= {min(counts)}")
        n, dim = len(codes), self.cfg.dim
        self.domain_of = codes.clone()
        self.bank = torch.zeros(n, dim, device=dev)
        self.bank_ready = torch.zeros((), dtype=torch.long, device=dev)
        self.centroids = torch.zeros(len(counts), k, dim, device=dev)
        self.assign = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.kmeans_ready = torch.zeros((), dtype=torch.long, device=dev)

    # schedules ---------------------------------------------------------------------------------
    def cluster_weight_at(self, epoch: int) -> float:
        """0 up to ``warmup_epochs``, linear to ``cluster_weight`` at ``cross_start``."""
        c = self.cfg
        if epoch < c.warmup_epochs:
            return 0.0
        if c.cross_start == c.warmup_epochs:
            return c.cluster_weight
        ramp = (epoch - c.warmup_epochs) / (c.cross_start - c.warmup_epochs)
        return c.cluster_weight * min(1.0, ramp)

    # per-epoch state ---------------------------------------------------------------------------
    def _key_features(self, embed: Embed) -> torch.Tensor:
        """Unit momentum features of every image (zero rows for unreadable images)."""
        key = nn.Sequential(self.encoder_k, self.head_k)
        key.train(self.training)  # the caller restores this mode afterwards
        z = torch.as_tensor(embed(key), dtype=torch.float32).to(self.bank.device)
        z = z.masked_fill(torch.isnan(z).any(1, keepdim=True), 0.0)
        return F.normalize(z, dim=1)

    @torch.no_grad()
    def begin_epoch(self, epoch: int, embed: Embed) -> dict[str, float]:
        """Fill the bank (first call only) and, from ``warmup_epochs``, rerun the per-domain
        k-means. Runs on every rank with the same inputs, so every rank gets the same state."""
        self.set_epoch(epoch)
        c = self.cfg
        if len(self.bank) == 0:
            raise CdirError("ucdir: call set_domains before begin_epoch")
        if not bool(self.bank_ready):
            self.bank.copy_(self._key_features(embed))
            self.bank_ready.fill_(1)
        if epoch < c.warmup_epochs:
            return {}
        feats = self.bank if c.kmeans_source == "bank" else self._key_features(embed)
        valid = feats.abs().sum(1) > 0
        gen = torch.Generator().manual_seed(1_000_003 * int(epoch) + 17)
        assign = torch.full_like(self.assign, -1)
        inertia, smallest = 0.0, len(feats)
        for d in range(self.n_domains):
            rows = ((self.domain_of == d) & valid).nonzero(as_tuple=True)[0]
            if len(rows) < c.num_cluster:
                raise CdirError(f"ucdir: domain code {d} has {len(rows)} readable images, fewer "
                                f"than num_cluster {c.num_cluster}; lower it with --set "
                                "method.num_cluster=K")
            cent, a, inert = spherical_kmeans(feats[rows], c.num_cluster, c.kmeans_iters,
                                              c.kmeans_restarts, gen)
            self.centroids[d] = cent
            assign[rows] = a
            inertia += inert
            smallest = min(smallest, int(torch.bincount(a, minlength=c.num_cluster).min()))
        self.assign.copy_(assign)
        self.kmeans_ready.fill_(1)
        return {"kmeans_inertia": inertia / max(int(valid.sum()), 1),
                "kmeans_smallest_cluster": float(smallest)}

    # encoders --------------------------------------------------------------------------------
    def _embed_k(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_k(self.encoder_k(x))

    def _momentum_update(self) -> None:
        momentum_update(self.encoder_k, self.encoder_q, self.cfg.momentum)
        momentum_update(self.head_k, self.head_q, self.cfg.momentum)

    # losses ------------------------------------------------------------------------------------
    def _cluster_loss(self, k: torch.Tensor, sim: torch.Tensor, idx: torch.Tensor,
                      dom: torch.Tensor, other: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """In-domain cluster contrast over the bank and the share of anchors it keeps."""
        c = self.cfg
        own = self.assign[idx]
        log_prob = F.log_softmax(sim.masked_fill(other, float("-inf")) / c.temperature, dim=1)
        pos = (self.assign[None, :] == own[:, None]) & ~other
        mean_pos = torch.where(pos, log_prob, 0.0).sum(1) / (pos.sum(1) + 1e-8)
        # confidence filter on the key, as in the official code
        p = F.softmax(torch.einsum("bd,bkd->bk", k, self.centroids[dom]) / c.temperature, dim=1)
        keep = (p.gather(1, own.clamp(min=0)[:, None])[:, 0] > c.conf_threshold) & (own >= 0)
        return per_domain_mean(-mean_pos, dom, self.n_domains, keep), keep.float().mean()

    def _selfentropy_loss(self, q: torch.Tensor, dom: torch.Tensor) -> torch.Tensor:
        """Mean entropy of the query's softmax over each domain's centroids."""
        logits = torch.einsum("bd,ekd->bek", q, self.centroids) / self.cfg.selfentropy_temperature
        return per_domain_mean(entropy(logits).mean(1), dom, self.n_domains)

    def _dod_loss(self, q: torch.Tensor, dom: torch.Tensor) -> torch.Tensor:
        """Distance-of-distance within each domain's share of the batch, over domain pairs."""
        pairs = torch.combinations(torch.arange(self.n_domains, device=q.device), 2)
        terms = []
        for d in torch.unique(dom).tolist():  # a loop over domains, not images
            qd = q[dom == d]
            if len(qd) < 2:
                continue
            logits = torch.einsum("nd,ekd->enk", qd, self.centroids) / self.cfg.dod_temperature
            dist = cosine_distances(F.softmax(logits, dim=-1))  # (D, n, n)
            diff = dist[pairs[:, 0]] - dist[pairs[:, 1]]
            terms.append(diff.pow(2).sum(-1).mean())
        return torch.stack(terms).mean() if terms else q.new_zeros(())

    def forward(self, views: list[torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        x_q, x_k = views
        c = self.cfg
        idx = idx.to(self.bank.device)[:, 0]
        dom = self.domain_of[idx]
        q = self.head_q(self.encoder_q(x_q))
        with torch.no_grad():
            if self.training:  # eval mode changes no state
                self._momentum_update()
            k, k_all = encode_momentum(self._embed_k, x_k, self.training, c.shuffle_bn,
                                       c.bn_splits)
        with no_autocast(q.device):
            q = F.normalize(q.float(), dim=1)
            k = F.normalize(k.float(), dim=1)
            if self.training:
                # Written before the losses, as in the official code: the anchor's own row then
                # holds its current key (a positive of the cluster term) and the rows of the
                # other batch images their new keys. Every rank writes the whole global batch.
                self.bank.index_copy_(0, concat_all_gather(idx),
                                      F.normalize(k_all.float(), dim=1))
            bank = self.bank.clone()  # the next write must not touch a tensor saved for backward
            empty = bank.abs().sum(1) == 0  # unreadable images
            other = (self.domain_of[None, :] != dom[:, None]) | empty[None, :]
            own_row = torch.zeros_like(other).scatter_(1, idx[:, None], True)

            # (1) in-domain instance contrast
            sim = q @ bank.T
            pos = (q * k).sum(1, keepdim=True)
            logits = torch.cat([pos, sim.masked_fill(other | own_row, float("-inf"))], dim=1)
            target = torch.zeros(len(q), dtype=torch.long, device=q.device)
            per_anchor = F.cross_entropy(logits / c.temperature, target, reduction="none")
            loss_instance = per_domain_mean(per_anchor, dom, self.n_domains)

            zero = q.new_zeros(())
            loss_cluster, loss_entropy, loss_dod, kept = zero, zero, zero, zero
            clustered = bool(self.kmeans_ready) and self.epoch >= c.warmup_epochs
            w_cluster = self.cluster_weight_at(self.epoch)
            loss = loss_instance
            if clustered:  # (2) in-domain cluster contrast
                loss_cluster, kept = self._cluster_loss(k, sim, idx, dom, other)
                loss = loss + w_cluster * loss_cluster
            if clustered and self.epoch >= c.cross_start:  # (3), (4) cross-domain terms
                loss_entropy = self._selfentropy_loss(q, dom)
                loss_dod = self._dod_loss(q, dom)
                loss = loss + c.selfentropy_weight * loss_entropy + c.dod_weight * loss_dod
        with torch.no_grad():
            return {
                "loss": loss,
                "loss_instance": loss_instance.detach(),
                "loss_cluster": loss_cluster.detach(),
                "loss_entropy": loss_entropy.detach(),
                "loss_dod": loss_dod.detach(),
                "acc1": (logits.argmax(1) == 0).float().mean(),
                "cluster_kept": kept.detach(),
                "cluster_weight": torch.tensor(w_cluster if clustered else 0.0, device=q.device),
            }
