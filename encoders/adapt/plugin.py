"""The adaptation family of the engine: ``METHODS`` (name -> method around a backbone, built by
``encoders.ssl.plugin.build_method``), registered with :mod:`encoders.engine.config`.

Cross-domain adaptation on images with domain names (`cdir adapt`): the method keyword
arguments are the fields of ``XDomainConfig`` (``xdomain``) and ``UCDIRConfig`` (``ucdir``). The
method modules (and torch) are imported when a method is built.
"""

from __future__ import annotations

import importlib
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from encoders.engine.config import Family, register
from encoders.ssl.plugin import Method

if TYPE_CHECKING:
    from torch import nn

    from encoders.ssl.moco import SSLMethod


def _method(module: str, model: str, config: str) -> Method:
    """The method ``encoders.adapt.<module>.<model>`` configured by the dataclass ``config`` of
    the same module; the module (and torch) imported when first used."""

    def config_type() -> type:
        return getattr(importlib.import_module(f"encoders.adapt.{module}"), config)

    def options() -> list[str]:
        return [f.name for f in fields(config_type())]

    def build(net: nn.Module, feat_dim: int, kw: dict[str, Any]) -> SSLMethod:
        cls = getattr(importlib.import_module(f"encoders.adapt.{module}"), model)
        return cls(net, feat_dim, config_type()(**kw))

    return Method(options, build, config=config_type)


METHODS: dict[str, Method] = {
    "xdomain": _method("xdomain", "XDomain", "XDomainConfig"),
    "ucdir": _method("ucdir", "UCDIR", "UCDIRConfig"),
}

register(Family("adapt", METHODS))
