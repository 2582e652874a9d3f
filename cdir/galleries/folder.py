"""The generic gallery: a ``ROOT/<domain>/<class>/<image>`` tree (also the built-in emoji
gallery once written)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.tree import is_image_name, listdir
from cdir.galleries import common

if TYPE_CHECKING:
    import pandas as pd


def load_folder(root: str | os.PathLike, domains: Iterable[str] | str | None = None,
                split: str = "all", classes: Any = None, progress: bool = False) -> pd.DataFrame:
    """Load ``ROOT/<domain>/<class>/<image>`` (any depth below the class folder).

    ``domains`` selects domain folders (a list or "A,B"; rows are always sorted by domain, class,
    id); ``split`` keeps one split of a ``<domain>/<split>/<class>`` layout; ``classes`` is any
    :func:`common.resolve_classes` spec. Labels index the byte-sorted names of the classes kept.
    """
    root = common.existing_dir(root)
    split = common.check_split(split)
    keep = common.resolve_classes(classes)
    dom_dirs, files = listdir(root)
    if not dom_dirs:
        n = sum(map(is_image_name, files))
        extra = f"; it holds {n} image(s) directly" if n else ""
        raise CdirError(f"no domain folders in {root}: expected {root}/<domain>/<class>/<image>"
                        f"{extra}")
    chosen = common.pick_domains(dom_dirs, domains, root)
    bar = common.Progress(progress, f"scanning {os.path.basename(root) or root}")
    rows: list[dict] = []
    seen: set[str] = set()
    try:
        scans = {}
        for d in chosen:
            scans[d] = s = common.scan_domain(root, d, d, set(keep) if keep else None, bar)
            rows.extend(s.rows)
            seen |= s.classes
    finally:
        bar.close()
    if all(not s.classes for s in scans.values()) and any(s.loose for s in scans.values()):
        raise CdirError(f"{root} looks like ROOT/<class>/<image> (one level of folders, images "
                        f"inside): a gallery needs ROOT/<domain>/<class>/<image>; pass the parent "
                        f"folder or put these class folders inside a domain folder")
    for d, s in scans.items():
        common.warn_loose(d, s.loose)
    empty = [d for d in chosen if not scans[d].rows and not scans[d].loose]
    if empty and len(empty) < len(chosen):  # left out of the gallery: say which
        warnings.warn(f"{len(empty)} domain folder(s) hold no image in a class folder and are "
                      f"left out: {', '.join(empty)}", common.DataWarning, stacklevel=2)
    common.check_unknown_classes(keep, seen)
    rows = common.select_split(rows, split, root)
    common.warn_coverage(rows, [d for d in chosen if scans[d].rows])
    return common.finish(rows, root)
