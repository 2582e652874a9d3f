"""The training stage behind `cdir train METHOD`: the run config (recipe, --set, direct values,
checkpoint), the kNN / P@1 monitor, then the trainer. Runs the same in one process and under
torchrun (one call per process)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

from cdir.core.dist import launch_rank
from cdir.core.signals import graceful

# keyword argument of train_encoder -> the config key it sets
DIRECT = {"data": "data.path", "out": "train.out", "epochs": "optim.epochs",
          "batch_size": "optim.batch_size", "workers": "data.workers", "seed": "train.seed",
          "monitor": "monitor.path"}


@graceful()  # SIGTERM, like Ctrl-C, stops the epoch in flight; latest.pt keeps the last one
def train_encoder(
    method: str,
    config: str | os.PathLike | None = None,
    sets: Iterable[str] = (),
    *,
    data: str | os.PathLike | list[str | os.PathLike] | None = None,
    out: str | os.PathLike | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    seed: int | None = None,
    monitor: str | os.PathLike | None = None,
    resume: str | os.PathLike | None = None,
    stop_at: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Pretrain (or resume) ``method`` and return a summary of the call.

    ``config`` is a YAML recipe, ``sets`` are ``key=value`` overrides (values YAML), the keyword
    values (``data``, ``epochs``, ...) override both; ``resume`` is a checkpoint or ``"auto"``
    (``OUT/latest.pt`` when it exists). An output folder that holds a run is refused without
    ``resume``; ``force`` starts over, moving that run's files aside. The summary has
    ``method``, ``rank``, ``out``, ``epochs_run``, ``epochs_done``, ``epochs``, ``steps``,
    ``images_per_s``, ``latest``, ``encoder`` (None until the last epoch), ``skipped``,
    ``epoch_losses`` and ``monitor``."""
    from encoders.engine.config import run_config
    from encoders.ssl.trainer import pretrain as train

    given = {"data": data, "out": out, "epochs": epochs, "batch_size": batch_size,
             "workers": workers, "seed": seed, "monitor": monitor}
    values = {DIRECT[k]: _plain(v) for k, v in given.items() if v is not None}
    cfg, ckpt = run_config(method, config, sets, values, resume)
    probe = build_monitor(cfg) if cfg.monitor.path else None
    res = train(cfg, resume=ckpt, stop_at=stop_at, monitor=probe, force=force)
    return run_summary(cfg, res)


def _plain(value: Any) -> Any:
    """Paths as text (one, or a list of several ``data`` sources: one alone is kept as text)."""
    if isinstance(value, list | tuple):
        value = [os.fspath(v) for v in value]
        return value[0] if len(value) == 1 else value
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def build_monitor(cfg: Any, normalize: str = "none") -> Any:
    """The label-based training monitor on ``cfg.monitor.path`` (eval.ssl.make_monitor) at the
    run's input settings, on the main process only (None on the others). On a set with domains
    it logs `cdir eval`'s mean P@1 over directed domain pairs of the monitored features:
    ``p1`` (plain) and, unless ``normalize`` is "none", ``p1_<normalize>`` (`cdir eval
    --normalize <normalize>`), both computed by :func:`cdir.stages.evaluate.mean_pair_p1`."""
    if launch_rank() != 0:
        return None
    from cdir.stages.evaluate import mean_pair_p1
    from eval.ssl import make_monitor

    names = ["none"] + ([normalize] if normalize != "none" else [])

    def pairs(feats: Any, labels: Any, domains: Any) -> dict[str, float]:
        return {"p1" if n == "none" else f"p1_{n}": mean_pair_p1(feats, labels, domains, n)
                for n in names}

    preprocess = {"size": cfg.aug.size, "mean": cfg.aug.mean, "std": cfg.aug.std,
                  "eval_resize": cfg.aug.eval_resize}
    return make_monitor(cfg.monitor, preprocess, seed=cfg.train.seed, workers=cfg.data.workers,
                        pairs=pairs)


def run_summary(cfg: Any, res: Any) -> dict[str, Any]:
    """What a training call did (the keys of :func:`train_encoder`'s summary)."""
    return {
        "method": cfg.method, "rank": res.rank, "out": str(res.out),
        "epochs_run": len(res.epoch_losses), "epochs_done": res.epochs_done,
        "epochs": cfg.optim.epochs, "steps": res.steps, "images_per_s": res.images_per_s,
        "latest": str(res.latest), "encoder": str(res.encoder) if res.encoder else None,
        "skipped": res.skipped, "epoch_losses": res.epoch_losses, "monitor": res.monitor,
        "losses": res.losses,
    }


def summary_line(s: dict[str, Any]) -> str:
    """What a training call did, in one line (where the run stands when it trained nothing:
    resumed after its last epoch, or at the --stop-at epoch already)."""
    if not s["epochs_run"]:
        where = f"{s['epochs_done']}/{s['epochs']} epoch(s) in {s['latest']}"
        if s["epochs_done"] >= s["epochs"]:
            return (f"{s['method']}: already finished, {where}; nothing trained"
                    + (f" (the encoder: {s['encoder']})" if s["encoder"] else ""))
        return (f"{s['method']}: nothing trained: {where}, the epoch --stop-at stops at "
                "(continue with --resume auto and a later --stop-at, or none)")
    what = f"{s['encoder']} and {s['latest']}" if s["encoder"] else f"{s['latest']}"
    line = (f"trained {s['method']} for {s['epochs_run']} epoch(s) (now {s['epochs_done']}/"
            f"{s['epochs']}), {s['images_per_s']:.0f} img/s; wrote {what}")
    if s["skipped"]:
        line += f"; skipped {len(s['skipped'])} unreadable image(s), see skipped.txt"
    return line
