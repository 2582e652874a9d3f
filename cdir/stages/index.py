"""Index jobs over a workspace: build/extend an index from stored embeddings, find and open one."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cdir.core.errors import CdirError
from cdir.core.workspace import Workspace, spec_key


def caption_spec(text_encoder: str, captions_key: str) -> str:
    """The spec recorded for an index over caption embeddings."""
    return f"{text_encoder}@captions:{captions_key}"


def index_vectors(ws: Workspace, manifest, args: argparse.Namespace):
    """(vectors, valid mask, spec) of what `cdir index build` was asked to index."""
    from cdir.stages.modes import caption_vectors, image_vectors

    if args.captions or args.text_encoder:
        if not args.text_encoder:
            raise CdirError("indexing captions needs --text-encoder (the one used by cdir embed)")
        from cdir.stages.embed_captions import resolve_caption_source

        key = resolve_caption_source(ws, args.captions)
        x, ok = caption_vectors(ws, manifest, key, args.text_encoder)
        return x, ok, caption_spec(args.text_encoder, key)
    if not args.encoder:
        raise CdirError("give --encoder SPEC (image embeddings) or --captions/--text-encoder")
    x, ok = image_vectors(ws, manifest, args.encoder)
    return x, ok, args.encoder


def build_workspace_index(args: argparse.Namespace) -> Path:
    from cdir.core.manifest import fingerprint
    from indexes.faiss_index import build_index, index_files, load_index

    ws = Workspace(args.workspace).require()
    manifest = ws.manifest()
    fp = fingerprint(manifest)
    x, ok, spec = index_vectors(ws, manifest, args)
    name = args.name or f"{spec_key(spec)}.{args.type}"
    path = ws.index_path(name)
    ids = manifest["id"].to_numpy()[ok].tolist()
    domains = manifest["domain"].astype(str).to_numpy()[ok].tolist()
    m_name = {"ivfpq": "pq_m", "hnsw": "hnsw_m"}.get(args.type)
    if args.m and not m_name:
        raise CdirError("--m applies to --type ivfpq (sub-quantizers) or hnsw (graph degree)")
    if args.nlist and args.type not in ("ivf", "ivfpq"):
        raise CdirError("--nlist applies to --type ivf or ivfpq")
    params = {k: v for k, v in (("nlist", args.nlist), (m_name, args.m)) if v}
    t0 = time.perf_counter()
    if index_files(path).faiss.exists() and not args.rebuild:
        old = load_index(path, gpu=args.gpu)
        known = set(old.ids)
        grown = (old.meta.encoder_spec == spec and old.kind == args.type
                 and known.issubset(ids) and len(known) < len(ids))
        if old.meta.encoder_spec == spec and old.kind == args.type and old.ids == ids:
            old.meta.manifest_fingerprint = fp  # same rows: only the bookkeeping may differ
            old.save(path)
            print(f"index {name} is up to date ({len(old)} vectors)")
            return path
        if grown:
            new = [i for i, id_ in enumerate(ids) if id_ not in known]
            sel = ok.nonzero()[0][new]
            old.add(x[sel], [ids[i] for i in new], [domains[i] for i in new])
            old.meta.manifest_fingerprint = fp
            old.save(path)
            print(f"added {len(new)} vectors to {name}: {len(old)} in all "
                  f"({time.perf_counter() - t0:.1f}s) → {path}")
            return path
    index = build_index(x[ok], ids, domains, kind=args.type, encoder_spec=spec,
                        manifest_fingerprint=fp, gpu=args.gpu, **params)
    index.save(path)
    skipped = int((~ok).sum())
    print(f"built {args.type} index {name}: {len(index)} vectors × {index.dim} on {index.device} "
          f"in {time.perf_counter() - t0:.1f}s → {path}"
          + (f" ({skipped} images without a vector left out)" if skipped else ""))
    return path


def list_indexes(workspace: str | Path) -> list[dict]:
    from cdir.core.io import read_json
    from cdir.core.manifest import fingerprint

    ws = Workspace(workspace).require()
    fp = fingerprint(ws.manifest())
    rows = []
    for faiss_file in sorted((ws.root / "indexes").glob("*.faiss")):
        sidecar = faiss_file.with_suffix(".json")
        if not sidecar.exists():
            continue
        meta = read_json(sidecar)
        rows.append({"name": faiss_file.stem, "path": faiss_file,
                     "current": meta.get("manifest_fingerprint") == fp, **meta})
    return rows


def open_index(ws: Workspace, name: str | None = None, encoder: str | None = None,
               gpu: bool | None = None):
    """The workspace index to search: by name, by encoder, or the only one there is. Refused when
    the gallery changed since it was built."""
    from cdir.core.manifest import fingerprint
    from indexes.faiss_index import load_index

    rows = list_indexes(ws.root)
    if name:
        rows = [r for r in rows if r["name"] == name]
    elif encoder:
        rows = [r for r in rows if r.get("encoder_spec") == encoder]
    if not rows:
        raise CdirError(f"no matching index in {ws.root}: build one with "
                        f"`cdir index build -w {ws.root} --encoder SPEC`")
    if len(rows) > 1:
        names = ", ".join(r["name"] for r in rows)
        raise CdirError(f"several indexes match ({names}): choose one with --index NAME")
    return load_index(rows[0]["path"], expect_fingerprint=fingerprint(ws.manifest()), gpu=gpu)
