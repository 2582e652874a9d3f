"""FIFO memories of teacher embeddings for RRD and CRD's InfoNCE variant.

The queue itself is ``encoders.engine.parts.MemoryQueue`` (rows initialised to random unit vectors,
not the reference's column-normalised matrix; wrap-around enqueue; a fixed-seed init so every
rank starts alike). What is added here is the global batch of keys (all-gathered under DDP, so
every rank enqueues the same keys and the queues stay identical) and the memory a loss sees
when the current keys are enqueued *before* the loss; ``QueueLoss`` runs that protocol for
the losses on such a memory.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from cdir.core.dist import concat_all_gather, rank_world
from cdir.core.errors import CdirError
from encoders.distill.losses.base import ProjectionLoss
from encoders.engine.parts import MemoryQueue


def global_keys(z: torch.Tensor) -> torch.Tensor:
    """The keys of the global batch in rank order; this rank's rows keep their gradient.
    ``z`` itself without a process group."""
    rank, world = rank_world()
    if world == 1:
        return z
    b = z.shape[0]
    everyone = concat_all_gather(z.detach())
    return torch.cat([everyone[:rank * b], z, everyone[(rank + 1) * b:]], dim=0)


def memory_for_loss(queue: MemoryQueue, keys: torch.Tensor, enqueue_before: bool) -> torch.Tensor:
    """The (K, d) memory the loss contrasts with, never aliasing the queue buffer (the enqueue
    after the loss must not change a tensor saved for backward).

    ``enqueue_before``: the queue as it will be once ``keys`` are enqueued, built out of place
    so the gradient of ``keys`` (if any) flows through their rows; otherwise the queue as it is.
    """
    if not enqueue_before:
        return queue.feats.clone()
    n = keys.shape[0]
    if n > queue.size:
        raise CdirError(f"the queue ({queue.size}) must hold at least one global batch ({n})")
    rows = (queue.ptr + torch.arange(n, device=keys.device)) % queue.size
    return queue.feats.index_copy(0, rows, keys.to(queue.feats.dtype))


class QueueLoss(ProjectionLoss):
    """A projection loss against a FIFO memory (``queue``, feat_dim wide) of teacher keys: the
    batch's global keys join the memory before the loss (``enqueue_before_loss``) or only after
    it; in training mode they are enqueued after the loss. Subclasses implement
    ``memory_loss``.

    ``keys_keep_gradient``: whether the current keys' rows of the memory pass a gradient to the
    teacher projection (they do for RRD; CRD's FIFO variant trains it through the positive
    alone).
    """

    keys_keep_gradient: ClassVar[bool] = False

    def __init__(self, s_dim: int, t_dim: int, feat_dim: int, queue_size: int,
                 enqueue_before_loss: bool) -> None:
        super().__init__(s_dim, t_dim, feat_dim)
        self.enqueue_before_loss = bool(enqueue_before_loss)
        self.queue = MemoryQueue(queue_size, feat_dim)

    def embedding_loss(self, z_s: torch.Tensor, z_t: torch.Tensor, idx: torch.Tensor | None,
                       contrast_idx: torch.Tensor | None) -> torch.Tensor:
        keys = global_keys(z_t)
        if not self.keys_keep_gradient:
            keys = keys.detach()
        memory = memory_for_loss(self.queue, keys, self.enqueue_before_loss)
        loss = self.memory_loss(z_s, z_t, memory)
        if self.training:
            self.queue.enqueue(keys)
        return loss

    def memory_loss(self, z_s: torch.Tensor, z_t: torch.Tensor,
                    memory: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        """The loss of the unit embeddings (B, d) against the (K, d) memory."""
        raise NotImplementedError
