"""The self-supervised family of the engine: ``METHODS`` (name -> method around a backbone of
the zoo) and the ``aug`` config section, registered with :mod:`encoders.engine.config`.

``build_method("synco", "resnet50", {}, n_hard=1024, ...)`` builds any registered method that is
a :class:`Method` (these, and the adaptation methods of ``encoders.adapt``).

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
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from encoders.engine.config import Family, Section, methods, register

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


@dataclass(frozen=True)
class Method:
    """A method built around a backbone: ``options()`` lists the keyword arguments it takes,
    ``build(backbone, feature dim, kwargs)`` makes it; ``config()``, where given, is the
    dataclass of those arguments (its defaults are the method's)."""

    options: Callable[[], list[str]]
    build: Callable[..., SSLMethod]
    config: Callable[[], type] | None = None


def _aug() -> type:
    from encoders.ssl.augment import AugConfig

    return AugConfig


# pretraining on images alone (`cdir train NAME`)
METHODS: dict[str, Method] = {
    "moco": Method(_moco_options, _moco),
    "synco": Method(_synco_options, _synco),
    "isd": Method(_isd_options, _isd),
    "isd_plus": Method(_isd_options, _isd_plus),
}

register(Family("ssl", METHODS, (Section("aug", _aug, after="model"),)))


def _entry(name: str) -> Method:
    """Method ``name`` of any family, when it is one built around a backbone."""
    found = methods()
    entry = found[name].methods[name] if name in found else None
    if not isinstance(entry, Method):
        known = [n for n, fam in found.items() if isinstance(fam.methods[n], Method)]
        raise CdirError(f"unknown method {name!r}; choose one of {', '.join(known)}")
    return entry


def method_options(name: str) -> list[str]:
    """The keyword arguments ``build_method`` accepts for method ``name``."""
    return _entry(name).options()


def build_method(
    name: str,
    backbone: str,
    backbone_kwargs: dict[str, Any] | None = None,
    **method_kwargs: Any,
) -> SSLMethod:
    """Build an SSL method around a fresh ``build_backbone(backbone, **backbone_kwargs)``."""
    from encoders.zoo.backbones import build_backbone

    entry = _entry(name)
    valid = entry.options()
    unknown = sorted(set(method_kwargs) - set(valid))
    if unknown:
        raise CdirError(
            f"unknown option(s) {unknown} for method {name!r}; valid: {', '.join(valid)}"
        )
    backbone_kwargs = dict(backbone_kwargs or {})
    net, feat_dim = build_backbone(backbone, **backbone_kwargs)
    method = entry.build(net, feat_dim, method_kwargs)
    method.encoder_arch = {"name": backbone, "kwargs": backbone_kwargs}
    return method
