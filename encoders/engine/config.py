"""The configuration of a pretraining run, and where each value comes from.

A YAML recipe holds shared sections (data, model, aug, optim, train, monitor) and one section per
method under ``methods:``; a method section's keys are the method's hyperparameters, except
``name`` (the registry name, e.g. ``isd_plus``) and nested shared sections, which override the
top-level ones for that method only. Unknown keys are errors, not silently dropped.

Precedence (:func:`run_config`, what ``cdir train`` does): the recipe, then its method section,
then ``--set key=value`` items, then the direct flags (``--data``, ``--epochs``, ...). Without a
recipe a resumed run starts from the checkpoint's own config instead. ``--set method.X`` addresses
the method's hyperparameters (``method_kwargs.X``).
"""

from __future__ import annotations

import copy
import os
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdir.core.config import apply_sets, build, deep_merge, load_yaml, set_value, to_dict
from cdir.core.errors import CdirError
from encoders.distill.losses import DISTILL_METHODS
from encoders.ssl.augment import AugConfig
from encoders.ssl.registry import ADAPT_METHODS, METHODS


@dataclass
class DataConfig:
    path: str | None = None  # image folder (recursive) or manifest (.parquet/.csv)
    workers: int = 4  # DataLoader workers per process


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)
    # start from these weights (an encoder checkpoint whose backbone fits), not from scratch
    init: str | None = None


@dataclass
class OptimConfig:
    epochs: int = 200
    batch_size: int = 256  # global batch, split evenly across processes
    optimizer: str = "sgd"  # sgd (the papers) | adamw (converges in fewer steps: small CPU runs)
    lr: float = 0.03
    momentum: float = 0.9  # SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | constant
    milestones: list[int] = field(default_factory=lambda: [120, 160])  # step schedule
    gamma: float = 0.1  # step schedule factor
    warmup_epochs: float = 0.0  # linear lr warm-up (per step), before the schedule
    per_step: bool = False  # False: the lr changes once per epoch (MoCo's --cos)


@dataclass
class RunConfig:
    out: str | None = None  # default runs/<method>-<recipe name>
    seed: int = 0
    amp: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU) | bf16 | fp16 | none
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # process-group backend under torchrun: auto | nccl | gloo
    save_every: int = 10  # also keep checkpoint_XXXX.pt every N epochs (0: only latest.pt)
    keep_checkpoints: int = 0  # keep only the newest N periodic checkpoints (0: all)
    log_every: int = 10  # steps between TensorBoard points / progress-bar updates
    max_steps_per_epoch: int | None = None  # cap for smoke tests and timing runs
    channels_last: bool = False  # NHWC on GPU (faster convolutions on tensor cores)
    # torch CPU threads; None: on CPU, the cores left over by the data workers (oversubscribing
    # the cores with compute threads and augmentation workers halves the speed on small machines)
    threads: int | None = None
    progress: bool = True


@dataclass
class DistillConfig:
    """What `cdir train teacher` and `cdir distill` read (pretraining and adaptation ignore it).

    ``data.path`` names the labelled set (cifar10, cifar100, digits, or a folder with train/
    and test/), or for ``label_free`` the workspace; ``model.backbone`` is the student's zoo
    name (label-free: a backbone of ``encoders.zoo.backbones``)."""

    root: str = "data"  # where named datasets live (CIFAR archives, STL-10, Tiny-ImageNet)
    download: bool = False  # fetch a named dataset with torchvision when it is missing
    # hold out this fraction of the training set (stratified) to choose "best" on; 0: best is
    # chosen on the test set, as the reference code does (reported beside last, never alone)
    val_split: float = 0.0
    eval_every: int = 1  # epochs between test evaluations (the last epoch always is one)
    # input side; None: the dataset's (32 for CIFAR); >= 96 uses the ImageNet augmentation
    image_size: int | None = None
    teacher: str | None = None  # labelled: a teacher checkpoint; label-free: an encoder spec
    teacher_arch: str | None = None  # zoo name; default: the checkpoint's, or its folder name
    teacher_sha256: str | None = None  # the teacher file must hash to this (mirrored teachers)
    # loss weights of gamma * CE + alpha * KD + beta * method; None: the method's recipe
    gamma: float | None = None
    alpha: float | None = None
    beta: float | None = None
    with_kd: bool = False  # the recipe's "+KD" weights (when alpha is None)
    kd_temperature: float = 4.0
    label_free: bool = False  # distil on a workspace gallery with the method term alone
    # label-free: the student's embedding size (a linear head after its pooled features)
    embed_dim: int = 256
    # label-free: the teacher vectors distilled, from the workspace's embedding store:
    # none | domain-whiten (per-domain whitening, label-free, as retrieval uses it)
    teacher_normalize: str = "none"


@dataclass
class MonitorConfig:
    path: str | None = None  # labelled folder/manifest; None disables the monitor
    every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    k: int = 20
    temperature: float = 0.07
    max_images: int | None = None  # random fixed subset for speed
    batch_size: int = 256


# The shared sections of a recipe and of a run config, by name.
SECTIONS: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "aug": AugConfig,
                             "optim": OptimConfig, "train": RunConfig, "monitor": MonitorConfig,
                             "distill": DistillConfig}


@dataclass
class Config:
    # the command: moco | synco | isd | isd_plus (pretraining), xdomain | ucdir (adaptation),
    # teacher | kd | crd | crd_fifo | dcd | rrd (distillation)
    method: str = "moco"
    method_name: str = "moco"  # the registry name actually built
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    recipe: str = ""  # recipe file stem, for the default output folder
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (tuples become lists), loadable with weights_only."""
        return to_dict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        def section(name: str, kind: type) -> Any:
            return lambda raw, _where: build(kind, raw, name)  # errors name the section: "optim"

        return build(cls, d, "config", {n: section(n, k) for n, k in SECTIONS.items()})


def method_key(key: str) -> str:
    """Where a ``--set`` key lives in a config dict: ``method.X`` is ``method_kwargs.X``."""
    head, dot, rest = key.strip().partition(".")
    return f"method_kwargs.{rest}" if head == "method" and dot and rest else key


def with_values(d: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``d`` with dotted keys set to values as given (no parsing), e.g.
    ``{"data.path": "/x"}``."""
    d = copy.deepcopy(d)
    for key, value in values.items():
        set_value(d, method_key(key), value)
    return d


def resolve_config(
    raw: dict[str, Any], method: str, recipe: str = "", overrides: Iterable[str] | None = None
) -> Config:
    """The run config for ``method`` from a recipe dict and ``--set`` items (module docstring)."""
    known = (*METHODS, *ADAPT_METHODS, *DISTILL_METHODS)
    if method not in known:
        raise CdirError(f"unknown method {method!r}; choose one of {', '.join(known)}")
    raw = dict(raw or {})
    sections = raw.pop("methods", None) or {}
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise CdirError(
            f"unknown top-level recipe key(s) {sorted(unknown)}; valid: {[*SECTIONS, 'methods']}"
        )
    if sections and method not in sections:
        raise CdirError(
            f"the recipe has no section for {method!r} under 'methods' "
            f"(it has {', '.join(sections)}); add one or pick another method"
        )
    msec = dict(sections.get(method) or {})
    name = msec.pop("name", method)
    if name not in known:
        raise CdirError(f"methods.{method}.name must be one of {', '.join(known)}, got {name!r}")
    base = {k: raw.get(k) or {} for k in SECTIONS}
    for k in SECTIONS:
        if k in msec:
            # backbone_kwargs is one value: a method's replaces the shared one whole
            base[k] = deep_merge(base[k], msec.pop(k) or {}, leaves=("backbone_kwargs",))
    d = {"method": method, "method_name": name, "method_kwargs": msec, "recipe": recipe, **base}
    return Config.from_dict(apply_sets(d, overrides, rename=method_key))


def default_out(cfg: Config) -> Path:
    """``runs/<method>-<recipe stem>``: the output folder when ``train.out`` is not set."""
    return Path("runs") / f"{cfg.method}-{cfg.recipe or 'run'}"


def run_dir(cfg: Config) -> Path:
    """The output folder of a run: ``train.out``, else :func:`default_out`."""
    return Path(cfg.train.out) if cfg.train.out else default_out(cfg)


def run_config(
    method: str,
    config_path: str | os.PathLike | None = None,
    sets: Iterable[str] = (),
    values: dict[str, Any] | None = None,
    resume: str | os.PathLike | None = None,
    base: dict[str, Any] | None = None,
) -> tuple[Config, dict[str, Any] | None]:
    """The config of a ``cdir train METHOD`` run and the loaded checkpoint to resume (or None).

    ``values`` are the direct flags as dotted keys (``{"optim.epochs": 3}``), applied last.
    ``resume="auto"`` resumes ``OUT/latest.pt`` when it exists (OUT from the recipe or
    ``train.out``). With a recipe, values that differ from the checkpoint's are noted on stderr;
    without one, the checkpoint's config is the base. ``base`` (a recipe dict) lies under the
    recipe: the distillation testbed's defaults, which hold with no recipe at all."""
    from encoders.engine.checkpoint import load_checkpoint

    sets = list(sets or [])
    values = dict(values or {})
    raw = load_yaml(config_path) if config_path else None
    if base is not None and raw is not None:
        raw = deep_merge(base, raw)
    stem = Path(config_path).stem if config_path else ""
    if resume == "auto":
        if raw is not None:
            probe = with_values(resolve_config(raw, method, stem, sets).to_dict(), values)
            out = run_dir(Config.from_dict(probe))
        elif values.get("train.out"):
            out = Path(values["train.out"])
        else:
            raise CdirError("--resume auto needs --config or --out to find latest.pt")
        resume = str(out / "latest.pt") if (out / "latest.pt").exists() else None
    if base is not None and raw is None and not resume:
        raw = dict(base)  # a fresh run with no recipe: the defaults and the flags

    ckpt = load_checkpoint(resume) if resume else None
    if raw is not None:
        d = with_values(resolve_config(raw, method, stem, sets).to_dict(), values)
        if ckpt is not None:
            report_differences(ckpt.get("config", {}), d)
    elif ckpt is not None:
        d = with_values(apply_sets(ckpt["config"], sets, rename=method_key), values)
        if d.get("method") != method:
            raise CdirError(f"{resume} was trained with {d.get('method')!r}, not {method!r}")
    else:
        raise CdirError("pass --config FILE (a recipe from configs/) or --resume CKPT")
    return Config.from_dict(d), ckpt


# Settings that may differ between a run and its resumption without a note: where things are,
# not what is trained.
_QUIET = {"train.out", "data.path", "data.workers", "train.progress", "monitor.path"}


def report_differences(old: dict, new: dict, prefix: str = "") -> None:
    """A stderr note for every setting of ``new`` that differs from the checkpoint's ``old``."""
    for k in sorted(set(old) | set(new)):
        key = f"{prefix}{k}"
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            report_differences(a, b, key + ".")
        elif a != b and key not in _QUIET:
            print(f"note: {key} is {b!r} now, {a!r} in the checkpoint", file=sys.stderr)
