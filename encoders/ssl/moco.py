"""MoCo v2 and the pieces SynCo and ISD share with it.

Shared pieces:
- ``SSLMethod``: the interface the trainer drives (``views``, ``forward(views) -> dict``,
  ``set_epoch``, ``encoder_prefix``).
- shuffle-BN across ranks (``ddp_shuffle`` / ``ddp_unshuffle``, on the collectives of
  ``cdir.core.dist``, which are no-ops without a process group); ``split_forward``: its
  single-process equivalent (virtual ranks); ``encode_online`` / ``encode_momentum``: the one
  encode path of the online and the momentum branch that MoCo, SynCo and ISD all use;
- ``MemoryQueue``: a FIFO of unit vectors in a registered buffer, **row**-normalised at init
  (the reference normalises columns), with wrap-around enqueue;
- ``momentum_update``: theta_k <- m * theta_k + (1 - m) * theta_q, under no_grad.

Everything from the embeddings on (normalisation, logits, softmax, loss) runs in float32 with
autocast disabled, so the method is safe inside ``torch.autocast`` (fp16/bf16).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cdir.core.dist import broadcast, concat_all_gather, dist_ready, rank_world
from cdir.core.errors import CdirError
from encoders.ssl.heads import moco_head

# --------------------------------------------------------------------------------------------
# shuffle-BN


@torch.no_grad()
def ddp_shuffle(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN, step 1: gather the global batch, permute it (permutation drawn on rank 0 and
    broadcast), and return this rank's shard of the permuted batch plus the inverse permutation.

    Every rank must hold the same number of samples (use ``drop_last=True`` in the sampler).
    """
    x_all = concat_all_gather(x)
    rank, world = rank_world()
    n_all = x_all.shape[0]
    if n_all != x.shape[0] * world:  # pragma: no cover - all_gather already insists on equal shapes
        raise RuntimeError("shuffle-BN needs the same batch size on every rank")
    perm = broadcast(torch.randperm(n_all, device=x.device), src=0)
    idx_unshuffle = torch.argsort(perm)
    local = perm.view(world, -1)[rank]
    return x_all[local], idx_unshuffle


@torch.no_grad()
def ddp_unshuffle(
    y_local: torch.Tensor, idx_unshuffle: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shuffle-BN, step 2: gather the encoded shards and undo the permutation.

    Returns ``(y for this rank's own samples, y for the global batch in rank order)``; the second is
    what goes into the queue, so no second gather is needed for the enqueue.
    """
    y_all = concat_all_gather(y_local)[idx_unshuffle]
    rank, _ = rank_world()
    b = y_local.shape[0]
    return y_all[rank * b:(rank + 1) * b], y_all


def effective_splits(batch: int, splits: int) -> int:
    """Number of virtual ranks for ``split_forward``: at most ``splits``, at least 2 samples each
    (BatchNorm needs more than one value per channel)."""
    return max(1, min(int(splits), batch // 2))


def split_forward(
    fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, splits: int, shuffle: bool
) -> torch.Tensor:
    """Single-process shuffle-BN: run ``fn`` on ``splits`` chunks of the batch (each chunk gets
    its own BatchNorm statistics, like one GPU of a DDP run). With ``shuffle`` the chunks are
    drawn from a random permutation and the outputs are put back in the input order, so the
    statistics behind a key and behind its query come from different sample subsets, as in MoCo."""
    if splits <= 1:
        return fn(x)
    if not shuffle:
        return torch.cat([fn(c) for c in x.tensor_split(splits)], dim=0)
    perm = torch.randperm(x.shape[0], device=x.device)
    y = torch.cat([fn(c) for c in x[perm].tensor_split(splits)], dim=0)
    return y[torch.argsort(perm)]


Embed = Callable[[torch.Tensor], torch.Tensor]


def encode_online(embed: Embed, x: torch.Tensor, training: bool, shuffle_bn: bool,
                  bn_splits: int) -> torch.Tensor:
    """The online (query / student) branch. In one training process with shuffle-BN it runs in
    ``bn_splits`` chunks, so its BatchNorm statistics are per chunk like those of the keys; under
    DDP each rank's batch already is one chunk."""
    if training and shuffle_bn and not dist_ready():
        return split_forward(embed, x, effective_splits(x.shape[0], bn_splits), shuffle=False)
    return embed(x)


@torch.no_grad()
def encode_momentum(embed: Embed, x: torch.Tensor, training: bool, shuffle_bn: bool,
                    bn_splits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The momentum (key / teacher) branch: embeddings of the local batch and of the global batch
    in rank order (the latter goes into the queue). With shuffle-BN the batch is shuffled across
    ranks (DDP) or across virtual ranks (one process) before the embedding."""
    if not training:  # no shuffle and no collectives: eval may run on one rank only
        y = embed(x)
        return y, y
    if dist_ready():
        if shuffle_bn:
            x_shuf, idx_unshuffle = ddp_shuffle(x)
            return ddp_unshuffle(embed(x_shuf), idx_unshuffle)
        y = embed(x)
        return y, concat_all_gather(y)
    if shuffle_bn:
        y = split_forward(embed, x, effective_splits(x.shape[0], bn_splits), shuffle=True)
    else:
        y = embed(x)
    return y, y


# --------------------------------------------------------------------------------------------
# queue and EMA


class MemoryQueue(nn.Module):
    """FIFO memory of ``size`` unit vectors of dimension ``dim`` (buffers ``feats`` and ``ptr``).

    Initialised with random unit **rows** drawn from a fixed-seed generator, so every rank of a
    DDP run starts from the same queue whatever its global seed and whether or not DDP syncs
    buffers. ``enqueue`` writes a batch at the pointer with wrap-around; a batch larger than the
    queue keeps its last ``size`` rows. The pointer stays on the device, so enqueue never
    synchronises with the host.
    """

    def __init__(self, size: int, dim: int, seed: int = 0) -> None:
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"queue size and dim must be positive, got {size}, {dim}")
        self.size, self.dim = int(size), int(dim)
        init = torch.randn(size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("feats", F.normalize(init, dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        keys = keys.detach().to(self.feats.dtype)
        n = keys.shape[0]
        if n == 0:
            return
        start = self.ptr
        if n > self.size:
            start = (self.ptr + (n - self.size)) % self.size
            keys = keys[-self.size:]
        idx = (start + torch.arange(keys.shape[0], device=keys.device)) % self.size
        self.feats.index_copy_(0, idx, keys)
        self.ptr.copy_((self.ptr + n) % self.size)


@torch.no_grad()
def momentum_update(target: nn.Module, source: nn.Module, momentum: float) -> None:
    """theta_target <- m * theta_target + (1 - m) * theta_source for every parameter.

    Buffers (BatchNorm running statistics) are not averaged: as in MoCo and ISD, the momentum
    encoder keeps the statistics of its own forward passes.
    """
    tp = [p for p in target.parameters()]
    sp = [p.detach() for p in source.parameters()]
    if len(tp) != len(sp):
        raise ValueError("momentum_update: source and target have different parameter lists")
    if not tp:
        return
    torch._foreach_mul_(tp, momentum)
    torch._foreach_add_(tp, sp, alpha=1.0 - momentum)


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy with ``requires_grad=False`` everywhere (the momentum/teacher encoder)."""
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


# --------------------------------------------------------------------------------------------
# loss


def infonce_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
    """Unscaled MoCo logits [q.k+ | q.n_1 ... q.n_K], shape (B, 1 + K)."""
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.t()
    return torch.cat([pos, neg], dim=1)


def infonce_loss(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy with the positive at index 0, averaged over the batch."""
    target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
    return F.cross_entropy(logits / temperature, target)


def no_autocast(device: torch.device) -> torch.autocast:
    return torch.autocast(device_type=device.type, enabled=False)


# --------------------------------------------------------------------------------------------
# methods


class SSLMethod(nn.Module):
    """Base class of the self-supervised methods: the interface the trainer drives.

    ``views`` names the augmentation each input view needs; ``forward(views)`` returns a dict with a
    differentiable scalar ``"loss"`` and detached scalar logs, and performs the momentum update and
    enqueue itself (in training mode only; in eval mode forward changes no state).
    ``encoder_prefix`` is the ``state_dict`` prefix of the backbone used for retrieval;
    ``momentum_prefix`` that of the momentum (teacher) backbone. ``encoder_arch`` is
    ``{"name", "kwargs"}`` of the backbone (set by ``registry.build_method``).
    """

    views: tuple[str, ...] = ("strong", "strong")
    encoder_prefix: str = "encoder_q."
    momentum_prefix: str = "encoder_k."

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        # Filled in by registry.build_method so checkpoints can rebuild the backbone.
        self.encoder_arch: dict[str, Any] = {}

    def set_epoch(self, epoch: int) -> None:
        """Tell the method the 0-based epoch about to run (warm-up gating, schedules)."""
        self.epoch = int(epoch)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError


@dataclass
class MoCoConfig:
    """MoCo v2 hyperparameters. Defaults: the SynCo/MoCo v2 recipe."""

    dim: int = 128  # --moco-dim
    mlp: bool = True  # --mlp: Linear(f, f) -> ReLU -> Linear(f, dim), no BN
    hidden_dim: int | None = None  # None = the backbone feature dim (2048 for ResNet-50)
    queue_size: int = 65536  # --moco-k
    momentum: float = 0.999  # --moco-m
    temperature: float = 0.2  # --moco-t 0.2 in the recipe (argparse default 0.07)
    shuffle_bn: bool = True
    # Virtual ranks for shuffle-BN in a single process (ignored under DDP, where the real ranks
    # are the splits). 4 matches a 256 batch on 4 GPUs as in the reference scripts.
    bn_splits: int = 4

    def validate(self) -> None:
        if self.queue_size < 1 or self.dim < 1:
            raise CdirError("moco: queue_size and dim must be positive")
        if not 0.0 <= self.momentum <= 1.0:
            raise CdirError(f"moco: momentum must be in [0, 1], got {self.momentum}")
        if self.temperature <= 0:
            raise CdirError(f"moco: temperature must be positive, got {self.temperature}")
        if self.bn_splits < 1:
            raise CdirError(f"moco: bn_splits must be >= 1, got {self.bn_splits}")


class MoCo(SSLMethod):
    """MoCo v2: query encoder + MLP head, momentum key encoder, queue of past keys, InfoNCE.

    ``views = [x_q, x_k]`` (two MoCo-v2 "strong" views).
    """

    views = ("strong", "strong")

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: MoCoConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or MoCoConfig()
        self.cfg.validate()
        self.encoder_q = backbone
        self.head_q = moco_head(feat_dim, self.cfg.dim, self.cfg.hidden_dim, self.cfg.mlp)
        self.encoder_k = frozen_copy(self.encoder_q)
        self.head_k = frozen_copy(self.head_q)
        self.queue = MemoryQueue(self.cfg.queue_size, self.cfg.dim)

    # encoders -------------------------------------------------------------------------------
    def _embed_q(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_q(self.encoder_q(x))

    def _embed_k(self, x: torch.Tensor) -> torch.Tensor:
        return self.head_k(self.encoder_k(x))

    def _momentum_update(self) -> None:
        momentum_update(self.encoder_k, self.encoder_q, self.cfg.momentum)
        momentum_update(self.head_k, self.head_q, self.cfg.momentum)

    def _encode_query(self, x: torch.Tensor) -> torch.Tensor:
        return encode_online(self._embed_q, x, self.training, self.cfg.shuffle_bn,
                             self.cfg.bn_splits)

    def _encode_key(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys for the local batch and for the global batch (the latter goes into the queue)."""
        return encode_momentum(self._embed_k, x, self.training, self.cfg.shuffle_bn,
                               self.cfg.bn_splits)

    # loss ----------------------------------------------------------------------------------
    def _logits(
        self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return infonce_logits(q, k, queue), {}

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x_q, x_k = views
        q = self._encode_query(x_q)
        with torch.no_grad():
            if self.training:  # eval mode (e.g. a validation loss) changes no state
                self._momentum_update()  # before the keys are computed, as in MoCo
            k, k_all = self._encode_key(x_k)
        with no_autocast(q.device):
            q = F.normalize(q.float(), dim=1)
            k = F.normalize(k.float(), dim=1)
            k_all = F.normalize(k_all.float(), dim=1)
            # A copy: the enqueue below would otherwise modify a tensor saved for backward.
            queue = self.queue.feats.clone()
            logits, logs = self._logits(q, k, queue)
            loss = infonce_loss(logits, self.cfg.temperature)
        if self.training:
            self.queue.enqueue(k_all)  # after the logits, with the global batch
        with torch.no_grad():
            out = {
                "loss": loss,
                "acc1": (logits.argmax(dim=1) == 0).float().mean(),
                "pos_sim": logits[:, 0].mean(),
                "neg_sim": logits[:, 1:1 + queue.shape[0]].mean(),
            }
        out.update(logs)
        return out
