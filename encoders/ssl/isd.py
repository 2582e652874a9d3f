"""ISD: Iterative Similarity Distillation.

The teacher is an EMA of the student. For each image the teacher gives a softmax over its queue of
past teacher embeddings (temperature tau_t); the student, from another augmentation and through a
predictor, is trained to match it: L = mean_batch KL(p_T || p_S), p_S with temperature tau_s.

Variants:
- ``isd`` (``train_isd.py``, ResNet-18 README recipe): the teacher embeds the raw pooled feature
  (f dims); student predictor Linear(f, f, no bias) -> BN -> ReLU -> Linear(f, f); one temperature
  0.02 for both; m = 0.999; both views strong.
- ``isd_plus`` (``train_isd_plus.py``, ResNet-50 README recipe): projection f -> 2f -> f/4 (BN) on
  teacher and student, predictor f/4 -> 2f -> f/4 (BN) on the student; tau_t = 0.01, tau_s = 0.1;
  m = 0.99; teacher view weak, student view strong.

``views = [x_teacher, x_student]`` (teacher view first).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cdir.core.errors import CdirError
from encoders.engine.parts import (
    MemoryQueue,
    encode_momentum,
    encode_online,
    frozen_copy,
    momentum_update,
    no_autocast,
)
from encoders.ssl.heads import isd_plus_predictor, isd_plus_projection, isd_predictor
from encoders.ssl.moco import SSLMethod

AUGMENTATIONS = ("weak/strong", "weak/weak", "strong/weak", "strong/strong")


def isd_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    queue: torch.Tensor,
    temp_s: float,
    temp_t: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(p_T || p_S) averaged over the batch, with p = softmax(x . queue^T / tau).

    ``student`` and ``teacher`` are unit rows (float32); the teacher side carries no gradient.
    Returns ``(loss, student_logits, teacher_logits)`` (logits unscaled).
    """
    logits_s = student @ queue.t()
    with torch.no_grad():
        logits_t = teacher.detach() @ queue.t()
        p_t = F.softmax(logits_t / temp_t, dim=1)
    log_p_s = F.log_softmax(logits_s / temp_s, dim=1)
    loss = F.kl_div(log_p_s, p_t, reduction="batchmean")
    return loss, logits_s, logits_t


@dataclass
class ISDConfig:
    """ISD hyperparameters; defaults = ``train_isd.py``. ``isd_plus`` overrides some."""

    plus: bool = False
    queue_size: int = 128000  # --queue_size
    momentum: float = 0.999  # --momentum (0.99 for plus)
    temp_t: float = 0.02  # --temp (plus: --temp_t 0.01)
    temp_s: float = 0.02  # --temp (plus: --temp_s 0.1)
    augmentation: str = "strong/strong"  # teacher/student (plus: "weak/strong")
    shuffle_bn: bool = True
    bn_splits: int = 4  # virtual ranks for single-process shuffle-BN (see moco.MoCoConfig)

    def validate(self) -> None:
        if self.augmentation not in AUGMENTATIONS:
            raise CdirError(f"isd: augmentation must be one of {AUGMENTATIONS} (teacher/student), "
                            f"got {self.augmentation!r}")
        if min(self.temp_t, self.temp_s) <= 0:
            raise CdirError("isd: temp_t and temp_s must be positive")
        if not 0.0 <= self.momentum <= 1.0:
            raise CdirError(f"isd: momentum must be in [0, 1], got {self.momentum}")
        if self.queue_size < 1 or self.bn_splits < 1:
            raise CdirError("isd: queue_size and bn_splits must be >= 1")


class ISD(SSLMethod):
    """ISD and ISD-plus. ``views = [x_teacher, x_student]``."""

    def __init__(self, backbone: nn.Module, feat_dim: int, cfg: ISDConfig | None = None) -> None:
        super().__init__()
        self.cfg = cfg or ISDConfig()
        self.cfg.validate()
        self.views = tuple(self.cfg.augmentation.split("/"))
        self.encoder_q = backbone
        if self.cfg.plus:
            if feat_dim < 4:
                raise CdirError(f"isd_plus needs a feature dim >= 4, got {feat_dim}")
            self.proj_q: nn.Module = isd_plus_projection(feat_dim)
            self.predictor = isd_plus_predictor(feat_dim)
            dim = feat_dim // 4
        else:
            self.proj_q = nn.Identity()
            self.predictor = isd_predictor(feat_dim)
            dim = feat_dim
        self.encoder_k = frozen_copy(self.encoder_q)
        self.proj_k = frozen_copy(self.proj_q)
        self.queue = MemoryQueue(self.cfg.queue_size, dim)

    def _embed_s(self, x: torch.Tensor) -> torch.Tensor:
        return self.predictor(self.proj_q(self.encoder_q(x)))

    def _embed_t(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj_k(self.encoder_k(x))

    def _momentum_update(self) -> None:
        momentum_update(self.encoder_k, self.encoder_q, self.cfg.momentum)
        momentum_update(self.proj_k, self.proj_q, self.cfg.momentum)

    def _encode_student(self, x: torch.Tensor) -> torch.Tensor:
        return encode_online(self._embed_s, x, self.training, self.cfg.shuffle_bn,
                             self.cfg.bn_splits)

    def _encode_teacher(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher embeddings of the local batch and of the global batch (enqueued)."""
        return encode_momentum(self._embed_t, x, self.training, self.cfg.shuffle_bn,
                               self.cfg.bn_splits)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        x_t, x_s = views
        s = self._encode_student(x_s)
        with torch.no_grad():
            if self.training:  # eval mode (e.g. a validation loss) changes no state
                self._momentum_update()
            t, t_all = self._encode_teacher(x_t)
        with no_autocast(s.device):
            s = F.normalize(s.float(), dim=1)
            t = F.normalize(t.float(), dim=1)
            t_all = F.normalize(t_all.float(), dim=1)
            queue = self.queue.feats.clone()  # the enqueue below must not touch saved tensors
            loss, logits_s, logits_t = isd_loss(s, t, queue, self.cfg.temp_s, self.cfg.temp_t)
        if self.training:
            self.queue.enqueue(t_all)  # similarities use the queue before the enqueue
        with torch.no_grad():
            out = {
                "loss": loss,
                # how often the student's nearest queue entry is the teacher's
                "nn_agree": (logits_s.argmax(1) == logits_t.argmax(1)).float().mean(),
                "teacher_max_sim": logits_t.max(dim=1).values.mean(),
            }
        return out
