"""The interface every distillation loss implements, and the pieces they share.

``DistillLoss.forward(f_s, f_t, logits_s=None, logits_t=None, idx=None, contrast_idx=None)``
returns the scalar method loss (the ``L_distill`` that the objective weighs by beta):

- ``f_s`` (B, s_dim): the student's pooled features, with gradient; ``f_t`` (B, t_dim): the
  teacher's (detached here: the teacher backbone is frozen; projections of it may train);
- ``logits_s`` / ``logits_t``: the classifier outputs (KD needs them; the others ignore them);
- ``idx`` (B,): the samples' dataset indices, ``contrast_idx`` (B, K+1): the memory rows to
  contrast with, positive first (CRD's momentum memory needs ``idx``; ``contrast_idx`` is
  optional there).

``ProjectionLoss``: the losses on both sides' features projected to ``feat_dim`` and
L2-normalised (CRD, its FIFO variant, DCD, RRD) share that head and implement
``embedding_loss`` on the unit embeddings.

Projection heads are submodules and learnable scalars are parameters, so an optimiser over
``loss.parameters()`` trains them; memories are buffers, so ``loss.state_dict()`` holds them. In
training mode ``forward`` also updates the memory; in eval mode it changes no state. The math
runs in float32 with autocast off.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from cdir.core.errors import CdirError
from encoders.engine.parts import no_autocast


class DistillLoss(nn.Module):
    """Base class of the distillation losses (see the module docstring for ``forward``).

    ``needs_logits`` / ``needs_index``: which optional inputs ``forward`` requires.
    ``recipe`` / ``recipe_kd``: the (gamma, alpha, beta) weights of CE, KD and this loss in the
    testbed's README commands, alone and combined with KD (``StudentObjective.recipe``).
    """

    needs_logits: ClassVar[bool] = False
    needs_index: ClassVar[bool] = False
    recipe: ClassVar[tuple[float, float, float]] = (1.0, 0.0, 1.0)
    recipe_kd: ClassVar[tuple[float, float, float]] = (1.0, 1.0, 1.0)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor,
                logits_s: torch.Tensor | None = None, logits_t: torch.Tensor | None = None,
                idx: torch.Tensor | None = None,
                contrast_idx: torch.Tensor | None = None) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def set_labels(self, labels: torch.Tensor | None) -> None:
        """The training set's labels, one per dataset index, for a loss whose sampling uses
        them (CRD's negatives); the others ignore them."""


class ProjectionLoss(DistillLoss):
    """A loss on linear projections of the student's and the teacher's features to ``feat_dim``
    (``embed_s``, ``embed_t``), L2-normalised; subclasses implement ``embedding_loss``."""

    def __init__(self, s_dim: int, t_dim: int, feat_dim: int) -> None:
        super().__init__()
        self.embed_s = nn.Linear(s_dim, feat_dim)
        self.embed_t = nn.Linear(t_dim, feat_dim)

    def forward(self, f_s: torch.Tensor, f_t: torch.Tensor,
                logits_s: torch.Tensor | None = None, logits_t: torch.Tensor | None = None,
                idx: torch.Tensor | None = None,
                contrast_idx: torch.Tensor | None = None) -> torch.Tensor:
        with no_autocast(f_s.device):
            z_s = embed(self.embed_s, f_s)
            z_t = embed(self.embed_t, f_t.detach())
            return self.embedding_loss(z_s, z_t, idx, contrast_idx)

    def embedding_loss(self, z_s: torch.Tensor, z_t: torch.Tensor, idx: torch.Tensor | None,
                       contrast_idx: torch.Tensor | None) -> torch.Tensor:  # pragma: no cover
        """The loss on the unit embeddings (B, feat_dim), in float32 with autocast off."""
        raise NotImplementedError


class FixedProjection(nn.Module):
    """A frozen linear map without bias: ``x @ weight.T``. ``weight`` is a buffer (saved in
    the checkpoint, never optimised)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("weight", weight.float().contiguous())

    @property
    def out_features(self) -> int:
        return int(self.weight.shape[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.t()


def teacher_projection(feats: torch.Tensor, dim: int) -> nn.Module:
    """A bias-free frozen map of teacher vectors ``feats`` (N, d) to ``dim``: the identity when
    ``dim == d``; otherwise the rows' principal directions (uncentred, so the map stays linear
    and keeps the origin), largest first: a rotation when ``dim >= d`` (zero rows beyond d: every
    inner product, hence every cosine ranking, is kept), and the inner-product-preserving rank
    ``dim`` projection when ``dim < d``. A random map, or a random bias as large as unit vectors,
    would blur the neighbour structure the student is asked to learn."""
    d = int(feats.shape[1])
    if dim == d:
        return nn.Identity()
    x = feats.detach().double().cpu()
    _, vecs = torch.linalg.eigh(x.t() @ x)  # ascending eigenvalues
    vecs = vecs.flip(1).t()  # (d, d), one direction per row, largest first
    # a fixed sign per direction (its largest entry positive), so the map is reproducible
    pick = vecs.abs().argmax(dim=1, keepdim=True)
    vecs = vecs * torch.sign(vecs.gather(1, pick))
    weight = torch.zeros(dim, d, dtype=torch.float64)
    k = min(dim, d)
    weight[:k] = vecs[:k]
    return FixedProjection(weight.to(feats.device))


def embed(proj: nn.Module, f: torch.Tensor) -> torch.Tensor:
    """A projection's output, L2-normalised per row, in float32."""
    return F.normalize(proj(f.float()), dim=1)


def check_positive(what: str, **values: float) -> None:
    for k, v in values.items():
        if not v > 0:
            raise CdirError(f"{what}: {k} must be positive, got {v}")
