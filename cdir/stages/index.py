"""The index stage: build or extend a FAISS index from a workspace's stored embeddings (image or
caption), list the workspace's indexes, and open one to search."""

from __future__ import annotations

import functools
import os
import re
import shlex
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.lock import beside, exclusive
from cdir.core.workspace import Workspace, caption_spec, spec_key, split_caption_spec

if TYPE_CHECKING:
    import numpy as np
    import pandas as pd

    from cdir.core.store import StoredRows
    from indexes.index import CdirIndex


def index_vectors(ws: Workspace, manifest: pd.DataFrame, encoder: str | None = None,
                  text_encoder: str | None = None, captions: str | None = None
                  ) -> tuple[StoredRows, np.ndarray, str]:
    """(vectors, valid mask, spec) of the image embeddings of ``encoder``, or of the embeddings of
    a caption source by ``text_encoder``: the vectors of the valid rows, in manifest order, as a
    view read from the store on demand (`cdir.core.store.StoredRows`)."""
    from cdir.core.caption_store import resolve_source
    from cdir.stages.modes import caption_vectors, image_vectors

    if captions or text_encoder:
        if not text_encoder:
            raise CdirError("indexing captions needs --text-encoder (the one used by cdir embed)")
        key = resolve_source(ws, captions)
        x, ok = caption_vectors(ws, manifest, key, text_encoder, lazy=True)
        return x, ok, caption_spec(text_encoder, key)
    if not encoder:
        raise CdirError("give --encoder SPEC (image embeddings) or --captions/--text-encoder")
    x, ok = image_vectors(ws, manifest, encoder, lazy=True)
    return x, ok, encoder


# a plain file name: no path separators, no leading dot (no hidden files, no `..`)
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")


def check_index_name(name: str) -> str:
    """``name`` if it is a safe index file name (letters, digits, ``.``, ``_``, ``-``; not
    starting with a dot), else a CdirError: a name must not write outside WORKSPACE/indexes/."""
    if not _NAME.fullmatch(name):
        raise CdirError(f"bad index name {name!r}: use letters, digits, '.', '_' and '-' only "
                        "(no path separators, not starting with a dot)")
    return name


def _source_flags(spec: str) -> list[str]:
    """The flags that select the embeddings of ``spec`` (image encoder or caption spec)."""
    parts = split_caption_spec(spec)
    if parts is None:
        return ["--encoder", spec]
    text_encoder, key = parts
    return ["--captions", key, "--text-encoder", text_encoder]


def fill_commands(ws: Workspace, spec: str) -> list[str]:
    """The commands that give every gallery image a vector of ``spec``: `cdir caption` (for a
    captioner's source: the same settings, so the same source) and `cdir embed`. Each skips the
    work already done."""
    from cdir.core.caption_store import captioner_of_source

    root = str(ws.root)
    cmds = []
    parts = split_caption_spec(spec)
    source = captioner_of_source(ws, parts[1]) if parts else None
    if source is not None:
        captioner, gen = source
        flags = [f for k, v in gen.items() if v is not None
                 for f in (f"--{k.replace('_', '-')}", str(v))]
        cmds.append(["cdir", "caption", "-w", root, "--captioner", captioner, *flags])
    cmds.append(["cdir", "embed", "-w", root, *_source_flags(spec)])
    return [shlex.join(c) for c in cmds]


def update_commands(ws: Workspace, spec: str, kind: str, name: str, normalize: str = "none",
                    normalize_dim: int | None = None) -> str:
    """The command line, ready to paste, that brings index ``name`` up to date with the gallery
    (``normalize_dim``: its shared PCA, named so that a rebuild keeps it)."""
    build = ["cdir", "index", "build", "-w", str(ws.root), *_source_flags(spec), "--type", kind,
             *(["--normalize", normalize] if normalize != "none" else []),
             *(["--normalize-dim", str(normalize_dim)]
               if normalize != "none" and normalize_dim is not None else []), "--name", name]
    return " && ".join([*fill_commands(ws, spec), shlex.join(build)])


def _one_builder(build: Callable[..., dict]) -> Callable[..., dict]:
    """Hold the workspace's index lock while ``build`` runs: two builds of one index at once
    could pair one's .faiss file with the other's sidecar."""
    @functools.wraps(build)
    def locked(workspace: str | os.PathLike, *args: Any, **kwargs: Any) -> dict:
        ws = Workspace(workspace).require()
        with exclusive(beside(ws.root / "indexes"), "building an index of this workspace"):
            return build(workspace, *args, **kwargs)
    return locked


@_one_builder
def build_index(workspace: str | os.PathLike, encoder: str | None = None,
                text_encoder: str | None = None, captions: str | None = None,
                kind: str = "flat", name: str | None = None, gpu: bool | None = None,
                nlist: int | None = None, m: int | None = None,
                rebuild: bool = False, force: bool = False,
                allow_missing: bool = False, normalize: str = "none",
                normalize_dim: int | None = None, memory: str | None = None, recall: float = 0.95,
                refine: int | None = None, shards: int | None = None) -> dict[str, Any]:
    """Build a cosine index of ``kind`` over the image embeddings of ``encoder`` or the caption
    embeddings of ``captions`` by ``text_encoder``, in ``WORKSPACE/indexes/NAME.faiss``.

    An index of the same spec and kind is kept when it holds the same rows, and extended when the
    gallery only grew (unless ``rebuild``); an index of another spec or kind under ``name`` is
    replaced only with ``force``. Gallery images that have no vector yet (new since `cdir embed`
    ran) are refused unless ``allow_missing``; unreadable images are always left out. ``m``: PQ
    sub-quantizers (ivfpq) or graph degree (hnsw); ``nlist``: IVF lists. ``normalize`` (a key of
    `indexes.normalize.NORMALIZERS`): the vectors are normalised per domain with statistics
    fitted on the indexed rows, saved as ``NAME.normalize.npz`` (fingerprint in the sidecar);
    such an index is refit and rebuilt, never extended, when the gallery grows.
    ``normalize_dim``: a shared PCA to that many dims before the per-domain statistics (None: the
    default of `indexes.normalize.resolve_pca_dim`, 0: none); the choice and the statistics
    file's size are in the notes. ``shards``
    (ivf, ivfpq): built shard by shard from vectors read off the store a chunk at a time (never
    all in memory; with ``normalize``, one domain at a time while its statistics are fitted),
    merged into inverted lists on disk (`indexes.build.build_sharded`), rebuilt rather
    than extended. ``kind="auto"``
    chooses the family from the vector count, dimension and ``memory`` (e.g. "4GB") and tunes
    its nprobe / efSearch to reach ``recall``@10 against exact search (`indexes.auto`); the
    choice and the measurement go into the sidecar (``params.auto``). Returns the index's
    name, path, spec, kind, vector count, what was done (``action``: up-to-date, added or built),
    ``notes`` (lines for stderr: what was left out, parameters lowered for small data) and the
    one-line ``summary``."""
    import numpy as np

    from cdir.core.manifest import fingerprint
    from cdir.stages.modes import coverage, gallery_normalizer, require_coverage
    from indexes.build import build_index as new_index
    from indexes.index import load_index
    from indexes.kinds import KINDS, small_data_note
    from indexes.meta import index_files, load_normalizer, normalizer_file, read_meta
    from indexes.normalize import NORMALIZERS, resolve_pca_dim

    for flag, value in (("--nlist", nlist), ("--m", m)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise CdirError(f"{flag} must be a positive integer, got {value!r}")
    if name is not None:
        check_index_name(name)
    if normalize not in NORMALIZERS:
        raise CdirError(f"--normalize takes {', '.join(NORMALIZERS)}, not {normalize!r}")
    ws = Workspace(workspace).require()
    manifest = ws.manifest()
    fp = fingerprint(manifest)
    x, ok, spec = index_vectors(ws, manifest, encoder, text_encoder, captions)
    pca_dim, pca_note = resolve_pca_dim(normalize, int(x.shape[1]), normalize_dim)
    # a normalised index has a name of its own, so the plain one can stay beside it
    name = name or f"{spec_key(spec)}.{kind}" + (f".{normalize}" if normalize != "none" else "")
    choice = None
    if kind == "auto":
        from indexes.auto import choose, parse_memory

        if nlist or m:
            raise CdirError("--nlist and --m do not go with --type auto: it chooses them")
        choice = choose(int(ok.sum()), int(x.shape[1]), parse_memory(memory))
        kind = choice.kind
    elif memory is not None:
        raise CdirError("--memory applies to --type auto")
    path = ws.index_path(name)
    ids = manifest["id"].to_numpy()[ok].tolist()
    domains = manifest["domain"].astype(str).to_numpy()[ok].tolist()
    accepts = KINDS[kind].params if kind in KINDS else ()  # new_index refuses an unknown kind
    m_name = next((p for p in ("pq_m", "hnsw_m") if p in accepts), None)
    if m and not m_name:
        raise CdirError("--m applies to --type ivfpq (sub-quantizers) or hnsw (graph degree)")
    if nlist and "nlist" not in accepts:
        raise CdirError("--nlist applies to --type ivf or ivfpq")
    if refine and "refine" not in accepts:
        raise CdirError("--refine applies to --type ivfpq (its codes are what gets re-ranked)")
    params = {k: v for k, v in (("nlist", nlist), (m_name, m), ("refine", refine)) if v}
    if choice is not None:
        params.update(choice.params)
    old_meta = None
    if index_files(path).faiss.exists():
        try:
            old_meta = read_meta(path)
        except CdirError as e:
            if not (rebuild or force):  # building again without --rebuild would fail again
                raise CdirError(f"{e} (pass --rebuild to replace it)") from None
    same = old_meta is not None and (old_meta.encoder_spec, old_meta.kind, old_meta.normalize
                                      ) == (spec, kind, normalize)
    if old_meta is not None and not same and not force:
        raise CdirError(f"index {name} was built as {old_meta.kind} over {old_meta.encoder_spec}"
                        f" (normalize {old_meta.normalize}), not {kind} over {spec} (normalize "
                        f"{normalize}): choose another --name, or pass --force to replace it")
    cov = coverage(ws, manifest, spec, ok)
    require_coverage(cov, " && ".join(fill_commands(ws, spec)), allow_missing)
    missing = cov.n_missing
    skipped = int((~ok).sum())
    why = [f"{n} {what}" for n, what in ((missing, "not embedded yet"),
                                         (skipped - missing, "unreadable or without a caption"))
           if n]
    notes = [f"{skipped} of {len(manifest)} images left out: {', '.join(why)}"] if skipped else []
    if pca_note:
        notes.append(pca_note)
    result = {"name": name, "path": str(path), "spec": spec, "kind": kind,
              "normalize": normalize, "notes": notes}
    left_out = f" ({skipped} images left out)" if skipped else ""
    t0 = time.perf_counter()
    if same and normalize != "none" and not rebuild:
        try:
            old_norm = load_normalizer(path, old_meta)
        except CdirError:  # statistics removed, edited or not the sidecar's: refit them
            notes.append(f"the {normalize} statistics of {name} are missing or changed: refit")
            rebuild = True
        else:
            # as asked (the rows' rank may have capped the dims it got)
            old_pca = old_norm.pca_dim if old_norm.out_dim < old_norm.dim else 0
            if old_pca != pca_dim:  # another --normalize-dim: other statistics, other vectors
                def pca(n: int) -> str:
                    return f"a shared PCA to {n} dims" if n else "the full dims (no shared PCA)"

                notes.append(f"{name} was built with {pca(old_pca)}, not {pca(pca_dim)}: "
                             "rebuilt")
                rebuild = True
    if same and not rebuild:
        old = load_index(path, gpu=gpu)
        known = set(old.ids)
        # vectors re-made since (other weights, changed images): the old index is rebuilt
        fresh = old.meta.vectors_fingerprint == _stamp(ws, spec, old, dry=True)
        if fresh and old.ids == ids:
            old.meta.manifest_fingerprint = fp  # same rows: only the bookkeeping may differ
            _stamp(ws, spec, old)
            old.save(path)
            stats = _stats_size(path)
            if stats is not None:
                notes.append(f"{normalize} statistics: {_megabytes(stats)} in "
                             f"{normalizer_file(path).name}")
            return {**result, "count": len(old), "action": "up-to-date", "stats_bytes": stats,
                    "summary": f"index {name} is up to date ({len(old)} vectors){left_out}"}
        grew = fresh and known.issubset(ids) and len(known) < len(ids)
        if grew and old.normalizer is not None:
            notes.append(f"the gallery grew: the {normalize} statistics of {name} are refit and "
                         "the index rebuilt")
        elif grew and old.meta.params.get("ivfdata"):
            notes.append(f"the gallery grew: {name}'s on-disk lists are built again")
        elif grew:
            new = [i for i, id_ in enumerate(ids) if id_ not in known]
            old.add(x[new], [ids[i] for i in new], [domains[i] for i in new])
            old.meta.manifest_fingerprint = fp
            _stamp(ws, spec, old)
            old.save(path)
            return {**result, "count": len(old), "action": "added",
                    "summary": f"added {len(new)} vectors to {name}: {len(old)} in all "
                               f"({time.perf_counter() - t0:.1f}s) → {path}{left_out}"}
    sharded = bool(shards and shards > 1)
    # a sharded build reads the vectors from the store a shard at a time, never all at once
    vecs = x if sharded else np.asarray(x)
    norm = gallery_normalizer(vecs, domains, normalize, pca_dim)
    if norm is not None and norm.pooled_note():
        notes.append(norm.pooled_note())
    if norm is not None:
        vecs = norm.transform_rows(vecs, domains) if sharded else norm.transform(vecs, domains)
    if sharded:
        from indexes.build import build_sharded

        index = build_sharded(vecs, ids, domains, path, shards, kind=kind, encoder_spec=spec,
                              manifest_fingerprint=fp, **params)
    else:
        index = new_index(vecs, ids, domains, kind=kind, encoder_spec=spec,
                          manifest_fingerprint=fp, gpu=gpu, **params)
    index.normalizer = norm  # saved beside it, its fingerprint in the sidecar
    if choice is not None:
        from indexes.auto import describe, tune

        record = tune(index, vecs, recall)
        index.meta.params["auto"]["reason"] = choice.reason
        notes.append(describe(choice, record))
    _stamp(ws, spec, index)
    index.save(path)
    small = small_data_note(kind, len(index), index.meta.params, params)
    if small:
        notes.append(small)
    stats = _stats_size(path)
    if stats is not None:
        notes.append(f"{normalize} statistics: {_megabytes(stats)} ({norm.dim} -> "
                     f"{norm.out_dim} dims, {len(norm.domains)} domains) in "
                     f"{normalizer_file(path).name}")
    return {**result, "count": len(index), "action": "built", "stats_bytes": stats,
            "summary": f"built {kind} index {name}: {len(index)} vectors × {index.dim} on "
                       f"{index.device} in {time.perf_counter() - t0:.1f}s → {path}{left_out}"
                       + (" (parameters lowered for small data)" if small else "")}


def _stats_size(path: str | os.PathLike) -> int | None:
    """The size in bytes of the normalisation statistics of the index at ``path`` (None: none)."""
    from indexes.meta import normalizer_file

    f = normalizer_file(path)
    return f.stat().st_size if f.exists() else None


def _megabytes(n: int) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"


def _stamp(ws: Workspace, spec: str, index: CdirIndex, dry: bool = False) -> str:
    """Record in ``index``'s sidecar what its vectors are: the model's identity (search checks
    it before encoding a query) and the fingerprint of the stored vectors of its rows (a later
    build compares it); ``dry`` only returns that fingerprint."""
    from cdir.stages.modes import vectors_fingerprint

    vfp, model_id, model_files = vectors_fingerprint(ws, spec, index.ids)
    if not dry:
        index.meta.vectors_fingerprint = vfp
        index.meta.model_id = model_id
        index.meta.model_files = model_files
    return vfp


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
                     "current": meta.get("manifest_fingerprint") == fp,
                     "stats_bytes": (_stats_size(faiss_file)
                                     if meta.get("normalize", "none") != "none" else None),
                     **meta})
    return rows


def open_index(ws: Workspace, name: str | None = None, encoder: str | None = None,
               gpu: bool | None = None, named: bool = False
               ) -> CdirIndex | tuple[CdirIndex, str]:
    """The workspace index to search: by name, by encoder, or the only one there is (with its
    name when ``named``). Refused when the gallery changed since it was built."""
    from cdir.core.manifest import fingerprint
    from indexes.index import load_index
    from indexes.meta import load_normalizer

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
    row = rows[0]
    update = update_commands(ws, row["encoder_spec"], row["kind"], row["name"],
                             row.get("normalize", "none"), row.get("normalize_dim", 0))
    if not row["current"]:
        raise CdirError(f"index {row['name']} is stale: the gallery changed since it was built "
                        f"(images added, removed or changed); update it with `{update}`")
    index = load_index(row["path"], expect_fingerprint=fingerprint(ws.manifest()), gpu=gpu,
                       normalizer=False)
    index.normalizer = load_normalizer(row["path"], index.meta, hint=update)
    return (index, row["name"]) if named else index
