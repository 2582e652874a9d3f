"""The gallery manifest: one row per image (id, path, domain, label, class_name, split, extras,
and the file's size, mtime and — once it changed — content hash).

Row order is canonical: embeddings, indexes and evaluation all refer to manifest rows by position.
Labels are indices into the byte-sorted list of all class names, as in the UCDIR literature.

What each image file holds is tracked by `stamp_files` (``file_size``, ``file_mtime_ns``,
``file_sha256``): a stat per file on every `cdir data`, and a content hash only for a file whose
size or mtime differ from the previous manifest's record, so a rewritten file is told from a
merely touched one without reading every image each time. `row_versions` names the content of
each row; stores record it with each vector, and `fingerprint` covers it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path, sha256_file

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["id", "path", "domain", "label", "class_name", "split"]
FILE_COLUMNS = ("file_size", "file_mtime_ns", "file_sha256")  # written by stamp_files


def make_manifest(rows: list[dict], extra_columns: tuple[str, ...] = ()) -> pd.DataFrame:
    """Build a manifest from dicts with id, path, domain, class_name (and optional split, extras).

    Labels are assigned from the byte-sorted class names; rows are sorted by (domain, class, id)
    so the same files always give the same manifest.
    """
    import pandas as pd

    if not rows:
        raise CdirError("the gallery is empty: no images were found")
    df = pd.DataFrame(rows)
    if "split" not in df:
        df["split"] = "all"
    df["split"] = df["split"].fillna("all").astype(str)
    classes = sorted(df["class_name"].astype(str).unique())  # str sort = byte order for ASCII names
    df["label"] = df["class_name"].map({c: i for i, c in enumerate(classes)}).astype("int64")
    df = df.sort_values(["domain", "class_name", "id"], kind="stable").reset_index(drop=True)
    dup = df["id"][df["id"].duplicated()]
    if len(dup):
        raise CdirError(f"duplicate image ids in the gallery, e.g. {dup.iloc[0]!r}")
    extras = [c for c in df.columns if c not in COLUMNS]
    return df[COLUMNS + [c for c in extra_columns if c in extras] +
              [c for c in extras if c not in extra_columns]]


def validate(df: pd.DataFrame) -> None:
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise CdirError(f"manifest lacks column(s) {', '.join(missing)}")
    if len(df) == 0:
        raise CdirError("the gallery is empty: no images were found")


def save_manifest(df: pd.DataFrame, path: str | Path) -> None:
    validate(df)
    with atomic_path(path) as tmp:
        df.to_parquet(tmp, index=False)


def load_manifest(path: str | Path) -> pd.DataFrame:
    import pandas as pd

    path = Path(path)
    if not path.exists():
        raise CdirError(f"no manifest at {path}: create one with `cdir data ... -w WORKSPACE`")
    df = pd.read_parquet(path)
    validate(df)
    return df


def file_sha256(path: str) -> str:
    try:
        return "sha256:" + sha256_file(path)[:16]
    except OSError:
        return ""  # unreadable: the embed stage lists it


def bytes_sha256(data: bytes) -> str:
    """`file_sha256` of a file with these bytes."""
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def stamp_files(df: pd.DataFrame, previous: pd.DataFrame | None = None) -> int:
    """Record each image file's size and mtime in ``df`` (FILE_COLUMNS, in place) and carry over
    the content hash ``previous`` recorded for an unchanged file. A file whose size or mtime
    differ from ``previous``'s record of its path is hashed now; a file seen for the first time
    is not (a stat per file: `cdir data` never reads a whole gallery). Returns how many files
    were hashed."""
    before: dict[str, tuple] = {}
    if previous is not None and all(c in previous.columns for c in FILE_COLUMNS):
        before = {p: (int(n), int(t), h if isinstance(h, str) else "") for p, n, t, h in zip(
            previous["path"].astype(str), *(previous[c] for c in FILE_COLUMNS), strict=True)}
    sizes, mtimes, hashes = [], [], []
    hashed = 0
    for path in df["path"].astype(str):
        try:
            st = os.stat(path)
            size, mtime = int(st.st_size), int(st.st_mtime_ns)
        except OSError:
            size, mtime = -1, -1
        old = before.get(path)
        digest = ""
        if old is not None and size >= 0:
            if old[:2] == (size, mtime):
                digest = old[2]
            else:
                digest = file_sha256(path)
                hashed += 1
        sizes.append(size)
        mtimes.append(mtime)
        hashes.append(digest)
    df["file_size"] = sizes
    df["file_mtime_ns"] = mtimes
    df["file_sha256"] = hashes
    return hashed


def row_versions(df: pd.DataFrame) -> list[str | None]:
    """What each row's image holds, as facts a store compares with those it recorded
    (`cdir.core.store.same_version`): ``stat:SIZE:MTIME``, and ``sha256:HASH`` where the content
    hash is known; None for every row of a manifest written before files were tracked."""
    if not all(c in df.columns for c in FILE_COLUMNS):
        return [None] * len(df)
    return [f"stat:{n}:{t}" + (f" {h}" if isinstance(h, str) and h else "")
            for n, t, h in zip(*(df[c].tolist() for c in FILE_COLUMNS), strict=True)]


def fingerprint(df: pd.DataFrame) -> str:
    """A short hash of what identifies the gallery: ids, paths, domains and labels, in row order,
    and what the files hold (`row_versions`) once they are tracked: a changed image changes it."""
    h = hashlib.sha256()
    for col in ("id", "path", "domain", "label"):
        h.update(col.encode())
        h.update("\x1f".join(map(str, df[col].tolist())).encode("utf-8", "surrogateescape"))
    if all(c in df.columns for c in FILE_COLUMNS):  # (older manifests keep their fingerprint)
        h.update(b"content")
        h.update("\x1f".join(map(str, row_versions(df))).encode())
    return h.hexdigest()[:16]


def summary(df: pd.DataFrame) -> str:
    per_domain = df.groupby("domain", sort=True).size()
    parts = ", ".join(f"{d} {n}" for d, n in per_domain.items())
    n_classes = df["class_name"].nunique()
    splits = df.groupby("split", sort=True)["class_name"].nunique() if "split" in df else {}
    by_split = ("; classes by split: " + ", ".join(f"{s} {n}" for s, n in splits.items())
                if len(splits) > 1 else "")
    return f"{len(df)} images, {n_classes} classes, {len(per_domain)} domains ({parts}){by_split}"
