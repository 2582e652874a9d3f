"""FIFO memories of teacher embeddings for RRD and CRD's InfoNCE variant.

The queue itself is ``encoders.engine.parts.MemoryQueue`` (rows initialised to random unit vectors,
not the reference's column-normalised matrix; wrap-around enqueue; a fixed-seed init so every
rank starts alike). What is added here is the global batch of keys (all-gathered under DDP, so
every rank enqueues the same keys and the queues stay identical) and the memory a loss sees
when the current keys are enqueued *before* the loss.
"""

from __future__ import annotations

import torch

from cdir.core.dist import concat_all_gather, rank_world
from cdir.core.errors import CdirError
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
