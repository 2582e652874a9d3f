"""The one folder scan, for galleries (`cdir.galleries`) and the trainers' data modules alike.

Images are recognised by extension only (:data:`cdir.core.images.IMAGE_EXTENSIONS`); nothing is
decoded here. Folders are read with ``os.scandir`` (no stat per file); hidden entries (``.*``)
and macOS ``__MACOSX`` folders are skipped; names are byte-sorted, and a tree is walked depth
first, a folder's own images before those of its sub-folders. Symbolic links are followed, each
real folder once, so a link loop ends.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cdir.core.errors import CdirError
from cdir.core.images import IMAGE_EXTENSIONS

_JUNK_DIRS = {"__MACOSX"}


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _JUNK_DIRS


def is_image_name(name: str) -> bool:
    return os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def _utf8(name: str) -> bool:
    if name.isascii():
        return True
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:  # undecodable bytes in the name (surrogate escapes)
        return False


def listdir(path: str, bad: list[str] | None = None, utf8: bool = True
            ) -> tuple[list[str], list[str]]:
    """(sub-folder names, file names) of ``path``, hidden ones left out, both sorted. With
    ``utf8``, names that are not valid UTF-8 (a manifest cannot store them) are left out too and,
    if ``bad`` is given, appended to it."""
    dirs, files = [], []
    try:
        with os.scandir(path) as it:
            for e in it:
                if _hidden(e.name):
                    continue
                if utf8 and not _utf8(e.name):
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


def images_under(folder: str, rel: str = "", bad: list[str] | None = None, utf8: bool = True
                 ) -> list[str]:
    """The image files under ``folder``, recursively, as POSIX paths relative to it, each
    prefixed with ``rel/`` when ``rel`` is given. ``bad`` and ``utf8`` as in :func:`listdir`."""
    out: list[str] = []
    stack = [(folder, rel)]
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
        dirs, files = listdir(a, bad, utf8)
        prefix = f"{r}/" if r else ""
        out.extend(prefix + f for f in files if is_image_name(f))
        stack.extend((os.path.join(a, d), prefix + d) for d in reversed(dirs))
    return out


def list_images(root: str | os.PathLike) -> list[str]:
    """Every image file under the folder ``root`` (``root`` joined with its relative path, in
    scan order); names are kept whatever their encoding. CdirError when there is none."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise CdirError(f"no folder at {root}")
    out = [os.path.join(root, *r.split("/")) for r in images_under(root, utf8=False)]
    if not out:
        raise CdirError(f"no images found under {root} (looked for {sorted(IMAGE_EXTENSIONS)})")
    return out


@dataclass
class LabelledScan:
    """A ``<class>/<image>`` folder: its images as (relative path, class folder), in scan
    order."""

    rows: list[tuple[str, str]] = field(default_factory=list)
    classes: set[str] = field(default_factory=set)  # every class folder seen, kept or not
    loose: list[str] = field(default_factory=list)  # images directly in the folder: no class


def scan_labelled(root: str | Path, keep: set[str] | None = None, rel: str = "",
                  bad: list[str] | None = None,
                  found: Callable[[int], None] | None = None) -> LabelledScan:
    """The images of ``root/<class>/...`` (any depth below the class folder), of the classes in
    ``keep`` (default all); paths relative to ``root``, prefixed with ``rel/`` when given.
    ``found(n)`` is told each class folder's count as it is read; ``bad`` as in
    :func:`listdir`."""
    root = os.fspath(root)
    prefix = f"{rel}/" if rel else ""
    dirs, files = listdir(root, bad)
    scan = LabelledScan(loose=[prefix + f for f in files if is_image_name(f)])
    for cls in dirs:
        scan.classes.add(cls)
        if keep is not None and cls not in keep:
            continue
        images = images_under(os.path.join(root, cls), prefix + cls, bad)
        scan.rows.extend((r, cls) for r in images)
        if found is not None:
            found(len(images))
    return scan
