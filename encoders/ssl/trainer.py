"""Pretraining (`cdir train moco|synco|isd|isd_plus`): the engine's loop
(:class:`encoders.engine.run.Run`) with a method of :data:`encoders.ssl.plugin.METHODS` around a
backbone of the zoo, on the images of a folder or manifest (no labels). Outputs, checkpoints
and resume: :mod:`encoders.engine.run`."""

from __future__ import annotations

import os

import torch
from torch import nn

from encoders.engine.config import Config
from encoders.engine.run import Monitor, Run, TrainResult, train


def build_model(cfg: Config) -> nn.Module:
    """The method of a run config around a fresh backbone."""
    from encoders.ssl.plugin import build_method

    return build_method(
        cfg.method_name, cfg.model.backbone, dict(cfg.model.backbone_kwargs), **cfg.method_kwargs
    )


class SSLRun(Run):
    """A pretraining run: :func:`build_model`, and the method's views of every image of
    ``data.path``."""

    def make_model(self) -> nn.Module:
        return build_model(self.cfg)

    def make_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        from encoders.ssl.augment import build_multiview
        from encoders.ssl.data import UnlabelledImages, gather_images

        self.paths = gather_images(self.cfg.data.path)
        return UnlabelledImages(self.paths, build_multiview(model.views, self.cfg.aug))


def pretrain(
    cfg: Config,
    resume: str | os.PathLike | dict | None = None,
    stop_at: int | None = None,
    monitor: Monitor | None = None,
    force: bool = False,
) -> TrainResult:
    """Run pretraining, or resume it; arguments as :func:`encoders.engine.run.train`."""
    return train(cfg, resume=resume, stop_at=stop_at, monitor=monitor, force=force, run=SSLRun)
