"""Building FAISS indexes: in memory (``build_index``), or shard by shard with the inverted lists
merged on disk for indexes larger than memory (``build_sharded``); both train an approximate
kind on a deterministic sample, and an IVF-PQ index with ``refine`` keeps the exact vectors
beside its codes. What each kind is made of comes from `indexes.kinds`.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from cdir.core.errors import CdirError
from indexes.index import CdirIndex, check_rows, check_vectors, faiss_quiet
from indexes.kinds import (
    KINDS,
    choose_device,
    default_params,
    kind_of,
    kinds_where,
    log_device,
    to_gpu,
)
from indexes.meta import index_files, new_meta

log = logging.getLogger(__name__)

ADD_CHUNK = 65536  # rows read and added at a time by a sharded build


def _train_sample(x: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic subsample (sorted rows, fixed seed) so a rebuild gives the same index,
    and the positions of its rows."""
    if len(x) <= size:
        return x, np.arange(len(x))
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))
    return x[rows], rows


def _new_cpu_index(kind: str, x: np.ndarray, p: dict[str, Any], train_gpu: Any = None) -> Any:
    """An empty index of ``kind``, trained (IVF kinds) on a sample of ``x``: a matrix, or a view
    read on demand whose sampled rows are checked here. ``train_gpu``: a GPU index for the
    k-means assignment of the training."""
    import faiss

    k = KINDS[kind]
    index = k.make(x.shape[1], x.shape[0], p)
    if k.train is None or k.train_points is None:
        return index
    sample, rows = _train_sample(x, k.train_points(p), p["seed"])
    if not isinstance(x, np.ndarray):  # a view: its rows are checked as they are read
        sample = check_vectors(sample, "vectors", rows=rows)
    k.train(index, sample, train_gpu)
    if p.get("refine"):  # exact vectors beside the codes: candidates re-ranked by exact scores
        refined = faiss.IndexRefineFlat(index)
        refined.k_factor = float(p["refine"])
        return refined
    return index


def _checked_input(vectors: Any, ids: Sequence[str], domains: Sequence[str], kind: str,
                   params: dict[str, Any]) -> tuple[np.ndarray, list[str], list[str], dict]:
    """The vectors as a float32 matrix, the rows checked against them, the full parameters."""
    x = check_vectors(vectors, "vectors")
    n, d = x.shape
    if n == 0:
        raise CdirError("no vectors to index: embed the gallery first (`cdir embed`)")
    ids, domains = check_rows(ids, domains, n)
    return x, ids, domains, default_params(kind, n, d, **params)


def build_index(
    vectors: np.ndarray,
    ids: Sequence[str],
    domains: Sequence[str],
    kind: str = "flat",
    encoder_spec: str = "",
    manifest_fingerprint: str = "",
    gpu: bool | None = None,
    **params: Any,
) -> CdirIndex:
    """Build a cosine index over ``vectors`` (rows = manifest rows, with their ids and domains).

    ``kind``: a key of `indexes.kinds.KINDS` (flat: exact | ivf | ivfpq | hnsw); ``params``
    override `indexes.kinds.default_params`.
    ``gpu``: None = auto, True = required (CdirError if unavailable), False = CPU.
    """
    k = kind_of(kind)
    x, ids, domains, p = _checked_input(vectors, ids, domains, kind, params)
    n, d = x.shape
    device, reason = choose_device(kind, gpu)
    log_device(kind, gpu, device, reason)

    import faiss

    train_gpu = None
    if device == "gpu" and k.train is not None:
        # k-means assignment on the GPU: the slow part of building a large IVF index
        train_gpu = to_gpu(faiss.IndexFlatIP(d), "k-means assignment")
    cpu_index = _new_cpu_index(kind, x, p, train_gpu.index if train_gpu else None)
    cpu_index.add(x)
    index = CdirIndex(cpu_index, new_meta(kind, n, d, p, encoder_spec, manifest_fingerprint),
                      ids, domains)
    if device == "gpu":
        index._attach_gpu()
    log.info("built %s index: %d × %d on %s", kind, n, d, index.device)
    return index


def build_sharded(
    vectors: np.ndarray,
    ids: Sequence[str],
    domains: Sequence[str],
    path: str | os.PathLike,
    shards: int,
    kind: str = "ivf",
    encoder_spec: str = "",
    manifest_fingerprint: str = "",
    **params: Any,
) -> CdirIndex:
    """An IVF / IVF-PQ index built shard by shard and merged on disk, for indexes larger than
    memory: trained once on a sample, each of ``shards`` row ranges added to its own copy of the
    trained index and written out, then their inverted lists merged into one file beside the
    index, ``<name>.<token>.ivfdata``, that searches read memory-mapped. Same rows, same lists
    and so the same results as a single build (labels are row positions in both). The sidecar
    names the lists file and the shard count; `save` keeps both. CPU only. ``vectors`` may be a
    view read on demand (`cdir.core.store.StoredRows`, `indexes.normalize.NormalizedRows`):
    then only the training sample and one chunk of rows are ever in memory beside the lists."""
    import tempfile
    import uuid

    from faiss.contrib.ondisk import merge_ondisk

    if kind not in KINDS or not KINDS[kind].on_disk:
        raise CdirError(
            f"--shards applies to --type {kinds_where(lambda k: k.on_disk)}, not {kind}")
    if shards < 1:
        raise CdirError(f"--shards must be at least 1, got {shards}")
    if params.get("refine"):
        raise CdirError("--shards does not go with --refine (its exact vectors stay in memory)")
    if isinstance(vectors, np.ndarray):
        x, ids, domains, p = _checked_input(vectors, ids, domains, kind, params)
    else:  # a view read on demand (`StoredRows`): rows checked chunk by chunk as they are read
        x = vectors
        if len(x.shape) != 2 or x.shape[0] == 0:
            raise CdirError("no vectors to index: embed the gallery first (`cdir embed`)")
        ids, domains = check_rows(ids, domains, x.shape[0])
        p = default_params(kind, *x.shape, **params)
    n, d = x.shape
    import faiss

    trained = _new_cpu_index(kind, x, p)
    files = index_files(path)
    folder = files.faiss.parent
    folder.mkdir(parents=True, exist_ok=True)
    lists = folder / f"{files.faiss.stem}.{uuid.uuid4().hex[:12]}.ivfdata"
    bounds = np.linspace(0, n, min(shards, n) + 1).astype(np.int64)
    with tempfile.TemporaryDirectory(dir=folder, prefix=".shards-") as tmp:
        names = []
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
            part = faiss.clone_index(trained)
            for c in range(a, b, ADD_CHUNK):  # a chunk of vectors in memory beside the lists
                rows = x[c:min(c + ADD_CHUNK, b)]
                part.add_with_ids(check_vectors(rows, "vectors", rows=c),
                                  np.arange(c, c + len(rows), dtype=np.int64))
            names.append(os.path.join(tmp, f"shard_{s:04d}.faiss"))
            faiss.write_index(part, names[-1])
            del part  # one shard's lists in memory at a time
        with faiss_quiet():  # the merged lists say they grow
            merge_ondisk(trained, names, str(lists))
    p["shards"] = int(len(bounds) - 1)
    p["ivfdata"] = lists.name
    log.info("built %s index shard by shard: %d × %d in %d shards, lists in %s", kind, n, d,
             p["shards"], lists.name)
    return CdirIndex(trained, new_meta(kind, n, d, p, encoder_spec, manifest_fingerprint),
                     ids, domains)

