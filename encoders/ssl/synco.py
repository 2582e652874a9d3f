"""SynCo: MoCo v2 plus synthetic hard negatives after a warm-up.

For each query, after ``warmup_epochs`` epochs (0-based epoch >= warmup_epochs), the top
``n_hard`` queue entries by similarity are the hard set; n1..n6 synthetic negatives of the six types
(``encoders.ssl.synthetic``) are built from it and appended to the negative logits. The loss stays
(1 + K + sum n_i)-way InfoNCE. Synthetic vectors are constants: gradients reach the encoder only
through q in q.s.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from encoders.ssl.moco import MoCo, MoCoConfig
from encoders.ssl.synthetic import (
    SyntheticConfig,
    select_hard,
    synthesize,
    synthetic_logits,
)


def synco_logits(
    q: torch.Tensor,
    k: torch.Tensor,
    queue: torch.Tensor,
    cfg: SyntheticConfig,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Unscaled logits [q.k+ | q.queue | q.synthetic], (B, 1 + K + cfg.total), and the synthetic
    negatives (B, cfg.total, d), or None where they are not built (``cfg.logits`` closed_form,
    the default: the same logits and gradient from the queue logits). ``q``, ``k`` and ``queue``
    are unit rows (float32)."""
    pos = (q * k).sum(dim=1, keepdim=True)
    neg = q @ queue.t()
    hard = select_hard(neg, cfg.n_hard)  # from the current queue, before the enqueue
    if cfg.logits == "closed_form" and cfg.perturb_impl == "closed_form":
        return torch.cat([pos, neg, synthetic_logits(q, neg, queue, hard, cfg, generator)],
                         dim=1), None
    syn = synthesize(q, queue, hard, cfg, generator)
    syn_logits = torch.bmm(syn, q.unsqueeze(2)).squeeze(2)
    return torch.cat([pos, neg, syn_logits], dim=1), syn


@dataclass
class SynCoConfig(MoCoConfig):
    """MoCo v2 settings plus the synthetic-negative settings and the warm-up."""

    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    warmup_epochs: int = 10  # synthetic negatives from 0-based epoch 10 on


class SynCo(MoCo):
    """MoCo v2 + synthetic hard negatives. ``views = [x_q, x_k]``.

    Before the first ``set_epoch`` call the epoch is 0, so the warm-up applies from the start;
    ``warmup_epochs=0`` turns synthetic negatives on from the first step.
    """

    def __init__(
        self, backbone: nn.Module, feat_dim: int, cfg: SynCoConfig | None = None
    ) -> None:
        cfg = cfg or SynCoConfig()
        cfg.synthetic.validate(cfg.queue_size)
        super().__init__(backbone, feat_dim, cfg)
        self.cfg: SynCoConfig = cfg

    @property
    def synthetic_active(self) -> bool:
        return self.epoch >= self.cfg.warmup_epochs and self.cfg.synthetic.total > 0

    def _logits(
        self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        if not self.synthetic_active:
            logits, logs = super()._logits(q, k, queue)
            logs["n_syn"] = logits.new_zeros(())
            return logits, logs
        logits, _ = synco_logits(q, k, queue, self.cfg.synthetic)
        with torch.no_grad():
            syn_logits = logits[:, 1 + queue.shape[0]:]
            logs = {
                "n_syn": logits.new_tensor(float(syn_logits.shape[1])),
                "syn_sim": syn_logits.mean(),
            }
        return logits, logs
