"""AdaBN: a model's BatchNorm statistics re-estimated on one domain's images, label-free.

Every ``BatchNorm2d`` keeps running mean/var buffers; AdaBN replaces them with those of a target
domain (forward passes with the BN layers in train mode, ``momentum=None`` so each buffer is the
cumulative average over all the batches, no gradients) and leaves every weight as it is. The
statistics travel as a small dict ``{"<layer>.running_mean": tensor, "<layer>.running_var":
tensor}`` (state-dict names, on the CPU), so they are saved, compared and put back cheaply.
Works for any module holding BN layers (`ResNetTrunk`, `GridPooled` around one).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable

import torch
from torch import nn

from cdir.core.errors import CdirError

_BUFFERS = ("running_mean", "running_var")


def bn_layers(model: nn.Module) -> list[tuple[str, nn.BatchNorm2d]]:
    """The model's BatchNorm2d layers that keep running statistics, by module name."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]


def get_bn_stats(model: nn.Module) -> dict[str, torch.Tensor]:
    """The running statistics of every BN layer, copied to the CPU as float32."""
    return {f"{n}.{b}": getattr(m, b).detach().float().cpu().clone()
            for n, m in bn_layers(model) for b in _BUFFERS}


def set_bn_stats(model: nn.Module, stats: dict[str, torch.Tensor]) -> None:
    """Put ``stats`` (as `get_bn_stats` returns) into the model's BN layers, in place."""
    want = {f"{n}.{b}": (m, b) for n, m in bn_layers(model) for b in _BUFFERS}
    if set(stats) != set(want):
        odd = sorted(set(stats) ^ set(want))
        raise CdirError(f"BatchNorm statistics do not fit the model ({len(odd)} layer buffers "
                        f"differ, e.g. {odd[0]}): estimate them again")
    with torch.no_grad():
        for key, (m, b) in want.items():
            buf = getattr(m, b)
            if buf.shape != stats[key].shape:
                raise CdirError(f"BatchNorm statistics do not fit the model ({key}: "
                                f"{tuple(stats[key].shape)}, not {tuple(buf.shape)})")
            buf.copy_(stats[key])


def estimate_bn_stats(model: nn.Module, batches: Iterable[torch.Tensor],
                      forward: Callable[[torch.Tensor], torch.Tensor] | None = None
                      ) -> dict[str, torch.Tensor]:
    """BN statistics of ``model`` on ``batches`` (inputs already on the model's device),
    cumulative over all of them. ``forward``: what runs a batch (default: the model).

    Side-effect free: the model's own statistics, its train/eval mode and every BN momentum are
    restored afterwards; apply the result with `set_bn_stats`."""
    layers = bn_layers(model)
    if not layers:
        raise CdirError(f"{type(model).__name__} has no BatchNorm2d layer to adapt")
    modes = [(m, m.training) for m in model.modules()]
    saved = [(m, m.momentum, {b: getattr(m, b).clone()
                              for b in (*_BUFFERS, "num_batches_tracked")})
             for _, m in layers]
    run = forward or model
    seen = 0
    try:
        model.eval()  # everything but BN stays as at inference (dropout and the like)
        for _, m in layers:
            m.reset_running_stats()
            m.momentum = None  # running = mean of the batch statistics seen so far
            m.train()
        with torch.no_grad():
            for x in batches:
                run(x)
                seen += 1
        if not seen:
            raise CdirError("no images to estimate BatchNorm statistics from")
        return get_bn_stats(model)
    finally:
        with torch.no_grad():
            for m, momentum, buffers in saved:
                m.momentum = momentum
                for b, t in buffers.items():
                    getattr(m, b).copy_(t)
        for m, was_training in modes:
            m.training = was_training


def stats_key(stats: dict[str, torch.Tensor]) -> str:
    """A short content hash of BN statistics: what a vector embedded with them records."""
    h = hashlib.sha256()
    for name in sorted(stats):
        h.update(name.encode())
        h.update(stats[name].detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
