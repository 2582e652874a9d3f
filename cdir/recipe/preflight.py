"""Preflight: what a recipe needs that is present, what is missing and how to provide it.

Nothing is downloaded or loaded: folder listings and the local Hugging Face cache only.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

from cdir import galleries as datasets
from cdir.core.errors import CdirError
from cdir.galleries import KINDS
from cdir.galleries.emoji import find_assets
from cdir.recipe.config import DatasetConfig, Recipe, mode_entries, used_modes
from cdir.recipe.methods import build_methods
from cdir.stages.modes import MODES
from encoders.specs import parse_spec

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
    taken = [mode_entries(r, m) for m in modes]  # the recipe's model lists the modes use

    def used(entries: list) -> bool:
        return any(entries is t for t in taken)

    # (name, entries, its role in encoders.specs.ROLES, used); the recipe has made sure a clip
    # entry is a clip: spec, which is checked as the image encoder it also is
    roles = [("captioner", r.captioners, "captioner", captions),
             ("text encoder", r.text_encoders, "text", used(r.text_encoders)),
             ("CLIP (cm-image)", r.clip, "image", used(r.clip)),
             ("image encoder", r.image_encoders, "image", used(r.image_encoders))]
    models: dict[str, Check] = {}  # a spec in several roles is checked once
    role_names: dict[str, list[str]] = {}
    required: set[str] = set()
    for role, entries, kind, used in roles:
        if not used:
            continue
        for e in entries:
            if e.spec not in models:
                models[e.spec], role_names[e.spec] = check_model(e.spec, kind), []
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

def check_model(spec: str, role: str) -> Check:
    """Is the model ``spec`` (a ``role`` of `encoders.specs.ROLES`) here? Its scheme's preflight:
    folder listings and the local Hugging Face cache only."""
    try:
        parsed = parse_spec(spec, role=role)
    except CdirError as e:
        return Check(spec, "missing", str(e))
    ready = parsed.info.preflight(parsed)
    return Check(spec, ready.status, ready.message, ready.fetch)


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


# gallery kind -> (the cdir.galleries function finding its base folder under the root, the checks
# of its layout there); other kinds take any layout
_LAYOUT_CHECKS = {
    "officehome": ("find_officehome_root", _officehome_checks),
    "domainnet": ("find_domainnet_root", _domainnet_checks),
}


def check_dataset(ds: DatasetConfig) -> list[Check]:
    """The dataset root and, cheaply (folder listings only), the domains and classes the recipe
    needs. One Check per missing thing."""
    what = f"dataset {ds.kind}"
    if KINDS[ds.kind].source is None:  # built in: from installed packages
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
    if ds.kind not in _LAYOUT_CHECKS:  # any layout: the loader checks it
        return [Check(what, "ok", root)]
    find_base, layout_checks = _LAYOUT_CHECKS[ds.kind]
    try:
        base = getattr(datasets, find_base)(root)
        checks = layout_checks(ds, base, what)
    except CdirError as e:
        return [Check(what, "missing", f"{e}; {howto}")]
    checks = checks or [Check(what, "ok", base)]
    subset = ds.subset
    if subset is not None and not subset.verified:
        checks.append(Check(f"{what} classes {subset.name}", "note",
                            f"an unverified class subset ({subset.source}); the report says so"))
    return checks
