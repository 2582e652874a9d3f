"""MoCo v2, and ``SSLMethod``: the interface the engine drives that every self-supervised and
adaptation method implements (``views``, ``forward(views) -> dict``, ``set_epoch``,
``encoder_prefix``).

The shared parts (shuffle-BN, the queue, the momentum update, InfoNCE) are
:mod:`encoders.engine.parts`. Everything from the embeddings on (normalisation, logits, softmax,
loss) runs in float32 with autocast disabled, so the method is safe inside ``torch.autocast``
(fp16/bf16).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from cdir.core.errors import CdirError
from encoders.engine.parts import (
    MemoryQueue,
    encode_momentum,
    encode_online,
    frozen_copy,
    infonce_logits,
    infonce_loss,
    momentum_update,
    no_autocast,
)
from encoders.ssl.heads import moco_head

# --------------------------------------------------------------------------------------------
# methods


class SSLMethod(nn.Module):
    """Base class of the self-supervised methods: the interface the trainer drives.

    ``views`` names the augmentation each input view needs; ``forward(views)`` returns a dict with a
    differentiable scalar ``"loss"`` and detached scalar logs, and performs the momentum update and
    enqueue itself (in training mode only; in eval mode forward changes no state).
    ``encoder_prefix`` is the ``state_dict`` prefix of the backbone used for retrieval;
    ``momentum_prefix`` that of the momentum (teacher) backbone. ``encoder_arch`` is
    ``{"name", "kwargs"}`` of the backbone (set by ``plugin.build_method``).
    """

    views: tuple[str, ...] = ("strong", "strong")
    encoder_prefix: str = "encoder_q."
    momentum_prefix: str = "encoder_k."

    def __init__(self) -> None:
        super().__init__()
        self.epoch = 0
        # Filled in by plugin.build_method so checkpoints can rebuild the backbone.
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
