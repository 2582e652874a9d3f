"""`cdir data {folder,officehome,domainnet,csv,emoji}`: describe a gallery as a workspace manifest.

Writes ``WORKSPACE/manifest.parquet`` (one row per image) and ``WORKSPACE/gallery.json`` (dataset
kind, source root, fingerprint, per-domain counts, parameters). Images are found by extension and
not decoded here; ``cdir embed`` decodes them and lists the corrupt ones.
"""

from __future__ import annotations

import argparse

KINDS = {
    "folder": "a ROOT/<domain>/<class>/<image> tree",
    "officehome": "Office-Home (Art, Clipart, Product, Real World; renamed folders accepted)",
    "domainnet": "DomainNet (split files <domain>_{train,test}.txt, or the bare folders)",
    "csv": "a CSV/TSV/JSONL/Parquet table with path, domain and class columns",
    "emoji": "the built-in emoji gallery (3 art sets; no download needed)",
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "data", help="describe a gallery: write the workspace manifest",
        description="Scan a dataset and write WORKSPACE/manifest.parquet (id, path, domain, "
        "label, class_name, split) and WORKSPACE/gallery.json. Labels are the index of the class "
        "name in the byte-sorted class names, as in the UCDIR literature.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, help_text in KINDS.items():
        k = kinds.add_parser(kind, help=help_text, description=help_text)
        if kind != "emoji":
            k.add_argument("root", metavar="TABLE" if kind == "csv" else "ROOT",
                           help="the table file" if kind == "csv" else "the dataset folder")
        k.add_argument("-w", "--workspace", required=True, help="workspace folder")
        if kind == "emoji":
            k.add_argument("--limit", type=int, default=None,
                           help="keep N emoji categories (evenly spread), for small galleries")
            k.add_argument("--size", type=int, default=128,
                           help="image size in pixels (default: 128)")
        else:
            k.add_argument("--domains", help="comma-separated domains to keep (default: all)")
            k.add_argument("--classes", help="class subset: a,b,c | FILE.txt"
                           + (" | ucdir7 (unverified placeholder list)"
                              if kind == "domainnet" else ""))
            k.add_argument("--split", default="all",
                           choices=("all", "train", "test") if kind == "domainnet"
                           else ("all", "train", "test", "val"),
                           help="which split to keep, default all" + (
                               " (train/test need the official split files)"
                               if kind == "domainnet" else " (folder layouts with a "
                               "<domain>/<split>/<class> level, or a table's split column)"))
        k.set_defaults(func=run)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import sys
    import warnings

    from cdir import datasets
    from cdir.errors import CdirError
    from cdir.io import write_json, write_text
    from cdir.manifest import fingerprint, save_manifest, summary
    from cdir.workspace import Workspace

    kind = getattr(args, "kind", None)
    if kind not in KINDS:
        raise CdirError(f"unknown gallery kind {kind!r}: use one of {', '.join(KINDS)}")
    ws = Workspace(os.path.abspath(os.path.expanduser(args.workspace)))
    domains = getattr(args, "domains", None)
    classes = getattr(args, "classes", None)
    split = getattr(args, "split", None) or "all"
    params: dict = {"domains": domains, "classes": classes, "split": split}

    if kind == "emoji":
        from cdir.emoji import build_emoji_gallery

        limit = getattr(args, "limit", None)
        size = getattr(args, "size", None) or 128
        root = str(ws.root / "gallery")
        params = {"limit": limit, "size": size}
        build_emoji_gallery(root, size=size, limit=limit)
    else:
        root = os.path.abspath(os.path.expanduser(args.root))
        if not os.path.exists(root):
            what = "table" if kind == "csv" else "dataset folder"
            raise CdirError(f"{what} {root} does not exist")
        if kind == "folder":
            _check_workspace_outside(ws.root, root)
    print(f"cdir data {kind}: scanning {root}", file=sys.stderr)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", datasets.DataWarning)
        if kind == "emoji":
            df = datasets.load_folder(root, progress=True)
        elif kind == "folder":
            df = datasets.load_folder(root, domains, split=split, classes=classes, progress=True)
        elif kind == "officehome":
            df = datasets.load_officehome(root, domains, split=split, classes=classes,
                                          progress=True)
        elif kind == "domainnet":
            df = datasets.load_domainnet(root, domains, split=split, classes=classes,
                                         progress=True)
        else:
            df = datasets.load_table(root, domains, split=split, classes=classes)
    for w in caught:
        if issubclass(w.category, datasets.DataWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.showwarning(w.message, w.category, w.filename, w.lineno)

    root = str(df.attrs.get("root") or root)  # e.g. OfficeHomeDataset_10072016/ below ROOT
    missing = list(df.attrs.pop("missing", []) or [])
    df.attrs.clear()  # keep the parquet metadata small
    if classes:
        params["class_list"] = sorted(df["class_name"].unique().tolist())
    old = ws.info().get("fingerprint") if ws.info_path.exists() else None
    fp = fingerprint(df)
    save_manifest(df, ws.manifest_path)
    missing_path = ws.root / "missing_images.txt"
    if missing:
        write_text(missing_path, "\n".join(missing) + "\n")
    elif missing_path.exists():
        missing_path.unlink()
    counts = {str(d): int(n) for d, n in df.groupby("domain", sort=True).size().items()}
    write_json(ws.info_path, {
        "dataset": "table" if kind == "csv" else kind,
        "root": root,
        "fingerprint": fp,
        "counts": counts,
        "classes": int(df["class_name"].nunique()),
        "params": params,
    })
    if old and old != fp:
        print(f"note: the gallery changed (fingerprint {old} -> {fp}); later stages will "
              "recompute what depends on it", file=sys.stderr)
    extra = f"; {len(missing)} listed image(s) missing, see {missing_path}" if missing else ""
    print(f"wrote {ws.manifest_path}: {summary(df)}{extra}")
    return 0


def _check_workspace_outside(ws_root: object, data_root: str) -> None:
    """For `folder` galleries: a workspace inside the image folder would be scanned as a domain
    (its plots are images). Hidden folders are skipped by the scan, so ROOT/.cdir is fine."""
    import os

    from cdir.errors import CdirError

    rel = os.path.relpath(os.path.realpath(ws_root), os.path.realpath(data_root))
    inside = rel == "." or not (rel == ".." or rel.startswith(".." + os.sep))
    if inside and (rel == "." or not rel.split(os.sep)[0].startswith(".")):
        raise CdirError(f"the workspace {ws_root} is inside the image folder {data_root}: its "
                        "files would be read as images; use a workspace outside it (or a hidden "
                        "folder such as ROOT/.cdir)")
