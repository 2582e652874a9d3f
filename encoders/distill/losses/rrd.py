"""RRD, Relational Representation Distillation: the student's similarity distribution over a
FIFO memory of teacher embeddings matches the teacher's.

With z_s, z_t the normalised projections (feat_dim 128) and M (K x d) the memory:
p_t = softmax(z_t M^T / tau_t) (detached target), log p_s = log_softmax(z_s M^T / tau_s) and
L = -(1/B) sum_i sum_k p_t[i, k] log p_s[i, k].

Defaults are the reference code's (2025): K = 16384, tau_s = 0.1, tau_t = 0.02 (its docstrings
and the 2024 code say otherwise; both are options), and the current teacher batch enqueued
*before* the similarities (``enqueue_before_loss``), so each sample's own teacher key is in M:
as tau_t -> 0, p_t is one-hot on that key and L is InfoNCE with the queue as negatives at
temperature tau_s. ``enqueue_before_loss=False`` is the 2024 order (the queue holds past
batches only).

The teacher projection receives no gradient through this loss (p_t is detached and the enqueue
is not differentiated), so by default it is frozen: a fixed random projection of the teacher's
features, as the reference code ends up with. ``freeze_teacher_proj=False`` trains it through
the one path there is: the current keys' rows of M in the student's similarities (this needs
``enqueue_before_loss``). Label-free runs replace the random teacher projection by a fixed
bias-free one (``encoders.distill.student.LabelFreeDistiller``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdir.core.errors import CdirError
from encoders.distill.losses.base import check_positive
from encoders.distill.losses.memory import QueueLoss


def relational_loss(z_s: torch.Tensor, z_t: torch.Tensor, memory: torch.Tensor,
                    temp_s: float, temp_t: float) -> torch.Tensor:
    """Cross-entropy between the teacher's (target) and the student's softmax similarities to
    the memory rows."""
    p_t = F.softmax(z_t.detach() @ memory.detach().t() / temp_t, dim=1)
    log_p_s = F.log_softmax(z_s @ memory.t() / temp_s, dim=1)
    return -(p_t * log_p_s).sum(dim=1).mean()


class RRDLoss(QueueLoss):
    """``rrd``: README weights RRD = (1, 0, 1), RRD+KD = (1, 1, 1)."""

    keys_keep_gradient = True

    def __init__(self, s_dim: int, t_dim: int, n_data: int | None = None, *,
                 feat_dim: int = 128, queue_size: int = 16384, temp_s: float = 0.1,
                 temp_t: float = 0.02, enqueue_before_loss: bool = True,
                 freeze_teacher_proj: bool = True) -> None:
        check_positive("rrd", feat_dim=feat_dim, queue_size=queue_size, temp_s=temp_s,
                       temp_t=temp_t)
        if not freeze_teacher_proj and not enqueue_before_loss:
            raise CdirError("rrd: freeze_teacher_proj=False needs enqueue_before_loss=True; "
                            "otherwise no gradient reaches the teacher projection")
        super().__init__(s_dim, t_dim, feat_dim, queue_size, enqueue_before_loss)
        self.temp_s, self.temp_t = float(temp_s), float(temp_t)
        self.embed_t.requires_grad_(not freeze_teacher_proj)

    def memory_loss(self, z_s: torch.Tensor, z_t: torch.Tensor,
                    memory: torch.Tensor) -> torch.Tensor:
        return relational_loss(z_s, z_t, memory, self.temp_s, self.temp_t)
