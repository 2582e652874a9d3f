"""Distillation losses behind one interface (``base.DistillLoss``), one module per method.

``LOSSES`` maps a name to its constructor, ``(s_dim, t_dim, n_data, **options) -> DistillLoss``
(the losses of ``encoders.distill.plugin.METHODS``, where the names are listed):

- ``kd``: Hinton's KD on the logits (temperature 4);
- ``crd``: CRD with the paper's momentum memory banks and NCE (needs ``n_data`` and ``idx``);
- ``crd_fifo``: CRD as InfoNCE against a FIFO queue of teacher embeddings;
- ``dcd``: DCD, in-batch contrast + consistency with a learnable logit scale and bias;
- ``rrd``: RRD, relational (soft) contrast against a FIFO queue of teacher embeddings.

``build_loss(name, s_dim, t_dim, n_data, **options)`` checks the option names first;
``loss_options(name)`` lists them. The loss modules (and torch) are imported when a loss is
built, so the names are cheap to list. The student objective that weighs CE, KD and the loss
is ``encoders.distill.losses.objective.StudentObjective``.
"""

from __future__ import annotations

import inspect
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from encoders.distill.plugin import METHODS, LazyLoss

if TYPE_CHECKING:
    from encoders.distill.losses.base import DistillLoss


# the losses of METHODS (all but the teacher run's cross-entropy)
LOSSES: dict[str, LazyLoss] = {n: m for n, m in METHODS.items() if m is not None}

__all__ = ["LOSSES", "build_loss", "loss_class", "loss_options"]


def loss_class(name: str) -> type[DistillLoss]:
    if name not in LOSSES:
        raise CdirError(f"unknown distillation loss {name!r}; choose one of {', '.join(LOSSES)}")
    return LOSSES[name].load()


def loss_options(name: str) -> list[str]:
    """The keyword options of loss ``name`` (its constructor's keyword-only arguments)."""
    params = inspect.signature(loss_class(name).__init__).parameters.values()
    return [p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY]


def build_loss(name: str, s_dim: int, t_dim: int, n_data: int | None = None,
               **options: Any) -> DistillLoss:
    """Loss ``name`` for student features of ``s_dim`` and teacher features of ``t_dim``;
    ``n_data``: the training set size (CRD's memory has a row per sample; others ignore it)."""
    valid = loss_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise CdirError(f"unknown option(s) {unknown} for loss {name!r}; valid: "
                        f"{', '.join(valid) or 'none'}")
    return LOSSES[name](s_dim, t_dim, n_data, **options)
