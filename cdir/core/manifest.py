"""The gallery manifest: one row per image (id, path, domain, label, class_name, split, extras).

Row order is canonical: embeddings, indexes and evaluation all refer to manifest rows by position.
Labels are indices into the byte-sorted list of all class names, as in the UCDIR literature.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["id", "path", "domain", "label", "class_name", "split"]


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


def fingerprint(df: pd.DataFrame) -> str:
    """A short hash of what identifies the gallery: ids, paths, domains and labels, in row order."""
    h = hashlib.sha256()
    for col in ("id", "path", "domain", "label"):
        h.update(col.encode())
        h.update("\x1f".join(map(str, df[col].tolist())).encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def summary(df: pd.DataFrame) -> str:
    per_domain = df.groupby("domain", sort=True).size()
    parts = ", ".join(f"{d} {n}" for d, n in per_domain.items())
    n_classes = df["class_name"].nunique()
    return f"{len(df)} images, {n_classes} classes, {len(per_domain)} domains ({parts})"
