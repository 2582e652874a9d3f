"""The configuration of a training run (pretraining, adaptation, distillation), and where each
value comes from.

A YAML recipe holds sections and one section per method under ``methods:``. The sections are
the shared ones (data, model, optim, train, monitor: :data:`SHARED`) and those the families add
(:func:`register`: ``aug`` by encoders.ssl, ``distill`` by encoders.distill); the engine imports
none of the families: each plug-in package registers its ``METHODS`` and sections when its
``plugin`` module is imported, and :func:`families` finds those modules. A method section's
keys are the method's hyperparameters, except ``name`` (the registry name, e.g. ``isd_plus``)
and nested sections, which override the top-level ones for that method only. Unknown keys are
errors, not silently dropped.

Precedence (:func:`run_config`, what ``cdir train`` does): the recipe, then its method section,
then ``--set key=value`` items, then the direct flags (``--data``, ``--epochs``, ...). Without a
recipe a resumed run starts from the checkpoint's own config instead. ``--set method.X`` addresses
the method's hyperparameters (``method_kwargs.X``).
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdir.core.config import (
    INTERNAL,
    apply_sets,
    build,
    config_keys,
    deep_merge,
    load_yaml,
    set_value,
    to_dict,
)
from cdir.core.errors import CdirError


@dataclass
class DataConfig:
    # image folders (recursive), workspaces or manifests (.parquet/.csv); a list joins several
    path: str | list[str] | None = None
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
class MonitorConfig:
    path: str | None = None  # labelled folder/manifest; None disables the monitor
    every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    k: int = 20
    temperature: float = 0.07
    max_images: int | None = None  # random fixed subset for speed
    batch_size: int = 256


# The sections every run config has, by name; the families add their own (:func:`register`).
SHARED: dict[str, type] = {"data": DataConfig, "model": ModelConfig, "optim": OptimConfig,
                           "train": RunConfig, "monitor": MonitorConfig}


@dataclass(frozen=True)
class Section:
    """A config section a family adds: ``load()`` returns its dataclass (imported when a config
    is built, so that listing the families stays cheap); ``after``: the section it follows in a
    config file."""

    name: str
    load: Callable[[], type]
    after: str


@dataclass(frozen=True)
class Family:
    """A plug-in of the engine: its ``METHODS`` dict (method name -> whatever the family builds
    from it; the engine reads only the names) and its config sections."""

    name: str
    methods: Mapping[str, Any]
    sections: tuple[Section, ...] = ()


_FAMILIES: dict[str, Family] = {}
_discovered = False


def register(family: Family) -> None:
    """Register a family (what a plug-in's ``plugin`` module does when it is imported)."""
    _FAMILIES[family.name] = family


def families() -> dict[str, Family]:
    """Every family, by name. The plug-ins are found, not named: each package of ``encoders``
    with a ``plugin`` module is one, and importing that module registers it."""
    global _discovered
    if not _discovered:
        _discovered = True
        root = Path(__file__).resolve().parents[1]
        top = __name__.split(".")[0]
        for sub in sorted(root.iterdir()):
            if (sub / "plugin.py").is_file():
                importlib.import_module(f"{top}.{sub.name}.plugin")
    return dict(_FAMILIES)


def methods() -> dict[str, Family]:
    """Every method name of every family -> its family."""
    out: dict[str, Family] = {}
    for fam in families().values():
        for name in fam.methods:
            if name in out:
                raise CdirError(f"method {name!r} is registered by {out[name].name} and "
                                f"{fam.name}")
            out[name] = fam
    return out


def sections() -> dict[str, type]:
    """Every section of a run config (the shared ones and the families'), in file order."""
    order: dict[str, type] = dict(SHARED)
    pending = [s for fam in families().values() for s in fam.sections]
    while pending:
        placed = [s for s in pending if s.after in order]
        if not placed:
            raise CdirError(f"config sections {[s.name for s in pending]} follow no section")
        for s in placed:
            names = list(order)
            at = names.index(s.after) + 1
            order = {n: order.get(n) or s.load() for n in (*names[:at], s.name, *names[at:])}
        pending = [s for s in pending if s not in placed]
    return order


def _family_sections() -> dict[str, Any]:
    return {n: kind() for n, kind in sections().items() if n not in SHARED}


@dataclass
class Config:
    """A run config: the method, the shared sections, and the families' sections (``aug``,
    ``distill``, ...: read as attributes, ``cfg.aug``)."""

    method: str = "moco"  # the command: a method name of a family (`cdir train moco`)
    method_name: str = "moco"  # the registry name actually built
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    recipe: str = ""  # recipe file stem, for the default output folder
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    # the families' sections by name
    sections: dict[str, Any] = field(default_factory=_family_sections, metadata=INTERNAL)

    def __getattr__(self, name: str) -> Any:
        found = self.__dict__.get("sections") or {}
        if name in found:
            return found[name]
        raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

    def to_dict(self) -> dict[str, Any]:
        """Plain YAML/JSON values (tuples become lists), loadable with weights_only; the
        sections in file order."""
        own = to_dict(self)
        head = {k: v for k, v in own.items() if k not in SHARED}
        parts = {**own, **{n: to_dict(v) for n, v in self.sections.items()}}
        return {**head, **{n: parts[n] for n in sections() if n in parts}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        def section(name: str, kind: type) -> Any:
            return lambda raw, _where: build(kind, raw, name)  # errors name the section: "optim"

        kinds = sections()
        if not isinstance(d, dict):
            raise CdirError(f"config: expected a mapping, got {d!r}")
        valid = {*config_keys(cls), *kinds}
        unknown = sorted(set(d) - valid)
        if unknown:
            raise CdirError(f"config: unknown key(s) {', '.join(map(str, unknown))}; valid: "
                            f"{', '.join(sorted(valid))}")
        own = {k: v for k, v in d.items() if k not in kinds or k in SHARED}
        cfg = build(cls, own, "config", {n: section(n, k) for n, k in SHARED.items()})
        for name, raw in d.items():
            if name in kinds and name not in SHARED and raw is not None:
                cfg.sections[name] = build(kinds[name], raw, name)
        return cfg


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
    known = methods()
    if method not in known:
        raise CdirError(f"unknown method {method!r}; choose one of {', '.join(known)}")
    raw = dict(raw or {})
    per_method = raw.pop("methods", None) or {}
    kinds = sections()
    unknown = set(raw) - set(kinds)
    if unknown:
        raise CdirError(
            f"unknown top-level recipe key(s) {sorted(unknown)}; valid: {[*kinds, 'methods']}"
        )
    if per_method and method not in per_method:
        raise CdirError(
            f"the recipe has no section for {method!r} under 'methods' "
            f"(it has {', '.join(per_method)}); add one or pick another method"
        )
    msec = dict(per_method.get(method) or {})
    name = msec.pop("name", method)
    if name not in known:
        raise CdirError(f"methods.{method}.name must be one of {', '.join(known)}, got {name!r}")
    base = {k: raw.get(k) or {} for k in kinds}
    for k in kinds:
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
