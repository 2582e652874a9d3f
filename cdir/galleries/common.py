"""What every gallery loader shares: named class subsets, scanning domain folders (read by
`cdir.core.tree`) and the rules for turning rows into a manifest (see :mod:`cdir.core.manifest`).

The loaders (``folder``, ``officehome``, ``domainnet``, ``table``; dispatched by
:data:`cdir.galleries.KINDS`) follow these rules:

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
from typing import TYPE_CHECKING

from cdir.core.errors import CdirError
from cdir.core.images import IMAGE_EXTENSIONS
from cdir.core.tree import is_image_name, listdir, scan_labelled
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
    # UCDIR, ProtoOT and DG-UCDIR evaluate DomainNet on 7 classes (7 clusters); this is the list
    # hard-coded in ProtoOT's data loader, and two UCDIR forks use the same one.
    "ucdir7": ClassSubset(
        name="ucdir7",
        dataset="domainnet",
        classes=("bird", "feather", "teapot", "tiger", "whale", "windmill", "zebra"),
        source="the 7-class list hard-coded in HCVLab/ProtoOT loader.py (the same list in two "
               "UCDIR forks)",
        verified=True,
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
# Scanning domain folders (`cdir.core.tree` reads the folders)

SPLIT_DIRS = ("train", "test", "val", "validation")


class Progress:
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
        bad = list(dict.fromkeys(self.bad))  # a folder listed twice reports its names once
        if bad:
            warnings.warn(f"{len(bad)} file or folder name(s) are not valid UTF-8 and were "
                          f"left out (rename them), e.g. {bad[0]}", DataWarning, stacklevel=3)


@dataclass
class DomainScan:
    rows: list[dict]
    classes: set[str]  # every class folder seen (before the subset filter)
    loose: int  # images directly in the domain (or split) folder: no class, ignored


def scan_domain(root: str, rel: str, domain: str, keep: set[str] | None,
                bar: Progress) -> DomainScan:
    """Rows for ``root/rel/<class>/...`` or, with a split level,
    ``root/rel/<split>/<class>/...``."""
    dirs, files = listdir(os.path.join(root, rel), bar.bad)
    levels: list[tuple[str, str]]  # (relative folder holding class folders, split)
    if dirs and all(d.lower() in SPLIT_DIRS for d in dirs):
        levels = [(f"{rel}/{d}", d.lower()) for d in dirs]
        loose = sum(map(is_image_name, files))  # beside the split folders
    else:
        levels = [(rel, "all")]
        loose = 0  # the scan of the domain folder itself counts them
    scan = DomainScan([], set(), loose)
    for lrel, split in levels:
        found = scan_labelled(os.path.join(root, lrel), keep, lrel, bar.bad, bar.update)
        scan.rows.extend({"id": r, "path": os.path.join(root, r), "domain": domain,
                          "class_name": cls, "split": split} for r, cls in found.rows)
        scan.classes |= found.classes
        scan.loose += len(found.loose)
    return scan


# ---------------------------------------------------------------------------------------------
# Shared checks


def existing_dir(root: str | os.PathLike, what: str = "dataset folder") -> str:
    p = os.path.abspath(os.path.expanduser(os.fspath(root)))
    if not os.path.exists(p):
        raise CdirError(f"{what} {p} does not exist")
    if not os.path.isdir(p):
        raise CdirError(f"{what} {p} is not a folder")
    return p


def pick_domains(available: Sequence[str], wanted: Iterable[str] | str | None, root: str,
                  aliases: dict[str, str] | None = None) -> list[str]:
    """The requested domains in the given order (all available ones when None).

    A name matches exactly, then through ``aliases`` (keys normalised by :func:`norm`), then
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
        elif aliases and norm(w) in aliases and aliases[norm(w)] in available:
            hit = aliases[norm(w)]
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


def norm(name: str) -> str:
    return "".join(ch for ch in name.lower() if ch.isalnum())


def check_split(split: str) -> str:
    s = (split or "all").lower()
    if s not in ("all", *SPLIT_DIRS):
        raise CdirError(f"unknown split {split!r}: use all, train or test")
    return s


def check_unknown_classes(keep: list[str] | None, seen: set[str]) -> None:
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


def warn_coverage(rows: list[dict], domains: Sequence[str],
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


def finish(rows: list[dict], where: str, extra_columns: tuple[str, ...] = (),
            missing: list[str] | None = None) -> pd.DataFrame:
    from cdir.core.manifest import make_manifest

    if not rows:
        raise CdirError(f"no images found in {where} (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))} files)")
    df = make_manifest(rows, extra_columns=extra_columns)
    df.attrs["root"] = where  # the folder the ids are relative to (the table file for tables)
    df.attrs["missing"] = list(missing or [])
    return df


def select_split(rows: list[dict], split: str, where: str) -> list[dict]:
    if split == "all":
        return rows
    kept = [r for r in rows if r["split"] == split]
    if rows and not kept:
        have = sorted({r["split"] for r in rows})
        raise CdirError(f"no {split!r} images in {where} (splits found: {', '.join(have)}); "
                        "use one of those or --split all")
    return kept


def warn_loose(domain: str, n: int) -> None:
    if n:
        warnings.warn(f"{n} image(s) directly in the {domain!r} folder have no class folder and "
                      "were ignored", DataWarning, stacklevel=3)
