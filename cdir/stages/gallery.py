"""The gallery stage: scan a dataset into the workspace manifest.

Writes ``WORKSPACE/manifest.parquet`` (one row per image) and ``WORKSPACE/gallery.json`` (dataset
kind, source root, fingerprint, per-domain counts, parameters). Images are found by extension and
not decoded here; the embed and caption stages decode them and list the corrupt ones. Each file is
stat-ed (size, mtime) and, when those changed since the previous manifest, hashed, so a changed
image at the same path is re-embedded (`cdir.core.manifest.stamp_files`).
"""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.io import write_json, write_text
from cdir.core.manifest import (
    FILE_COLUMNS,
    fingerprint,
    load_manifest,
    save_manifest,
    stamp_files,
    summary,
)
from cdir.core.workspace import Workspace
from cdir.galleries import KINDS, DataWarning, recorded_name

if TYPE_CHECKING:
    import pandas as pd


def describe_gallery(workspace: str | os.PathLike, kind: str, root: str | os.PathLike | None = None,
                     domains: str | list[str] | None = None,
                     classes: str | list[str] | None = None, split: str = "all",
                     limit: int | None = None, size: int | None = 128,
                     progress: bool = True) -> dict[str, Any]:
    """Scan the gallery ``kind`` (a key of ``cdir.galleries.KINDS``) and write the manifest.

    ``domains`` and ``classes`` are comma-separated text or lists; ``classes`` may also name a file
    or a subset. ``limit`` and ``size`` apply to the emoji gallery only. Returns a summary with the
    manifest path, counts, fingerprint and the one-line ``summary``."""
    if kind not in KINDS:
        raise CdirError(f"unknown gallery kind {kind!r}: use one of {', '.join(KINDS)}")
    if size is None:
        size = 128
    elif isinstance(size, bool) or not isinstance(size, int) or size < 1:
        raise CdirError(f"the image size must be a positive number of pixels, got {size!r}")
    ws = Workspace(os.path.abspath(os.path.expanduser(str(workspace)))).create()
    if isinstance(domains, list | tuple):
        domains = ",".join(domains)
    if isinstance(classes, list | tuple):
        classes = ",".join(classes)
    split = split or "all"
    params: dict = {"domains": domains, "classes": classes, "split": split}

    gk = KINDS[kind]
    if gk.build:  # rendered into the workspace first: from a source folder, or built in
        source = None if root is None else os.path.abspath(os.path.expanduser(str(root)))
        root = str(ws.root / "gallery")
        params = {"limit": limit, "size": size} | ({"source": source} if source else {})
        gk.render(kind, source, root, size=size, limit=limit, progress=progress)
    else:
        if root is None:
            raise CdirError(f"the {kind} gallery needs its "
                            f"{'table' if gk.source == 'TABLE' else 'root'}")
        root = os.path.abspath(os.path.expanduser(str(root)))
        if not os.path.exists(root):
            what = "table" if gk.source == "TABLE" else "dataset folder"
            raise CdirError(f"{what} {root} does not exist")
        if gk.any_folder_a_domain:
            _check_workspace_outside(ws.root, root)
    print(f"cdir data {kind}: scanning {root}", file=sys.stderr)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", DataWarning)
        df = KINDS[kind].load(root, domains=domains, split=split, classes=classes,
                              progress=progress)
    for w in caught:
        if issubclass(w.category, DataWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    if gk.category_split:
        from cdir.galleries.splits import category_split

        df["split"] = df["class_name"].astype(str).map(category_split)
    root = str(df.attrs.get("root") or root)  # e.g. OfficeHomeDataset_10072016/ below ROOT
    missing = list(df.attrs.pop("missing", []) or [])
    df.attrs.clear()  # keep the parquet metadata small
    if classes:
        params["class_list"] = sorted(df["class_name"].unique().tolist())
    old = ws.info().get("fingerprint") if ws.info_path.exists() else None
    previous = None
    if ws.manifest_path.exists():
        try:
            previous = load_manifest(ws.manifest_path)
        except Exception:  # noqa: BLE001 - an unreadable old manifest is simply replaced
            previous = None
    # size + mtime of every file (a stat each); files changed since the last run are hashed
    stamp_files(df, previous)
    fp = fingerprint(df)
    save_manifest(df, ws.manifest_path)
    missing_path = ws.root / "missing_images.txt"
    if missing:
        write_text(missing_path, "\n".join(missing) + "\n")
    elif missing_path.exists():
        missing_path.unlink()
    counts = {str(d): int(n) for d, n in df.groupby("domain", sort=True).size().items()}
    write_json(ws.info_path, {
        "dataset": recorded_name(kind),
        "root": root,
        "fingerprint": fp,
        "counts": counts,
        "classes": int(df["class_name"].nunique()),
        "params": params,
    })
    if old and old != fp and previous is not None and FILE_COLUMNS[0] not in previous.columns:
        # a manifest of an older cdir: its fingerprint did not cover the files yet
        print(f"note: the manifest now tracks each file's size, mtime and hash (fingerprint "
              f"{old} -> {fp}); embeddings are kept, indexes need `cdir index build` once",
              file=sys.stderr)
    elif old and old != fp:
        print(f"note: the gallery changed (fingerprint {old} -> {fp}); later stages will "
              "recompute what depends on it", file=sys.stderr)
    extra = f"; {len(missing)} listed image(s) missing, see {missing_path}" if missing else ""
    return {"manifest": str(ws.manifest_path), "root": root, "fingerprint": fp,
            "counts": counts, "missing": len(missing),
            "summary": f"wrote {ws.manifest_path}: {summary(df)}{extra}"}


def _check_workspace_outside(ws_root: Path, data_root: str) -> None:
    """For `folder` galleries: a workspace inside the image folder would be scanned as a domain
    (its plots are images). Hidden folders are skipped by the scan, so ROOT/.cdir is fine."""
    rel = os.path.relpath(os.path.realpath(ws_root), os.path.realpath(data_root))
    inside = rel == "." or not (rel == ".." or rel.startswith(".." + os.sep))
    if inside and (rel == "." or not rel.split(os.sep)[0].startswith(".")):
        raise CdirError(f"the workspace {ws_root} is inside the image folder {data_root}: its "
                        "files would be read as images; use a workspace outside it (or a hidden "
                        "folder such as ROOT/.cdir)")


def restamp(ws: Workspace, df: pd.DataFrame, save: bool = True) -> tuple[pd.DataFrame, int]:
    """(the manifest ``df`` with each image file's size and mtime as they are now, how many
    files were hashed): a file whose size or mtime differ from the record is hashed again
    (`stamp_files`), so what it holds now is known without `cdir data` having run since it
    changed. With ``save`` the refreshed records replace the workspace's manifest (and its
    fingerprint) when any changed: later stages then compare stored vectors with what the files
    hold. A file that cannot be stat'ed keeps its record (a removed image leaves the manifest
    when `cdir data` scans the gallery again). A manifest written before files were tracked is
    returned as it is."""
    if not all(c in df.columns for c in FILE_COLUMNS):
        return df, 0
    now = df.copy()
    hashed = stamp_files(now, df)
    cols = list(FILE_COLUMNS)
    gone = (now["file_size"] < 0).to_numpy()  # removed files are `cdir data`'s to drop
    now.loc[gone, cols] = df.loc[gone, cols]
    if now[cols].astype(str).equals(df[cols].astype(str)):
        return df, hashed
    if save:
        save_manifest(now, ws.manifest_path)
        if ws.info_path.exists():
            write_json(ws.info_path, {**ws.info(), "fingerprint": fingerprint(now)})
    return now, hashed
