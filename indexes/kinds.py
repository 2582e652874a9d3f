"""The index kinds: one ``IndexKind`` each (exact flat, IVF-Flat, IVF-PQ, HNSW), all cosine.

``KINDS`` is the one table of kinds and the one place that dispatches on them: what a kind
accepts and defaults to (``default_params``), how an empty index of it is made and trained, its
search-time knob (``nprobe`` / ``efSearch``: how far a search looks, widened for a filtered query
short of hits, tuned by `indexes.auto`), and where it can run (``choose_device``, ``to_gpu``).
Building (`indexes.build`), the sidecar (`indexes.meta`) and searching (`indexes.index`) ask the
kind instead of testing its name.

Importing this module does not import FAISS (`cdir --help` lists the kinds).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from cdir.core.errors import CdirError

log = logging.getLogger(__name__)

# FAISS GPU k-selection limit (GPU_MAX_SELECTION_K); also the cap on nprobe for GPU IVF.
GPU_MAX_K = 2048
# FAISS k-means warns below this many training points per centroid; we size nlist / nbits to it.
MIN_POINTS_PER_CENTROID = 39
PQ_MIN_POINTS_PER_CODE = 4
TRAIN_POINTS_PER_CENTROID = 256  # FAISS's own cap (max_points_per_centroid): more is subsampled

Params = dict[str, Any]


@dataclass(frozen=True)
class Knob:
    """The search-time parameter of an approximate kind: larger looks further, finds more, costs
    more. Its value is stored in the sidecar's params under ``name``, which is also the keyword
    of `CdirIndex.search` that overrides it for one call."""

    name: str
    ceiling: Callable[[Params, int, int], int]  # (params, rows, k) -> the largest useful value
    tries: Callable[[Params], list[int]]  # the values `--type auto` tries, ascending
    search_params: Callable[[int], Any]  # value -> FAISS SearchParameters (CPU)
    gpu_search_params: Callable[[int], Any] | None = None  # the same for the GPU copy


@dataclass(frozen=True)
class IndexKind:
    """What one kind of index is and how it is handled (the functions import FAISS when run)."""

    help: str  # one line for `cdir index build --help`
    params: tuple[str, ...]  # the build/search parameters it accepts (overrides are checked)
    defaults: Callable[[int, int, Params], Params]  # (n, dim, given overrides) -> full params
    make: Callable[[int, int, Params], Any]  # (dim, n, params) -> an empty FAISS index
    # the training sample size (None: nothing to train) and the training, given the sample and
    # an optional GPU index to run the k-means assignment on
    train_points: Callable[[Params], int] | None = None
    train: Callable[[Any, Any, Any], None] | None = None
    knob: Knob | None = None  # None: exact, nothing to tune or widen
    exact_vectors: bool = False  # `reconstruct` gives back the indexed vectors
    gpu: bool = True  # FAISS has a GPU version (index_cpu_to_gpu can move it)
    gpu_float16: bool = False  # float16 lookup tables on the GPU
    on_disk: bool = False  # inverted lists that a sharded build merges into a file on disk


# -------------------------------------------------------------------------------------------------
# parameters (pure, no FAISS)
# -------------------------------------------------------------------------------------------------
def _default_nlist(n: int) -> int:
    return max(1, min(round(4 * math.sqrt(n)), n // MIN_POINTS_PER_CENTROID))


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


def _flat_defaults(n: int, dim: int, given: Params) -> Params:
    return {}


def _ivf_defaults(n: int, dim: int, given: Params) -> Params:
    nlist = int(given.get("nlist") or _default_nlist(n))
    if not 1 <= nlist <= n:
        raise CdirError(
            f"nlist={nlist} needs at least {nlist} vectors to train (got {n}); "
            f"use nlist ≤ {max(1, n // MIN_POINTS_PER_CENTROID)} or a flat index")
    nprobe = int(given.get("nprobe") or min(nlist, max(8, round(2 * math.sqrt(nlist)))))
    return {"nlist": nlist, "nprobe": max(1, min(nprobe, nlist)),
            "seed": int(given.get("seed", 1234))}


def _ivfpq_defaults(n: int, dim: int, given: Params) -> Params:
    p = _ivf_defaults(n, dim, given)
    m = int(given.get("pq_m") or _default_pq_m(dim))
    if m < 1 or dim % m:
        raise CdirError(f"pq_m={m} must divide the vector dimension {dim}")
    p["pq_m"] = m
    nbits = int(given.get("pq_nbits") or _default_pq_nbits(n))
    if not 1 <= nbits <= 16 or 2**nbits > n:
        raise CdirError(
            f"pq_nbits={nbits} needs 1..16 bits and at least 2^{nbits} vectors to train "
            f"(got {n}); use pq_nbits ≤ {_default_pq_nbits(n)}")
    p["pq_nbits"] = nbits
    refine = int(given.get("refine") or 0)
    if refine < 0:
        raise CdirError(f"refine={refine}: give the candidates re-ranked per result (0: off)")
    if refine:
        p["refine"] = refine
    return p


def _hnsw_defaults(n: int, dim: int, given: Params) -> Params:
    p = {"hnsw_m": int(given.get("hnsw_m") or 32),
         "ef_construction": int(given.get("ef_construction") or 80),
         "ef_search": int(given.get("ef_search") or 64)}
    if min(p.values()) < 1:
        raise CdirError(f"HNSW parameters must be positive: {p}")
    return p


# -------------------------------------------------------------------------------------------------
# FAISS objects of each kind
# -------------------------------------------------------------------------------------------------
def _make_flat(d: int, n: int, p: Params) -> Any:
    import faiss

    return faiss.IndexFlatIP(d)


def _make_hnsw(d: int, n: int, p: Params) -> Any:
    import faiss

    index = faiss.IndexHNSWFlat(d, p["hnsw_m"], faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = p["ef_construction"]
    index.hnsw.efSearch = p["ef_search"]
    return index


def _ivf_setup(index: Any, n: int, p: Params) -> Any:
    index.cp.seed = p["seed"]
    index.cp.spherical = True  # centroids on the unit sphere: k-means for cosine
    index.cp.min_points_per_centroid = min(MIN_POINTS_PER_CENTROID, max(1, n // p["nlist"]))
    index.nprobe = p["nprobe"]
    # (faiss's Python wrapper keeps the quantizer referenced by the index; no own_fields juggling)
    return index


def _make_ivf(d: int, n: int, p: Params) -> Any:
    import faiss

    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, p["nlist"], faiss.METRIC_INNER_PRODUCT)
    return _ivf_setup(index, n, p)


def _make_ivfpq(d: int, n: int, p: Params) -> Any:
    import faiss

    index = faiss.IndexIVFPQ(faiss.IndexFlatIP(d), d, p["nlist"], p["pq_m"], p["pq_nbits"],
                             faiss.METRIC_INNER_PRODUCT)
    index.pq.cp.seed = p["seed"]
    # we chose nbits for the data size; don't let FAISS print warnings for tiny collections
    index.pq.cp.min_points_per_centroid = min(
        MIN_POINTS_PER_CENTROID, max(1, n // 2 ** p["pq_nbits"]))
    return _ivf_setup(index, n, p)


def _ivf_train_points(p: Params) -> int:
    return TRAIN_POINTS_PER_CENTROID * p["nlist"]


def _ivf_train(index: Any, sample: Any, assign_gpu: Any = None) -> None:
    if assign_gpu is not None:
        index.clustering_index = assign_gpu  # k-means assignment on the GPU; centroids stay CPU
    index.train(sample)
    if assign_gpu is not None:
        index.clustering_index = None


def _ivf_search_params(nprobe: int) -> Any:
    import faiss

    sp = faiss.SearchParametersIVF()
    sp.nprobe = nprobe
    return sp


def _hnsw_search_params(ef_search: int) -> Any:
    import faiss

    sp = faiss.SearchParametersHNSW()
    sp.efSearch = ef_search
    return sp


# how far an IVF search looks: lists probed, at most all of them; GPU IVF caps nprobe
NPROBE = Knob(
    "nprobe", ceiling=lambda p, n, k: p["nlist"],
    tries=lambda p: sorted({min(p["nlist"], 2**i) for i in range(0, 16)}),
    search_params=_ivf_search_params,
    gpu_search_params=lambda nprobe: _ivf_search_params(min(nprobe, GPU_MAX_K)))
# how far an HNSW search looks: the candidate list, beyond the row count it finds nothing more
EF_SEARCH = Knob(
    "ef_search", ceiling=lambda p, n, k: max(n, k),
    tries=lambda p: [16, 32, 64, 128, 256, 512, 1024, 2048],
    search_params=_hnsw_search_params)


# index kind -> what it is; the order is the one `cdir index build --type` lists
KINDS: dict[str, IndexKind] = {
    "flat": IndexKind(
        help="exact", params=(), defaults=_flat_defaults, make=_make_flat,
        exact_vectors=True),
    "ivf": IndexKind(
        help="inverted lists (faster, approximate)", params=("nlist", "nprobe", "seed"),
        defaults=_ivf_defaults, make=_make_ivf, train_points=_ivf_train_points,
        train=_ivf_train, knob=NPROBE, on_disk=True),
    "ivfpq": IndexKind(
        help="inverted lists of compressed codes (smaller, more approximate)",
        params=("nlist", "nprobe", "pq_m", "pq_nbits", "seed", "refine"),
        defaults=_ivfpq_defaults, make=_make_ivfpq, train_points=_ivf_train_points,
        train=_ivf_train, knob=NPROBE, on_disk=True,
        # float16 lookup tables let large pq_m fit in shared memory (FAISS's usual advice);
        # the other kinds keep float32 vectors on the GPU so scores match the CPU index
        gpu_float16=True),
    "hnsw": IndexKind(
        help="graph", params=("hnsw_m", "ef_construction", "ef_search"),
        defaults=_hnsw_defaults, make=_make_hnsw, knob=EF_SEARCH, exact_vectors=True,
        gpu=False),
}


def kind_of(kind: str) -> IndexKind:
    """The ``IndexKind`` named ``kind``; a CdirError naming the kinds otherwise."""
    if kind not in KINDS:
        raise CdirError(f"unknown index type {kind!r}: choose one of {', '.join(KINDS)}")
    return KINDS[kind]


def kinds_where(test: Callable[[IndexKind], bool]) -> str:
    """The kinds that pass ``test``, for a message: "ivf or ivfpq"."""
    return " or ".join(name for name, k in KINDS.items() if test(k))


def default_params(kind: str, n: int, dim: int, **overrides: Any) -> Params:
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
    k = kind_of(kind)
    unknown = sorted(set(overrides) - set(k.params))
    if unknown:
        raise CdirError(
            f"index type {kind!r} has no parameter(s) {', '.join(unknown)}; it takes "
            f"{', '.join(k.params) or 'none'}")
    return k.defaults(n, dim, {key: v for key, v in overrides.items() if v is not None})


def small_data_note(kind: str, n: int, params: Params,
                    given: Params | None = None) -> str | None:
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


# -------------------------------------------------------------------------------------------------
# device
# -------------------------------------------------------------------------------------------------
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
        import faiss

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
    if not KINDS[kind].gpu:
        return "cpu", f"FAISS has no GPU version of {kind} indexes"
    return "gpu", f"{num_gpus} GPU(s) visible"


def log_device(kind: str, gpu: bool | None, device: str, reason: str) -> None:
    """Say where an index runs: a warning when a GPU was asked for but not used, else a note."""
    level = logging.WARNING if gpu and device == "cpu" else logging.INFO
    log.log(level, "%s index on %s (%s)", kind, device.upper(), reason)


class Gpu(NamedTuple):
    index: Any
    resources: Any  # StandardGpuResources must outlive the GPU index


def to_gpu(cpu_index: Any, what: str, float16: bool = False, device: int = 0) -> Gpu | None:
    """Copy ``cpu_index`` to GPU ``device`` (``float16``: an `IndexKind.gpu_float16` kind); None
    (and a warning naming ``what``) if FAISS can't."""
    import faiss

    try:
        res = faiss.StandardGpuResources()
        co = faiss.GpuClonerOptions()
        co.useFloat16 = float16
        return Gpu(faiss.index_cpu_to_gpu(res, device, cpu_index, co), res)
    except Exception as e:  # FAISS raises RuntimeError for unsupported layouts (e.g. PQ sizes)
        log.warning("could not move the %s to GPU %d (%s); it stays on CPU", what, device, e)
        return None
