"""Projection and prediction heads (two-layer MLPs) used by MoCo v2, SynCo and ISD."""

from __future__ import annotations

from torch import nn


def mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    *,
    batch_norm: bool = False,
    first_bias: bool = True,
) -> nn.Sequential:
    """Linear -> [BatchNorm1d] -> ReLU -> Linear.

    MoCo v2 / SynCo: ``mlp(f, f, 128)`` with no BN.
    ISD predictor (``train_isd.py``): ``mlp(f, f, f, batch_norm=True, first_bias=False)``.
    ISD-plus projection: ``mlp(f, 2f, f // 4, batch_norm=True)``; predictor
    ``mlp(f // 4, 2f, f // 4, batch_norm=True)``.
    """
    layers: list[nn.Module] = [nn.Linear(in_dim, hidden_dim, bias=first_bias)]
    if batch_norm:
        layers.append(nn.BatchNorm1d(hidden_dim))
    layers += [nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim)]
    return nn.Sequential(*layers)


def moco_head(feat_dim: int, dim: int = 128, hidden_dim: int | None = None,
              use_mlp: bool = True) -> nn.Module:
    """MoCo's head: the 2-layer MLP of v2 (``--mlp``) or the single linear layer of v1."""
    if not use_mlp:
        return nn.Linear(feat_dim, dim)
    return mlp(feat_dim, hidden_dim or feat_dim, dim)


def isd_predictor(dim: int) -> nn.Module:
    """ISD (ResNet-18 recipe) student predictor: Linear(no bias) -> BN -> ReLU -> Linear, f -> f."""
    return mlp(dim, dim, dim, batch_norm=True, first_bias=False)


def isd_plus_projection(feat_dim: int) -> nn.Module:
    """ISD-plus projection on teacher and student: f -> 2f -> f/4 with BN."""
    return mlp(feat_dim, 2 * feat_dim, feat_dim // 4, batch_norm=True)


def isd_plus_predictor(feat_dim: int) -> nn.Module:
    """ISD-plus student predictor: f/4 -> 2f -> f/4 with BN."""
    return mlp(feat_dim // 4, 2 * feat_dim, feat_dim // 4, batch_norm=True)
