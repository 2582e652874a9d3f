"""A CSV/TSV/JSONL/Parquet table with path, domain and class columns, one row per image."""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.galleries import DataWarning, common

if TYPE_CHECKING:
    import pandas as pd


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
    keep = common.resolve_classes(classes)
    split = common.check_split(split)
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
        chosen = set(common.pick_domains(available, domains, p))
        rows = [r for r in rows if r["domain"] in chosen]
    if keep is not None:
        common.check_unknown_classes(keep, {r["class_name"] for r in rows})
        ks = set(keep)
        rows = [r for r in rows if r["class_name"] in ks]
    rows = common.select_split(rows, split, p)
    if check_files:
        exists = [os.path.isfile(r["path"]) for r in rows]
        gone = [r["id"] for r, ok in zip(rows, exists, strict=True) if not ok]
        rows = [r for r, ok in zip(rows, exists, strict=True) if ok]
        if gone:
            warnings.warn(f"{len(gone)} file(s) listed in {os.path.basename(p)} do not exist and "
                          f"were left out (e.g. {', '.join(gone[:3])})", DataWarning, stacklevel=2)
    common.warn_coverage(rows, sorted({r["domain"] for r in rows}))
    return common.finish(rows, p, extra_columns=extra_cols, missing=gone)
