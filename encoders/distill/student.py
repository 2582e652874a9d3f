"""The module the training engine runs for distillation: the student, the frozen teacher, the
distillation loss and the objective, behind the engine's ``forward(views, idx) -> {"loss", ...}``.

Two kinds, one per way the teacher's signal arrives:

- :class:`Distiller` (labelled, the CIFAR/ImageNet testbed): the teacher is a zoo model run on
  the same batch; the loss is ``gamma * CE + alpha * KD + beta * method`` (``StudentObjective``).
  ``method="teacher"`` has no teacher and trains with cross-entropy alone (teachers and the
  vanilla students of the tables).
- :class:`LabelFreeDistiller` (retrieval): the teacher's embeddings of every training image
  are given up front (from the workspace's embedding store: the teacher never runs twice on an
  image), looked up by dataset index; the loss is the method term alone (no labels, no logits).

The teacher and the teacher embeddings are kept out of ``state_dict()``: a checkpoint holds
what trains (student, loss projections, memories), and a resumed run loads the teacher again
from its file, checked by content hash. ``encoder_prefix = "student."``: the weights that are
exported.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from encoders.distill.losses.base import DistillLoss, teacher_projection
from encoders.distill.losses.objective import StudentObjective


class _Engine(nn.Module):
    """What the training engine expects of a method besides ``forward``."""

    encoder_prefix = "student."
    views = ("weak",)

    def set_epoch(self, epoch: int) -> None:  # no schedule inside the method
        pass


class Distiller(_Engine):
    """Student + (optional) frozen zoo teacher + loss + objective, on labelled data."""

    def __init__(self, student: nn.Module, labels: torch.Tensor, objective: StudentObjective,
                 teacher: nn.Module | None = None, loss: DistillLoss | None = None) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        self.objective = objective
        self.register_buffer("labels", labels.long(), persistent=False)
        if loss is not None:
            loss.set_labels(self.labels)
        object.__setattr__(self, "teacher", teacher)  # not a submodule: not in state_dict

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Distiller:
        super()._apply(fn, *args, **kwargs)
        if self.teacher is not None:  # moves with the rest (.to(device), .half())
            self.teacher._apply(fn, *args, **kwargs)
        return self

    def train(self, mode: bool = True) -> Distiller:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # a frozen teacher keeps its BatchNorm statistics
        return self

    def forward(self, views: list[torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        x = views[0]
        idx = idx.to(x.device, non_blocking=True)
        target = self.labels[idx]
        out_s = self.student(x)
        out_t = None
        if self.teacher is not None:
            with torch.no_grad():
                out_t = self.teacher(x)
        method_loss = None
        if self.loss is not None and self.objective.beta:
            method_loss = self.loss(out_s.feat, out_t.feat, out_s.logits, out_t.logits, idx=idx)
        total, parts = self.objective(out_s.logits, target,
                                      None if out_t is None else out_t.logits, method_loss)
        acc = (out_s.logits.detach().argmax(1) == target).float().mean()
        return {"loss": total, **parts, "acc": acc}


class LabelFreeDistiller(_Engine):
    """A student embedding network trained to match given teacher embeddings with a
    relational (RRD) or contrastive (DCD) term. The student outputs its embedding directly, so
    the loss's student projection is the identity: what is exported is what was distilled.
    The teacher's vectors reach the loss through a frozen bias-free map
    (:func:`~encoders.distill.losses.base.teacher_projection`: the identity when the sizes
    agree, else their principal directions), so the targets keep the teacher's neighbours."""

    def __init__(self, student: nn.Module, teacher_feats: torch.Tensor,
                 loss: DistillLoss) -> None:
        super().__init__()
        self.student = student
        self.loss = loss
        if hasattr(loss, "embed_s"):
            loss.embed_s = nn.Identity()
        if hasattr(loss, "embed_t"):
            loss.embed_t = teacher_projection(teacher_feats, loss.embed_t.out_features)
        self.register_buffer("teacher_feats", teacher_feats.float(), persistent=False)

    def forward(self, views: list[torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        x = views[0]
        idx = idx.to(x.device, non_blocking=True)
        f_s = self.student(x)
        f_t = self.teacher_feats[idx]
        loss = self.loss(f_s, f_t, idx=idx)
        with torch.no_grad():  # how often the student's nearest teacher key in the batch is its own
            z_s = F.normalize(f_s.detach().float(), dim=1)
            z_t = F.normalize(self.loss.embed_t(f_t).float(), dim=1) if hasattr(
                self.loss, "embed_t") else F.normalize(f_t, dim=1)
            hit = (z_s @ z_t.t()).argmax(1) == torch.arange(len(x), device=x.device)
        return {"loss": loss, "distill": loss.detach(), "batch_match": hit.float().mean()}
