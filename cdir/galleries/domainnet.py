"""DomainNet: ``<domain>_{train,test}.txt`` split files or the bare domain folders, an optional
class subset."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.tree import is_image_name, listdir
from cdir.galleries import KINDS, DataWarning, common

if TYPE_CHECKING:
    import pandas as pd


DOMAINNET_DOMAINS: tuple[str, ...] = ("clipart", "infograph", "painting", "quickdraw", "real",
                                      "sketch")
_SPLIT_FILE_DIRS = ("", "splits", "split", "txt", "lists", "image_list", "image_lists")
_KNOWN_GAPS = {("painting", "t-shirt"): "known gap: the official painting_train.txt has no t-shirt"}


def domainnet_split_files(base: str) -> dict[str, dict[str, str]]:
    """domain -> {"train"|"test": path of <domain>_<split>.txt}, looked for in ``base`` and a few
    usual sub-folders (``splits/``, ``txt/``, ...)."""
    out: dict[str, dict[str, str]] = {}
    for sub in _SPLIT_FILE_DIRS:
        d = os.path.join(base, sub) if sub else base
        if not os.path.isdir(d):
            continue
        for f in listdir(d)[1]:
            stem, ext = os.path.splitext(f)
            if ext.lower() != ".txt" or "_" not in stem:
                continue
            dom, sp = stem.rsplit("_", 1)
            if dom in DOMAINNET_DOMAINS and sp in ("train", "test"):
                out.setdefault(dom, {}).setdefault(sp, os.path.join(d, f))
    return out


def _domainnet_dirs(path: str) -> list[str]:
    dirs = set(listdir(path)[0])
    return [d for d in DOMAINNET_DOMAINS if d in dirs]


def find_domainnet_root(root: str | os.PathLike) -> str:
    """The folder with the DomainNet domain folders or split files: ``root`` or a single
    sub-folder of it that has them (e.g. the parent of ``domainnet/`` or ``images/``)."""
    root = common.existing_dir(root)
    if _domainnet_dirs(root) or domainnet_split_files(root):
        return root
    subs = [os.path.join(root, d) for d in listdir(root)[0]]
    hits = [s for s in subs if _domainnet_dirs(s) or domainnet_split_files(s)]
    if len(hits) == 1:
        return hits[0]
    dirs = listdir(root)[0]
    seen = f"; it has {', '.join(dirs[:8])}{' ...' if len(dirs) > 8 else ''}" if dirs else ""
    raise CdirError(f"no DomainNet domain folders ({', '.join(DOMAINNET_DOMAINS)}) or "
                    f"<domain>_train.txt/<domain>_test.txt files in {root}{seen}")


def _read_split_file(path: str) -> list[tuple[str, int | None]]:
    out: list[tuple[str, int | None]] = []
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.rsplit(None, 1)
            label: int | None = None
            if len(parts) == 2:
                try:
                    label = int(parts[1])
                except ValueError:
                    parts = [line]  # no label: the whole line is the path
            rel = parts[0].replace("\\", "/")
            if rel.startswith("./"):
                rel = rel[2:]
            if rel.count("/") < 2:
                raise CdirError(f"{path}:{n}: expected '<domain>/<class>/<image> <label>', "
                                f"got {line!r}")
            out.append((rel, label))
    return out


def load_domainnet(root: str | os.PathLike, domains: Iterable[str] | str | None = None,
                   split: str = "all", classes: Any = None,
                   progress: bool = False) -> pd.DataFrame:
    """Load DomainNet (original or cleaned M3SDA release).

    With ``<domain>_train.txt`` / ``<domain>_test.txt`` present (in ROOT or ROOT/splits, ...), the
    images they list are used (``split`` = "all" takes both lists; the class is the path's folder;
    the file's own label goes to the extra column ``source_label``). Listed images missing on disk
    are dropped with a warning (a cleaned list on the original images or vice versa) and kept in
    ``df.attrs["missing"]``. Without split files the domain folders are walked (split "all" only).
    ``classes``: None (all 345), a subset name from :data:`CLASS_SUBSETS` (``"ucdir7"``: the
    UCDIR/ProtoOT 7 classes), a list, a comma-separated string or a text file.
    """
    base = find_domainnet_root(root)
    split = common.check_split(split)
    if split not in KINDS["domainnet"].splits:
        raise CdirError(f"DomainNet has train and test splits, not {split!r}")
    keep = common.resolve_classes(classes)
    keep_set = set(keep) if keep else None
    lists = domainnet_split_files(base)
    dirs = _domainnet_dirs(base)
    available = [d for d in DOMAINNET_DOMAINS if d in lists or d in dirs]
    chosen = common.pick_domains(available, domains, base)
    bar = common.Progress(progress, "scanning DomainNet")
    rows: list[dict] = []
    seen: set[str] = set()
    missing: list[str] = []
    unlisted: list[str] = []
    all_have_labels = True
    try:
        for d in chosen:
            want = ["train", "test"] if split == "all" else [split]
            files = {sp: lists.get(d, {}).get(sp) for sp in want}
            if not any(files.values()):
                if split != "all":
                    raise CdirError(f"no {d}_{split}.txt in {base}: --split {split} needs the "
                                    "official split files (or use --split all to walk the folders)")
                if d not in dirs:
                    continue
                s = common.scan_domain(base, d, d, keep_set, bar)
                common.warn_loose(d, s.loose)
                rows.extend(s.rows)
                seen |= s.classes
                all_have_labels = False
                continue
            for sp, f in files.items():
                if f is None:
                    warnings.warn(f"{d}_{sp}.txt not found in {base}: the {d} images listed in "
                                  f"it are left out", DataWarning, stacklevel=2)
            got, gone, loose = _domainnet_listed(base, d, files, lists.get(d, {}), keep_set,
                                                 seen, bar)
            rows.extend(got)
            missing.extend(gone)
            unlisted.extend(loose)
    finally:
        bar.close()
    common.check_unknown_classes(keep, seen)
    if missing:
        shown = ", ".join(missing[:3])
        warnings.warn(f"{len(missing)} image(s) listed in the split files are missing on disk and "
                      f"were left out (e.g. {shown}); the images and the lists may come from "
                      "different releases (original vs cleaned)", DataWarning, stacklevel=2)
    if unlisted:
        # the split files do not cover the folders: those images are not part of the gallery
        warnings.warn(f"{len(unlisted)} image(s) on disk are named in no split file and were left "
                      f"out (e.g. {', '.join(unlisted[:3])}); the split files may be of another "
                      "release than the images", DataWarning, stacklevel=2)
    if not all_have_labels or any(r.get("source_label") is None for r in rows):
        for r in rows:
            r.pop("source_label", None)
    present = [d for d in chosen if any(r["domain"] == d for r in rows)]
    common.warn_coverage(rows, present, _KNOWN_GAPS)
    return common.finish(rows, base, extra_columns=("source_label",), missing=missing)


def _domainnet_listed(base: str, domain: str, files: dict[str, str | None],
                      all_files: dict[str, str], keep: set[str] | None, seen: set[str],
                      bar: common.Progress) -> tuple[list[dict], list[str], list[str]]:
    """Rows for the images listed in one domain's split files ``files`` (the selected splits),
    checked against the disk with one scandir per class folder (no stat per image); also the
    missing listed images and the images on disk that no split file of ``all_files`` names."""
    listed: list[tuple[str, int | None, str]] = []
    named: set[str] = set()
    for sp, f in all_files.items():
        entries = _read_split_file(f)
        named.update(rel for rel, _ in entries)
        if files.get(sp) == f:
            listed.extend((rel, lab, sp) for rel, lab in entries)
    # Where the listed relative paths start: the split file's folder, the dataset root, or a
    # sub-folder of it (e.g. DomainNet/images/<domain>, as ProtoOT lays it out).
    cands = [os.path.dirname(f) for f in files.values() if f is not None] + [base]
    cands += [os.path.join(base, d) for d in listdir(base)[0] if d not in DOMAINNET_DOMAINS]
    img_base = next((c for c in cands if os.path.isdir(os.path.join(c, domain))), None)
    if img_base is None:
        raise CdirError(f"the split files list {domain} images but there is no {domain}/ folder "
                        f"in {base} (or next to the split files): unzip {domain}.zip there")
    on_disk: dict[str, set[str]] = {}
    rows: list[dict] = []
    gone: list[str] = []
    ids: set[str] = set()
    for rel, lab, sp in listed:
        folder, name = rel.rsplit("/", 1)
        cls = folder.rsplit("/", 1)[-1]
        seen.add(cls)
        if keep is not None and cls not in keep:
            continue
        if folder not in on_disk:
            on_disk[folder] = set(listdir(os.path.join(img_base, folder))[1]) \
                if os.path.isdir(os.path.join(img_base, folder)) else set()
        if name not in on_disk[folder]:
            gone.append(rel)
            continue
        if rel in ids:  # listed twice (e.g. in both train and test): keep the first
            continue
        ids.add(rel)
        rows.append({"id": rel, "path": os.path.join(img_base, rel), "domain": domain,
                     "class_name": cls, "split": sp, "source_label": lab})
    bar.update(len(rows))
    loose: list[str] = []
    # with a split file absent its images are unlisted by construction (and warned about already)
    classes = listdir(os.path.join(img_base, domain))[0] if len(all_files) == 2 else []
    for cls in classes:
        if (keep is not None and cls not in keep) or (domain, cls) in _KNOWN_GAPS:
            continue  # a known gap is reported by warn_coverage already
        folder = f"{domain}/{cls}"
        if folder not in on_disk:
            on_disk[folder] = set(listdir(os.path.join(img_base, folder))[1])
        loose.extend(f"{folder}/{n}" for n in sorted(on_disk[folder])
                     if is_image_name(n) and f"{folder}/{n}" not in named)
    return rows, gone, loose
