"""Datasets and samplers for self-supervised pretraining and SSL evaluation.

- :func:`list_images`, :func:`gather_images` and :class:`UnlabelledImages`: the training images,
  every image under a folder (recursive), listed in a manifest file or a workspace's manifest,
  one source or several; each item is ``(views, index, ok)``. A corrupt
  image is replaced by the next readable one and flagged ``ok=False`` so that the trainer can list
  it; a run never dies on one bad file.
- :func:`labelled_set`: a labelled folder (``root/<class>/<img>`` or
  ``root/<domain>/<class>/<img>``, e.g. the emoji gallery) or a manifest (``path``, ``label`` and
  optional ``domain`` columns) for kNN, linear probe and the training monitor, read through
  ``cdir.core.images.ImageList``.

The training order is the engine's ``DistributedSampler`` (one replica in one process): a pure
function of (seed, epoch), so a resumed run sees the data in the order an uninterrupted one did.

Images are decoded by ``cdir.core.images.load_image`` and gallery manifests read by
``cdir.core.manifest.load_manifest``, as everywhere else in the project.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch.utils.data import Dataset

from cdir.core import tree
from cdir.core.errors import CdirError
from cdir.core.images import DECODE_ERRORS, load_image

if TYPE_CHECKING:
    import pandas as pd

MANIFEST_SUFFIXES = {".parquet", ".csv"}

# How many following images to try when one is unreadable before giving up on the batch.
_MAX_SUBSTITUTES = 32


def read_manifest(path: Path) -> pd.DataFrame:
    """The rows of a manifest file, paths made absolute (relative ones are relative to the file's
    folder). A gallery manifest (a workspace's manifest.parquet, with every column of
    ``cdir.core.manifest``) is read and checked by ``load_manifest``; any other .parquet/.csv
    table needs only a ``path`` column."""
    import pandas as pd

    from cdir.core.manifest import COLUMNS, load_manifest

    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        gallery = set(COLUMNS) <= set(pq.read_schema(path).names)
        df = load_manifest(path) if gallery else pd.read_parquet(path)
    else:
        df = pd.read_csv(path)
    if "path" not in df.columns:
        raise CdirError(f"{path}: a manifest needs a 'path' column (found {list(df.columns)})")
    base = path.parent
    df["path"] = [str(p if os.path.isabs(p) else base / p) for p in df["path"].astype(str)]
    return df


def list_images(root: str | os.PathLike) -> list[str]:
    """All image files under ``root`` (`cdir.core.tree.list_images`), the ``path`` column of a
    manifest file (.parquet/.csv), or of a workspace's manifest (its reports are not images to
    train on)."""
    root = Path(root)
    if (root / "manifest.parquet").is_file():
        root = root / "manifest.parquet"
    if root.is_file() and root.suffix.lower() in MANIFEST_SUFFIXES:
        return list(read_manifest(root)["path"])
    if not root.is_dir():
        raise CdirError(f"no image folder at {root}: pass --data DIR (a folder of images)")
    return tree.list_images(root)


def gather_images(sources: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """The images of one source or of several (`list_images` each), in order, each file once."""
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    seen: set[str] = set()
    out = []
    for source in sources:
        for path in list_images(source):
            key = os.path.realpath(path)
            if key not in seen:
                seen.add(key)
                out.append(path)
    return out


class UnlabelledImages(Dataset):
    """Images with no labels; ``transform`` maps a PIL image to one tensor or a list of views."""

    def __init__(self, paths: Sequence[str], transform: Callable) -> None:
        if not paths:
            raise CdirError("the training set is empty")
        self.paths = list(paths)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[object, int, bool]:
        n = len(self.paths)
        for step in range(_MAX_SUBSTITUTES):
            path = self.paths[(index + step) % n]
            try:
                img = load_image(path)
            except DECODE_ERRORS:  # skip this file
                continue
            return self.transform(img), index, step == 0
        raise CdirError(
            f"{_MAX_SUBSTITUTES} unreadable images in a row from {self.paths[index]}; "
            "check the data folder"
        )


@dataclass
class LabelledSet:
    """A labelled image list. ``domains`` is None when the folder has no domain level."""

    paths: list[str]
    labels: list[int]
    class_names: list[str]
    domains: list[str] | None = None

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, rows: Sequence[int]) -> LabelledSet:
        return LabelledSet(
            [self.paths[i] for i in rows],
            [self.labels[i] for i in rows],
            self.class_names,
            None if self.domains is None else [self.domains[i] for i in rows],
        )


def labelled_set(source: str | os.PathLike | LabelledSet) -> LabelledSet:
    """A labelled set from a folder or a manifest file.

    Folder layouts: ``root/<class>/<image>`` (labels only) or ``root/<domain>/<class>/<image>``
    (the emoji gallery; labels and domains). Class names are byte-sorted and labels index them,
    as in the project manifest. A manifest (.parquet/.csv) needs ``path`` and ``label`` columns
    (``class_name`` and ``domain`` are used when present).

    The folder layouts are read here rather than by ``cdir.galleries`` (which encoders may not
    import): kNN needs only paths, labels and domains, not ids, splits or a workspace."""
    if isinstance(source, LabelledSet):
        return source
    root = Path(source)
    if root.is_file() and root.suffix.lower() in MANIFEST_SUFFIXES:
        df = read_manifest(root)
        if "label" not in df.columns:
            raise CdirError(f"{root}: a labelled manifest needs a 'label' column")
        labels = [int(v) for v in df["label"]]
        if "class_name" in df.columns:
            names = dict(zip(labels, df["class_name"].astype(str), strict=True))
            class_names = [names.get(i, str(i)) for i in range(max(labels) + 1)]
        else:
            class_names = [str(i) for i in range(max(labels) + 1)]
        domains = list(df["domain"].astype(str)) if "domain" in df.columns else None
        return LabelledSet(list(df["path"]), labels, class_names, domains)

    paths = list_images(root)
    rel = [Path(p).relative_to(root).parts for p in paths]
    depths = {len(r) for r in rel}
    if depths == {2}:
        classes = [r[0] for r in rel]
        domains = None
    elif depths == {3}:
        classes = [r[1] for r in rel]
        domains = [r[0] for r in rel]
    else:
        raise CdirError(
            f"{root}: expected root/<class>/<image> or root/<domain>/<class>/<image>, "
            f"found images at depths {sorted(depths)}"
        )
    class_names = sorted(set(classes))
    index = {c: i for i, c in enumerate(class_names)}
    return LabelledSet(paths, [index[c] for c in classes], class_names, domains)
