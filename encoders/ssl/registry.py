"""Name -> self-supervised method: ``build_method("synco", "resnet50", {}, n_hard=1024, ...)``.

Method keyword arguments are the fields of the method's config dataclass, flat:

- ``moco``: ``MoCoConfig`` fields (dim, mlp, hidden_dim, queue_size, momentum, temperature,
  shuffle_bn, bn_splits).
- ``synco``: the MoCo fields plus ``warmup_epochs`` and the ``SyntheticConfig`` fields (n_hard,
  n1..n6, alpha_max, beta_max, gamma_max, sigma, delta, eta, extrapolate_from, perturb_impl,
  fd_eps).
- ``isd`` / ``isd_plus``: ``ISDConfig`` fields (queue_size, momentum, temp_t, temp_s,
  augmentation, shuffle_bn, bn_splits); ``plus`` is fixed by the name.

Defaults are the papers' recipes (MoCo v2 / SynCo for moco and synco, ``train_isd.py`` and
``train_isd_plus.py`` for ISD). The method modules (and torch) are imported when a method is built,
so that the CLI can list the names cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError

if TYPE_CHECKING:
    from torch import nn

    from encoders.ssl.moco import SSLMethod

# ISD-plus recipe (train_isd_plus.py defaults and its README).
_ISD_PLUS_DEFAULTS: dict[str, Any] = {
    "plus": True, "momentum": 0.99, "temp_t": 0.01, "temp_s": 0.1, "augmentation": "weak/strong",
}


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def _moco_options() -> list[str]:
    from encoders.ssl.moco import MoCoConfig

    return _names(MoCoConfig)


def _moco(net: nn.Module, feat_dim: int, kw: dict[str, Any]) -> SSLMethod:
    from encoders.ssl.moco import MoCo, MoCoConfig

    return MoCo(net, feat_dim, MoCoConfig(**kw))


def _synco_options() -> list[str]:
    from encoders.ssl.synco import SynCoConfig
    from encoders.ssl.synthetic import SyntheticConfig

    return [n for n in _names(SynCoConfig) if n != "synthetic"] + _names(SyntheticConfig)


def _synco(net: nn.Module, feat_dim: int, kw: dict[str, Any]) -> SSLMethod:
    from encoders.ssl.synco import SynCo, SynCoConfig
    from encoders.ssl.synthetic import SyntheticConfig

    syn_keys = set(_names(SyntheticConfig))
    syn = SyntheticConfig(**{k: v for k, v in kw.items() if k in syn_keys})
    rest = {k: v for k, v in kw.items() if k not in syn_keys}
    return SynCo(net, feat_dim, SynCoConfig(synthetic=syn, **rest))


def _isd_options() -> list[str]:
    from encoders.ssl.isd import ISDConfig

    return [n for n in _names(ISDConfig) if n != "plus"]


def _isd(net: nn.Module, feat_dim: int, kw: dict[str, Any]) -> SSLMethod:
    from encoders.ssl.isd import ISD, ISDConfig

    return ISD(net, feat_dim, ISDConfig(**kw))


def _isd_plus(net: nn.Module, feat_dim: int, kw: dict[str, Any]) -> SSLMethod:
    return _isd(net, feat_dim, {**_ISD_PLUS_DEFAULTS, **kw})


def _xdomain_options() -> list[str]:
    from encoders.adapt.xdomain import XDomainConfig

    return _names(XDomainConfig)


def _xdomain(net: nn.Module, feat_dim: int, kw: dict[str, Any]) -> SSLMethod:
    from encoders.adapt.xdomain import XDomain, XDomainConfig

    return XDomain(net, feat_dim, XDomainConfig(**kw))


def _ucdir_options() -> list[str]:
    from encoders.adapt.ucdir import UCDIRConfig

    return _names(UCDIRConfig)


def _ucdir(net: nn.Module, feat_dim: int, kw: dict[str, Any]) -> SSLMethod:
    from encoders.adapt.ucdir import UCDIR, UCDIRConfig

    return UCDIR(net, feat_dim, UCDIRConfig(**kw))


# name -> (the keyword arguments it takes, builder(backbone, feature dim, kwargs), adapts):
# adapts=False: pretraining on images alone (`cdir train`); True: cross-domain adaptation on
# images with domain names (`cdir adapt`, encoders.adapt)
_REGISTRY: dict[str, tuple[Callable[[], list[str]], Callable[..., SSLMethod], bool]] = {
    "moco": (_moco_options, _moco, False),
    "synco": (_synco_options, _synco, False),
    "isd": (_isd_options, _isd, False),
    "isd_plus": (_isd_options, _isd_plus, False),
    "xdomain": (_xdomain_options, _xdomain, True),
    "ucdir": (_ucdir_options, _ucdir, True),
}
METHODS: tuple[str, ...] = tuple(n for n, e in _REGISTRY.items() if not e[2])
ADAPT_METHODS: tuple[str, ...] = tuple(n for n, e in _REGISTRY.items() if e[2])

__all__ = ["ADAPT_METHODS", "METHODS", "build_method", "method_options"]


def _entry(name: str) -> tuple[Callable[[], list[str]], Callable[..., SSLMethod]]:
    if name not in _REGISTRY:
        raise CdirError(f"unknown method {name!r}; choose one of {', '.join(_REGISTRY)}")
    return _REGISTRY[name][:2]


def method_options(name: str) -> list[str]:
    """The keyword arguments ``build_method`` accepts for method ``name``."""
    return _entry(name)[0]()


def build_method(
    name: str,
    backbone: str,
    backbone_kwargs: dict[str, Any] | None = None,
    **method_kwargs: Any,
) -> SSLMethod:
    """Build an SSL method around a fresh ``build_backbone(backbone, **backbone_kwargs)``."""
    from encoders.zoo.backbones import build_backbone

    options, make = _entry(name)
    valid = options()
    unknown = sorted(set(method_kwargs) - set(valid))
    if unknown:
        raise CdirError(
            f"unknown option(s) {unknown} for method {name!r}; valid: {', '.join(valid)}"
        )
    backbone_kwargs = dict(backbone_kwargs or {})
    net, feat_dim = build_backbone(backbone, **backbone_kwargs)
    method = make(net, feat_dim, method_kwargs)
    method.encoder_arch = {"name": backbone, "kwargs": backbone_kwargs}
    return method
