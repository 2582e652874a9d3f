"""KD (Hinton et al.): the KL divergence between temperature-softened class distributions."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cdir.core.errors import CdirError
from encoders.distill.losses.base import DistillLoss, check_positive
from encoders.engine.parts import no_autocast


def kd_divergence(logits_s: torch.Tensor, logits_t: torch.Tensor,
                  temperature: float = 4.0) -> torch.Tensor:
    """KL(softmax(z_t / T) || softmax(z_s / T)) * T^2, summed over classes and averaged over
    the batch. T^2 keeps the gradient's scale independent of T. The teacher is detached."""
    with no_autocast(logits_s.device):
        t = temperature
        log_p_s = F.log_softmax(logits_s.float() / t, dim=1)
        p_t = F.softmax(logits_t.detach().float() / t, dim=1)
        return F.kl_div(log_p_s, p_t, reduction="batchmean") * (t * t)


class KDLoss(DistillLoss):
    """``kd``: the logits-only loss. The testbed's KD run weighs CE 0.1 and KD 0.9 and has no
    other term (its beta is 0), so in ``StudentObjective`` this loss adds nothing to the KD
    term the objective computes itself; it exists so ``kd`` is a method like the others."""

    needs_logits = True
    recipe = (0.1, 0.9, 0.0)
    recipe_kd = (0.1, 0.9, 0.0)

    def __init__(self, s_dim: int | None = None, t_dim: int | None = None,
                 n_data: int | None = None, *, temperature: float = 4.0) -> None:
        super().__init__()
        check_positive("kd", temperature=temperature)
        self.temperature = float(temperature)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor,
                logits_s: torch.Tensor | None = None, logits_t: torch.Tensor | None = None,
                idx: torch.Tensor | None = None,
                contrast_idx: torch.Tensor | None = None) -> torch.Tensor:
        if logits_s is None or logits_t is None:
            raise CdirError("kd needs the student's and the teacher's logits")
        return kd_divergence(logits_s, logits_t, self.temperature)
