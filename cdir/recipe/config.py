"""Recipe configs: the dataclasses, YAML loading, ``--set`` overrides and validation.

Config format (every key; see configs/cm_*.yaml for commented examples)::

    name: cm_officehome            # report folder: WORKSPACE/reports/<name>/
    title: ...                     # report heading
    workspace: runs/cm_officehome  # -w overrides; default runs/<name>
    device: null                   # null = cuda when available, else cpu
    dataset: {kind: officehome|domainnet|folder|csv|emoji, root, domains, classes, split,
              limit, size}         # limit/size: emoji only; classes: names, a file or a subset name
    captioners:                    # each a spec string or a mapping:
      - {spec: hf:ID-OR-FOLDER, name, optional, prompt, max_new_tokens, min_new_tokens,
         num_beams, batch_size, dtype, trust_remote_code}
    text_encoders: [SPEC | {spec, name, optional}]   # cm-text (st: or clip:)
    clip: [SPEC | {spec, name, optional}]            # cm-image (clip: with both towers)
    image_encoders: [SPEC | {spec, name, optional}]  # visual (clip:, ckpt:, pixels)
    eval: {modes: [cm-image, cm-text, visual, fusion], ks: [1, 5, 15] | null,
           pairs: all | [QUERY:GALLERY, ...], examples: 4,
           fusion: {modes: [...], weights: {mode: w}, method: zscore|rrf}}
    batch: {caption: 32, image: 64, text: 256, workers: null}
    literature:                    # numbers reported elsewhere, copied as reported
      - {method, paper, pair: QUERY:GALLERY | null, metric: "label exactly as reported", value,
         unit, source, compare_with: P@k | null, comparable: true, verified: false, note}
    notes: [text, ...]             # printed in the report

Relative paths (dataset.root, workspace, local model folders) are relative to the current
directory. An entry marked ``optional: true`` is skipped (and said so) when its model is not
available; a required one that is missing stops the recipe before any stage runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdir.core.config import INTERNAL, apply_sets, build, load_yaml, to_dict
from cdir.core.errors import CdirError
from cdir.galleries import KINDS as DATASET_KINDS
from cdir.galleries.common import CLASS_SUBSETS, ClassSubset
from cdir.stages.modes import MODES, SINGLE_MODES
from encoders.specs import parse_spec
from eval.fusion import FUSION_METHODS
from eval.metrics import normalize_ks

# the recipe's model list of each mode, by the model it gives (Mode.model)
ROLES = {"encoder": "image_encoders", "text_encoder": "text_encoders", "clip": "clip"}


@dataclass
class DatasetConfig:
    kind: str
    root: str | None = None
    domains: list[str] | None = None
    classes: str | list[str] | None = None
    split: str = "all"
    limit: int | None = None  # emoji: number of categories
    size: int = 128  # emoji: image size

    @property
    def subset(self) -> ClassSubset | None:
        """The named class subset (cdir.galleries.common.CLASS_SUBSETS) that ``classes`` names."""
        return CLASS_SUBSETS.get(self.classes) if isinstance(self.classes, str) else None


@dataclass
class ModelEntry:
    spec: str
    name: str | None = None
    optional: bool = False

    @property
    def display(self) -> str:
        return self.name or self.spec


@dataclass
class CaptionerConfig(ModelEntry):
    prompt: str | None = None
    max_new_tokens: int = 30
    min_new_tokens: int = 0
    num_beams: int = 1
    batch_size: int | None = None  # default: batch.caption
    dtype: str = "auto"
    trust_remote_code: bool = False

    @property
    def display(self) -> str:
        if self.name:
            return self.name
        try:
            target = parse_spec(self.spec, role="captioner").body
        except CdirError:  # named as written; the captioner stage says what is wrong
            target = self.spec
        return target.rstrip("/").rsplit("/", 1)[-1] or self.spec


@dataclass
class FusionConfig:
    modes: list[str] = field(default_factory=list)  # default: every single mode of eval.modes
    weights: dict[str, float] = field(default_factory=dict)
    method: str = "zscore"


@dataclass
class EvalConfig:
    # every mode, in the report's row order (the CM paper's own first); checked against MODES
    modes: list[str] = field(
        default_factory=lambda: sorted(MODES, key=lambda m: MODES[m].report_row))
    ks: list[int] | None = None  # default: the dataset's (1,5,15; DomainNet 50,100,200)
    pairs: str | list[str] = "all"
    examples: int = 4
    fusion: FusionConfig = field(default_factory=FusionConfig)


@dataclass
class BatchConfig:
    caption: int = 32
    image: int = 64
    text: int = 256
    workers: int | None = None


@dataclass
class LiteratureEntry:
    method: str
    metric: str  # the metric name exactly as the source reports it
    value: float
    source: str
    pair: str | None = None  # QUERY:GALLERY in this recipe's domain names; None: not per pair
    paper: str | None = None
    unit: str | None = None  # e.g. "% (relative)" for a summary figure
    compare_with: str | None = None  # our column it matches (P@k); None: k not stated
    comparable: bool = True  # False: a different benchmark, listed for completeness only
    verified: bool = False
    note: str | None = None
    value_text: str = field(default="", metadata=INTERNAL)  # the value as written

    def __post_init__(self) -> None:
        self.value_text = self.value_text or str(self.value)  # 24.0 stays "24.0", as written


@dataclass
class Recipe:
    name: str
    dataset: DatasetConfig
    title: str | None = None
    workspace: str | None = None
    device: str | None = None
    captioners: list[CaptionerConfig] = field(default_factory=list)
    text_encoders: list[ModelEntry] = field(default_factory=list)
    clip: list[ModelEntry] = field(default_factory=list)
    image_encoders: list[ModelEntry] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    batch: BatchConfig = field(default_factory=BatchConfig)
    literature: list[LiteratureEntry] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    config_path: str | None = field(default=None, metadata=INTERNAL)  # read from
    overrides: list[str] = field(default_factory=list, metadata=INTERNAL)  # --set items applied

    def to_dict(self) -> dict[str, Any]:
        """The config keys only: loads back with recipe_from_dict."""
        return to_dict(self)


def mode_entries(r: Recipe, mode: str) -> list[ModelEntry]:
    """The recipe's models for a single mode (image_encoders, text_encoders or clip)."""
    return getattr(r, ROLES[MODES[mode].model])


def fusion_parts(r: Recipe) -> list[str]:
    """The single modes that fusion combines."""
    return list(r.eval.fusion.modes) or [m for m in r.eval.modes if m in SINGLE_MODES]


def used_modes(r: Recipe) -> list[str]:
    """The single modes the recipe evaluates, on their own or fused."""
    modes = [m for m in r.eval.modes if m in SINGLE_MODES]
    if any(MODES[m].fuses for m in r.eval.modes):
        modes += [m for m in fusion_parts(r) if m not in modes]
    return modes


# -- validation -----------------------------------------------------------------------------------

def _as_list(raw: Any) -> list:
    if raw is None:
        return []
    return list(raw) if isinstance(raw, list | tuple) else [raw]


def _entries(cls: type[ModelEntry], raw: Any, where: str) -> list:
    """Model entries, each a spec string or a mapping."""
    out = []
    for i, item in enumerate(_as_list(raw)):
        entry = build(cls, {"spec": item.strip()} if isinstance(item, str) else item,
                       f"{where}[{i}]")
        if not entry.spec:
            what = "captioner" if cls is CaptionerConfig else "model"
            raise CdirError(f"{where}[{i}]: empty {what} spec")
        out.append(entry)
    return out


def _literature(raw: Any, where: str) -> list[LiteratureEntry]:
    out = []
    for i, item in enumerate(_as_list(raw)):
        entry = build(LiteratureEntry, item, f"{where}[{i}]")
        try:
            entry.value = float(entry.value)
        except (TypeError, ValueError):
            raise CdirError(f"{where}[{i}]: value must be a number, got {entry.value!r}") \
                from None
        out.append(entry)
    return out


def _dataset(raw: Any, where: str) -> DatasetConfig:
    ds = build(DatasetConfig, raw, where)
    if ds.kind not in DATASET_KINDS:
        raise CdirError(f"{where}.kind: {ds.kind!r} is not one of {', '.join(DATASET_KINDS)}")
    if ds.domains is not None:
        ds.domains = [str(x) for x in _as_list(ds.domains)]
    if isinstance(ds.classes, list | tuple):
        ds.classes = [str(c) for c in ds.classes]
    return ds


def _eval(raw: Any, where: str) -> EvalConfig:
    ev = build(EvalConfig, raw, where, {"fusion": lambda d, w: build(FusionConfig, d, w)})
    ev.modes = [str(m) for m in _as_list(ev.modes)]
    bad = [m for m in ev.modes if m not in MODES]
    if bad or not ev.modes:
        raise CdirError(f"{where}.modes: {bad or 'empty'}; choose from {', '.join(MODES)}")
    if ev.ks is not None:
        try:
            ev.ks = [int(k) for k in _as_list(ev.ks)]
        except (TypeError, ValueError):
            raise CdirError(f"{where}.ks: integers expected, got {ev.ks!r}") from None
        if not ev.ks or min(ev.ks) < 1:
            raise CdirError(f"{where}.ks: positive integers expected, got {ev.ks!r}")
        # refused, not fixed: the recipe file is the record of what was run
        if tuple(ev.ks) != normalize_ks(ev.ks):
            raise CdirError(f"{where}.ks: {ev.ks!r} repeats a k or is out of order; write "
                            f"{list(normalize_ks(ev.ks))!r}")
    if ev.pairs != "all":
        ev.pairs = [str(p) for p in _as_list(ev.pairs)]
        for p in ev.pairs:
            if ":" not in p:
                raise CdirError(f"{where}.pairs: {p!r} is not QUERY_DOMAIN:GALLERY_DOMAIN")
    bad = [m for m in [*ev.fusion.modes, *ev.fusion.weights] if m not in SINGLE_MODES]
    if bad:
        raise CdirError(f"{where}.fusion: unknown mode(s) {bad}; fused modes are "
                        f"{', '.join(SINGLE_MODES)}")
    if ev.fusion.method not in FUSION_METHODS:
        raise CdirError(f"{where}.fusion.method: use {' or '.join(FUSION_METHODS)}, not "
                        f"{ev.fusion.method!r}")
    return ev


def _check_roles(r: Recipe, where: str) -> None:
    """Every mode the recipe evaluates has the models it needs."""
    for mode in used_modes(r):
        if not mode_entries(r, mode):
            raise CdirError(f"{where}: mode {mode} needs at least one entry in "
                            f"{ROLES[MODES[mode].model]}")
        if MODES[mode].captions and not r.captioners:
            raise CdirError(f"{where}: mode {mode} needs at least one captioner")
    for e in r.clip:
        try:
            both = parse_spec(e.spec).cross_modal
        except CdirError:
            both = False
        if not both:
            raise CdirError(f"{where}.clip: {e.spec!r} is not a clip: spec (cm-image needs both "
                            "CLIP towers)")
    if any(MODES[m].fuses for m in r.eval.modes) and len(fusion_parts(r)) < 2:
        raise CdirError(f"{where}: fusion needs at least two single modes (eval.fusion.modes or "
                        "eval.modes)")


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    """Validate a config mapping into a Recipe (clear errors for unknown keys and bad values)."""
    if not isinstance(raw, dict):
        raise CdirError(f"{where}: a recipe must be a YAML mapping")
    if not raw.get("name"):
        raise CdirError(f"{where}: the recipe needs a name (its report folder)")
    if "dataset" not in raw:
        raise CdirError(f"{where}: the recipe needs a dataset section (kind, root, ...)")
    recipe = build(Recipe, raw, where, {
        "dataset": _dataset, "eval": _eval, "literature": _literature,
        "captioners": lambda d, w: _entries(CaptionerConfig, d, w),
        "text_encoders": lambda d, w: _entries(ModelEntry, d, w),
        "clip": lambda d, w: _entries(ModelEntry, d, w),
        "image_encoders": lambda d, w: _entries(ModelEntry, d, w),
        "batch": lambda d, w: build(BatchConfig, d, w),
        "notes": lambda d, w: [str(x) for x in _as_list(d)]})
    recipe.name = str(recipe.name)
    _check_roles(recipe, where)
    return recipe


# -- loading --------------------------------------------------------------------------------------

def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None,
                root: str | None = None, workspace: str | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides, then --root / -w."""
    p = Path(path)
    raw = apply_sets(load_yaml(p, hint="see configs/cm_*.yaml"), overrides)
    if root is not None:
        raw.setdefault("dataset", {})["root"] = root
    if workspace is not None:
        raw["workspace"] = workspace
    recipe = recipe_from_dict(raw, str(p))
    recipe.config_path = str(p)
    recipe.overrides = list(overrides or [])
    return recipe
