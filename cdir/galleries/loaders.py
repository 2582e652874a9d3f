"""Gallery loaders: turn a dataset on disk into a manifest (see :mod:`cdir.core.manifest`).

Supported sources:

- :func:`load_folder`     a generic ``ROOT/<domain>/<class>/<image>`` tree;
- :func:`load_officehome` Office-Home (``Art``, ``Clipart``, ``Product``, ``Real World`` and the
  common renames, an optional UCDIR-style ``train/`` level, the archive's top folder);
- :func:`load_domainnet`  DomainNet (``<domain>_{train,test}.txt`` split files or the bare folders,
  an optional class subset);
- :func:`load_table`      a CSV/TSV/JSONL/Parquet table with path, domain and class columns.

Common rules:

- ``id`` is the image path relative to the dataset root with ``/`` separators (stable across
  machines); ``path`` is absolute.
- ``label`` is the index of the class name in the byte-sorted list of the gallery's class names
  (``TV`` sorts before ``Table``), as the UCDIR family does with ``np.sort(os.listdir(...))``.
- Files are recognised as images by extension only (:data:`cdir.core.images.IMAGE_EXTENSIONS`);
  nothing is decoded here (``cdir embed`` decodes and skips corrupt files). Hidden files and
  folders (``.*``) and macOS ``__MACOSX`` folders are ignored.
- A UCDIR-style split level (``<domain>/train/<class>/...``, also ``test``/``val``) is recognised
  when a domain folder holds nothing but such folders; the split column then says which.
- Problems the user must fix raise :class:`~cdir.core.errors.CdirError`; things worth knowing that
  do not stop the load (missing listed images, classes absent from a domain, loose files) are
  reported with :class:`DataWarning`. Images listed in a split file or table but absent on disk are
  dropped; their paths are kept in ``df.attrs["missing"]``. ``df.attrs["root"]`` is the dataset
  folder the ids are relative to (after finding e.g. ``OfficeHomeDataset_10072016/``).
"""

from __future__ import annotations

import difflib
import os
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.images import IMAGE_EXTENSIONS
from cdir.galleries import DataWarning

if TYPE_CHECKING:
    import pandas as pd


# ---------------------------------------------------------------------------------------------
# Named class subsets (the one place where they live)


@dataclass(frozen=True)
class ClassSubset:
    name: str
    dataset: str
    classes: tuple[str, ...]
    source: str
    verified: bool


CLASS_SUBSETS: dict[str, ClassSubset] = {
    # UCDIR, ProtoOT and DG-UCDIR all evaluate DomainNet with 7 clusters, so they use 7 classes, but
    # WHICH 7 is NOT verified: the UCDIR paper (arXiv 2207.09721, section 4) could not be read when
    # this was written. Until someone checks it, this is a PLACEHOLDER: the first seven classes of
    # the FedBN 10-class DomainNet subset. Check the list against the paper, fix it here, set
    # verified=True and cite the page. Users can always pass their own list (--classes a,b,c or a
    # file).
    "ucdir7": ClassSubset(
        name="ucdir7",
        dataset="domainnet",
        classes=("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale"),
        source="PLACEHOLDER, unverified: must be checked against arXiv 2207.09721 section 4",
        verified=False,
    ),
    # The 10-class DomainNet subset circulated with FedBN (Li et al., ICLR 2021).
    "fedbn10": ClassSubset(
        name="fedbn10",
        dataset="domainnet",
        classes=("bird", "feather", "headphones", "ice_cream", "teapot", "tiger", "whale",
                 "windmill", "wine_glass", "zebra"),
        source="FedBN (Li et al., ICLR 2021) DomainNet subset",
        verified=False,
    ),
}


def resolve_classes(spec: str | Sequence[str] | os.PathLike | None) -> list[str] | None:
    """Turn a class-subset spec into a list of class names (None = all classes).

    ``spec`` is None, a list of names, the name of a :data:`CLASS_SUBSETS` entry (``"ucdir7"``),
    a path to a text file (one class per line; ``#`` comments; only the first word counts, so
    ``<name> <label>`` lines work), or a comma-separated string ``"a,b,c"``.
    """
    if spec is None:
        return None
    if isinstance(spec, os.PathLike):
        return _read_class_file(Path(spec))
    if isinstance(spec, str):
        s = spec.strip()
        if s in CLASS_SUBSETS:
            subset = CLASS_SUBSETS[s]
            if not subset.verified:
                warnings.warn(
                    f"class subset {s!r} is unverified ({subset.source}); pass your own list with "
                    "--classes a,b,c or --classes FILE.txt if you know the right one",
                    DataWarning, stacklevel=2)
            return list(subset.classes)
        if os.path.isfile(os.path.expanduser(s)):
            return _read_class_file(Path(os.path.expanduser(s)))
        if s.lower().endswith(".txt"):
            raise CdirError(f"class list file {s} does not exist")
        names = [c.strip() for c in s.split(",") if c.strip()]
    else:
        names = [str(c).strip() for c in spec if str(c).strip()]
    if not names:
        raise CdirError(f"empty class list {spec!r}: give names separated by commas, a subset name "
                        f"({', '.join(CLASS_SUBSETS)}) or a text file")
    return list(dict.fromkeys(names))


def _read_class_file(path: Path) -> list[str]:
    if not path.is_file():
        raise CdirError(f"class list file {path} does not exist")
    names = []
    for line in path.read_text(encoding="utf-8-sig").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line.split()[0])
    if not names:
        raise CdirError(f"class list file {path} has no class names (one per line)")
    return list(dict.fromkeys(names))


# ---------------------------------------------------------------------------------------------
# Walking folders fast: os.scandir only (no stat per file, no image decoding)

_JUNK_DIRS = {"__MACOSX"}
SPLIT_DIRS = ("train", "test", "val", "validation")


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_DIRS


def _is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _utf8(name: str) -> bool:
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes in the name (surrogate escapes)
        return False


def _listdir(path: str, bad: list[str] | None = None) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) of ``path``, hidden ones left out, both sorted. Names that
    are not valid UTF-8 cannot be stored in the manifest: they are left out and, if ``bad`` is
    given, appended to it."""
    dirs, files = [], []
    try:
        with os.scandir(path) as it:
            for e in it:
                if _hidden(e.name):
                    continue
                if not _utf8(e.name):
                    if bad is not None:
                        bad.append(os.path.join(path, e.name).encode("utf-8", "surrogateescape")
                                   .decode("utf-8", "replace"))
                    continue
                try:
                    (dirs if e.is_dir() else files).append(e.name)
                except OSError:  # a broken symlink or a vanished entry
                    continue
    except PermissionError:
        raise CdirError(f"cannot read folder {path}: permission denied") from None
    dirs.sort()
    files.sort()
    return dirs, files


class _Progress:
    """A tqdm counter of images found (total unknown) on stderr, or nothing; also collects the
    names skipped because they are not valid UTF-8."""

    def __init__(self, enabled: bool, desc: str):
        self.bar = None
        self.bad: list[str] = []
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(desc=desc, unit="img", file=sys.stderr, mininterval=0.5)

    def update(self, n: int) -> None:
        if self.bar is not None and n:
            self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.bad:
            warnings.warn(f"{len(self.bad)} file or folder name(s) are not valid UTF-8 and were "
                          f"left out (rename them), e.g. {self.bad[0]}", DataWarning, stacklevel=3)


def _images_under(abs_dir: str, rel_dir: str, bar: _Progress) -> list[str]:
    """Relative (POSIX) paths of the image files under ``abs_dir``, recursively (each real
    folder once, so symlink loops end)."""
    out: list[str] = []
    stack = [(abs_dir, rel_dir)]
    visited: set[tuple[int, int]] = set()
    while stack:
        a, r = stack.pop()
        try:
            st = os.stat(a)
        except OSError:
            continue
        if (st.st_dev, st.st_ino) in visited:
            continue
        visited.add((st.st_dev, st.st_ino))
        dirs, files = _listdir(a, bar.bad)
        out.extend(f"{r}/{f}" for f in files if _is_image_name(f))
        stack.extend((os.path.join(a, d), f"{r}/{d}") for d in reversed(dirs))
    return out


@dataclass
class _DomainScan:
    rows: list[dict]
    classes: set[str]  # every class folder seen (before the subset filter)
    loose: int  # images directly in the domain (or split) folder: no class, ignored


def _scan_domain(root: str, rel: str, domain: str, keep: set[str] | None,
                 bar: _Progress) -> _DomainScan:
    """Rows for ``root/rel/<class>/...`` or, with a split level,
    ``root/rel/<split>/<class>/...``."""
    abs_dom = os.path.join(root, rel)
    dirs, files = _listdir(abs_dom, bar.bad)
    loose = sum(map(_is_image_name, files))
    levels: list[tuple[str, str]]  # (relative folder holding class folders, split)
    if dirs and all(d.lower() in SPLIT_DIRS for d in dirs):
        levels = [(f"{rel}/{d}", d.lower()) for d in dirs]
    else:
        levels = [(rel, "all")]
    rows: list[dict] = []
    seen: set[str] = set()
    for lrel, split in levels:
        if split != "all":
            cdirs, cfiles = _listdir(os.path.join(root, lrel), bar.bad)
            loose += sum(map(_is_image_name, cfiles))
        else:
            cdirs = dirs
        for cls in cdirs:
            seen.add(cls)
            if keep is not None and cls not in keep:
                continue
            crel = f"{lrel}/{cls}"
            found = _images_under(os.path.join(root, crel), crel, bar)
            rows.extend({"id": r, "path": os.path.join(root, r), "domain": domain,
                         "class_name": cls, "split": split} for r in found)
            bar.update(len(found))
    return _DomainScan(rows, seen, loose)


# ---------------------------------------------------------------------------------------------
# Shared checks


def _existing_dir(root: str | os.PathLike, what: str = "dataset folder") -> str:
    p = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(p):
        raise CdirError(f"{what} {p} does not exist")
    if not os.path.isdir(p):
        raise CdirError(f"{what} {p} is not a folder")
    return p


def _pick_domains(available: Sequence[str], wanted: Iterable[str] | str | None, root: str,
                  aliases: dict[str, str] | None = None) -> list[str]:
    """The requested domains in the given order (all available ones when None).

    A name matches exactly, then through ``aliases`` (keys normalised by :func:`_norm`), then
    case-insensitively.
    """
    if wanted is None:
        return list(available)
    if isinstance(wanted, str):
        wanted = [w for w in wanted.split(",")]
    out: list[str] = []
    for w in wanted:
        w = w.strip()
        if not w:
            continue
        hit = None
        if w in available:
            hit = w
        elif aliases and _norm(w) in aliases and aliases[_norm(w)] in available:
            hit = aliases[_norm(w)]
        else:
            ci = [a for a in available if a.lower() == w.lower()]
            hit = ci[0] if len(ci) == 1 else None
        if hit is None:
            raise CdirError(f"domain {w!r} is not in {root}; available: {', '.join(available)}")
        if hit not in out:
            out.append(hit)
    if not out:
        raise CdirError(f"no domain given; available: {', '.join(available)}")
    return out


def _norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def _check_split(split: str) -> str:
    s = (split or "all").lower()
    if s not in ("all", "train", "test", "val", "validation"):
        raise CdirError(f"unknown split {split!r}: use all, train or test")
    return s


def _check_unknown_classes(keep: list[str] | None, seen: set[str]) -> None:
    if keep is None:
        return
    unknown = [c for c in keep if c not in seen]
    if unknown:
        hints = []
        for c in unknown[:5]:
            close = difflib.get_close_matches(c, sorted(seen), n=1)
            hints.append(f"{c!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise CdirError(f"{len(unknown)} requested class(es) not found in the dataset: "
                        f"{', '.join(hints)}{' ...' if len(unknown) > 5 else ''}")


def _warn_coverage(rows: list[dict], domains: Sequence[str],
                   known_gaps: dict | None = None) -> None:
    """Warn when some classes are absent from some domains (their queries have no match there)."""
    if len(domains) < 2:
        return
    by_dom: dict[str, set[str]] = {d: set() for d in domains}
    for r in rows:
        by_dom.setdefault(r["domain"], set()).add(r["class_name"])
    allc = set().union(*by_dom.values())
    gaps = [(d, c) for d in domains for c in sorted(allc - by_dom[d])]
    if not gaps:
        return
    known_gaps = known_gaps or {}
    parts = []
    for d, c in gaps[:6]:
        note = known_gaps.get((d, c))
        parts.append(f"{d} lacks {c}" + (f" ({note})" if note else ""))
    more = f" and {len(gaps) - 6} more" if len(gaps) > 6 else ""
    warnings.warn(f"not every class is in every domain: {'; '.join(parts)}{more}",
                  DataWarning, stacklevel=3)


def _finish(rows: list[dict], where: str, extra_columns: tuple[str, ...] = (),
            missing: list[str] | None = None) -> pd.DataFrame:
    from cdir.core.manifest import make_manifest

    if not rows:
        raise CdirError(f"no images found in {where} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))} files)")
    df = make_manifest(rows, extra_columns=extra_columns)
    df.attrs["root"] = where  # the folder the ids are relative to (the table file for tables)
    df.attrs["missing"] = list(missing or [])
    return df


def _select_split(rows: list[dict], split: str, where: str) -> list[dict]:
    if split == "all":
        return rows
    kept = [r for r in rows if r["split"] == split]
    if rows and not kept:
        have = sorted({r["split"] for r in rows})
        raise CdirError(f"no {split!r} images in {where} (splits found: {', '.join(have)}); "
                        "use one of those or --split all")
    return kept


def _warn_loose(domain: str, n: int) -> None:
    if n:
        warnings.warn(f"{n} image(s) directly in the {domain!r} folder have no class folder and "
                      "were ignored", DataWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Generic folder


def load_folder(root: str | os.PathLike, domains: Iterable[str] | str | None = None,
                split: str = "all", classes: Any = None, progress: bool = False) -> pd.DataFrame:
    """Load ``ROOT/<domain>/<class>/<image>`` (any depth below the class folder).

    ``domains`` selects domain folders (a list or "A,B"; rows are always sorted by domain, class,
    id); ``split`` keeps one split of a ``<domain>/<split>/<class>`` layout; ``classes`` is any
    :func:`resolve_classes` spec. Labels index the byte-sorted names of the classes kept.
    """
    root = _existing_dir(root)
    split = _check_split(split)
    keep = resolve_classes(classes)
    dom_dirs, files = _listdir(root)
    if not dom_dirs:
        n = sum(map(_is_image_name, files))
        extra = f"; it holds {n} image(s) directly" if n else ""
        raise CdirError(f"no domain folders in {root}: expected {root}/<domain>/<class>/<image>"
                        f"{extra}")
    chosen = _pick_domains(dom_dirs, domains, root)
    bar = _Progress(progress, f"scanning {os.path.basename(root) or root}")
    rows: list[dict] = []
    seen: set[str] = set()
    try:
        scans = {}
        for d in chosen:
            scans[d] = s = _scan_domain(root, d, d, set(keep) if keep else None, bar)
            rows.extend(s.rows)
            seen |= s.classes
    finally:
        bar.close()
    if all(not s.classes for s in scans.values()) and any(s.loose for s in scans.values()):
        raise CdirError(f"{root} looks like ROOT/<class>/<image> (one level of folders, images "
                        f"inside): a gallery needs ROOT/<domain>/<class>/<image>; pass the parent "
                        f"folder or put these class folders inside a domain folder")
    for d, s in scans.items():
        _warn_loose(d, s.loose)
    _check_unknown_classes(keep, seen)
    rows = _select_split(rows, split, root)
    _warn_coverage(rows, [d for d in chosen if scans[d].rows])
    return _finish(rows, root)


# ---------------------------------------------------------------------------------------------
# Office-Home

OFFICEHOME_DOMAINS: tuple[str, ...] = ("Art", "Clipart", "Product", "Real World")
OFFICEHOME_ARCHIVE_DIR = "OfficeHomeDataset_10072016"
# Folder names seen in the wild (normalised: lowercase, letters and digits only) -> canonical.
_OH_FOLDERS = {"art": "Art", "clipart": "Clipart", "product": "Product",
               "realworld": "Real World", "real": "Real World"}
# Also accepted by --domains: the two-letter codes of the literature (Ar->Cl, ...).
_OH_ALIASES = {**_OH_FOLDERS, "ar": "Art", "cl": "Clipart", "pr": "Product", "rw": "Real World",
               "re": "Real World"}


def officehome_dirs(path: str) -> dict[str, str]:
    """canonical domain -> folder name, for the Office-Home domain folders directly in ``path``."""
    dirs, _ = _listdir(path)
    found: dict[str, str] = {}
    for d in dirs:
        canon = _OH_FOLDERS.get(_norm(d))
        if canon is None:
            continue
        if canon in found:
            raise CdirError(f"two folders in {path} are both Office-Home's {canon!r}: "
                            f"{found[canon]!r} and {d!r}; remove or rename one")
        found[canon] = d
    return found


def _officehome_aliases(folders: dict[str, str]) -> dict[str, str]:
    """normalised name -> canonical domain: the usual spellings, the literature's codes and the
    folders present (``folders`` from :func:`officehome_dirs`)."""
    return {**_OH_ALIASES, **{_norm(f): c for c, f in folders.items()}}


def officehome_domain(name: str, folders: dict[str, str]) -> str | None:
    """The canonical Office-Home domain that ``name`` means (a canonical name, a folder name or a
    code such as Ar, Rw), or None; ``folders`` from :func:`officehome_dirs`."""
    return name if name in folders else _officehome_aliases(folders).get(_norm(name))


def find_officehome_root(root: str | os.PathLike) -> str:
    """The folder that holds the Office-Home domain folders: ``root`` itself, its
    ``OfficeHomeDataset_10072016`` folder, or its single sub-folder that has them."""
    root = _existing_dir(root)
    if officehome_dirs(root):
        return root
    top = os.path.join(root, OFFICEHOME_ARCHIVE_DIR)
    if os.path.isdir(top) and officehome_dirs(top):
        return top
    subs = [os.path.join(root, d) for d in _listdir(root)[0]]
    hits = [s for s in subs if officehome_dirs(s)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise CdirError(f"several Office-Home copies below {root}: "
                        f"{', '.join(os.path.basename(h) for h in hits)}; pass one of them")
    dirs = _listdir(root)[0]
    seen = f"; it has {', '.join(dirs[:8])}{' ...' if len(dirs) > 8 else ''}" if dirs else ""
    raise CdirError(f"no Office-Home domain folders (Art, Clipart, Product, Real World) in {root}"
                    f"{seen}")


def load_officehome(root: str | os.PathLike, domains: Iterable[str] | str | None = None,
                    split: str = "all", classes: Any = None,
                    progress: bool = False) -> pd.DataFrame:
    """Load Office-Home with canonical domain names ``Art``, ``Clipart``, ``Product``,
    ``Real World`` whatever the folders are called (``Real_World``, ``RealWorld``, ``Real``).

    ``root`` may be the dataset folder or the folder holding ``OfficeHomeDataset_10072016``. A
    UCDIR-style ``<Domain>/train/<Class>/`` level is recognised. ``domains`` accepts canonical
    names, folder names and the codes Ar, Cl, Pr, Rw. Office-Home has no official splits.
    """
    base = find_officehome_root(root)
    split = _check_split(split)
    keep = resolve_classes(classes)
    folders = officehome_dirs(base)
    available = [d for d in OFFICEHOME_DOMAINS if d in folders]
    chosen = _pick_domains(available, domains, base, _officehome_aliases(folders))
    others = [d for d in _listdir(base)[0] if _OH_FOLDERS.get(_norm(d)) is None]
    if others:
        warnings.warn(f"ignored folder(s) in {base} that are not Office-Home domains: "
                      f"{', '.join(others[:5])}", DataWarning, stacklevel=2)
    bar = _Progress(progress, "scanning Office-Home")
    rows: list[dict] = []
    seen: set[str] = set()
    try:
        for d in chosen:
            s = _scan_domain(base, folders[d], d, set(keep) if keep else None, bar)
            _warn_loose(folders[d], s.loose)
            rows.extend(s.rows)
            seen |= s.classes
    finally:
        bar.close()
    _check_unknown_classes(keep, seen)
    rows = _select_split(rows, split, base)
    _warn_coverage(rows, [d for d in chosen if any(r["domain"] == d for r in rows)])
    return _finish(rows, base)


# ---------------------------------------------------------------------------------------------
# DomainNet

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
        for f in _listdir(d)[1]:
            stem, ext = os.path.splitext(f)
            if ext.lower() != ".txt" or "_" not in stem:
                continue
            dom, sp = stem.rsplit("_", 1)
            if dom in DOMAINNET_DOMAINS and sp in ("train", "test"):
                out.setdefault(dom, {}).setdefault(sp, os.path.join(d, f))
    return out


def _domainnet_dirs(path: str) -> list[str]:
    dirs = set(_listdir(path)[0])
    return [d for d in DOMAINNET_DOMAINS if d in dirs]


def find_domainnet_root(root: str | os.PathLike) -> str:
    """The folder with the DomainNet domain folders or split files: ``root`` or a single
    sub-folder of it that has them (e.g. the parent of ``domainnet/`` or ``images/``)."""
    root = _existing_dir(root)
    if _domainnet_dirs(root) or domainnet_split_files(root):
        return root
    subs = [os.path.join(root, d) for d in _listdir(root)[0]]
    hits = [s for s in subs if _domainnet_dirs(s) or domainnet_split_files(s)]
    if len(hits) == 1:
        return hits[0]
    dirs = _listdir(root)[0]
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
    ``classes``: None (all 345), a subset name from :data:`CLASS_SUBSETS` (``"ucdir7"``,
    unverified), a list, a comma-separated string or a text file.
    """
    base = find_domainnet_root(root)
    split = _check_split(split)
    if split not in ("all", "train", "test"):
        raise CdirError(f"DomainNet has train and test splits, not {split!r}")
    keep = resolve_classes(classes)
    keep_set = set(keep) if keep else None
    lists = domainnet_split_files(base)
    dirs = _domainnet_dirs(base)
    available = [d for d in DOMAINNET_DOMAINS if d in lists or d in dirs]
    chosen = _pick_domains(available, domains, base)
    bar = _Progress(progress, "scanning DomainNet")
    rows: list[dict] = []
    seen: set[str] = set()
    missing: list[str] = []
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
                s = _scan_domain(base, d, d, keep_set, bar)
                _warn_loose(d, s.loose)
                rows.extend(s.rows)
                seen |= s.classes
                all_have_labels = False
                continue
            for sp, f in files.items():
                if f is None:
                    warnings.warn(f"{d}_{sp}.txt not found in {base}: the {d} images listed in "
                                  f"it are left out", DataWarning, stacklevel=2)
            got, gone = _domainnet_listed(base, d, files, keep_set, seen, bar)
            rows.extend(got)
            missing.extend(gone)
    finally:
        bar.close()
    _check_unknown_classes(keep, seen)
    if missing:
        shown = ", ".join(missing[:3])
        warnings.warn(f"{len(missing)} image(s) listed in the split files are missing on disk and "
                      f"were left out (e.g. {shown}); the images and the lists may come from "
                      "different releases (original vs cleaned)", DataWarning, stacklevel=2)
    if not all_have_labels or any(r.get("source_label") is None for r in rows):
        for r in rows:
            r.pop("source_label", None)
    present = [d for d in chosen if any(r["domain"] == d for r in rows)]
    _warn_coverage(rows, present, _KNOWN_GAPS)
    return _finish(rows, base, extra_columns=("source_label",), missing=missing)


def _domainnet_listed(base: str, domain: str, files: dict[str, str | None],
                      keep: set[str] | None, seen: set[str],
                      bar: _Progress) -> tuple[list[dict], list[str]]:
    """Rows for the images listed in one domain's split files, checked against the disk with one
    scandir per class folder (no stat per image)."""
    listed: list[tuple[str, int | None, str]] = []
    for sp, f in files.items():
        if f is not None:
            listed.extend((rel, lab, sp) for rel, lab in _read_split_file(f))
    # Where the listed relative paths start: the split file's folder, the dataset root, or a
    # sub-folder of it (e.g. DomainNet/images/<domain>, as ProtoOT lays it out).
    cands = [os.path.dirname(f) for f in files.values() if f is not None] + [base]
    cands += [os.path.join(base, d) for d in _listdir(base)[0] if d not in DOMAINNET_DOMAINS]
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
            on_disk[folder] = set(_listdir(os.path.join(img_base, folder))[1]) \
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
    return rows, gone


# ---------------------------------------------------------------------------------------------
# CSV / JSONL tables

_CLASS_COLUMNS = ("class_name", "class", "label")


def load_table(path: str | os.PathLike, domains: Iterable[str] | str | None = None,
               split: str = "all", classes: Any = None, check_files: bool = True) -> pd.DataFrame:
    """Load a table with one row per image: CSV, TSV, JSONL/NDJSON, JSON records or Parquet.

    Columns: ``path`` (absolute, or relative to the table's folder), ``domain``, and the class in
    ``class_name``, ``class`` or ``label`` (first found; an integer ``label`` becomes a zero-padded
    name so that sorted names keep numeric order). Optional: ``id`` (else the path as written,
    normalised), ``split``, any extra columns (kept). Rows whose file does not exist are dropped
    with a warning when ``check_files``.
    """
    import pandas as pd

    p = os.path.abspath(os.path.expanduser(os.fspath(path)))
    if not os.path.exists(p):
        raise CdirError(f"table {p} does not exist")
    if os.path.isdir(p):
        raise CdirError(f"{p} is a folder: `cdir data csv` needs a .csv/.jsonl file "
                        "(use `cdir data folder` for a folder of images)")
    ext = os.path.splitext(p)[1].lower()
    try:
        if ext in (".csv", ".tsv", ".txt"):
            df = pd.read_csv(p, sep="\t" if ext == ".tsv" else ",", encoding="utf-8-sig")
        elif ext in (".jsonl", ".ndjson"):
            df = pd.read_json(p, lines=True, dtype=False)
        elif ext == ".json":
            df = pd.read_json(p, dtype=False)
        elif ext in (".parquet", ".pq"):
            df = pd.read_parquet(p)
        else:
            raise CdirError(f"unknown table format {ext or '(none)'} for {p}: use .csv, .tsv, "
                            ".jsonl or .parquet")
    except CdirError:
        raise
    except Exception as e:  # pandas raises many kinds; the user needs one line
        raise CdirError(f"cannot read table {p}: {e.__class__.__name__}: {e}") from None
    df.columns = [str(c).strip() for c in df.columns]
    cls_col = next((c for c in _CLASS_COLUMNS if c in df.columns), None)
    missing_cols = [c for c in ("path", "domain") if c not in df.columns]
    if cls_col is None:
        missing_cols.append("class (or class_name/label)")
    if missing_cols:
        raise CdirError(f"table {p} lacks column(s) {', '.join(missing_cols)}; it has "
                        f"{', '.join(df.columns) or 'none'}")
    if len(df) == 0:
        raise CdirError(f"table {p} has no rows: the gallery is empty")
    for c in ("path", "domain", cls_col):
        bad = df[c].isna() | (df[c].astype(str).str.strip() == "")
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise CdirError(f"table {p}: empty {c!r} in data row {i + 1}")

    base = os.path.dirname(p)
    cls = df[cls_col]
    if pd.api.types.is_integer_dtype(cls):
        width = len(str(int(cls.max())))
        names = [f"{int(v):0{width}d}" for v in cls]
    elif pd.api.types.is_float_dtype(cls) and (cls == cls.round()).all():
        width = len(str(int(cls.max())))
        names = [f"{int(v):0{width}d}" for v in cls]
    else:
        names = [str(v).strip() for v in cls]

    extras = [c for c in df.columns
              if c not in ("id", "path", "domain", "split", cls_col, "label", "class_name")]
    rename = {"label": "source_label"} if "label" in df.columns and cls_col != "label" else {}
    if "class_name" in df.columns and cls_col != "class_name":
        rename["class_name"] = "source_class_name"
    extra_cols = tuple(rename.get(c, c) for c in extras + list(rename))
    keep = resolve_classes(classes)
    split = _check_split(split)
    records = df.to_dict("records")
    rows: list[dict] = []
    gone: list[str] = []
    for rec, name in zip(records, names, strict=True):
        raw = os.path.expanduser(str(rec["path"]).strip())
        full = raw if os.path.isabs(raw) else os.path.join(base, raw)
        full = os.path.normpath(full)
        has_id = "id" in rec and not pd.isna(rec["id"])
        rid = str(rec["id"]) if has_id else os.path.normpath(raw).replace(os.sep, "/")
        has_split = "split" in rec and not pd.isna(rec["split"])
        row = {"id": rid, "path": full, "domain": str(rec["domain"]).strip(), "class_name": name,
               "split": str(rec["split"]).strip() if has_split else "all"}
        for c in extras:
            row[c] = rec[c]
        for c, new in rename.items():
            row[new] = rec[c]
        rows.append(row)
    available = sorted({r["domain"] for r in rows})
    if domains is not None:
        chosen = set(_pick_domains(available, domains, p))
        rows = [r for r in rows if r["domain"] in chosen]
    if keep is not None:
        _check_unknown_classes(keep, {r["class_name"] for r in rows})
        ks = set(keep)
        rows = [r for r in rows if r["class_name"] in ks]
    rows = _select_split(rows, split, p)
    if check_files:
        exists = [os.path.isfile(r["path"]) for r in rows]
        gone = [r["id"] for r, ok in zip(rows, exists, strict=True) if not ok]
        rows = [r for r, ok in zip(rows, exists, strict=True) if ok]
        if gone:
            warnings.warn(f"{len(gone)} file(s) listed in {os.path.basename(p)} do not exist and "
                          f"were left out (e.g. {', '.join(gone[:3])})", DataWarning, stacklevel=2)
    _warn_coverage(rows, sorted({r["domain"] for r in rows}))
    return _finish(rows, p, extra_columns=extra_cols, missing=gone)
