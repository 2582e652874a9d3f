"""Preflight: what a recipe needs that is present, what is missing and how to provide it.

Nothing is downloaded or loaded: folder listings and the local Hugging Face cache only.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

from cdir import galleries as datasets
from cdir.core.errors import CdirError
from cdir.core.io import read_json
from cdir.galleries.emoji import find_assets
from cdir.recipe.config import DatasetConfig, Recipe, used_modes
from cdir.recipe.methods import build_methods
from cdir.stages.modes import MODES
from encoders.clip import RANDOM, WEIGHT_FILES, hub_weights, parse_clip_spec
from encoders.hub import cached_file, download_blocked, hub_cache_dir

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
_DOMAINNET_URL = "http://csr.bu.edu/ftp/visda/2019/multi-source/"
# weight files of transformers models (sentence-transformers, timm); captioners may be sharded
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_SHARDED_WEIGHTS = ("model.safetensors.index.json", "model.safetensors",
                    "pytorch_model.bin.index.json", "pytorch_model.bin")
_PATH_PREFIXES = ("/", "./", "../", "~")


@dataclass
class Check:
    what: str  # e.g. "captioner hf:Salesforce/blip2-opt-2.7b"
    status: str  # ok | download | missing | skipped | note
    message: str
    fetch: str | None = None  # command to run where there is internet
    spec: str | None = None  # the model spec a model check is about

    @property
    def blocking(self) -> bool:
        return self.status == "missing"


def preflight(r: Recipe) -> list[Check]:
    """Check the dataset and every model the recipe's modes use. A missing optional model is
    "skipped" (its methods are left out); anything else missing is "missing" and blocks the run."""
    checks = check_dataset(r.dataset)
    modes = used_modes(r)
    captions = any(MODES[m].captions for m in modes)
    roles = [("captioner", r.captioners, check_captioner, captions),
             ("text encoder", r.text_encoders, check_text_encoder, "cm-text" in modes),
             ("CLIP (cm-image)", r.clip, check_clip, "cm-image" in modes),
             ("image encoder", r.image_encoders, check_image_encoder, "visual" in modes)]
    models: dict[str, Check] = {}  # a spec in several roles is checked once
    role_names: dict[str, list[str]] = {}
    required: set[str] = set()
    for role, entries, check, used in roles:
        if not used:
            continue
        for e in entries:
            if e.spec not in models:
                models[e.spec], role_names[e.spec] = check(e.spec), []
            if role not in role_names[e.spec]:
                role_names[e.spec].append(role)
            if not e.optional:
                required.add(e.spec)
    for spec, c in models.items():
        c.what, c.spec = f"{' / '.join(role_names[spec])} {spec}", spec
        if c.status == "missing" and spec not in required:
            c.status, c.message = "skipped", f"optional, skipped: {c.message}"
        checks.append(c)
    if not build_methods(r, skipped_specs(checks)) and not any(c.blocking for c in checks):
        checks.append(Check("methods", "missing", "no method is left to evaluate: every model "
                            "it needs is missing (see above)"))
    return checks


def skipped_specs(checks: list[Check]) -> set[str]:
    """The optional model specs the preflight skipped."""
    return {c.spec for c in checks if c.spec and c.status == "skipped"}


# -- models ---------------------------------------------------------------------------------------

def _missing_files(repo: str, groups: Sequence[Sequence[str]]) -> list[str]:
    """Which of ``groups`` (alternative file names) ``repo`` lacks in the local hub cache; a
    sharded checkpoint's index counts only when all its shards are cached too."""
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


def _hub_check(spec: str, repo: str, groups: Sequence[Sequence[str]], fetch: str | None = None,
               hint: str = "") -> Check:
    """ok when ``repo`` is cached; download when it is not but the hub can be reached (its stage
    fetches it); otherwise missing, with the command that fetches it elsewhere."""
    lacking = _missing_files(repo, groups)
    if not lacking:
        return Check(spec, "ok", f"{repo} in the local Hugging Face cache")
    state = "not in" if len(lacking) == len(groups) else f"incomplete ({', '.join(lacking)}) in"
    where = f"{repo} is {state} the local Hugging Face cache ({hub_cache_dir()})"
    blocked = download_blocked()
    if not blocked:
        return Check(spec, "download",
                     f"{where}; it will be downloaded by its stage (the hub is reachable)")
    fetch = fetch or f"hf download {repo}"
    return Check(spec, "missing", f"{where} and {blocked}: on a machine with internet run "
                 f"`{fetch}`, then copy its models--{repo.replace('/', '--')} folder into this "
                 f"machine's {hub_cache_dir()} (or point HF_HOME at a copy of the cache){hint}",
                 fetch)


def check_captioner(spec: str) -> Check:
    """A transformers captioner: hf:OWNER/NAME in the cache, or hf:FOLDER."""
    target = spec[3:] if spec.startswith("hf:") else spec
    path = Path(target).expanduser()
    if target.startswith(_PATH_PREFIXES) or path.exists():
        if (path / "config.json").is_file():
            return Check(spec, "ok", f"local folder {path}")
        return Check(spec, "missing", f"no model folder with config.json at {path}: save the "
                     "model there with save_pretrained, or use a hub id")
    if target.count("/") != 1:
        return Check(spec, "missing", f"{spec!r} is neither a hub id (owner/name) nor a folder")
    return _hub_check(spec, target, [("config.json",), _SHARDED_WEIGHTS],
                      hint="; or save the model to a folder and use hf:/path/to/folder")


def check_clip(spec: str) -> Check:
    """An open_clip spec: its weights in the local cache or a file (as encoders.clip finds them)."""
    try:
        cs = parse_clip_spec(spec)
    except CdirError as e:
        return Check(spec, "missing", str(e))
    if cs.kind == "folder":
        if (Path(cs.arch) / "open_clip_config.json").is_file():
            return Check(spec, "ok", f"local folder {cs.arch}")
        return Check(spec, "missing", f"{cs.arch} has no open_clip_config.json")
    if cs.kind == "hf-hub":
        return _hub_check(spec, cs.arch, [("open_clip_config.json",), WEIGHT_FILES])
    tag = cs.pretrained
    if tag is None:
        return Check(spec, "missing", f"{spec}: no weights given (clip:ARCH/TAG or "
                     "clip:ARCH/PATH)")
    if tag == RANDOM:
        return Check(spec, "ok", "random weights (tests and throughput only)")
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(cs.arch, tag) if cs.kind == "name" else {}
    if not pcfg:
        p = Path(tag).expanduser()
        if p.is_file():
            return Check(spec, "ok", f"checkpoint file {p}")
        return Check(spec, "missing", f"{tag!r} is neither an open_clip tag of {cs.arch} nor an "
                     "existing checkpoint file")
    if pcfg.get("file"):
        return Check(spec, "ok", f"file {pcfg['file']}")
    if not pcfg.get("hf_hub"):
        return Check(spec, "missing", f"open_clip has no Hugging Face copy of {cs.arch}/{tag}; "
                     "download its checkpoint and use clip:ARCH/PATH")
    repo, filename, names = hub_weights(pcfg["hf_hub"])
    return _hub_check(spec, repo, [names], fetch=f"hf download {repo} {filename}".rstrip())


def check_text_encoder(spec: str) -> Check:
    """st:ID-OR-PATH (a local copy or the cache) or a clip: spec."""
    if spec.startswith("clip:"):
        return check_clip(spec)
    if not spec.startswith("st:"):
        return Check(spec, "missing", f"unknown text encoder {spec!r}: use st:ID-OR-PATH or "
                     "clip:ARCH/PRETRAINED")
    from encoders.text import resolve_st_model  # imports torch

    name = spec[3:]
    source = resolve_st_model(name)
    if Path(source).is_dir():
        return Check(spec, "ok", f"local copy {source}")
    if name.startswith(_PATH_PREFIXES):
        return Check(spec, "missing", f"no such folder {name}")
    repo = name if "/" in name else f"sentence-transformers/{name}"
    return _hub_check(spec, repo, [("modules.json", "config.json"), _WEIGHTS])


def check_image_encoder(spec: str) -> Check:
    """pixels, a clip: spec, ckpt:PATH or ckpt:timm:NAME[?file=PATH]."""
    if spec == "pixels":
        return Check(spec, "ok", "built in")
    if spec.startswith("clip:"):
        return check_clip(spec)
    if not spec.startswith("ckpt:"):
        return Check(spec, "missing", f"unknown image encoder {spec!r}: use clip:, ckpt: or "
                     "pixels")
    body, _, query = spec[len("ckpt:"):].partition("?")
    if not body.startswith("timm:"):
        p = Path(body).expanduser()
        if p.is_file():
            return Check(spec, "ok", f"checkpoint {p}")
        return Check(spec, "missing", f"no checkpoint file at {p}: train one with `cdir train` "
                     "or copy the file here")
    name = body[len("timm:"):]
    file = dict(parse_qsl(query)).get("file")
    if file:
        p = Path(file).expanduser()
        if p.is_file():
            return Check(spec, "ok", f"weights file {p}")
        return Check(spec, "missing", f"no such weights file {p}")
    try:
        from timm.models import get_pretrained_cfg

        repo = getattr(get_pretrained_cfg(name), "hf_hub_id", None)
    except Exception:  # noqa: BLE001 - unknown model name: say so below
        repo = None
    if not repo:
        return Check(spec, "missing", f"timm knows no downloadable weights for {name}; pass "
                     f"ckpt:timm:{name}?file=PATH")
    return _hub_check(spec, repo, [_WEIGHTS])


# -- the dataset ----------------------------------------------------------------------------------

def _domainnet_zip(domain: str) -> str:
    """Download URL of a DomainNet domain (cleaned release: clipart and painting under
    groundtruth/)."""
    sub = "groundtruth/" if domain in ("clipart", "painting") else ""
    return f"{_DOMAINNET_URL}{sub}{domain}.zip"


def _officehome_checks(ds: DatasetConfig, base: str, what: str) -> list[Check]:
    folders = datasets.officehome_dirs(base)
    return [Check(f"{what} domain {d}", "missing",
                  f"no {d!r} folder in {base}; {DATASET_HOWTO['officehome']}")
            for d in ds.domains or datasets.OFFICEHOME_DOMAINS
            if datasets.officehome_domain(d, folders) not in folders]


def _domainnet_checks(ds: DatasetConfig, base: str, what: str) -> list[Check]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an unverified subset gets its own note
        classes = datasets.resolve_classes(ds.classes) or []
    split_files = datasets.domainnet_split_files(base)
    checks = []
    for d in ds.domains or datasets.DOMAINNET_DOMAINS:
        if d not in datasets.DOMAINNET_DOMAINS:
            checks.append(Check(f"{what} domain {d}", "missing", f"{d!r} is not a DomainNet "
                                f"domain ({', '.join(datasets.DOMAINNET_DOMAINS)})"))
            continue
        folder = os.path.join(base, d)
        if not os.path.isdir(folder):
            checks.append(Check(f"{what} domain {d}", "missing",
                                f"no {d}/ folder in {base}: download {_domainnet_zip(d)} and "
                                f"unzip it there (giving {base}/{d}/<class>/<image>.jpg)"))
            continue
        lost = [c for c in classes if not os.path.isdir(os.path.join(folder, c))]
        if lost:
            checks.append(Check(f"{what} {d} classes", "missing",
                                f"{len(lost)} class folder(s) of the subset missing in {folder}: "
                                f"{', '.join(lost[:8])}; re-unzip {_domainnet_zip(d)} or fix "
                                "dataset.classes"))
        if ds.split != "all" and ds.split not in split_files.get(d, {}):
            checks.append(Check(f"{what} {d}_{ds.split}.txt", "missing",
                                f"split {ds.split!r} needs {d}_{ds.split}.txt in {base}: download "
                                f"it from {_DOMAINNET_URL}domainnet/txt/{d}_{ds.split}.txt (or "
                                "use split: all)"))
    return checks


def check_dataset(ds: DatasetConfig) -> list[Check]:
    """The dataset root and, cheaply (folder listings only), the domains and classes the recipe
    needs. One Check per missing thing."""
    what = f"dataset {ds.kind}"
    if ds.kind == "emoji":
        try:
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
    try:
        if ds.kind == "officehome":
            base = datasets.find_officehome_root(root)
            checks = _officehome_checks(ds, base, what)
        else:
            base = datasets.find_domainnet_root(root)
            checks = _domainnet_checks(ds, base, what)
    except CdirError as e:
        return [Check(what, "missing", f"{e}; {howto}")]
    checks = checks or [Check(what, "ok", base)]
    subset = ds.subset
    if subset is not None and not subset.verified:
        checks.append(Check(f"{what} classes {subset.name}", "note",
                            f"an unverified class subset ({subset.source}); the report says so"))
    return checks
