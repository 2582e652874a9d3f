"""DCD, Discriminative and Consistent Distillation: in-batch contrast between student and
teacher embeddings with a learnable logit scale and bias, plus a consistency term.

With z_s, z_t the normalised projections (both trained) and Z = tau * z_s z_t^T + b (B x B):
- contrast: cross-entropy of Z's rows with the diagonal as targets (student i -> teacher i);
- consistency: KL(Q^T_i || P_i) averaged over rows, P = softmax over Z's rows and Q = softmax
  over its columns (not detached: the gradient flows through both);
- L = contrast + alpha * consistency, alpha = 0.5.

tau = clamp(exp(log_tau), max=10) with log_tau initialised to 1 (tau = e, so the effective
temperature 1/tau starts at 0.37 and never falls below 0.1); b starts at 0. Both are
parameters of this module, so an optimiser over ``loss.parameters()`` updates them (the
reference's ImageNet trainer left them out). Note: a bias added to every logit cancels in both
softmaxes, so b's gradient is zero up to rounding and b stays where it starts; it is kept for
the published parametrisation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from encoders.distill.losses.base import ProjectionLoss, check_positive


def dcd_loss(z_s: torch.Tensor, z_t: torch.Tensor, tau: torch.Tensor, bias: torch.Tensor,
             alpha: float = 0.5) -> torch.Tensor:
    """DCD on unit embeddings (B, d) of the same batch."""
    logits = tau * (z_s @ z_t.t()) + bias
    target = torch.arange(logits.shape[0], device=logits.device)
    contrast = F.cross_entropy(logits, target)
    consist = F.kl_div(F.log_softmax(logits, dim=1), F.softmax(logits, dim=0).t(),
                       reduction="batchmean")
    return contrast + alpha * consist


class DCDLoss(ProjectionLoss):
    """``dcd``: README weights DCD = (1, 0, 1), DCD+KD = (1, 1, 1)."""

    def __init__(self, s_dim: int, t_dim: int, n_data: int | None = None, *,
                 feat_dim: int = 128, alpha: float = 0.5, init_log_tau: float = 1.0,
                 max_tau: float = 10.0, init_bias: float = 0.0) -> None:
        check_positive("dcd", feat_dim=feat_dim, max_tau=max_tau)
        super().__init__(s_dim, t_dim, feat_dim)
        self.alpha, self.max_tau = float(alpha), float(max_tau)
        self.log_tau = nn.Parameter(torch.tensor(float(init_log_tau)))
        self.bias = nn.Parameter(torch.tensor(float(init_bias)))

    def tau(self) -> torch.Tensor:
        """The logit scale exp(log_tau), at most ``max_tau`` (no gradient beyond the clamp)."""
        return self.log_tau.exp().clamp(max=self.max_tau)

    def embedding_loss(self, z_s: torch.Tensor, z_t: torch.Tensor, idx: torch.Tensor | None,
                       contrast_idx: torch.Tensor | None) -> torch.Tensor:
        return dcd_loss(z_s, z_t, self.tau(), self.bias, self.alpha)
