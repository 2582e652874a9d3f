"""Office-Home: ``Art``, ``Clipart``, ``Product``, ``Real World`` and the common renames, an
optional UCDIR-style ``train/`` level, the archive's top folder."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.tree import listdir
from cdir.galleries import DataWarning, common

if TYPE_CHECKING:
    import pandas as pd


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
    dirs, _ = listdir(path)
    found: dict[str, str] = {}
    for d in dirs:
        canon = _OH_FOLDERS.get(common.norm(d))
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
    return {**_OH_ALIASES, **{common.norm(f): c for c, f in folders.items()}}


def officehome_domain(name: str, folders: dict[str, str]) -> str | None:
    """The canonical Office-Home domain that ``name`` means (a canonical name, a folder name or a
    code such as Ar, Rw), or None; ``folders`` from :func:`officehome_dirs`."""
    return name if name in folders else _officehome_aliases(folders).get(common.norm(name))


def find_officehome_root(root: str | os.PathLike) -> str:
    """The folder that holds the Office-Home domain folders: ``root`` itself, its
    ``OfficeHomeDataset_10072016`` folder, or its single sub-folder that has them."""
    root = common.existing_dir(root)
    if officehome_dirs(root):
        return root
    top = os.path.join(root, OFFICEHOME_ARCHIVE_DIR)
    if os.path.isdir(top) and officehome_dirs(top):
        return top
    subs = [os.path.join(root, d) for d in listdir(root)[0]]
    hits = [s for s in subs if officehome_dirs(s)]
    if len(hits) == 1:
        return hits[0]
    if len(hits) > 1:
        raise CdirError(f"several Office-Home copies below {root}: "
                        f"{', '.join(os.path.basename(h) for h in hits)}; pass one of them")
    dirs = listdir(root)[0]
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
    split = common.check_split(split)
    keep = common.resolve_classes(classes)
    folders = officehome_dirs(base)
    available = [d for d in OFFICEHOME_DOMAINS if d in folders]
    chosen = common.pick_domains(available, domains, base, _officehome_aliases(folders))
    others = [d for d in listdir(base)[0] if _OH_FOLDERS.get(common.norm(d)) is None]
    if others:
        warnings.warn(f"ignored folder(s) in {base} that are not Office-Home domains: "
                      f"{', '.join(others[:5])}", DataWarning, stacklevel=2)
    bar = common.Progress(progress, "scanning Office-Home")
    rows: list[dict] = []
    seen: set[str] = set()
    try:
        for d in chosen:
            s = common.scan_domain(base, folders[d], d, set(keep) if keep else None, bar)
            common.warn_loose(folders[d], s.loose)
            rows.extend(s.rows)
            seen |= s.classes
    finally:
        bar.close()
    common.check_unknown_classes(keep, seen)
    rows = common.select_split(rows, split, base)
    common.warn_coverage(rows, [d for d in chosen if any(r["domain"] == d for r in rows)])
    return common.finish(rows, base)
