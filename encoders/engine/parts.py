"""The parts the methods share: the one encode path of an online and a momentum branch, with
shuffle-BN; the memory queue; the momentum (EMA) update; InfoNCE.

- shuffle-BN across ranks (``ddp_shuffle`` / ``ddp_unshuffle``, on the collectives of
  ``cdir.core.dist``, which are no-ops without a process group); ``split_forward``: its
  single-process equivalent (virtual ranks); ``encode_online`` / ``encode_momentum``: the one
  encode path of the online and the momentum branch that MoCo, SynCo, ISD and the adaptation
  methods all use;
- ``MemoryQueue``: a FIFO of unit vectors in a registered buffer, **row**-normalised at init
  (the reference normalises columns), with wrap-around enqueue (also the distillation losses'
  memory of teacher embeddings);
- ``momentum_update``: theta_k <- m * theta_k + (1 - m) * theta_q, under no_grad;
  ``frozen_copy``: the momentum (teacher) twin of a module;
- ``infonce_logits`` / ``infonce_loss``, and ``no_autocast``: the losses run in float32 with
  autocast disabled, so a method is safe inside ``torch.autocast`` (fp16/bf16).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from cdir.core.dist import broadcast, concat_all_gather, dist_ready, rank_world

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
