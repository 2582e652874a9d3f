"""The student's objective: L = gamma * CE(y, z_s) + alpha * KD(z_s, z_t; T) + beta * L_method.

gamma defaults to 1 and T to 4 (the testbed's ``-r`` and ``--kd_T``); alpha and beta have no
default there and must be given, or taken from a method's README recipe with
``StudentObjective.recipe(name, with_kd)``. A term whose weight is 0 is not computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cdir.core.errors import CdirError
from encoders.distill.losses.kd import kd_divergence


@dataclass(frozen=True)
class StudentObjective:
    alpha: float  # KD weight (-a)
    beta: float  # the distillation method's weight (-b)
    gamma: float = 1.0  # cross-entropy weight (-r)
    kd_temperature: float = 4.0  # --kd_T

    def __post_init__(self) -> None:
        if min(self.alpha, self.beta, self.gamma) < 0:
            raise CdirError(f"loss weights must be >= 0, got gamma={self.gamma}, "
                            f"alpha={self.alpha}, beta={self.beta}")
        if not (self.alpha or self.beta or self.gamma):
            raise CdirError("at least one of gamma, alpha, beta must be positive")
        if self.kd_temperature <= 0:
            raise CdirError(f"kd_temperature must be positive, got {self.kd_temperature}")

    @classmethod
    def recipe(cls, name: str, with_kd: bool = False,
               kd_temperature: float = 4.0) -> StudentObjective:
        """The README weights of loss ``name`` (``with_kd``: its "+KD" row)."""
        from encoders.distill.losses import loss_class

        klass = loss_class(name)
        gamma, alpha, beta = klass.recipe_kd if with_kd else klass.recipe
        return cls(alpha=alpha, beta=beta, gamma=gamma, kd_temperature=kd_temperature)

    def __call__(self, logits_s: torch.Tensor, target: torch.Tensor,
                 logits_t: torch.Tensor | None = None,
                 method_loss: torch.Tensor | None = None,
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and its detached, unweighted parts (``ce``, ``kd``, ``distill``;
        only those computed)."""
        parts: dict[str, torch.Tensor] = {}
        total = logits_s.new_zeros((), dtype=torch.float32)
        if self.gamma:
            parts["ce"] = F.cross_entropy(logits_s.float(), target)
            total = total + self.gamma * parts["ce"]
        if self.alpha:
            if logits_t is None:
                raise CdirError("the KD term (alpha > 0) needs the teacher's logits")
            parts["kd"] = kd_divergence(logits_s, logits_t, self.kd_temperature)
            total = total + self.alpha * parts["kd"]
        if self.beta:
            if method_loss is None:
                raise CdirError("the distillation term (beta > 0) needs the method's loss")
            parts["distill"] = method_loss
            total = total + self.beta * method_loss
        return total, {k: v.detach() for k, v in parts.items()}
