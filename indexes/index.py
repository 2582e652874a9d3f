"""FAISS indexes over L2-normalised vectors: exact flat, IVF-Flat, IVF-PQ and HNSW; cosine scores.

One index = three files side by side (``<name>`` is the stem of ``Workspace.index_path``):

    <name>.faiss         the FAISS index, always written from its CPU copy
    <name>.rows.parquet  one row per vector in index order: ``id``, ``domain``
    <name>.json          ``IndexMeta``: encoder spec, kind, dim, metric, count, manifest
                         fingerprint, params, per-domain counts, versions, the sha256
                         of the two files above, and the encoder's weights identity and
                         vectors fingerprint
    <name>.normalize.npz only for a normalised index (``meta.normalize`` not "none"): the
                         per-domain statistics (`indexes.normalize`) its vectors were
                         transformed with; the sidecar records their fingerprint

FAISS labels are row positions: vectors are added in manifest order, so label ``i`` is manifest
row ``i`` (an incremental ``add`` appends rows after the existing ones).

Search returns ``SearchResult(scores, positions, ids)``, each of shape ``(n_queries, k)``, best
first. Where fewer than ``k`` vectors qualify (a small gallery or a small domain), the tail of a
row is padded with score ``-inf``, position ``-1`` and id ``""``; padding is always at the end.

Domain filter: ``search(..., domain="Clipart")`` returns the top-k *within* that domain (not the
top-k overall, filtered afterwards). On CPU the filter runs inside FAISS (``SearchParameters.sel``
with an ``IDSelectorBitmap``; flat, IVF, IVF-PQ and HNSW all honour it in faiss 1.15); an
approximate index that finds fewer than ``k`` in-domain hits for a query is searched again with a
doubled ``nprobe`` / ``efSearch`` for that query. GPU indexes ignore selectors, so on GPU the
search asks for more neighbours than ``k`` (oversampling), keeps the in-domain ones, and sends
queries still short of hits to the CPU copy with the selector.

Device: ``gpu=None`` uses a GPU when the installed faiss is a GPU build and sees a GPU;
``gpu=True`` demands one; ``gpu=False`` stays on CPU. The CPU index is the authoritative copy
(``save``, filtered fall-backs, ``add``); the GPU copy mirrors it. HNSW has no GPU version and
stays on CPU with a logged note.

Saving is atomic: the three files go to temporary files first and are renamed into place only
when all are complete, the sidecar last. ``load_index`` checks the sidecar's checksums, so files
left inconsistent by a crash between two renames are refused instead of mixing two indexes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path, sha256_file

if TYPE_CHECKING:
    from indexes.normalize import DomainNormalizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
# FAISS GPU k-selection limit (GPU_MAX_SELECTION_K); also the cap on nprobe for GPU IVF.
GPU_MAX_K = 2048
# FAISS k-means warns below this many training points per centroid; we size nlist / nbits to it.
MIN_POINTS_PER_CENTROID = 39
PQ_MIN_POINTS_PER_CODE = 4
TRAIN_POINTS_PER_CENTROID = 256  # FAISS's own cap (max_points_per_centroid): more is subsampled
ADD_CHUNK = 65536  # rows read and added at a time by a sharded build

# index kind -> the build/search parameters it accepts (user overrides are checked against these)
KIND_PARAMS: dict[str, tuple[str, ...]] = {
    "flat": (),
    "ivf": ("nlist", "nprobe", "seed"),
    "ivfpq": ("nlist", "nprobe", "pq_m", "pq_nbits", "seed", "refine"),
    "hnsw": ("hnsw_m", "ef_construction", "ef_search"),
}
KINDS = tuple(KIND_PARAMS)  # the index kinds, in the order `cdir index build --type` lists them
GPU_KINDS = tuple(k for k in KINDS if k != "hnsw")  # what index_cpu_to_gpu can move


# -------------------------------------------------------------------------------------------------
# metadata and results
# -------------------------------------------------------------------------------------------------
@dataclass
class IndexMeta:
    """What an index was built from; written as the ``<name>.json`` sidecar."""

    encoder_spec: str
    kind: str
    dim: int
    count: int
    manifest_fingerprint: str = ""
    metric: str = "ip"  # inner product on L2-normalised vectors = cosine similarity
    params: dict[str, Any] = field(default_factory=dict)
    domain_counts: dict[str, int] = field(default_factory=dict)
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {sha256, bytes}
    format: int = FORMAT_VERSION
    # what the vectors are (absent in older sidecars): the encoder's weights identity and its
    # file-hash records (a query is refused when the encoder now has other weights), and a
    # fingerprint of the stored vectors of the rows (a rebuild is due when it changes)
    model_id: str | None = None
    model_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    vectors_fingerprint: str = ""
    # search-time normalisation of the indexed vectors (a key of NORMALIZERS) and the fingerprint
    # of its statistics file; absent in older sidecars, which are plain
    normalize: str = "none"
    normalize_fingerprint: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexMeta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


class SearchResult(NamedTuple):
    """Search output, each ``(n_queries, k)``; padding: score -inf, position -1, id ""."""

    scores: np.ndarray  # float32, best first
    positions: np.ndarray  # int64 manifest rows
    ids: np.ndarray  # object array of str


class IndexFiles(NamedTuple):
    faiss: Path
    meta: Path
    rows: Path


def index_files(path: str | os.PathLike) -> IndexFiles:
    """The three files of the index at ``path``: ``<name>``, ``<name>.faiss`` or ``<name>.json``."""
    p = Path(path)
    if p.suffix in (".faiss", ".json"):
        p = p.with_suffix("")
    return IndexFiles(
        p.with_name(p.name + ".faiss"), p.with_name(p.name + ".json"),
        p.with_name(p.name + ".rows.parquet"))


def normalizer_file(path: str | os.PathLike) -> Path:
    """``<name>.normalize.npz``: the statistics of a normalised index at ``path``."""
    faiss_file = index_files(path).faiss
    return faiss_file.with_name(faiss_file.name.removesuffix(".faiss") + ".normalize.npz")


# -------------------------------------------------------------------------------------------------
# helpers without FAISS (pure, unit-testable)
# -------------------------------------------------------------------------------------------------
def default_params(kind: str, n: int, dim: int, **overrides: Any) -> dict[str, Any]:
    """Build/search parameters for ``kind`` on ``n`` vectors of ``dim``; overrides win, are checked.

    - IVF ``nlist`` ≈ 4·√n, lowered so every list gets ≥ 39 training points (FAISS's k-means
      minimum), at least 1: a small collection gets a small nlist instead of a failure.
      ``nprobe`` = max(8, 2·√nlist), at most nlist.
    - IVF-PQ ``pq_m`` = the largest divisor of dim that is ≤ min(64, dim/8) (sub-vectors of ≥ 8
      dims; 64 bytes/vector at most), ``pq_nbits`` = 8, lowered for small n so each of the 2^nbits
      codewords gets ≥ 4 training points (at least 1 bit).
    - IVF-PQ ``refine`` = K (default 0, off): the exact vectors are kept too and each search
      re-ranks K x k PQ candidates by their exact scores (more memory, far better recall).
    - HNSW ``hnsw_m`` = 32, ``ef_construction`` = 80, ``ef_search`` = 64.
    """
    if kind not in KINDS:
        raise CdirError(f"unknown index type {kind!r}: choose one of {', '.join(KINDS)}")
    allowed = KIND_PARAMS[kind]
    unknown = sorted(set(overrides) - set(allowed))
    if unknown:
        raise CdirError(
            f"index type {kind!r} has no parameter(s) {', '.join(unknown)}; it takes "
            f"{', '.join(allowed) or 'none'}")
    overrides = {k: v for k, v in overrides.items() if v is not None}
    p: dict[str, Any] = {}
    if kind in ("ivf", "ivfpq"):
        nlist = int(overrides.get("nlist") or _default_nlist(n))
        if not 1 <= nlist <= n:
            raise CdirError(
                f"nlist={nlist} needs at least {nlist} vectors to train (got {n}); "
                f"use nlist ≤ {max(1, n // MIN_POINTS_PER_CENTROID)} or a flat index")
        p["nlist"] = nlist
        nprobe = int(overrides.get("nprobe") or min(nlist, max(8, round(2 * math.sqrt(nlist)))))
        p["nprobe"] = max(1, min(nprobe, nlist))
        p["seed"] = int(overrides.get("seed", 1234))
    if kind == "ivfpq":
        m = int(overrides.get("pq_m") or _default_pq_m(dim))
        if m < 1 or dim % m:
            raise CdirError(f"pq_m={m} must divide the vector dimension {dim}")
        p["pq_m"] = m
        nbits = int(overrides.get("pq_nbits") or _default_pq_nbits(n))
        if not 1 <= nbits <= 16 or 2**nbits > n:
            raise CdirError(
                f"pq_nbits={nbits} needs 1..16 bits and at least 2^{nbits} vectors to train "
                f"(got {n}); use pq_nbits ≤ {_default_pq_nbits(n)}")
        p["pq_nbits"] = nbits
        refine = int(overrides.get("refine") or 0)
        if refine < 0:
            raise CdirError(f"refine={refine}: give the candidates re-ranked per result (0: off)")
        if refine:
            p["refine"] = refine
    if kind == "hnsw":
        p["hnsw_m"] = int(overrides.get("hnsw_m") or 32)
        p["ef_construction"] = int(overrides.get("ef_construction") or 80)
        p["ef_search"] = int(overrides.get("ef_search") or 64)
        if min(p.values()) < 1:
            raise CdirError(f"HNSW parameters must be positive: {p}")
    return p


def _default_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))


def small_data_note(kind: str, n: int, params: dict[str, Any],
                    given: dict[str, Any] | None = None) -> str | None:
    """One line naming the parameters ``default_params`` lowered below their usual value because
    ``n`` vectors are too few to train them (None when nothing was lowered; values the caller
    ``given`` are never lowered, so never named)."""
    given = {k for k, v in (given or {}).items() if v is not None}
    lowered = []
    if "nlist" in params and "nlist" not in given and params["nlist"] < round(4 * math.sqrt(n)):
        lowered.append(f"nlist {params['nlist']} instead of 4·√N = {round(4 * math.sqrt(n))} "
                       f"(≥ {MIN_POINTS_PER_CENTROID} training vectors per list)")
    if "pq_nbits" in params and "pq_nbits" not in given and params["pq_nbits"] < 8:
        lowered.append(f"pq_nbits {params['pq_nbits']} instead of 8 "
                       f"(≥ {PQ_MIN_POINTS_PER_CODE} training vectors per codeword)")
    if not lowered:
        return None
    return f"{kind} index on only {n} vectors: " + "; ".join(lowered)


def _default_pq_m(dim: int) -> int:
    # sub-vectors of ≥ 8 dims: 4-dim ones train ~10× slower in FAISS's k-means (measured: 12.7 s
    # vs 1.1 s for 20k × 128-d, 1 thread) for a modest recall gain
    cap = max(1, min(64, dim // 8))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def _default_pq_nbits(n: int) -> int:
    # 8 bits unless each of the 2^nbits codewords would get fewer than 4 training points; FAISS
    # itself only needs 2^nbits ≤ n (it warns below 39 per codeword, but on small collections
    # 256 codewords on few points still beat fewer codewords: 10-recall@10 0.56 with 8 bits vs
    # 0.38 with 6 bits on 4k clustered 32-d vectors)
    return max(1, min(8, int(math.floor(math.log2(max(n / PQ_MIN_POINTS_PER_CODE, 1.0))))))


def choose_device(
    kind: str, gpu: bool | None, *, num_gpus: int | None = None, gpu_build: bool | None = None,
) -> tuple[str, str]:
    """Decide where an index of ``kind`` runs: returns ``("gpu" | "cpu", reason)``.

    ``num_gpus`` / ``gpu_build`` default to what the installed faiss reports; pass them to test.
    ``gpu=True`` without a usable GPU raises a CdirError that says how to get one.
    """
    if gpu is False:
        return "cpu", "CPU requested"
    if num_gpus is None or gpu_build is None:
        faiss = _faiss()
        gpu_build = hasattr(faiss, "StandardGpuResources") if gpu_build is None else gpu_build
        num_gpus = (faiss.get_num_gpus() if gpu_build else 0) if num_gpus is None else num_gpus
    if not gpu_build or num_gpus < 1:
        if gpu:
            why = ("the installed faiss is a CPU-only build" if not gpu_build
                   else "faiss sees no GPU (check the driver and CUDA_VISIBLE_DEVICES)")
            raise CdirError(
                f"--gpu asked for a GPU index but {why}: install the GPU build with "
                "`pip uninstall -y faiss-cpu && pip install 'cdir[gpu]'` (faiss-gpu, CUDA 12) "
                "on a machine with an NVIDIA GPU, or drop --gpu")
        return "cpu", "no GPU faiss" if not gpu_build else "no GPU visible"
    if kind not in GPU_KINDS:
        return "cpu", f"FAISS has no GPU version of {kind} indexes"
    return "gpu", f"{num_gpus} GPU(s) visible"


def _log_device(kind: str, gpu: bool | None, device: str, reason: str) -> None:
    # a GPU that was asked for but not used deserves a warning; the automatic choice a note
    level = logging.WARNING if gpu and device == "cpu" else logging.INFO
    log.log(level, "%s index on %s (%s)", kind, device.upper(), reason)


def _faiss():
    import faiss  # lazy: keeps `import indexes.faiss_index` cheap for `cdir --help`

    return faiss


def _check_vectors(x: Any, what: str, dim: int | None = None,
                   rows: int | np.ndarray = 0) -> np.ndarray:
    """float32 C-contiguous (n, d), finite, non-zero rows, re-normalised to unit length.
    ``rows``: where these rows are in the whole (the first one's position, or each one's), so a
    bad row of a chunk or a sample is named by its own position."""
    try:
        x = np.asarray(x, dtype=np.float32)
    except (TypeError, ValueError) as e:
        raise CdirError(f"{what} must be a numeric array: {e}") from None
    if x.ndim == 1 and what == "queries":
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] < 1:
        raise CdirError(f"{what} must be a 2-D array (n, dim), got shape {x.shape}")
    if dim is not None and x.shape[1] != dim:
        raise CdirError(
            f"{what} have dimension {x.shape[1]} but the index holds {dim}-d vectors: "
            "were they made with the same encoder?")
    def first(mask: np.ndarray) -> int:
        i = int(np.flatnonzero(mask)[0])
        return int(rows[i]) if isinstance(rows, np.ndarray) else rows + i

    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise CdirError(
            f"{what} contain NaN or inf in {int(bad.sum())} row(s) (first: row {first(bad)}): "
            "re-embed them")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    zero = norms[:, 0] == 0
    if zero.any():
        raise CdirError(
            f"{what} contain {int(zero.sum())} all-zero row(s) (first: row {first(zero)}), "
            "which have no direction to compare: re-embed them")
    # re-normalise defensively: cosine = inner product only on unit vectors
    return np.ascontiguousarray(x / norms, dtype=np.float32)


def _check_rows(ids: Sequence[str], domains: Sequence[str], n: int) -> tuple[list[str], list[str]]:
    ids = [str(i) for i in ids]
    domains = [str(d) for d in domains]
    if len(ids) != n or len(domains) != n:
        raise CdirError(
            f"got {n} vectors but {len(ids)} ids and {len(domains)} domains: they must match")
    if len(set(ids)) != n:
        dup = sorted(i for i, c in Counter(ids).items() if c > 1)
        raise CdirError(f"{len(dup)} duplicate id(s) among the vectors: {', '.join(dup[:5])}")
    return ids, domains



def _fsync(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        cdir_version = version("cdir")
    except PackageNotFoundError:
        cdir_version = "unknown"
    return {"faiss": _faiss().__version__, "numpy": np.__version__, "cdir": cdir_version,
            "python": platform.python_version()}


# -------------------------------------------------------------------------------------------------
# building FAISS indexes
# -------------------------------------------------------------------------------------------------
def _train_sample(x: np.ndarray, size: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A deterministic subsample (sorted rows, fixed seed) so a rebuild gives the same index,
    and the positions of its rows."""
    if len(x) <= size:
        return x, np.arange(len(x))
    rows = np.sort(np.random.default_rng(seed).choice(len(x), size=size, replace=False))
    return x[rows], rows


def _new_cpu_index(kind: str, x: np.ndarray, p: dict[str, Any], train_gpu: Any = None) -> Any:
    """An empty index of ``kind``, trained (IVF kinds) on a sample of ``x``: a matrix, or a view
    read on demand whose sampled rows are checked here."""
    faiss = _faiss()
    d = x.shape[1]
    if kind == "flat":
        return faiss.IndexFlatIP(d)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, p["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = p["ef_construction"]
        index.hnsw.efSearch = p["ef_search"]
        return index
    quantizer = faiss.IndexFlatIP(d)
    if kind == "ivf":
        index = faiss.IndexIVFFlat(quantizer, d, p["nlist"], faiss.METRIC_INNER_PRODUCT)
    else:
        index = faiss.IndexIVFPQ(
            quantizer, d, p["nlist"], p["pq_m"], p["pq_nbits"], faiss.METRIC_INNER_PRODUCT)
        index.pq.cp.seed = p["seed"]
        # we chose nbits for the data size; don't let FAISS print warnings for tiny collections
        index.pq.cp.min_points_per_centroid = min(
            MIN_POINTS_PER_CENTROID, max(1, len(x) // 2 ** p["pq_nbits"]))
    index.cp.seed = p["seed"]
    index.cp.spherical = True  # centroids on the unit sphere: k-means for cosine
    index.cp.min_points_per_centroid = min(MIN_POINTS_PER_CENTROID, max(1, len(x) // p["nlist"]))
    index.nprobe = p["nprobe"]
    if train_gpu is not None:
        index.clustering_index = train_gpu  # k-means assignment on the GPU; centroids stay CPU
    sample, rows = _train_sample(x, TRAIN_POINTS_PER_CENTROID * p["nlist"], p["seed"])
    if not isinstance(x, np.ndarray):  # a view: its rows are checked as they are read
        sample = _check_vectors(sample, "vectors", rows=rows)
    index.train(sample)
    if train_gpu is not None:
        index.clustering_index = None
    # (faiss's Python wrapper keeps `quantizer` referenced by the index; no own_fields juggling)
    if p.get("refine"):  # exact vectors beside the codes: candidates re-ranked by exact scores
        refined = faiss.IndexRefineFlat(index)
        refined.k_factor = float(p["refine"])
        return refined
    return index


class _Gpu(NamedTuple):
    index: Any
    resources: Any  # StandardGpuResources must outlive the GPU index


def _to_gpu(cpu_index: Any, kind: str, device: int = 0) -> _Gpu | None:
    """Copy ``cpu_index`` to GPU ``device``; None (and a warning) if FAISS can't."""
    faiss = _faiss()
    try:
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        # IVF-PQ: float16 lookup tables let large pq_m fit in shared memory (FAISS's usual advice);
        # flat / IVF-Flat keep float32 vectors so scores match the CPU index.
        co.useFloat16 = kind == "ivfpq"
        return _Gpu(faiss.index_cpu_to_gpu(res, device, cpu_index, co), res)
    except Exception as e:  # FAISS raises RuntimeError for unsupported layouts (e.g. PQ sizes)
        log.warning("could not move the %s index to GPU %d (%s); it stays on CPU", kind, device, e)
        return None


def _checked_input(vectors: Any, ids: Sequence[str], domains: Sequence[str], kind: str,
                   params: dict[str, Any]) -> tuple[np.ndarray, list[str], list[str], dict]:
    """The vectors as a float32 matrix, the rows checked against them, the full parameters."""
    x = _check_vectors(vectors, "vectors")
    n, d = x.shape
    if n == 0:
        raise CdirError("no vectors to index: embed the gallery first (`cdir embed`)")
    ids, domains = _check_rows(ids, domains, n)
    return x, ids, domains, default_params(kind, n, d, **params)


def _new_meta(kind: str, n: int, d: int, params: dict[str, Any], encoder_spec: str,
              manifest_fingerprint: str) -> IndexMeta:
    return IndexMeta(
        encoder_spec=encoder_spec, kind=kind, dim=d, count=n,
        manifest_fingerprint=manifest_fingerprint, params=params,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=_versions())


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

    ``kind``: flat (exact) | ivf | ivfpq | hnsw; ``params`` override ``default_params``.
    ``gpu``: None = auto, True = required (CdirError if unavailable), False = CPU.
    """
    if kind not in KINDS:
        raise CdirError(f"unknown index type {kind!r}: choose one of {', '.join(KINDS)}")
    x, ids, domains, p = _checked_input(vectors, ids, domains, kind, params)
    n, d = x.shape
    device, reason = choose_device(kind, gpu)
    _log_device(kind, gpu, device, reason)

    faiss = _faiss()
    train_gpu = None
    if device == "gpu" and kind in ("ivf", "ivfpq"):
        # k-means assignment on the GPU: the slow part of building a large IVF index
        train_gpu = _to_gpu(faiss.IndexFlatIP(d), "flat")
    cpu_index = _new_cpu_index(kind, x, p, train_gpu.index if train_gpu else None)
    cpu_index.add(x)
    index = CdirIndex(cpu_index, _new_meta(kind, n, d, p, encoder_spec, manifest_fingerprint),
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

    if kind not in ("ivf", "ivfpq"):
        raise CdirError(f"--shards applies to --type ivf or ivfpq, not {kind}")
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
        ids, domains = _check_rows(ids, domains, x.shape[0])
        p = default_params(kind, *x.shape, **params)
    n, d = x.shape
    faiss = _faiss()
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
                part.add_with_ids(_check_vectors(rows, "vectors", rows=c),
                                  np.arange(c, c + len(rows), dtype=np.int64))
            names.append(os.path.join(tmp, f"shard_{s:04d}.faiss"))
            faiss.write_index(part, names[-1])
            del part  # one shard's lists in memory at a time
        merge_ondisk(trained, names, str(lists))
    p["shards"] = int(len(bounds) - 1)
    p["ivfdata"] = lists.name
    log.info("built %s index shard by shard: %d × %d in %d shards, lists in %s", kind, n, d,
             p["shards"], lists.name)
    return CdirIndex(trained, _new_meta(kind, n, d, p, encoder_spec, manifest_fingerprint),
                     ids, domains)


# -------------------------------------------------------------------------------------------------
# the index
# -------------------------------------------------------------------------------------------------
class CdirIndex:
    """A FAISS index with its rows (ids, domains) and metadata. Build with ``build_index`` or
    ``load_index``."""

    def __init__(self, cpu_index: Any, meta: IndexMeta, ids: list[str], domains: list[str]):
        if cpu_index.ntotal != len(ids) or len(ids) != len(domains):
            raise CdirError(
                f"index holds {cpu_index.ntotal} vectors but {len(ids)} ids / {len(domains)} "
                "domains: the index files don't belong together; rebuild with `cdir index build`")
        self._cpu = cpu_index
        self._gpu: _Gpu | None = None
        self.meta = meta
        self._ids = np.array(ids, dtype=object)
        self._domains = np.array(domains, dtype=object)
        self._pos = {i: k for k, i in enumerate(ids)}
        self._masks: dict[frozenset[str], tuple[np.ndarray, np.ndarray, int]] = {}
        # the statistics the vectors were normalised with (None: plain); queries get the same
        self.normalizer: DomainNormalizer | None = None
        self._refresh_meta()

    # -- facts -----------------------------------------------------------------------------------
    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def dim(self) -> int:
        return self.meta.dim

    @property
    def device(self) -> str:
        return "gpu" if self._gpu is not None else "cpu"

    @property
    def ids(self) -> list[str]:
        return self._ids.tolist()

    @property
    def domains(self) -> list[str]:
        return self._domains.tolist()

    @property
    def domain_names(self) -> list[str]:
        return sorted(self.meta.domain_counts)

    def __len__(self) -> int:
        return int(self._cpu.ntotal)

    def position(self, id_: str) -> int:
        """The row of ``id_`` (KeyError if absent)."""
        return self._pos[id_]

    def stored_vectors(self, ids: Sequence[str]) -> np.ndarray | None:
        """The vectors held for ``ids`` [len(ids), dim], as searched (a normalised index's are
        transformed); None where the index keeps no exact copy (IVF kinds) or lacks an id."""
        if self.kind not in ("flat", "hnsw") or any(i not in self._pos for i in ids):
            return None
        return np.stack([self._cpu.reconstruct(self._pos[i]) for i in ids]).astype(np.float32)

    def __repr__(self) -> str:
        return (f"CdirIndex(kind={self.kind!r}, count={len(self)}, dim={self.dim}, "
                f"device={self.device!r}, encoder={self.meta.encoder_spec!r})")

    def _refresh_meta(self) -> None:
        self.meta.count = len(self)
        names, counts = np.unique(self._domains.astype(str), return_counts=True)
        self.meta.domain_counts = {str(k): int(v) for k, v in zip(names, counts, strict=True)}
        self._masks.clear()

    # -- device ----------------------------------------------------------------------------------
    def _attach_gpu(self) -> None:
        self._gpu = _to_gpu(self._cpu, self.kind)
        if self._gpu is not None:
            log.info("%s index on GPU 0", self.kind)

    def to_cpu(self) -> None:
        """Drop the GPU copy (frees GPU memory); searches run on the CPU index afterwards."""
        self._gpu = None

    # -- checks ----------------------------------------------------------------------------------
    def check(
        self, expect_encoder: str | None = None, expect_fingerprint: str | None = None,
        where: str | os.PathLike = "",
    ) -> None:
        """Refuse (CdirError) an index built with another encoder or for another gallery."""
        _check_meta(self.meta, expect_encoder, expect_fingerprint, str(where) or repr(self))

    # -- search ----------------------------------------------------------------------------------
    def search(
        self,
        queries: np.ndarray,
        k: int = 10,
        domain: str | Sequence[str] | None = None,
        nprobe: int | None = None,
        ef_search: int | None = None,
    ) -> SearchResult:
        """Top-``k`` rows by cosine for each query (1-D = one query), optionally within ``domain``.

        ``nprobe`` (IVF kinds) / ``ef_search`` (HNSW) override the built-in values for this call.
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise CdirError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        q = _check_vectors(queries, "queries", self.dim)
        sel = self._selection(domain)
        n_eligible = len(self) if sel is None else sel[2]
        need = min(k, n_eligible)
        if self.kind in ("ivf", "ivfpq"):
            nprobe = int(nprobe or self.meta.params["nprobe"])
        if self.kind == "hnsw":
            ef_search = int(ef_search or self.meta.params["ef_search"])

        # never ask FAISS for more than the index holds (k=10**6 on 100 rows must not allocate
        # n×10**6 results, nor push a small GPU search over the GPU k limit); pad afterwards
        kk = min(k, len(self))
        if self._gpu is not None and kk <= GPU_MAX_K:
            scores, pos = self._search_gpu(q, kk, need, sel, nprobe)
        else:
            scores, pos = self._search_cpu(q, kk, need, sel, nprobe, ef_search)
        if kk < k:
            scores = np.pad(scores, ((0, 0), (0, k - kk)), constant_values=-np.inf)
            pos = np.pad(pos, ((0, 0), (0, k - kk)), constant_values=-1)
        # one padding convention whatever FAISS used (it returns -FLT_MAX / -1)
        empty = pos < 0
        scores = scores.astype(np.float32, copy=False)
        scores[empty] = -np.inf
        pos[empty] = -1
        ids = np.where(empty, "", self._ids[np.where(empty, 0, pos)]).astype(object)
        return SearchResult(scores, pos.astype(np.int64, copy=False), ids)

    def _selection(
        self, domain: str | Sequence[str] | None,
    ) -> tuple[np.ndarray, np.ndarray, int] | None:
        """(bool mask over rows, packed little-endian bitmap for IDSelectorBitmap, count)."""
        if domain is None:
            return None
        wanted = frozenset([domain] if isinstance(domain, str) else [str(d) for d in domain])
        unknown = sorted(wanted - set(self.meta.domain_counts))
        if unknown or not wanted:
            raise CdirError(
                f"unknown domain(s) {', '.join(map(repr, unknown)) or '(none given)'}: this index "
                f"has {', '.join(self.domain_names)}")
        if wanted not in self._masks:
            mask = np.isin(self._domains, list(wanted))
            self._masks[wanted] = (mask, np.packbits(mask, bitorder="little"), int(mask.sum()))
        return self._masks[wanted]

    def _params(self, nprobe: int | None, ef_search: int | None, selector: Any = None) -> Any:
        faiss = _faiss()
        if self.kind in ("ivf", "ivfpq"):
            sp = faiss.SearchParametersIVF()
            sp.nprobe = nprobe
            if self.meta.params.get("refine"):  # the selector filters the PQ candidates
                if selector is not None:
                    sp.sel = selector
                outer = faiss.IndexRefineSearchParameters()
                outer.k_factor = float(self.meta.params["refine"])
                outer.base_index_params = sp
                outer._base = sp  # keep the inner parameters alive while FAISS reads them
                return outer
        elif self.kind == "hnsw":
            sp = faiss.SearchParametersHNSW()
            sp.efSearch = ef_search
        else:
            sp = faiss.SearchParameters()
        if selector is not None:
            sp.sel = selector
        return sp

    def _search_cpu(
        self, q: np.ndarray, k: int, need: int,
        sel: tuple[np.ndarray, np.ndarray, int] | None, nprobe: int | None, ef: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        faiss = _faiss()
        selector = None
        if sel is not None:
            bitmap = sel[1]  # stays referenced by `sel` (cached) while FAISS reads it
            selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        sp = self._params(nprobe, ef, selector)
        scores, pos = self._cpu.search(q, k, params=sp)
        # An approximate index may stop short of `need` hits (a small domain, a small nprobe):
        # widen the search for those queries until it finds them or can't widen further.
        n = len(self)
        while True:
            short = np.flatnonzero((pos >= 0).sum(axis=1) < need)
            if not len(short):
                break
            if self.kind in ("ivf", "ivfpq") and nprobe < self.meta.params["nlist"]:
                nprobe = min(2 * nprobe, self.meta.params["nlist"])
            elif self.kind == "hnsw" and ef < max(n, k):
                ef = min(2 * ef, max(n, k))
            else:
                break
            s2, p2 = self._cpu.search(q[short], k, params=self._params(nprobe, ef, selector))
            scores[short], pos[short] = s2, p2
        return scores, pos

    def _search_gpu(
        self, q: np.ndarray, k: int, need: int,
        sel: tuple[np.ndarray, np.ndarray, int] | None, nprobe: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._gpu is not None
        sp = None
        if self.kind in ("ivf", "ivfpq"):  # GPU IVF takes SearchParametersIVF for nprobe only
            sp = _faiss().SearchParametersIVF()
            sp.nprobe = min(nprobe, GPU_MAX_K)
        if sel is None:
            return self._gpu.index.search(q, k, params=sp)
        return _oversample_search(
            self._gpu.index, q, k, need, sel[0], sp,
            fallback=lambda rows: self._search_cpu(q[rows], k, need, sel, nprobe, None))

    # -- growing ---------------------------------------------------------------------------------
    def add(
        self, vectors: np.ndarray, ids: Sequence[str], domains: Sequence[str],
        manifest_fingerprint: str | None = None,
    ) -> None:
        """Append rows (new ids only). IVF kinds reuse their trained centroids; pass the new
        gallery's ``manifest_fingerprint`` so the saved index matches the grown manifest."""
        if self.normalizer is not None:
            # new rows change the per-domain statistics every indexed vector was transformed with
            raise CdirError(f"a {self.normalizer.method} index cannot be extended in place: "
                            "refit and rebuild it with `cdir index build`")
        x = _check_vectors(vectors, "vectors", self.dim)
        ids, domains = _check_rows(ids, domains, len(x))
        clash = [i for i in ids if i in self._pos]
        if clash:
            raise CdirError(
                f"{len(clash)} id(s) are already in the index (e.g. {', '.join(clash[:3])}): "
                "add only new images, or rebuild with `cdir index build`")
        if not len(x):
            return
        start = len(self)
        self._cpu.add(x)
        if self._gpu is not None:
            self._gpu.index.add(x)  # labels continue from ntotal, like the CPU copy
        self._ids = np.concatenate([self._ids, np.array(ids, dtype=object)])
        self._domains = np.concatenate([self._domains, np.array(domains, dtype=object)])
        self._pos.update((i, start + k) for k, i in enumerate(ids))
        if manifest_fingerprint is not None:
            self.meta.manifest_fingerprint = manifest_fingerprint
        self._refresh_meta()

    # -- persistence -----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``<name>.faiss``, ``<name>.rows.parquet`` and ``<name>.json`` atomically; returns
        the ``.faiss`` path. The CPU copy is written (it mirrors the GPU copy, if any)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        files = index_files(path)
        meta = IndexMeta.from_dict(self.meta.to_dict())
        if self.normalizer is not None:
            # the statistics land before the sidecar naming their fingerprint: a crash in
            # between leaves a sidecar that no longer matches them, which is refused
            self.normalizer.save(normalizer_file(path))
            meta.normalize = self.normalizer.method
            meta.normalize_fingerprint = self.normalizer.fingerprint
        else:
            meta.normalize, meta.normalize_fingerprint = "none", ""
        with ExitStack() as stack:
            # entered sidecar-first so the renames run faiss, rows, then the sidecar: until the
            # sidecar lands, a reader still sees the old sidecar (and a checksum mismatch)
            tmp_meta = stack.enter_context(atomic_path(files.meta))
            tmp_rows = stack.enter_context(atomic_path(files.rows))
            tmp_faiss = stack.enter_context(atomic_path(files.faiss))
            _write_faiss(self._cpu, tmp_faiss)
            table = pa.table({"id": pa.array(self._ids.tolist(), pa.string()),
                              "domain": pa.array(self._domains.tolist(), pa.string())})
            pq.write_table(table, tmp_rows)
            _fsync(tmp_rows)
            meta.files = {final.name: {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
                          for final, tmp in ((files.faiss, tmp_faiss), (files.rows, tmp_rows))}
            with open(tmp_meta, "w", encoding="utf-8") as f:
                json.dump(meta.to_dict(), f, indent=2, sort_keys=True)
                f.write("\n")
                f.flush()
                os.fsync(f.fileno())
        self.meta.files = meta.files
        self.meta.normalize = meta.normalize
        self.meta.normalize_fingerprint = meta.normalize_fingerprint
        if self.normalizer is None:  # a plain index replacing a normalised one of this name
            normalizer_file(path).unlink(missing_ok=True)
        keep = self.meta.params.get("ivfdata")
        for old in files.faiss.parent.glob(f"{files.faiss.stem}.*.ivfdata"):
            if old.name != keep:  # the lists of an index this one replaced
                old.unlink(missing_ok=True)
        return files.faiss


def _write_faiss(index: Any, path: Path) -> None:
    _faiss().write_index(index, str(path))
    _fsync(path)


def _oversample_search(
    index: Any, q: np.ndarray, k: int, need: int, mask: np.ndarray, params: Any,
    fallback: Any, max_k: int = GPU_MAX_K,
) -> tuple[np.ndarray, np.ndarray]:
    """Filtered top-k on an index without selector support (GPU): ask for more neighbours, keep
    the rows in ``mask``, grow the request ×4 for queries still short, and hand the queries that
    are short at the k limit to ``fallback(rows) -> (scores, positions)``."""
    n = int(index.ntotal)
    frac = max(float(mask.mean()), 1.0 / n)
    kk = min(max_k, n, max(2 * k, math.ceil(2 * k / frac)))
    scores = np.full((len(q), k), -np.inf, dtype=np.float32)
    pos = np.full((len(q), k), -1, dtype=np.int64)
    todo = np.arange(len(q))
    while len(todo):
        s, p = index.search(q[todo], kk, params=params)
        keep = (p >= 0) & mask[np.where(p >= 0, p, 0)]
        # stable sort puts kept hits first, in score order
        order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
        s_k = np.take_along_axis(s, order, axis=1)
        p_k = np.take_along_axis(p, order, axis=1)
        kept = np.take_along_axis(keep, order, axis=1)
        if kk < k:  # tiny index: pad to k columns
            pad = k - kk
            s_k = np.pad(s_k, ((0, 0), (0, pad)), constant_values=-np.inf)
            p_k = np.pad(p_k, ((0, 0), (0, pad)), constant_values=-1)
            kept = np.pad(kept, ((0, 0), (0, pad)), constant_values=False)
        scores[todo] = np.where(kept, s_k, -np.inf)
        pos[todo] = np.where(kept, p_k, -1)
        done = kept.sum(axis=1) >= need
        todo = todo[~done]
        if not len(todo):
            break
        if kk >= min(max_k, n):
            s_f, p_f = fallback(todo)
            scores[todo], pos[todo] = s_f, p_f
            break
        kk = min(max_k, n, 4 * kk)
    return scores, pos


# -------------------------------------------------------------------------------------------------
# loading
# -------------------------------------------------------------------------------------------------
def _check_meta(
    meta: IndexMeta, expect_encoder: str | None, expect_fingerprint: str | None, where: str,
) -> None:
    if expect_encoder is not None and meta.encoder_spec.strip() != expect_encoder.strip():
        raise CdirError(
            f"index {where} was built with encoder {meta.encoder_spec!r}, but {expect_encoder!r} "
            f"was asked for: rebuild it with `cdir index build --encoder {expect_encoder}` "
            f"(or search with --encoder {meta.encoder_spec})")
    if expect_fingerprint is not None and meta.manifest_fingerprint != expect_fingerprint:
        raise CdirError(
            f"index {where} was built for gallery fingerprint {meta.manifest_fingerprint!r}, but "
            f"the gallery is now {expect_fingerprint!r} (images added, removed or changed): "
            f"embed the new images with `cdir embed`, then update the index with "
            f"`cdir index build`")


def read_meta(path: str | os.PathLike) -> IndexMeta:
    """The sidecar of the index at ``path`` (cheap: reads only the JSON)."""
    files = index_files(path)
    if not files.meta.exists():
        raise CdirError(
            f"no index at {files.faiss.with_suffix('')} (missing {files.meta.name}): "
            "build one with `cdir index build`")
    try:
        with open(files.meta, encoding="utf-8") as f:
            raw = json.load(f)
        meta = IndexMeta.from_dict(raw)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CdirError(
            f"index sidecar {files.meta} is unreadable ({e}): rebuild with `cdir index build`"
        ) from None
    if meta.format > FORMAT_VERSION:
        raise CdirError(
            f"index {files.faiss} uses format {meta.format}, newer than this cdir understands "
            f"({FORMAT_VERSION}): upgrade cdir or rebuild the index")
    if meta.kind not in KINDS:
        raise CdirError(f"index sidecar {files.meta} names unknown type {meta.kind!r}: rebuild it")
    return meta


def load_normalizer(path: str | os.PathLike, meta: IndexMeta, hint: str | None = None
                    ) -> DomainNormalizer | None:
    """The normalisation statistics of the index at ``path`` (None for a plain index); refused
    when the file is missing, damaged, or not the one the sidecar ``meta`` names. ``hint``: the
    command that rebuilds the index, for the message."""
    from indexes.normalize import DomainNormalizer

    if meta.normalize == "none":
        return None
    f = normalizer_file(path)
    rebuild = f"rebuild with `{hint or f'cdir index build --normalize {meta.normalize}'}`"
    if not f.exists():
        raise CdirError(f"the {meta.normalize} statistics of index {index_files(path).faiss} "
                        f"are missing ({f.name}): {rebuild}")
    try:
        norm = DomainNormalizer.load(f)
    except CdirError as e:
        raise CdirError(f"{e} ({f}): {rebuild}") from None
    if (norm.method, norm.fingerprint) != (meta.normalize, meta.normalize_fingerprint):
        raise CdirError(f"the statistics {f.name} are not those index {index_files(path).faiss} "
                        f"was built with ({norm.method} {norm.fingerprint}, the sidecar says "
                        f"{meta.normalize} {meta.normalize_fingerprint}): {rebuild}")
    return norm


def load_index(
    path: str | os.PathLike,
    expect_encoder: str | None = None,
    expect_fingerprint: str | None = None,
    gpu: bool | None = None,
    verify: bool = True,
    normalizer: bool = True,
) -> CdirIndex:
    """Load the index at ``path``; refuse it if it was built with another encoder or for another
    gallery than expected. ``verify`` checks the sidecar's sha256 of the other two files (catches
    truncation and a save interrupted between its renames). ``gpu`` as in ``build_index``.
    ``normalizer``: load and check the normalisation statistics (the caller may do it itself)."""
    import pyarrow.parquet as pq

    files = index_files(path)
    meta = read_meta(files.faiss)
    _check_meta(meta, expect_encoder, expect_fingerprint, str(files.faiss))
    device, reason = choose_device(meta.kind, gpu)  # fail fast on --gpu without a GPU
    _log_device(meta.kind, gpu, device, reason)
    for f in (files.faiss, files.rows):
        if not f.exists():
            raise CdirError(f"index file {f} is missing: rebuild with `cdir index build`")
        want = meta.files.get(f.name)
        if verify and want and (f.stat().st_size != want.get("bytes")
                                or sha256_file(f) != want.get("sha256")):
            raise CdirError(
                f"index file {f} does not match its sidecar {files.meta.name} (a save was "
                "interrupted, or the file was changed): rebuild with `cdir index build`")
    try:
        flags = _faiss().IO_FLAG_ONDISK_SAME_DIR if meta.params.get("ivfdata") else 0
        if flags and not (files.faiss.parent / meta.params["ivfdata"]).exists():
            raise CdirError(f"the inverted lists {meta.params['ivfdata']} of {files.faiss} are "
                            "missing: rebuild with `cdir index build`")
        cpu_index = _faiss().read_index(str(files.faiss), flags)
        table = pq.read_table(files.rows, columns=["id", "domain"])
    except Exception as e:  # FAISS raises RuntimeError, pyarrow ArrowInvalid, on corrupt files
        raise CdirError(
            f"index {files.faiss} could not be read ({str(e).splitlines()[0]}): rebuild with "
            "`cdir index build`") from None
    if cpu_index.d != meta.dim or cpu_index.ntotal != meta.count:
        raise CdirError(
            f"index {files.faiss} holds {cpu_index.ntotal} × {cpu_index.d} vectors but its sidecar "
            f"says {meta.count} × {meta.dim}: rebuild with `cdir index build`")
    index = CdirIndex(
        cpu_index, meta, table.column("id").to_pylist(), table.column("domain").to_pylist())
    if normalizer:
        index.normalizer = load_normalizer(files.faiss, meta)
    if device == "gpu" and not meta.params.get("ivfdata"):  # on-disk lists stay on the CPU
        index._attach_gpu()
    return index
