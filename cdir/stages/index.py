"""The index stage: build or extend a FAISS index from a workspace's stored embeddings (image or
caption), list the workspace's indexes, and open one to search."""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.workspace import Workspace, caption_spec, spec_key

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from indexes.faiss_index import CdirIndex


def index_vectors(ws: Workspace, manifest: pd.DataFrame, encoder: str | None = None,
                  text_encoder: str | None = None, captions: str | None = None
                  ) -> tuple[np.ndarray, np.ndarray, str]:
    """(vectors, valid mask, spec) of the image embeddings of ``encoder``, or of the embeddings of
    a caption source by ``text_encoder``."""
    from cdir.core.caption_store import resolve_source
    from cdir.stages.modes import caption_vectors, image_vectors

    if captions or text_encoder:
        if not text_encoder:
            raise CdirError("indexing captions needs --text-encoder (the one used by cdir embed)")
        key = resolve_source(ws, captions)
        x, ok = caption_vectors(ws, manifest, key, text_encoder)
        return x, ok, caption_spec(text_encoder, key)
    if not encoder:
        raise CdirError("give --encoder SPEC (image embeddings) or --captions/--text-encoder")
    x, ok = image_vectors(ws, manifest, encoder)
    return x, ok, encoder


def build_index(workspace: str | os.PathLike, encoder: str | None = None,
                text_encoder: str | None = None, captions: str | None = None,
                kind: str = "flat", name: str | None = None, gpu: bool | None = None,
                nlist: int | None = None, m: int | None = None,
                rebuild: bool = False) -> dict[str, Any]:
    """Build a cosine index of ``kind`` over the image embeddings of ``encoder`` or the caption
    embeddings of ``captions`` by ``text_encoder``, in ``WORKSPACE/indexes/NAME.faiss``.

    An index of the same spec and kind is kept when it holds the same rows, and extended when the
    gallery only grew (unless ``rebuild``). ``m``: PQ sub-quantizers (ivfpq) or graph degree
    (hnsw); ``nlist``: IVF lists. Returns the index's name, path, spec, kind, vector count, what
    was done (``action``: up-to-date, added or built) and the one-line ``summary``."""
    from cdir.core.manifest import fingerprint
    from indexes.faiss_index import KIND_PARAMS, index_files, load_index
    from indexes.faiss_index import build_index as new_index

    ws = Workspace(workspace).require()
    manifest = ws.manifest()
    fp = fingerprint(manifest)
    x, ok, spec = index_vectors(ws, manifest, encoder, text_encoder, captions)
    name = name or f"{spec_key(spec)}.{kind}"
    path = ws.index_path(name)
    ids = manifest["id"].to_numpy()[ok].tolist()
    domains = manifest["domain"].astype(str).to_numpy()[ok].tolist()
    accepts = KIND_PARAMS.get(kind, ())  # an unknown kind is refused by new_index below
    m_name = next((p for p in ("pq_m", "hnsw_m") if p in accepts), None)
    if m and not m_name:
        raise CdirError("--m applies to --type ivfpq (sub-quantizers) or hnsw (graph degree)")
    if nlist and "nlist" not in accepts:
        raise CdirError("--nlist applies to --type ivf or ivfpq")
    params = {k: v for k, v in (("nlist", nlist), (m_name, m)) if v}
    result = {"name": name, "path": str(path), "spec": spec, "kind": kind}
    t0 = time.perf_counter()
    if index_files(path).faiss.exists() and not rebuild:
        old = load_index(path, gpu=gpu)
        known = set(old.ids)
        grown = (old.meta.encoder_spec == spec and old.kind == kind
                 and known.issubset(ids) and len(known) < len(ids))
        if old.meta.encoder_spec == spec and old.kind == kind and old.ids == ids:
            old.meta.manifest_fingerprint = fp  # same rows: only the bookkeeping may differ
            old.save(path)
            return {**result, "count": len(old), "action": "up-to-date",
                    "summary": f"index {name} is up to date ({len(old)} vectors)"}
        if grown:
            new = [i for i, id_ in enumerate(ids) if id_ not in known]
            sel = ok.nonzero()[0][new]
            old.add(x[sel], [ids[i] for i in new], [domains[i] for i in new])
            old.meta.manifest_fingerprint = fp
            old.save(path)
            return {**result, "count": len(old), "action": "added",
                    "summary": f"added {len(new)} vectors to {name}: {len(old)} in all "
                               f"({time.perf_counter() - t0:.1f}s) → {path}"}
    index = new_index(x[ok], ids, domains, kind=kind, encoder_spec=spec,
                      manifest_fingerprint=fp, gpu=gpu, **params)
    index.save(path)
    skipped = int((~ok).sum())
    return {**result, "count": len(index), "action": "built",
            "summary": f"built {kind} index {name}: {len(index)} vectors × {index.dim} on "
                       f"{index.device} in {time.perf_counter() - t0:.1f}s → {path}"
                       + (f" ({skipped} images without a vector left out)" if skipped else "")}


def list_indexes(workspace: str | os.PathLike) -> list[dict]:
    """Every index of the workspace: its sidecar metadata, name, path and whether it is
    ``current`` (built on the gallery as it is now)."""
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
               gpu: bool | None = None) -> CdirIndex:
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
