"""Reproduction recipes: one YAML config runs a whole Caption-Matching evaluation and writes our
numbers next to the ones the literature reports.

    recipe = load_recipe("configs/cm_officehome.yaml", overrides=["device=cuda"], root="/data/OH")
    runner = Runner(recipe)
    checks = runner.preflight()  # what is present, what is missing and how to provide it
    runner.run()                 # data → caption → embed captions → embed images → eval → report

The stages call the library in-process (`cdir data`'s loader, `caption_workspace`,
`embed_captions`, `embed_images`, `build_scorer` + `evaluate_pairs`), in that order. Each stage is
skipped when its output is already complete, and the library functions underneath resume
interrupted work, so re-running a recipe continues where it stopped.

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

import copy
import dataclasses
import gc
import os
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdir.errors import CdirError

SINGLE_MODES = ("visual", "cm-text", "cm-image")
MODES = (*SINGLE_MODES, "fusion")
DATASET_KINDS = ("officehome", "domainnet", "folder", "csv", "emoji")

# What the report says about the metrics (specs/cdir.md §1.3, §1.4, §2.2, §2.6).
OUR_METRIC = (
    "**Ours: UCDIR P@k** (the `retrieval_precision_cal` of conghui1002/UCDIR, also used by "
    "ProtoOT; specs/cdir.md §2.2). For each query, R is the number of gallery images of its class "
    "and t = min(k, R); P@k = 100 × Σ(correct among the top t) / Σ t over all queries of the pair "
    "(a micro-average, truncated by R; *not* standard precision@k, which divides by k). Every "
    "image of domain A queries all images of domain B (transductive, no split), ranked by cosine "
    "similarity; ties go to the lower manifest row. The mean column is the unweighted mean over "
    "the directed pairs. At k = 1, UCDIR P@1 equals top-1 accuracy (standard precision@1) "
    "whenever every query has a relevant gallery image, so a reported \"Precision@1\" compares "
    "directly.")
LIT_METRIC = (
    "**Literature: values and metric names exactly as reported.** For CM (arXiv 2403.15152) and "
    "CoDA (arXiv 2302.06081) only the wizwand.com extracted-benchmark pages were accessible, not "
    "the papers' tables, so the definition behind a label such as \"Retrieval Accuracy (Ar → Cl)\" "
    "or \"C-S Score\" (which k; whether it is UCDIR P@k) is **not known**. CM most likely follows "
    "the UCDIR protocol (Office-Home P@1/5/15, the DomainNet 7-class subset P@50/100/200), but "
    "that is unverified. An entry without a stated k is shown in every P@k table, marked †; read "
    "those comparisons as indicative only until they are checked against the paper "
    "(arxiv.org/html/2403.15152v3). CM's BLIP-2 checkpoint, CLIP variant and captioning prompt are "
    "not stated in any accessible source either (specs/cdir.md §1.2): the models below are this "
    "recipe's choices.")
MODE_TEXT = {
    "cm-image": "query image (CLIP image tower) against the gallery's captions (the same CLIP's "
                "text tower): the CM paper's image-to-caption matching",
    "cm-text": "query caption against gallery captions, both through a text encoder "
               "(caption-to-caption; a variant the later CM versions may use, unverified)",
    "visual": "query image against gallery images with an image encoder (CM v1's CLIP "
              "image-to-image ablation when the encoder is CLIP)",
    "fusion": "weighted sum of per-query standardised scores of the modes named",
}
DATASET_HOWTO = {
    "officehome": (
        "download Office-Home (OfficeHomeDataset_10072016.zip, about 1.2 GB) from "
        "https://www.hemanthdv.org/officeHomeDataset.html and unpack it; --root is the folder "
        "holding Art/, Clipart/, Product/ and 'Real World'/ (each <Class>/<image>.jpg; Real_World, "
        "RealWorld or Real are accepted too, and so is a UCDIR-style <Domain>/train/<Class>/ "
        "level) or the folder that holds OfficeHomeDataset_10072016/"),
    "domainnet": (
        "download the DomainNet domains (cleaned M3SDA release, http://ai.bu.edu/M3SDA/) and "
        "unzip them side by side into one folder, which is --root: ROOT/<domain>/<class>/<image>."
        "jpg. Optionally add the split lists ROOT/<domain>_train.txt and <domain>_test.txt from "
        "http://csr.bu.edu/ftp/visda/2019/multi-source/domainnet/txt/"),
    "folder": "give --root: a ROOT/<domain>/<class>/<image> tree",
    "csv": "give --root: a CSV/TSV/JSONL/Parquet table with path, domain and class columns",
}
_DOMAINNET_ZIP = "http://csr.bu.edu/ftp/visda/2019/multi-source/{sub}{domain}.zip"


def domainnet_zip_url(domain: str) -> str:
    """Download URL of a DomainNet domain (cleaned release: clipart and painting under
    groundtruth/)."""
    sub = "groundtruth/" if domain in ("clipart", "painting") else ""
    return _DOMAINNET_ZIP.format(sub=sub, domain=domain)


# ----------------------------------------------------------------------------------------------
# The config


@dataclass
class DatasetConfig:
    kind: str
    root: str | None = None
    domains: list[str] | None = None
    classes: str | list[str] | None = None
    split: str = "all"
    limit: int | None = None  # emoji: number of categories
    size: int = 128  # emoji: image size


@dataclass
class ModelEntry:
    spec: str
    name: str | None = None
    optional: bool = False

    @property
    def display(self) -> str:
        return self.name or self.spec


@dataclass
class CaptionerConfig:
    spec: str
    name: str | None = None
    optional: bool = False
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
        target = self.spec[3:] if self.spec.startswith("hf:") else self.spec
        return target.rstrip("/").rsplit("/", 1)[-1] or self.spec


@dataclass
class FusionConfig:
    modes: list[str] = field(default_factory=list)  # default: every single mode of eval.modes
    weights: dict[str, float] = field(default_factory=dict)
    method: str = "zscore"


@dataclass
class EvalConfig:
    modes: list[str] = field(default_factory=lambda: ["cm-image", "cm-text", "visual", "fusion"])
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
    value_text: str = field(default="", metadata={"internal": True})  # the value as written


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
    config_path: str | None = field(default=None, metadata={"internal": True})  # read from
    overrides: list[str] = field(default_factory=list,
                                 metadata={"internal": True})  # the --set items applied

    def to_dict(self) -> dict[str, Any]:
        """The config keys only: loads back with recipe_from_dict."""
        return _config_dict(self)


def _config_dict(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _config_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, list | tuple):
        return [_config_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _config_dict(v) for k, v in obj.items()}
    return obj


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


def _build(cls: type, raw: Any, where: str, nested: dict[str, Any] | None = None) -> Any:
    """A dataclass from a mapping, refusing unknown keys with the list of valid ones."""
    if not isinstance(raw, dict):
        raise CdirError(f"{where}: expected a mapping, got {raw!r}")
    known = {k for k, f in _fields(cls).items() if not f.metadata.get("internal")}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CdirError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid: "
                        f"{', '.join(sorted(known))}")
    kwargs = dict(raw)
    for key, make in (nested or {}).items():
        if key in kwargs and kwargs[key] is not None:
            kwargs[key] = make(kwargs[key], f"{where}.{key}")
        elif key in kwargs:
            kwargs.pop(key)  # null: the default
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise CdirError(f"{where}: {e}") from None


def _as_list(raw: Any) -> list:
    if raw is None:
        return []
    return list(raw) if isinstance(raw, list | tuple) else [raw]


def _model_entries(raw: Any, where: str) -> list[ModelEntry]:
    out = []
    for i, item in enumerate(_as_list(raw)):
        if isinstance(item, str):
            out.append(ModelEntry(spec=item.strip()))
        else:
            out.append(_build(ModelEntry, item, f"{where}[{i}]"))
        if not out[-1].spec:
            raise CdirError(f"{where}[{i}]: empty model spec")
    return out


def _captioners(raw: Any, where: str) -> list[CaptionerConfig]:
    out = []
    for i, item in enumerate(_as_list(raw)):
        if isinstance(item, str):
            item = {"spec": item}
        cfg = _build(CaptionerConfig, item, f"{where}[{i}]")
        if not cfg.spec:
            raise CdirError(f"{where}[{i}]: empty captioner spec")
        out.append(cfg)
    return out


def _literature(raw: Any, where: str) -> list[LiteratureEntry]:
    out = []
    for i, item in enumerate(_as_list(raw)):
        entry = _build(LiteratureEntry, item, f"{where}[{i}]")
        entry.value_text = str(entry.value)  # 24.0 stays "24.0", as the source writes it
        try:
            entry.value = float(entry.value)
        except (TypeError, ValueError):
            raise CdirError(f"{where}[{i}]: value must be a number, got {entry.value!r}") \
                from None
        out.append(entry)
    return out


def recipe_from_dict(raw: dict[str, Any], where: str = "recipe") -> Recipe:
    """Validate a config mapping into a Recipe (clear errors for unknown keys and bad values)."""
    def dataset(d: Any, w: str) -> DatasetConfig:
        ds = _build(DatasetConfig, d, w)
        if ds.kind not in DATASET_KINDS:
            raise CdirError(f"{w}.kind: {ds.kind!r} is not one of {', '.join(DATASET_KINDS)}")
        if ds.domains is not None:
            ds.domains = [str(x) for x in _as_list(ds.domains)]
        if isinstance(ds.classes, list | tuple):
            ds.classes = [str(c) for c in ds.classes]
        return ds

    def eval_cfg(d: Any, w: str) -> EvalConfig:
        ev = _build(EvalConfig, d, w, {"fusion": lambda x, ww: _build(FusionConfig, x, ww)})
        ev.modes = [str(m) for m in _as_list(ev.modes)]
        bad = [m for m in ev.modes if m not in MODES]
        if bad or not ev.modes:
            raise CdirError(f"{w}.modes: {bad or 'empty'}; choose from {', '.join(MODES)}")
        if ev.ks is not None:
            try:
                ev.ks = [int(k) for k in _as_list(ev.ks)]
            except (TypeError, ValueError):
                raise CdirError(f"{w}.ks: integers expected, got {ev.ks!r}") from None
            if not ev.ks or min(ev.ks) < 1:
                raise CdirError(f"{w}.ks: positive integers expected, got {ev.ks!r}")
        if ev.pairs != "all":
            ev.pairs = [str(p) for p in _as_list(ev.pairs)]
            for p in ev.pairs:
                if ":" not in p:
                    raise CdirError(f"{w}.pairs: {p!r} is not QUERY_DOMAIN:GALLERY_DOMAIN")
        bad = [m for m in ev.fusion.modes if m not in SINGLE_MODES]
        bad += [m for m in ev.fusion.weights if m not in SINGLE_MODES]
        if bad:
            raise CdirError(f"{w}.fusion: unknown mode(s) {bad}; fused modes are "
                            f"{', '.join(SINGLE_MODES)}")
        if ev.fusion.method not in ("zscore", "rrf"):
            raise CdirError(f"{w}.fusion.method: use zscore or rrf, not {ev.fusion.method!r}")
        return ev

    if not isinstance(raw, dict):
        raise CdirError(f"{where}: a recipe must be a YAML mapping")
    if "name" not in raw or not raw["name"]:
        raise CdirError(f"{where}: the recipe needs a name (its report folder)")
    if "dataset" not in raw:
        raise CdirError(f"{where}: the recipe needs a dataset section (kind, root, ...)")
    recipe = _build(Recipe, raw, where, {
        "dataset": dataset, "captioners": _captioners, "text_encoders": _model_entries,
        "clip": _model_entries, "image_encoders": _model_entries, "eval": eval_cfg,
        "batch": lambda d, w: _build(BatchConfig, d, w), "literature": _literature,
        "notes": lambda d, w: [str(x) for x in _as_list(d)]})
    recipe.name = str(recipe.name)
    _check_roles(recipe, where)
    return recipe


def _check_roles(r: Recipe, where: str) -> None:
    need = {"cm-text": ("text_encoders", r.text_encoders), "cm-image": ("clip", r.clip),
            "visual": ("image_encoders", r.image_encoders)}
    modes = list(r.eval.modes)
    if "fusion" in modes:
        modes += [m for m in _fusion_parts(r) if m not in modes]
    for mode in modes:
        if mode in need and not need[mode][1]:
            raise CdirError(f"{where}: mode {mode} needs at least one entry in {need[mode][0]}")
        if mode in ("cm-text", "cm-image") and not r.captioners:
            raise CdirError(f"{where}: mode {mode} needs at least one captioner")
    for e in r.clip:
        if not e.spec.startswith("clip:"):
            raise CdirError(f"{where}.clip: {e.spec!r} is not a clip: spec (cm-image needs both "
                            "CLIP towers)")
    if "fusion" in r.eval.modes and len(_fusion_parts(r)) < 2:
        raise CdirError(f"{where}: fusion needs at least two single modes (eval.fusion.modes or "
                        "eval.modes)")


def _fusion_parts(r: Recipe) -> list[str]:
    return list(r.eval.fusion.modes) or [m for m in r.eval.modes if m in SINGLE_MODES]


def parse_value(text: str) -> Any:
    """A --set value: YAML (numbers, null, true, [lists], {maps}); raw text if it is not YAML."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_set(d: dict[str, Any], item: str) -> None:
    """Apply one ``key.sub.0.x=value`` override in place (list items by index; the index one
    past the end appends an item)."""
    if "=" not in item:
        raise CdirError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise CdirError(f"--set {item!r}: empty key")
    node: Any = d
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
            except ValueError:
                idx = -1
            if not 0 <= idx <= len(node):
                raise CdirError(f"--set {key}: {part!r} is not an index of a list of "
                                f"{len(node)} (0..{len(node)}; {len(node)} appends)")
            if idx == len(node):  # one past the end appends
                node.append({})
            if last:
                node[idx] = parse_value(text)
            else:
                if isinstance(node[idx], str):  # a spec string: address its fields
                    node[idx] = {"spec": node[idx]}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = parse_value(text)
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise CdirError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")


def load_recipe(path: str | os.PathLike, overrides: list[str] | None = None,
                root: str | None = None, workspace: str | None = None) -> Recipe:
    """Read a YAML recipe, apply ``--set`` overrides, then --root / -w."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CdirError(f"no recipe at {p}; see configs/cm_*.yaml")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()
        raise CdirError(f"{p}: not valid YAML ({' '.join(first[:2])})") from None
    if not isinstance(raw, dict):
        raise CdirError(f"{p}: a recipe must be a YAML mapping")
    raw = copy.deepcopy(raw)
    for item in overrides or []:
        apply_set(raw, item)
    if root is not None:
        raw.setdefault("dataset", {})["root"] = root
    if workspace is not None:
        raw["workspace"] = workspace
    recipe = recipe_from_dict(raw, str(p))
    recipe.config_path = str(p)
    recipe.overrides = list(overrides or [])
    return recipe


# ----------------------------------------------------------------------------------------------
# Preflight: what is present, what is missing, how to provide it


@dataclass
class Check:
    what: str  # e.g. "captioner hf:Salesforce/blip2-opt-2.7b"
    status: str  # ok | download | missing | skipped | note
    message: str
    fetch: str | None = None  # command to run where there is internet
    spec: str | None = None

    @property
    def blocking(self) -> bool:
        return self.status == "missing"

    @property
    def usable(self) -> bool:
        return self.status in ("ok", "download")


def _cache_note() -> str:
    from encoders.hub import hub_cache_dir

    return hub_cache_dir()


def _hub_missing(repo: str, groups: list[tuple[str, ...]]) -> list[str]:
    """Which of ``groups`` (alternative file names) ``repo`` lacks in the local hub cache; a
    sharded checkpoint's index counts only when all its shards are cached too."""
    from cdir.io import read_json
    from encoders.hub import cached_file

    missing = []
    for names in groups:
        path = cached_file(repo, list(names))
        if path is None:
            missing.append(" or ".join(names))
            continue
        if path.endswith(".index.json"):
            try:
                shards = sorted(set(read_json(path).get("weight_map", {}).values()))
            except (OSError, ValueError):
                shards = []
            lost = [s for s in shards if cached_file(repo, [s]) is None]
            if lost:
                missing.append(f"{len(lost)} of {len(shards)} weight shards (e.g. {lost[0]})")
    return missing


def _hub_status(repo: str, groups: list[tuple[str, ...]]) -> tuple[str, str]:
    """(status, detail) of a hub repository: ok when cached; download when not cached but the hub
    can be reached (the stage will fetch it); missing otherwise."""
    from encoders.hub import hub_reachable, offline

    lacking = _hub_missing(repo, groups)
    if not lacking:
        return "ok", f"{repo} in the local Hugging Face cache"
    what = "not in" if len(lacking) == len(groups) else f"incomplete ({', '.join(lacking)}) in"
    where = f"{repo} is {what} the local Hugging Face cache ({_cache_note()})"
    if offline():
        return "missing", f"{where} and HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return "missing", f"{where} and the hub is unreachable"
    return "download", f"{where}; it will be downloaded by its stage (the hub is reachable)"


def _copy_hint(repo: str) -> str:
    return (f"then copy its models--{repo.replace('/', '--')} folder into this machine's "
            f"{_cache_note()} (or point HF_HOME at a copy of the cache)")


_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
            "pytorch_model.bin")


def check_captioner(spec: str) -> Check:
    what = f"captioner {spec}"
    target = spec[3:] if spec.startswith("hf:") else spec
    path = Path(target).expanduser()
    if target.startswith(("/", "./", "../", "~")) or path.exists():
        if (path / "config.json").is_file():
            return Check(what, "ok", f"local folder {path}", spec=spec)
        return Check(what, "missing", f"no model folder with config.json at {path}: save the "
                     "model there with save_pretrained, or use a hub id", spec=spec)
    if target.count("/") != 1:
        return Check(what, "missing", f"{spec!r} is neither a hub id (owner/name) nor a folder",
                     spec=spec)
    status, detail = _hub_status(target, [("config.json",), _WEIGHTS])
    if status == "missing":
        fetch = f"hf download {target}"
        detail += (f": on a machine with internet run `{fetch}`, {_copy_hint(target)}; or save "
                   "the model to a folder and use hf:/path/to/folder")
        return Check(what, status, detail, fetch=fetch, spec=spec)
    return Check(what, status, detail, spec=spec)


def check_clip(spec: str, what: str | None = None) -> Check:
    """An open_clip spec: its weights in the local cache or a file (mirrors encoders.clip)."""
    from encoders.clip import RANDOM, parse_clip_spec

    what = what or f"CLIP {spec}"
    try:
        cs = parse_clip_spec(spec)
    except CdirError as e:
        return Check(what, "missing", str(e), spec=spec)
    if cs.kind == "folder":
        ok = (Path(cs.arch) / "open_clip_config.json").is_file()
        return Check(what, "ok" if ok else "missing", f"local folder {cs.arch}" if ok else
                     f"{cs.arch} has no open_clip_config.json", spec=spec)
    if cs.kind == "hf-hub":
        repo = cs.arch
        status, detail = _hub_status(repo, [("open_clip_config.json",),
                                            ("open_clip_model.safetensors",
                                             "open_clip_pytorch_model.bin")])
        fetch = f"hf download {repo}"
    else:
        tag = cs.pretrained
        if tag is None:
            return Check(what, "missing", f"{spec}: no weights given (clip:ARCH/TAG or "
                         "clip:ARCH/PATH)", spec=spec)
        if tag == RANDOM:
            return Check(what, "ok", "random weights (tests and throughput only)", spec=spec)
        import open_clip

        pcfg = open_clip.get_pretrained_cfg(cs.arch, tag) if cs.kind == "name" else {}
        if not pcfg:
            p = Path(tag).expanduser()
            if p.is_file():
                return Check(what, "ok", f"checkpoint file {p}", spec=spec)
            return Check(what, "missing", f"{tag!r} is neither an open_clip tag of {cs.arch} nor "
                         "an existing checkpoint file", spec=spec)
        if pcfg.get("file"):
            return Check(what, "ok", f"file {pcfg['file']}", spec=spec)
        # open_clip's convention: "org/repo/" means the default file names, else "org/repo/file"
        hub = pcfg.get("hf_hub") or ""
        if not hub:
            return Check(what, "missing", f"open_clip has no Hugging Face copy of {cs.arch}/{tag}"
                         "; download its checkpoint and use clip:ARCH/PATH", spec=spec)
        if hub.endswith("/"):
            repo, filename = hub.rstrip("/"), ""
        else:
            repo, _, filename = hub.rpartition("/")
        names = [filename] if filename else ["open_clip_model.safetensors",
                                             "open_clip_pytorch_model.bin"]
        if filename.endswith((".bin", ".pth")):
            names.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
        status, detail = _hub_status(repo, [tuple(names)])
        fetch = f"hf download {repo}" + (f" {filename}" if filename else "")
    if status == "missing":
        detail += f": on a machine with internet run `{fetch}`, {_copy_hint(repo)}"
        return Check(what, status, detail, fetch=fetch, spec=spec)
    return Check(what, status, detail, spec=spec)


def check_text_encoder(spec: str) -> Check:
    what = f"text encoder {spec}"
    if spec.startswith("clip:"):
        return check_clip(spec, what)
    if not spec.startswith("st:"):
        return Check(what, "missing", f"unknown text encoder {spec!r}: use st:ID-OR-PATH or "
                     "clip:ARCH/PRETRAINED", spec=spec)
    from encoders.text import resolve_st_model

    name = spec[3:]
    source = resolve_st_model(name)
    if Path(source).is_dir():
        return Check(what, "ok", f"local copy {source}", spec=spec)
    if name.startswith(("/", "./", "../", "~")):
        return Check(what, "missing", f"no such folder {name}", spec=spec)
    repo = name if "/" in name else f"sentence-transformers/{name}"
    status, detail = _hub_status(repo, [("modules.json", "config.json"),
                                        ("model.safetensors", "pytorch_model.bin")])
    if status == "missing":
        fetch = f"hf download {repo}"
        detail += f": on a machine with internet run `{fetch}`, {_copy_hint(repo)}"
        return Check(what, status, detail, fetch=fetch, spec=spec)
    return Check(what, status, detail, spec=spec)


def check_image_encoder(spec: str) -> Check:
    what = f"image encoder {spec}"
    if spec == "pixels":
        return Check(what, "ok", "built in", spec=spec)
    if spec.startswith("clip:"):
        return check_clip(spec, what)
    if not spec.startswith("ckpt:"):
        return Check(what, "missing", f"unknown image encoder {spec!r}: use clip:, ckpt: or "
                     "pixels", spec=spec)
    from urllib.parse import parse_qsl

    body, _, query = spec[len("ckpt:"):].partition("?")
    params = dict(parse_qsl(query))
    if body.startswith("timm:"):
        name = body[len("timm:"):]
        if params.get("file"):
            p = Path(params["file"]).expanduser()
            return Check(what, "ok" if p.is_file() else "missing",
                         f"weights file {p}" if p.is_file() else f"no such weights file {p}",
                         spec=spec)
        try:
            from timm.models import get_pretrained_cfg

            pcfg = get_pretrained_cfg(name)
        except Exception:  # noqa: BLE001 - unknown model name: say so below
            pcfg = None
        repo = getattr(pcfg, "hf_hub_id", None) if pcfg is not None else None
        if not repo:
            return Check(what, "missing", f"timm knows no downloadable weights for {name}; pass "
                         f"ckpt:timm:{name}?file=PATH", spec=spec)
        status, detail = _hub_status(repo, [("model.safetensors", "pytorch_model.bin")])
        if status == "missing":
            fetch = f"hf download {repo}"
            detail += f": on a machine with internet run `{fetch}`, {_copy_hint(repo)}"
            return Check(what, status, detail, fetch=fetch, spec=spec)
        return Check(what, status, detail, spec=spec)
    p = Path(body).expanduser()
    if p.is_file():
        return Check(what, "ok", f"checkpoint {p}", spec=spec)
    return Check(what, "missing", f"no checkpoint file at {p}: train one with `cdir train` or "
                 "copy the file here", spec=spec)


def check_dataset(ds: DatasetConfig) -> list[Check]:
    """The dataset root and, cheaply (folder listings only), the domains and classes the recipe
    needs. One Check per missing thing."""
    from cdir import datasets

    what = f"dataset {ds.kind}"
    if ds.kind == "emoji":
        try:
            from cdir.emoji import find_assets

            find_assets()
        except CdirError as e:
            return [Check(what, "missing", str(e))]
        return [Check(what, "ok", "the emoji gallery is built from installed packages")]
    howto = DATASET_HOWTO[ds.kind]
    if not ds.root:
        return [Check(what, "missing", f"dataset root not set: pass --root DIR (or set "
                      f"dataset.root); {howto}")]
    root = os.path.abspath(os.path.expanduser(ds.root))
    if not os.path.exists(root):
        return [Check(what, "missing", f"dataset root {root} does not exist; {howto}")]
    if ds.kind in ("folder", "csv"):
        return [Check(what, "ok", root)]
    checks: list[Check] = []
    try:
        if ds.kind == "officehome":
            base = datasets.find_officehome_root(root)
            folders = datasets._officehome_dirs(base)  # canonical name -> folder
            aliases = dict(datasets._OH_ALIASES)  # "Real_World", "rw", "real" -> "Real World"
            aliases.update({datasets._norm(f): c for c, f in folders.items()})
            for d in ds.domains or list(datasets.OFFICEHOME_DOMAINS):
                canon = d if d in folders else aliases.get(datasets._norm(d))
                if canon not in folders:
                    checks.append(Check(f"{what} domain {d}", "missing",
                                        f"no {d!r} folder in {base}; {howto}"))
        else:
            base = datasets.find_domainnet_root(root)
            wanted = ds.domains or list(datasets.DOMAINNET_DOMAINS)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                classes = datasets.resolve_classes(ds.classes)
            for d in wanted:
                if d not in datasets.DOMAINNET_DOMAINS:
                    checks.append(Check(f"{what} domain {d}", "missing",
                                        f"{d!r} is not a DomainNet domain "
                                        f"({', '.join(datasets.DOMAINNET_DOMAINS)})"))
                    continue
                folder = os.path.join(base, d)
                if not os.path.isdir(folder):
                    checks.append(Check(
                        f"{what} domain {d}", "missing",
                        f"no {d}/ folder in {base}: download {domainnet_zip_url(d)} and unzip "
                        f"it there (giving {base}/{d}/<class>/<image>.jpg)"))
                    continue
                lost = [c for c in classes or [] if not os.path.isdir(os.path.join(folder, c))]
                if lost:
                    checks.append(Check(
                        f"{what} {d} classes", "missing",
                        f"{len(lost)} class folder(s) of the subset missing in {folder}: "
                        f"{', '.join(lost[:8])}; re-unzip {domainnet_zip_url(d)} or fix "
                        "dataset.classes"))
                if ds.split != "all":
                    files = datasets._domainnet_split_files(base).get(d, {})
                    if ds.split not in files:
                        checks.append(Check(
                            f"{what} {d}_{ds.split}.txt", "missing",
                            f"split {ds.split!r} needs {d}_{ds.split}.txt in {base}: download "
                            "it from http://csr.bu.edu/ftp/visda/2019/multi-source/domainnet/"
                            f"txt/{d}_{ds.split}.txt (or use split: all)"))
    except CdirError as e:
        return [Check(what, "missing", f"{e}; {howto}")]
    if not checks:
        checks.append(Check(what, "ok", base))
    subset = datasets.CLASS_SUBSETS.get(ds.classes) if isinstance(ds.classes, str) else None
    if subset is not None and not subset.verified:
        checks.append(Check(f"{what} classes {subset.name}", "note",
                            f"an unverified class subset ({subset.source}); the report says so"))
    return checks


# ----------------------------------------------------------------------------------------------
# Methods: one (mode, captioner, models) combination = one row of the report tables


@dataclass
class Method:
    mode: str
    label: str
    short: str
    captioner: int | None = None  # index into recipe.captioners
    encoder: str | None = None
    text_encoder: str | None = None
    clip: str | None = None
    fusion: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        from cdir.workspace import spec_key

        return spec_key(self.label)


def build_methods(r: Recipe, usable: set[str] | None = None) -> list[Method]:
    """Every method of the recipe whose models are usable (all, when ``usable`` is None)."""
    def keep(entries: list) -> list:
        return [e for e in entries if usable is None or e.spec in usable]

    caps = [(i, c) for i, c in enumerate(r.captioners) if usable is None or c.spec in usable]
    texts, clips, encs = keep(r.text_encoders), keep(r.clip), keep(r.image_encoders)
    names = {"cap": len(caps) > 1, "text": len(texts) > 1, "clip": len(clips) > 1,
             "enc": len(encs) > 1}
    out: list[Method] = []

    def add(mode: str, parts: list[tuple[str, str]], **kw: Any) -> None:
        label = " · ".join([mode] + [p for _, p in parts])
        short = " · ".join([mode] + [p for role, p in parts if names.get(role)])
        out.append(Method(mode=mode, label=label, short=short, **kw))

    for mode in r.eval.modes:
        if mode == "visual":
            for e in encs:
                add(mode, [("enc", e.display)], encoder=e.spec)
        elif mode == "cm-text":
            for i, c in caps:
                for t in texts:
                    add(mode, [("cap", c.display), ("text", t.display)], captioner=i,
                        text_encoder=t.spec)
        elif mode == "cm-image":
            for i, c in caps:
                for p in clips:
                    add(mode, [("cap", c.display), ("clip", p.display)], captioner=i,
                        clip=p.spec)
    if "fusion" in r.eval.modes:
        parts = tuple(_fusion_parts(r))
        enc = encs[0] if "visual" in parts and encs else None
        text = texts[0] if "cm-text" in parts and texts else None
        clip = clips[0] if "cm-image" in parts and clips else None
        have = [m for m, x in (("visual", enc), ("cm-text", text), ("cm-image", clip)) if x]
        needs_caps = "cm-text" in parts or "cm-image" in parts
        if len(have) == len(parts):
            for i, c in (caps if needs_caps else [(None, None)]):
                models = list(dict.fromkeys(x.display for x in (enc, text, clip) if x))
                mode = f"fusion[{'+'.join(parts)}]"
                label = " · ".join([mode] + ([c.display] if c else []) + models)
                short = " · ".join([mode] + ([c.display] if c and names["cap"] else []))
                out.append(Method(mode="fusion", label=label, short=short, captioner=i,
                                  encoder=enc.spec if enc else None,
                                  text_encoder=text.spec if text else None,
                                  clip=clip.spec if clip else None, fusion=parts))
    # e.g. one captioner listed twice with different prompts and no names: keep ids apart
    seen: dict[str, int] = {}
    for m in out:
        n = seen[m.label] = seen.get(m.label, 0) + 1
        if n > 1:
            m.label, m.short = f"{m.label} ({n})", f"{m.short} ({n})"
    return out


# ----------------------------------------------------------------------------------------------
# The runner


@dataclass
class Stage:
    kind: str  # data | caption | embed-captions | embed-images | eval | report
    label: str
    args: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"  # ran | skipped | pending
    detail: str = ""
    seconds: float = 0.0


class Runner:
    """Plans, checks and runs one recipe; see the module docstring."""

    def __init__(self, recipe: Recipe, progress: bool = True):
        self.r = recipe
        self.progress = progress
        self.ws_root = Path(os.path.abspath(os.path.expanduser(
            recipe.workspace or os.path.join("runs", recipe.name))))
        self.checks: list[Check] | None = None
        self._keys: dict[int, str] = {}  # captioner index -> caption source key
        self._results: dict[str, dict] = {}  # method id -> {"rows", "report_dir", ...}

    # -- checks and plan -----------------------------------------------------------------------
    def preflight(self) -> list[Check]:
        """Check the dataset and every model without downloading or loading anything."""
        r = self.r
        checks = check_dataset(r.dataset)
        seen: dict[str, Check] = {}
        required: dict[str, bool] = {}
        entries: list[tuple[str, Any, str]] = [(c.spec, c, "captioner") for c in r.captioners]
        for role, items in (("text", r.text_encoders), ("clip", r.clip),
                            ("image", r.image_encoders)):
            entries += [(e.spec, e, role) for e in items]
        used = self._used_specs()
        roles: dict[str, list[str]] = {}
        names = {"captioner": "captioner", "text": "text encoder", "clip": "CLIP (cm-image)",
                 "image": "image encoder"}
        for spec, entry, role in entries:
            if (role, spec) not in used:
                continue
            required[spec] = required.get(spec, False) or not entry.optional
            if names[role] not in roles.setdefault(spec, []):
                roles[spec].append(names[role])
            if spec in seen:
                continue
            if role == "captioner":
                seen[spec] = check_captioner(spec)
            elif role == "text":
                seen[spec] = check_text_encoder(spec)
            elif role == "clip":
                seen[spec] = check_clip(spec)
            else:
                seen[spec] = check_image_encoder(spec)
        for spec, check in seen.items():
            check.what = f"{' / '.join(roles[spec])} {spec}"
        for spec, check in seen.items():
            if check.status == "missing" and not required[spec]:
                check.status = "skipped"
                check.message = f"optional, skipped: {check.message}"
            checks.append(check)
        self.checks = checks
        if not build_methods(r, self.usable_specs()) and not any(c.blocking for c in checks):
            checks.append(Check("methods", "missing", "no method is left to evaluate: every "
                                "model it needs is missing (see above)"))
        self.checks = checks
        return checks

    def _used_specs(self) -> set[tuple[str, str]]:
        """(role, spec) pairs the recipe's modes actually use."""
        r = self.r
        modes = set(r.eval.modes)
        if "fusion" in modes:
            modes |= set(_fusion_parts(r))
        used: set[tuple[str, str]] = set()
        if modes & {"cm-text", "cm-image"}:
            used |= {("captioner", c.spec) for c in r.captioners}
        if "cm-text" in modes:
            used |= {("text", e.spec) for e in r.text_encoders}
        if "cm-image" in modes:
            used |= {("clip", e.spec) for e in r.clip}
        if "visual" in modes:
            used |= {("image", e.spec) for e in r.image_encoders}
        return used

    def usable_specs(self) -> set[str] | None:
        """Every model spec but the optional ones the preflight skipped (None before it ran).
        Required models that are missing stay in: the plan shows what would run."""
        if self.checks is None:
            return None
        skipped = {c.spec for c in self.checks if c.spec and c.status == "skipped"}
        return {s for s in self._all_specs() if s not in skipped}

    def _all_specs(self) -> set[str]:
        r = self.r
        return {e.spec for e in [*r.captioners, *r.text_encoders, *r.clip, *r.image_encoders]}

    def methods(self) -> list[Method]:
        return build_methods(self.r, self.usable_specs())

    def plan(self) -> list[Stage]:
        r = self.r
        methods = self.methods()
        stages = [Stage("data", self._data_label(), {})]
        cap_ids = sorted({m.captioner for m in methods if m.captioner is not None})
        for i in cap_ids:
            c = r.captioners[i]
            gen = (f"max_new_tokens {c.max_new_tokens}, "
                   + (f"beam {c.num_beams}" if c.num_beams > 1 else "greedy")
                   + (f", prompt {c.prompt!r}" if c.prompt else "")
                   + f", batch {c.batch_size or r.batch.caption}")
            stages.append(Stage("caption", f"{c.spec} ({gen})", {"captioner": i}))
        text_jobs: list[tuple[int, str]] = []
        for m in methods:
            for spec in (m.text_encoder, m.clip):
                if spec and m.captioner is not None and (m.captioner, spec) not in text_jobs:
                    text_jobs.append((m.captioner, spec))
        for i, spec in text_jobs:
            stages.append(Stage("embed-captions",
                                f"captions of {r.captioners[i].display} with {spec}",
                                {"captioner": i, "spec": spec}))
        image_specs: list[str] = []
        for m in methods:
            for spec in (m.encoder, m.clip):
                if spec and spec not in image_specs:
                    image_specs.append(spec)
        for spec in image_specs:
            stages.append(Stage("embed-images", f"images with {spec} (batch {r.batch.image})",
                                {"spec": spec}))
        ks = self.ks()
        pairs = "every directed pair" if r.eval.pairs == "all" else f"{len(r.eval.pairs)} pairs"
        for m in methods:
            stages.append(Stage("eval", f"{m.label} on {pairs}, "
                                f"P@{','.join(map(str, ks))}", {"method": m}))
        stages.append(Stage("report", str(self.report_dir / "reproduction.md")))
        return stages

    def _data_label(self) -> str:
        ds = self.r.dataset
        if ds.kind == "emoji":
            return (f"emoji gallery ({ds.limit or 'all'} categories, {ds.size} px) in "
                    f"{self.ws_root / 'gallery'}")
        doms = ", ".join(ds.domains) if ds.domains else "all domains"
        from cdir.datasets import CLASS_SUBSETS

        classes = ds.classes if isinstance(ds.classes, str) else (
            f"{len(ds.classes)} classes" if ds.classes else "all classes")
        subset = CLASS_SUBSETS.get(ds.classes) if isinstance(ds.classes, str) else None
        if subset is not None and not subset.verified:
            classes += " (UNVERIFIED class subset)"
        return f"{ds.kind} at {ds.root or '(root not set)'}: {doms}; {classes}; split {ds.split}"

    def ks(self) -> tuple[int, ...]:
        from eval.protocol import default_ks

        return tuple(self.r.eval.ks) if self.r.eval.ks else default_ks(self.r.dataset.kind)

    @property
    def report_dir(self) -> Path:
        from cdir.workspace import Workspace

        return Workspace(self.ws_root).reports_dir(self.r.name)

    def device_line(self) -> str:
        import torch

        dev = self.r.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if dev.startswith("cuda") and torch.cuda.is_available():
            return f"{dev} ({torch.cuda.get_device_name(0)})"
        if dev.startswith("cuda"):
            return f"{dev} requested, but no CUDA GPU is visible"
        big = [c.spec for c in self.r.captioners
               if any(w in c.spec.lower() for w in ("blip2", "llava", "flan", "large"))]
        return "cpu" + (f" (no GPU visible: captioning with {', '.join(big)} will be very slow)"
                        if big else "")

    # -- running -------------------------------------------------------------------------------
    def run(self, dry_run: bool = False, out: Any = None) -> dict[str, Any]:
        """Preflight, print the plan; unless ``dry_run`` or something is missing, run every
        stage and write the report. Returns {"checks", "stages", "report"}."""
        out = out or sys.stdout
        checks = self.preflight()
        stages = self.plan()
        print(format_plan(self, stages), file=out)
        print(format_preflight(self, checks), file=out)
        missing = [c for c in checks if c.blocking]
        if missing:
            raise CdirError(f"preflight: {len(missing)} required item(s) missing (listed above); "
                            "no stage was run")
        if dry_run:
            print("dry run: nothing was run", file=out)
            return {"checks": checks, "stages": stages, "report": None}
        from cdir.workspace import Workspace

        ws = Workspace(self.ws_root)
        for n, st in enumerate(stages, 1):
            t0 = time.perf_counter()
            print(f"\n[{n}/{len(stages)}] {st.kind}: {st.label}", file=out, flush=True)
            handler = getattr(self, "_stage_" + st.kind.replace("-", "_"))
            if st.kind == "report":
                st.status = "ran"  # the report lists itself
            st.detail = handler(ws, st, stages) or ""
            st.seconds = round(time.perf_counter() - t0, 3)
            print(f"[{n}/{len(stages)}] {st.kind}: {st.status}"
                  + (f" ({st.detail})" if st.detail else ""), file=out, flush=True)
        report = self.report_dir / "reproduction.md"
        print(f"\nwrote {report} (+ reproduction.json)", file=out)
        return {"checks": checks, "stages": stages, "report": str(report)}

    def _device(self) -> str | None:
        return self.r.device or None

    def _stage_data(self, ws: Any, st: Stage, _: list[Stage]) -> str:
        import argparse

        from cdir.commands import data as data_cmd

        ds = self.r.dataset
        ns = argparse.Namespace(kind=ds.kind, workspace=str(self.ws_root))
        if ds.kind == "emoji":
            ns.limit, ns.size = ds.limit, ds.size
            want = {"limit": ds.limit, "size": ds.size}
        else:
            ns.root = ds.root
            ns.domains = ",".join(ds.domains) if ds.domains else None
            ns.classes = (",".join(ds.classes) if isinstance(ds.classes, list)
                          else ds.classes)
            ns.split = ds.split
            want = {"domains": ns.domains, "classes": ns.classes, "split": ns.split}
        info = ws.info() if ws.info_path.exists() else {}
        kind = "table" if ds.kind == "csv" else ds.kind
        have = {k: (info.get("params") or {}).get(k) for k in want}
        same_root = ds.kind == "emoji" or _under(str(info.get("root", "")), ds.root)
        if ws.manifest_path.exists() and info.get("dataset") == kind and have == want \
                and same_root:
            st.status = "skipped"
            n = sum((info.get("counts") or {}).values())
            return (f"already done: {n} images in {ws.manifest_path}; delete it to rescan")
        data_cmd.run(ns)
        st.status = "ran"
        return ""

    def _captioner_key(self, i: int) -> str:
        if i not in self._keys:
            from encoders.captioners import resolve_captioner

            c = self.r.captioners[i]
            self._keys[i] = resolve_captioner(
                c.spec, prompt=c.prompt, max_new_tokens=c.max_new_tokens,
                min_new_tokens=c.min_new_tokens, num_beams=c.num_beams,
                trust_remote_code=c.trust_remote_code).key
        return self._keys[i]

    def _stage_caption(self, ws: Any, st: Stage, _: list[Stage]) -> str:
        from cdir.captions import CaptionStore, caption_workspace

        i = st.args["captioner"]
        c = self.r.captioners[i]
        key = self._captioner_key(i)
        store = CaptionStore(ws, key)
        ids = set(ws.manifest()["id"].astype(str))
        done = store.done_ids() if store.exists() else set()
        failed = {f["id"] for f in store.meta().get("failed", [])} if store.exists() else set()
        if ids <= done | failed:
            st.status = "skipped"
            extra = f", {len(ids & failed)} unreadable" if ids & failed else ""
            return f"already done: {len(ids & done)} captions{extra}"
        summary = caption_workspace(
            ws, c.spec, batch_size=c.batch_size or self.r.batch.caption, prompt=c.prompt,
            max_new_tokens=c.max_new_tokens, min_new_tokens=c.min_new_tokens,
            num_beams=c.num_beams, device=self._device(), dtype=c.dtype,
            trust_remote_code=c.trust_remote_code, progress=self.progress)
        _free_accelerator()  # the captioner is the largest model: release it before the rest
        st.status = "ran"
        return f"{summary['new']} new captions at {summary['images_per_s']} images/s"

    def _stage_embed_captions(self, ws: Any, st: Stage, _: list[Stage]) -> str:
        from cdir.captions import CaptionStore
        from cdir.store import EmbeddingStore
        from cdir.text_embed import caption_embeddings_dir, embed_captions

        key = self._captioner_key(st.args["captioner"])
        spec = st.args["spec"]
        ids = set(ws.manifest()["id"].astype(str))
        captioned = CaptionStore(ws, key).done_ids() & ids
        store = EmbeddingStore(caption_embeddings_dir(ws, key, spec))
        if captioned and captioned <= store.done_ids():
            st.status = "skipped"
            return f"already done: {len(captioned)} caption embeddings"
        summary = embed_captions(ws, key, spec, batch_size=self.r.batch.text,
                                 device=self._device(), progress=self.progress)
        st.status = "ran"
        return f"{summary['embedded']} new"

    def _stage_embed_images(self, ws: Any, st: Stage, _: list[Stage]) -> str:
        from cdir.embed import embed_images
        from cdir.store import EmbeddingStore

        spec = st.args["spec"]
        ids = set(ws.manifest()["id"].astype(str))
        store = EmbeddingStore(ws.embeddings_dir(spec))
        failed = {f["id"] for f in store.failed()}
        if store.exists() and ids <= store.done_ids() | failed:
            st.status = "skipped"
            extra = f", {len(ids & failed)} unreadable" if ids & failed else ""
            return f"already done: {len(ids - failed)} image embeddings{extra}"
        summary = embed_images(ws, spec, batch_size=self.r.batch.image,
                               num_workers=self.r.batch.workers, device=self._device(),
                               progress=self.progress)
        st.status = "ran"
        return f"{summary['new']} new at {summary['images_per_s']} images/s"

    def _eval_signature(self, ws: Any, m: Method, manifest: Any, pairs: Any) -> dict:
        from cdir.manifest import fingerprint
        from cdir.store import EmbeddingStore
        from cdir.text_embed import caption_embeddings_dir

        key = self._captioner_key(m.captioner) if m.captioner is not None else None
        dirs = []
        if m.encoder:
            dirs.append(ws.embeddings_dir(m.encoder))
        if m.clip:
            dirs += [ws.embeddings_dir(m.clip), caption_embeddings_dir(ws, key, m.clip)]
        if m.text_encoder:
            dirs.append(caption_embeddings_dir(ws, key, m.text_encoder))
        ev = self.r.eval
        return {"mode": m.mode, "encoder": m.encoder, "text_encoder": m.text_encoder,
                "clip": m.clip, "captions": key, "fusion": list(m.fusion),
                "weights": dict(ev.fusion.weights), "fusion_method": ev.fusion.method,
                "ks": list(self.ks()), "pairs": [list(p) for p in pairs] if pairs else "all",
                "examples": ev.examples, "manifest": fingerprint(manifest),
                "vectors": {d.name: len(EmbeddingStore(d).done_ids()) for d in dirs}}

    def _pairs(self, manifest: Any) -> list[tuple[str, str]] | None:
        if self.r.eval.pairs == "all":
            return None
        from cdir.evaluate import parse_pairs

        domains = sorted(manifest["domain"].astype(str).unique())
        return parse_pairs(",".join(self.r.eval.pairs), domains)

    def _stage_eval(self, ws: Any, st: Stage, _: list[Stage]) -> str:
        from cdir.io import read_json, write_json
        from cdir.retrieval import ModeConfig, build_scorer
        from eval.protocol import evaluate_pairs, split_examples
        from eval.report import write_report

        m: Method = st.args["method"]
        manifest = ws.manifest()
        pairs = self._pairs(manifest)
        out = self.report_dir / m.id
        sig = self._eval_signature(ws, m, manifest, pairs)
        stage_file = out / "stage.json"
        if stage_file.exists() and (out / "results.json").exists():
            old = read_json(stage_file)
            if old.get("signature") == sig:
                self._results[m.id] = {"rows": read_json(out / "results.json")["results"],
                                       "report_dir": str(out), "n_used": old.get("n_used"),
                                       "n_total": old.get("n_total")}
                st.status = "skipped"
                return f"already done: {out / 'results.md'}"
        key = self._captioner_key(m.captioner) if m.captioner is not None else None
        ev = self.r.eval
        cfg = ModeConfig(encoder=m.encoder, text_encoder=m.text_encoder, clip=m.clip,
                         captions=key, fusion=m.fusion, weights=dict(ev.fusion.weights),
                         fusion_method=ev.fusion.method)
        scorer, ok = build_scorer(ws, manifest, m.mode, cfg, device=self._device())
        sub = manifest[ok].reset_index(drop=True)
        results = evaluate_pairs(scorer, sub, pairs=pairs, ks=self.ks(),
                                 keep_examples=ev.examples, progress=self.progress)
        write_report(results, out, m.label, manifest=sub)
        rows, _ = split_examples(results)
        n_used, n_total = int(ok.sum()), len(manifest)
        write_json(stage_file, {"signature": sig, "n_used": n_used, "n_total": n_total})
        self._results[m.id] = {"rows": _jsonable(rows), "report_dir": str(out),
                               "n_used": n_used, "n_total": n_total}
        st.status = "ran"
        mean = rows[-1]
        k0 = self.ks()[0]
        return f"mean P@{k0} {mean.get(f'P@{k0}', float('nan')):.2f}; {out / 'results.md'}"

    def _stage_report(self, ws: Any, st: Stage, stages: list[Stage]) -> str:
        write_reproduction(self, ws, stages)
        return ""


def _under(path: str, root: str | None) -> bool:
    if not path or not root:
        return False
    p = os.path.realpath(path)
    r = os.path.realpath(os.path.abspath(os.path.expanduser(root)))
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def _free_accelerator() -> None:
    gc.collect()
    try:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    except ImportError:  # pragma: no cover - torch is a dependency
        pass


def _jsonable(v: Any) -> Any:
    import math

    if isinstance(v, float) and math.isnan(v):
        return None
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item"):
        return _jsonable(v.item())
    return v


# ----------------------------------------------------------------------------------------------
# Printing the plan and the preflight


_MARK = {"ok": "ok      ", "download": "download", "missing": "MISSING ", "skipped": "skipped ",
         "note": "note    "}


def format_plan(runner: Runner, stages: list[Stage]) -> str:
    r = runner.r
    src = r.config_path or "(config)"
    sets = f" with --set {' '.join(r.overrides)}" if r.overrides else ""
    lines = [f"recipe {r.name} ({src}{sets})", f"workspace {runner.ws_root}",
             f"device {runner.device_line()}", "plan:"]
    for n, st in enumerate(stages, 1):
        lines.append(f"  {n:2d}. {st.kind:<15} {st.label}")
    return "\n".join(lines)


def format_preflight(runner: Runner, checks: list[Check]) -> str:
    lines = ["preflight:"]
    for c in checks:
        lines.append(f"  {_MARK.get(c.status, c.status)} {c.what}: {c.message}")
    missing = [c for c in checks if c.blocking]
    if missing:
        lines.append(f"{len(missing)} required item(s) missing.")
        fetch = [c.fetch for c in missing if c.fetch]
        if fetch:
            lines.append("On a machine with internet (pip install -U huggingface_hub gives the "
                         "`hf` command):")
            lines += [f"  {f}" for f in dict.fromkeys(fetch)]
            lines.append("then copy that machine's Hugging Face cache (~/.cache/huggingface/hub) "
                         "here, or set HF_HOME to a copy of it.")
    else:
        lines.append("preflight passed" + (" (some optional items are skipped)" if any(
            c.status == "skipped" for c in checks) else ""))
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The reproduction report


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return "n/a" if v != v else f"{v:.2f}"
    return str(v)


def _pair_name(pair: str | None) -> str | None:
    if not pair:
        return None
    a, _, b = pair.partition(":")
    return f"{a.strip()}→{b.strip()}"


def _lit_value(e: LiteratureEntry) -> str:
    v = e.value_text or f"{e.value:g}"
    return f"{v} {e.unit}" if e.unit else v


def write_reproduction(runner: Runner, ws: Any, stages: list[Stage]) -> dict[str, Any]:
    """Write WORKSPACE/reports/<name>/reproduction.md and .json from the eval stages' results."""
    import importlib.metadata

    import yaml

    from cdir import datasets
    from cdir.io import write_json, write_text

    r = runner.r
    ks = runner.ks()
    methods = [m for m in runner.methods() if m.id in runner._results]
    info = ws.info() if ws.info_path.exists() else {}
    manifest = ws.manifest()
    pairs_order: list[str] = []
    for m in methods:
        for row in runner._results[m.id]["rows"]:
            if row["pair"] not in pairs_order and row["pair"] != "mean":
                pairs_order.append(row["pair"])
    cols = pairs_order + ["mean"]
    try:
        version = importlib.metadata.version("cdir")
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"

    # -- dataset description, including the class subset's provenance
    ds = r.dataset
    subset = None
    if isinstance(ds.classes, str) and ds.classes in datasets.CLASS_SUBSETS:
        s = datasets.CLASS_SUBSETS[ds.classes]
        subset = {"name": s.name, "classes": list(s.classes), "source": s.source,
                  "verified": s.verified}
    counts = info.get("counts") or {}
    n_classes = int(manifest["class_name"].nunique())

    lit = r.literature
    lit_rows = []
    for e in lit:
        pname = _pair_name(e.pair)
        ours: dict[str, dict[str, float | None]] = {}
        for m in methods:
            row = next((x for x in runner._results[m.id]["rows"] if x["pair"] == pname), None)
            if row is not None:
                ours[m.label] = {f"P@{k}": row.get(f"P@{k}") for k in ks}
        lit_rows.append({**dataclasses.asdict(e), "pair_name": pname, "ours": ours,
                         "in_our_pairs": pname in pairs_order})

    md: list[str] = [f"# {r.title or r.name}", ""]
    sets = f", overrides `{' '.join(r.overrides)}`" if r.overrides else ""
    md.append(f"Recipe `{r.name}` (`{r.config_path}`{sets}), written "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')} by cdir {version} on "
              f"{runner.device_line()}. Workspace `{runner.ws_root}`; the resolved config is "
              "`recipe.yaml` beside this file.")
    md += ["", "## Setup", ""]
    doms = ", ".join(f"{d} {counts.get(d, '?')}" for d in sorted(counts)) or "?"
    md.append(f"- **Dataset**: {ds.kind} at `{info.get('root', ds.root)}`; {len(manifest)} images "
              f"({doms}); {n_classes} classes; split {ds.split}; fingerprint "
              f"`{info.get('fingerprint', '?')}`.")
    if subset:
        state = "verified" if subset["verified"] else "**UNVERIFIED**"
        md.append(f"- **Class subset `{subset['name']}`** ({state}): "
                  f"{', '.join(subset['classes'])}. Source: {subset['source']}.")
        if not subset["verified"]:
            md.append("  The UCDIR family evaluates DomainNet on 7 classes, but which 7 could not "
                      "be checked (specs/cdir.md §2.3): this list is a placeholder, so our "
                      "DomainNet numbers are **not comparable** with the literature's until the "
                      "class list is confirmed against arXiv 2207.09721 §4 (fix it in "
                      "cdir/datasets.py CLASS_SUBSETS, or set dataset.classes).")
    elif ds.classes:
        md.append(f"- **Classes**: {ds.classes}.")
    for i in sorted({m.captioner for m in methods if m.captioner is not None}):
        c = r.captioners[i]
        prompt = repr(c.prompt) if c.prompt else "none (the family's default)"
        md.append(f"- **Captioner** {c.display}: `{c.spec}`, prompt {prompt}, "
                  f"max_new_tokens {c.max_new_tokens}, min_new_tokens "
                  f"{c.min_new_tokens}, num_beams {c.num_beams}, dtype {c.dtype}; caption source "
                  f"`{runner._keys.get(i, '?')}`.")
    md.append(f"- **Protocol**: every directed pair of distinct domains"
              f"{'' if r.eval.pairs == 'all' else ' listed in eval.pairs'}; "
              f"k = {', '.join(map(str, ks))}.")
    md.append("- **Methods** (rows of the tables):")
    for m in methods:
        res = runner._results[m.id]
        left = res.get("n_total", 0) - res.get("n_used", 0) if res.get("n_total") else 0
        what = MODE_TEXT["fusion"] + f" ({', '.join(m.fusion)}; {r.eval.fusion.method})" \
            if m.mode == "fusion" else MODE_TEXT[m.mode]
        models = "; ".join(f"{k} `{v}`" for k, v in (("image encoder", m.encoder),
                                                      ("text encoder", m.text_encoder),
                                                      ("CLIP", m.clip)) if v)
        extra = f"; {left} images without a vector were left out" if left else ""
        rel = os.path.relpath(res["report_dir"], runner.report_dir)
        md.append(f"  - `{m.label}`: {what}. {models}{extra}. Full report: "
                  f"[{rel}/results.md]({rel}/results.md)")
    skipped = [c for c in (runner.checks or []) if c.status == "skipped"]
    for c in skipped:
        md.append(f"- Skipped (optional, not available): {c.what}.")

    md += ["", "## Metrics: what is compared", "", OUR_METRIC, "", LIT_METRIC, ""]

    daggers: list[str] = []
    for k in ks:
        md += [f"## UCDIR P@{k} (%), every directed pair", ""]
        md.append("| method | " + " | ".join(cols) + " |")
        md.append("|---|" + "---:|" * len(cols))
        for m in methods:
            by_pair = {row["pair"]: row for row in runner._results[m.id]["rows"]}
            cells = [_fmt(by_pair.get(p, {}).get(f"P@{k}")) for p in cols]
            md.append(f"| {m.short} | " + " | ".join(cells) + " |")
        # literature rows: entries for a pair of ours, at this k (or at every k when not stated)
        by_method: dict[str, dict[str, list[str]]] = {}
        for e in lit:
            pname = _pair_name(e.pair)
            if not e.comparable or pname not in pairs_order:
                continue
            if e.compare_with and e.compare_with != f"P@{k}":
                continue
            mark = "" if e.compare_with else "†"
            by_method.setdefault(e.method, {}).setdefault(pname, []).append(
                f"{_lit_value(e)}{mark}")
            if mark and e.method not in daggers:
                daggers.append(e.method)
        for meth, cells_by_pair in by_method.items():
            cells = [" / ".join(cells_by_pair.get(p, [])) for p in cols]
            md.append(f"| *{meth} (reported)* | " + " | ".join(cells) + " |")
        md.append("")
    if daggers:
        md.append("† The source does not say which k (or which precision) this value is: it is "
                  "repeated in every P@k table. Its metric name as reported is in the next "
                  "section.")
        md.append("")

    md += ["## Literature (as reported) beside ours", ""]
    if not lit:
        md.append("No published numbers are listed for this dataset in the recipe.")
    else:
        primary = methods[0] if methods else None
        head = f"ours ({primary.short})" if primary else "ours"
        md.append(f"| method | pair | metric as reported | value | {head} | source | status |")
        md.append("|---|---|---|---:|---|---|---|")
        for e, lr in zip(lit, lit_rows, strict=True):
            ours = ""
            if primary and lr["in_our_pairs"] and e.comparable:
                vals = lr["ours"].get(primary.label, {})
                shown = [e.compare_with] if e.compare_with else [f"P@{k}" for k in ks]
                ours = ", ".join(f"{c} {_fmt(vals.get(c))}" for c in shown)
            elif e.pair and not lr["in_our_pairs"]:
                ours = "pair not evaluated here"
            elif not e.pair:
                ours = "not a per-pair number"
            if e.pair and not e.comparable:
                ours = "not comparable (different benchmark)"
            status = "verified" if e.verified else "unverified"
            if e.note:
                status += f": {e.note}"
            paper = f" ({e.paper})" if e.paper else ""
            md.append(f"| {e.method}{paper} | {lr['pair_name'] or '—'} | {e.metric} | "
                      f"{_lit_value(e)} | {ours} | {e.source} | {status} |")
        md.append("")
        md.append("Every method's value for each listed pair is in `reproduction.json` "
                  "(`literature[].ours`) and in the P@k tables above.")
    if r.notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in r.notes]
    md += ["", "## Stages", "", "| # | stage | what | status | seconds |",
           "|---:|---|---|---|---:|"]
    for n, st in enumerate(stages, 1):
        md.append(f"| {n} | {st.kind} | {st.label} | {st.status}"
                  f"{': ' + st.detail if st.detail else ''} | {st.seconds:.1f} |")
    md.append("")

    out_dir = runner.report_dir
    doc = {
        "recipe": r.name, "title": r.title, "config": r.config_path, "overrides": r.overrides,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "cdir_version": version,
        "device": runner.device_line(), "workspace": str(runner.ws_root),
        "dataset": {"kind": ds.kind, "root": info.get("root", ds.root), "counts": counts,
                    "images": len(manifest), "classes": n_classes, "split": ds.split,
                    "domains": sorted(counts), "fingerprint": info.get("fingerprint"),
                    "class_subset": subset},
        "ks": list(ks), "pairs": pairs_order,
        "metrics": {"ours": OUR_METRIC, "literature": LIT_METRIC},
        "methods": [{"id": m.id, "label": m.label, "short": m.short, "mode": m.mode,
                     "captioner": r.captioners[m.captioner].spec
                     if m.captioner is not None else None,
                     "captions": runner._keys.get(m.captioner) if m.captioner is not None
                     else None,
                     "encoder": m.encoder, "text_encoder": m.text_encoder, "clip": m.clip,
                     "fusion": list(m.fusion), **runner._results[m.id]} for m in methods],
        "literature": lit_rows, "notes": r.notes,
        "skipped": [{"what": c.what, "reason": c.message} for c in skipped],
        "stages": [{"kind": s.kind, "label": s.label, "status": s.status, "detail": s.detail,
                    "seconds": s.seconds} for s in stages],
    }
    write_text(out_dir / "reproduction.md", "\n".join(md))
    write_json(out_dir / "reproduction.json", _jsonable(doc))
    write_text(out_dir / "recipe.yaml", yaml.safe_dump(r.to_dict(), sort_keys=False,
                                                        allow_unicode=True))
    return doc
