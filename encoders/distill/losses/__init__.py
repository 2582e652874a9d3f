"""Distillation losses behind one interface (``base.DistillLoss``), one module per method.

``LOSSES`` maps a name to its constructor, ``(s_dim, t_dim, n_data, **options) -> DistillLoss``:

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

import importlib
import inspect
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError

if TYPE_CHECKING:
    from encoders.distill.losses.base import DistillLoss


class _Lazy:
    """A constructor that imports its class on first use."""

    def __init__(self, module: str, cls: str) -> None:
        self.module, self.cls = module, cls

    def load(self) -> type[DistillLoss]:
        return getattr(importlib.import_module(f"encoders.distill.losses.{self.module}"),
                       self.cls)

    def __call__(self, *args: Any, **kwargs: Any) -> DistillLoss:
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.module}.{self.cls}>"


LOSSES: dict[str, _Lazy] = {
    "kd": _Lazy("kd", "KDLoss"),
    "crd": _Lazy("crd", "CRDLoss"),
    "crd_fifo": _Lazy("crd", "CRDFifoLoss"),
    "dcd": _Lazy("dcd", "DCDLoss"),
    "rrd": _Lazy("rrd", "RRDLoss"),
}

# the runs of `cdir train teacher` (cross-entropy alone) and `cdir distill LOSS`
DISTILL_METHODS: tuple[str, ...] = ("teacher", *LOSSES)

__all__ = ["DISTILL_METHODS", "LOSSES", "build_loss", "loss_class", "loss_options"]


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
