"""The adaptation stage behind `cdir adapt`: an encoder of this project, a workspace whose images
carry domain names, and no labels -> an encoder adapted to retrieve across those domains.

What it hands the trainer (:mod:`encoders.adapt.trainer`): the workspace manifest (path and
domain of every image), the starting encoder (``model.init``; its backbone and input settings),
the per-domain normalisation applied before mining (``normalize``: a key of
``indexes.normalize.NORMALIZERS``), and, when the gallery has labels, a monitor and a report of
the mined pairs' precision: both only logged, never used for a choice.

Settings: the starting encoder's own input settings (``aug``) and backbone, then the recipe
(``config``, optional: a YAML file with the sections of `cdir train` recipes and a section per
method under ``methods:``), then ``sets``, then the keyword values.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from cdir.core.dist import launch_rank
from cdir.core.errors import CdirError
from cdir.core.signals import graceful
from cdir.core.workspace import Workspace
from cdir.stages.train import build_monitor, run_summary
from encoders.specs import parse_spec

# keyword argument -> the config key it sets
DIRECT = {"out": "train.out", "epochs": "optim.epochs", "batch_size": "optim.batch_size",
          "workers": "data.workers", "seed": "train.seed"}


def encoder_file(spec: str) -> Path:
    """The checkpoint of a trainable encoder spec (``ckpt:PATH``, no query options)."""
    parsed = parse_spec(spec)
    path = parsed.checkpoint
    if path is None or parsed.options:
        raise CdirError(f"{spec} cannot be adapted: cdir adapt trains ResNets of this project "
                        "or of MoCo/SynCo; pass --encoder ckpt:PATH (no ?options)")
    if not path.is_file():
        raise CdirError(f"{spec}: no such checkpoint file {path}")
    return path


def _base(path: Path) -> dict[str, Any]:
    """Input settings and backbone of the starting encoder."""
    from encoders.engine.checkpoint import encoder_settings

    found = encoder_settings(path)
    base: dict[str, Any] = {"model": {"backbone": found["arch"]["name"],
                                      "backbone_kwargs": found["arch"]["kwargs"]}}
    if found["aug"]:
        base["aug"] = found["aug"]
    return base


def adapt_config(method: str, encoder: str, manifest: Path, config: str | os.PathLike | None,
                 sets: Iterable[str], values: dict[str, Any]):
    """The run config (see the module docstring)."""
    from cdir.core.config import deep_merge, load_yaml
    from encoders.adapt.plugin import METHODS as ADAPT_METHODS
    from encoders.engine.config import resolve_config, with_values

    if method not in ADAPT_METHODS:
        raise CdirError(f"unknown adaptation method {method!r}; choose one of "
                        f"{', '.join(ADAPT_METHODS)}")
    path = encoder_file(encoder)
    raw = _base(path)
    stem = "run"
    if config:
        recipe = load_yaml(config)
        raw = deep_merge(raw, recipe, leaves=("backbone_kwargs",))
        stem = Path(config).stem
    raw.setdefault("model", {})["init"] = str(path)
    raw.setdefault("data", {})["path"] = str(manifest)
    cfg = resolve_config(raw, method, stem, list(sets))
    from encoders.engine.config import Config

    return Config.from_dict(with_values(cfg.to_dict(), values))


def _whitening(normalize: str):
    from indexes.normalize import NORMALIZERS, fit_normalizer

    if normalize not in NORMALIZERS:
        raise CdirError(f"unknown normalisation {normalize!r}; choose one of "
                        f"{', '.join(NORMALIZERS)}")

    def prepare(x, domains):
        return fit_normalizer(x, domains, normalize).transform(x, domains)

    return prepare


def _label_report(manifest: Path):
    """Pair precision and group purity from the gallery's labels: for the log only."""
    import numpy as np

    from cdir.core.manifest import load_manifest
    from encoders.adapt.mining import pair_precision

    df = load_manifest(manifest)
    if "label" not in df.columns or df["label"].isna().all():
        return None
    labels = df["label"].astype(str).to_numpy()

    def report(pairs, groups) -> dict[str, float]:
        grouped = np.bincount(groups, minlength=len(groups))[groups] > 1
        same = labels == labels[groups]  # a member agrees with its group's first image
        return {"pair_precision": pair_precision(pairs, labels),
                "group_purity": float(same[grouped].mean()) if grouped.any() else float("nan")}

    return report


@graceful()  # SIGTERM, like Ctrl-C, stops the epoch in flight; latest.pt keeps the last one
def adapt_encoder(
    workspace: str | os.PathLike,
    encoder: str,
    method: str = "xdomain",
    config: str | os.PathLike | None = None,
    sets: Iterable[str] = (),
    *,
    out: str | os.PathLike | None = None,
    rounds: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    workers: int | None = None,
    seed: int | None = None,
    normalize: str = "domain-whiten",
    selection: str = "mutual_nn_rate",
    monitor: bool = True,
    resume: str | None = None,
    stop_at: int | None = None,
    force: bool = False,
) -> dict[str, Any]:
    """Adapt ``encoder`` to the domains of ``workspace`` and return a summary of the call.

    ``rounds`` sets the epochs to rounds x ``method.round_epochs`` (``epochs`` sets them
    directly; given both, the ``epochs`` run in ``rounds`` rounds of equal length).
    ``resume``: a checkpoint, or "auto" for OUT/latest.pt when it exists.
    The summary has the keys of `cdir.stages.train.train_encoder`'s, plus ``selected``
    (``{"epoch", "criterion", "value", "spec"}``: the label-free choice behind encoder.pt, and
    the spec under which `cdir eval` scores the features it was chosen by)."""
    from encoders.adapt.trainer import adapt
    from encoders.engine.checkpoint import load_checkpoint

    ws = Workspace(workspace).require()
    given = {"out": out, "epochs": epochs, "batch_size": batch_size, "workers": workers,
             "seed": seed}
    values = {DIRECT[k]: (os.fspath(v) if isinstance(v, os.PathLike) else v)
              for k, v in given.items() if v is not None}
    cfg = adapt_config(method, encoder, ws.manifest_path, config, sets, values)
    if rounds is not None:
        if rounds < 1:
            raise CdirError(f"--rounds must be at least 1, not {rounds}")
        if epochs is None:
            cfg.optim.epochs = rounds * _round_epochs(cfg)
        elif epochs % rounds:  # the epochs given are the epochs run: rounds of equal length
            raise CdirError(f"--epochs {epochs} do not split into {rounds} rounds of whole "
                            "epochs: give a multiple of --rounds, or only one of the two")
        else:
            cfg.method_kwargs["round_epochs"] = epochs // rounds
    if cfg.train.out is None:
        cfg.train.out = str(ws.root / "adapt" / f"{method}-{cfg.recipe or 'run'}")
    ckpt = None
    if resume == "auto":
        latest = Path(cfg.train.out) / "latest.pt"
        ckpt = load_checkpoint(latest) if latest.exists() else None
    elif resume:
        ckpt = load_checkpoint(resume)
    prepare = _whitening(normalize)
    report = _label_report(ws.manifest_path) if monitor and launch_rank() == 0 else None
    probe = None
    if report is not None:  # the gallery has labels: log how the run does, for the report only
        cfg.monitor.path = str(ws.manifest_path)
        probe = build_monitor(cfg, normalize=normalize)
    res = adapt(cfg, prepare, resume=ckpt, stop_at=stop_at, monitor=probe, report=report,
                force=force, selection=selection)
    chosen = res.state.get("selection") or {}
    return {**run_summary(cfg, res),
            "selected": {"epoch": chosen.get("best_epoch"), "criterion": selection,
                         "value": chosen.get("best"), "spec": res.state.get("scored")}}


def _round_epochs(cfg) -> int:
    """Epochs per mining round of the run's method (its setting, else the method's default)."""
    if cfg.method_kwargs.get("round_epochs"):
        return int(cfg.method_kwargs["round_epochs"])
    from encoders.adapt.plugin import METHODS

    defaults = METHODS[cfg.method_name].config()()  # the method's own settings
    return int(defaults.round_epochs)
