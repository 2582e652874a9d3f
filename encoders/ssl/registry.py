"""Name -> self-supervised method: ``build_method("synco", "resnet50", {}, n_hard=1024, ...)``.

Method keyword arguments are the fields of the method's config dataclass, flat:

- ``moco``: ``MoCoConfig`` fields (dim, mlp, hidden_dim, queue_size, momentum, temperature,
  shuffle_bn, bn_splits).
- ``synco``: the MoCo fields plus ``warmup_epochs`` and the ``SyntheticConfig`` fields (n_hard,
  n1..n6, alpha_max, beta_max, gamma_max, sigma, delta, eta, extrapolate_from, perturb_impl,
  fd_eps).
- ``isd`` / ``isd_plus``: ``ISDConfig`` fields (queue_size, momentum, temp_t, temp_s,
  augmentation, shuffle_bn, bn_splits); ``plus`` is fixed by the name.

Defaults are the spec's (``methods.md`` §1.7 for MoCo/SynCo, §2.3 for ISD).
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from cdir.core.errors import CdirError
from encoders.ssl.backbones import build_backbone
from encoders.ssl.isd import ISD, ISDConfig
from encoders.ssl.moco import MoCo, MoCoConfig, SSLMethod
from encoders.ssl.synco import SynCo, SynCoConfig
from encoders.ssl.synthetic import SyntheticConfig

METHODS = ("moco", "synco", "isd", "isd_plus")

# ISD-plus recipe (train_isd_plus.py defaults + README, spec §2.3-§2.4).
_ISD_PLUS_DEFAULTS: dict[str, Any] = {
    "plus": True, "momentum": 0.99, "temp_t": 0.01, "temp_s": 0.1, "augmentation": "weak/strong",
}

__all__ = ["METHODS", "SSLMethod", "build_method", "method_options"]


def _names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def method_options(name: str) -> list[str]:
    """The keyword arguments ``build_method`` accepts for method ``name``."""
    if name == "moco":
        return _names(MoCoConfig)
    if name == "synco":
        return [n for n in _names(SynCoConfig) if n != "synthetic"] + _names(SyntheticConfig)
    if name in ("isd", "isd_plus"):
        return [n for n in _names(ISDConfig) if n != "plus"]
    raise CdirError(f"unknown SSL method {name!r}; choose one of {', '.join(METHODS)}")


def build_method(
    name: str,
    backbone: str,
    backbone_kwargs: dict[str, Any] | None = None,
    **method_kwargs: Any,
) -> SSLMethod:
    """Build an SSL method around a fresh ``build_backbone(backbone, **backbone_kwargs)``."""
    valid = method_options(name)
    unknown = sorted(set(method_kwargs) - set(valid))
    if unknown:
        raise CdirError(
            f"unknown option(s) {unknown} for method {name!r}; valid: {', '.join(valid)}"
        )
    backbone_kwargs = dict(backbone_kwargs or {})
    net, feat_dim = build_backbone(backbone, **backbone_kwargs)
    method: SSLMethod
    if name == "moco":
        method = MoCo(net, feat_dim, MoCoConfig(**method_kwargs))
    elif name == "synco":
        syn_keys = set(_names(SyntheticConfig))
        syn = SyntheticConfig(**{k: v for k, v in method_kwargs.items() if k in syn_keys})
        rest = {k: v for k, v in method_kwargs.items() if k not in syn_keys}
        method = SynCo(net, feat_dim, SynCoConfig(synthetic=syn, **rest))
    else:
        kw = dict(_ISD_PLUS_DEFAULTS) if name == "isd_plus" else {}
        kw.update(method_kwargs)
        method = ISD(net, feat_dim, ISDConfig(**kw))
    method.encoder_arch = {"name": backbone, "kwargs": backbone_kwargs}
    return method
