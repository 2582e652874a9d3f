"""The distillation family of the engine: ``METHODS`` (name -> its loss, imported on first use)
and the ``distill`` config section, registered with :mod:`encoders.engine.config`.

``teacher`` trains with cross-entropy alone (`cdir train teacher`: teachers and the vanilla
students of the tables); every other name is a distillation loss (`cdir distill NAME`), one
module each under ``encoders.distill.losses``.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from encoders.engine.config import Family, Section, register

if TYPE_CHECKING:
    from encoders.distill.losses.base import DistillLoss


class LazyLoss:
    """A loss constructor that imports its class on first use."""

    def __init__(self, module: str, cls: str) -> None:
        self.module, self.cls = module, cls

    def load(self) -> type[DistillLoss]:
        return getattr(importlib.import_module(f"encoders.distill.losses.{self.module}"),
                       self.cls)

    def __call__(self, *args: Any, **kwargs: Any) -> DistillLoss:
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.module}.{self.cls}>"


def _distill() -> type:
    from encoders.distill.config import DistillConfig

    return DistillConfig


METHODS: dict[str, LazyLoss | None] = {
    "teacher": None,
    "kd": LazyLoss("kd", "KDLoss"),
    "crd": LazyLoss("crd", "CRDLoss"),
    "crd_fifo": LazyLoss("crd", "CRDFifoLoss"),
    "dcd": LazyLoss("dcd", "DCDLoss"),
    "rrd": LazyLoss("rrd", "RRDLoss"),
}


def distils(method: str) -> bool:
    """Does ``method`` learn from a teacher? Every method does but ``teacher``, which has no
    loss: it trains with cross-entropy alone."""
    return METHODS[method] is not None


register(Family("distill", METHODS, (Section("distill", _distill, after="monitor"),)))
