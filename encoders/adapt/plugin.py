"""The adaptation family of the engine: ``METHODS`` (name -> method around a backbone, built by
``encoders.ssl.plugin.build_method``), registered with :mod:`encoders.engine.config`.

Cross-domain adaptation on images with domain names (`cdir adapt`): the method keyword
arguments are the fields of ``XDomainConfig`` (``xdomain``) and ``UCDIRConfig`` (``ucdir``). The
method modules (and torch) are imported when a method is built.
"""

from __future__ import annotations

from dataclasses import fields
from typing import TYPE_CHECKING, Any

from encoders.engine.config import Family, register
from encoders.ssl.plugin import Method

if TYPE_CHECKING:
    from torch import nn

    from encoders.ssl.moco import SSLMethod


def _xdomain_config() -> type:
    from encoders.adapt.xdomain import XDomainConfig

    return XDomainConfig


def _xdomain_options() -> list[str]:
    return [f.name for f in fields(_xdomain_config())]


def _xdomain(net: nn.Module, feat_dim: int, kw: dict[str, Any]) -> SSLMethod:
    from encoders.adapt.xdomain import XDomain, XDomainConfig

    return XDomain(net, feat_dim, XDomainConfig(**kw))


def _ucdir_config() -> type:
    from encoders.adapt.ucdir import UCDIRConfig

    return UCDIRConfig


def _ucdir_options() -> list[str]:
    return [f.name for f in fields(_ucdir_config())]


def _ucdir(net: nn.Module, feat_dim: int, kw: dict[str, Any]) -> SSLMethod:
    from encoders.adapt.ucdir import UCDIR, UCDIRConfig

    return UCDIR(net, feat_dim, UCDIRConfig(**kw))


METHODS: dict[str, Method] = {
    "xdomain": Method(_xdomain_options, _xdomain, config=_xdomain_config),
    "ucdir": Method(_ucdir_options, _ucdir, config=_ucdir_config),
}

register(Family("adapt", METHODS))
