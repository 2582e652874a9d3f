"""A loaded FAISS index: its rows (ids, domains), its sidecar, its search; and ``load_index``.

Indexes are cosine (inner product on L2-normalised vectors) over exact flat, IVF-Flat, IVF-PQ or
HNSW (`indexes.kinds`); they are built by `indexes.build`, and their files and sidecar are
described in `indexes.meta`.

FAISS labels are row positions: vectors are added in manifest order, so label ``i`` is manifest
row ``i`` (an incremental ``add`` appends rows after the existing ones).

Search returns ``SearchResult(scores, positions, ids)``, each of shape ``(n_queries, k)``, best
first. Where fewer than ``k`` vectors qualify (a small gallery or a small domain), the tail of a
row is padded with score ``-inf``, position ``-1`` and id ``""``; padding is always at the end.

Domain filter: ``search(..., domain="Clipart")`` returns the top-k *within* that domain (not the
top-k overall, filtered afterwards). On CPU the filter runs inside FAISS (``SearchParameters.sel``
with an ``IDSelectorBitmap``; flat, IVF, IVF-PQ and HNSW all honour it in faiss 1.15); an
approximate index that finds fewer than ``k`` in-domain hits for a query is searched again with a
doubled ``nprobe`` / ``efSearch`` (its kind's knob) for that query. GPU indexes ignore selectors,
so on GPU the search asks for more neighbours than ``k`` (oversampling), keeps the in-domain ones,
and sends queries still short of hits to the CPU copy with the selector.

Device: ``gpu=None`` uses a GPU when the installed faiss is a GPU build and sees a GPU;
``gpu=True`` demands one; ``gpu=False`` stays on CPU. The CPU index is the authoritative copy
(``save``, filtered fall-backs, ``add``); the GPU copy mirrors it. A kind FAISS has no GPU
version of (HNSW) stays on CPU with a logged note.

Saving is atomic: the three files go to temporary files first and are renamed into place only
when all are complete, the sidecar last. ``load_index`` checks the sidecar's checksums, so files
left inconsistent by a crash between two renames are refused instead of mixing two indexes.
"""

from __future__ import annotations

import logging
import math
import os
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path
from indexes.kinds import GPU_MAX_K, KINDS, Gpu, IndexKind, choose_device, log_device, to_gpu
from indexes.meta import (
    IndexMeta,
    check_meta,
    checksums,
    fsync,
    index_files,
    load_normalizer,
    normalizer_file,
    read_meta,
    verify_files,
    write_meta,
)

if TYPE_CHECKING:
    from indexes.normalize import DomainNormalizer

log = logging.getLogger(__name__)


class SearchResult(NamedTuple):
    """Search output, each ``(n_queries, k)``; padding: score -inf, position -1, id ""."""

    scores: np.ndarray  # float32, best first
    positions: np.ndarray  # int64 manifest rows
    ids: np.ndarray  # object array of str


def check_vectors(x: Any, what: str, dim: int | None = None,
                  rows: int | np.ndarray = 0) -> np.ndarray:
    """``x`` as float32 C-contiguous (n, d), finite, non-zero rows, re-normalised to unit length.
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


def check_rows(ids: Sequence[str], domains: Sequence[str], n: int) -> tuple[list[str], list[str]]:
    """``ids`` and ``domains`` as strings, one each for ``n`` vectors, the ids unique."""
    ids = [str(i) for i in ids]
    domains = [str(d) for d in domains]
    if len(ids) != n or len(domains) != n:
        raise CdirError(
            f"got {n} vectors but {len(ids)} ids and {len(domains)} domains: they must match")
    if len(set(ids)) != n:
        dup = sorted(i for i, c in Counter(ids).items() if c > 1)
        raise CdirError(f"{len(dup)} duplicate id(s) among the vectors: {', '.join(dup[:5])}")
    return ids, domains


# -------------------------------------------------------------------------------------------------
# the index
# -------------------------------------------------------------------------------------------------
class CdirIndex:
    """A FAISS index with its rows (ids, domains) and metadata. Build with
    `indexes.build.build_index` or ``load_index``."""

    def __init__(self, cpu_index: Any, meta: IndexMeta, ids: list[str], domains: list[str]):
        if cpu_index.ntotal != len(ids) or len(ids) != len(domains):
            raise CdirError(
                f"index holds {cpu_index.ntotal} vectors but {len(ids)} ids / {len(domains)} "
                "domains: the index files don't belong together; rebuild with `cdir index build`")
        self._cpu = cpu_index
        self._gpu: Gpu | None = None
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
    def index_kind(self) -> IndexKind:
        """What this kind of index is (`indexes.kinds.KINDS`)."""
        return KINDS[self.meta.kind]

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
        if not self.index_kind.exact_vectors or any(i not in self._pos for i in ids):
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
        self._gpu = to_gpu(self._cpu, f"{self.kind} index", self.index_kind.gpu_float16)
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
        check_meta(self.meta, expect_encoder, expect_fingerprint, str(where) or repr(self))

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

        ``nprobe`` (IVF kinds) / ``ef_search`` (HNSW) override the built-in values for this call
        (the kind's knob; the other is ignored).
        """
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise CdirError(f"k must be a positive integer, got {k!r}")
        k = int(k)
        q = check_vectors(queries, "queries", self.dim)
        sel = self._selection(domain)
        n_eligible = len(self) if sel is None else sel[2]
        need = min(k, n_eligible)
        knob = self.index_kind.knob
        reach = None  # how far the search looks: the value of the kind's knob, None when exact
        if knob is not None:
            given = {"nprobe": nprobe, "ef_search": ef_search}.get(knob.name)
            reach = int(given or self.meta.params[knob.name])

        # never ask FAISS for more than the index holds (k=10**6 on 100 rows must not allocate
        # n×10**6 results, nor push a small GPU search over the GPU k limit); pad afterwards
        kk = min(k, len(self))
        if self._gpu is not None and kk <= GPU_MAX_K:
            scores, pos = self._search_gpu(q, kk, need, sel, reach)
        else:
            scores, pos = self._search_cpu(q, kk, need, sel, reach)
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

    def _params(self, reach: int | None, selector: Any = None) -> Any:
        import faiss

        knob = self.index_kind.knob
        sp = knob.search_params(reach) if knob is not None else faiss.SearchParameters()
        if selector is not None:  # under a refine, the selector filters the PQ candidates
            sp.sel = selector
        if not self.meta.params.get("refine"):
            return sp
        outer = faiss.IndexRefineSearchParameters()
        outer.k_factor = float(self.meta.params["refine"])
        outer.base_index_params = sp
        outer._base = sp  # keep the inner parameters alive while FAISS reads them
        return outer

    def _search_cpu(
        self, q: np.ndarray, k: int, need: int,
        sel: tuple[np.ndarray, np.ndarray, int] | None, reach: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        import faiss

        selector = None
        if sel is not None:
            bitmap = sel[1]  # stays referenced by `sel` (cached) while FAISS reads it
            selector = faiss.IDSelectorBitmap(len(bitmap), faiss.swig_ptr(bitmap))
        sp = self._params(reach, selector)
        scores, pos = self._cpu.search(q, k, params=sp)
        # An approximate index may stop short of `need` hits (a small domain, a small nprobe):
        # widen the search for those queries until it finds them or can't widen further.
        knob = self.index_kind.knob
        ceiling = knob.ceiling(self.meta.params, len(self), k) if knob is not None else 0
        while True:
            short = np.flatnonzero((pos >= 0).sum(axis=1) < need)
            if not len(short) or reach is None or reach >= ceiling:
                break
            reach = min(2 * reach, ceiling)
            s2, p2 = self._cpu.search(q[short], k, params=self._params(reach, selector))
            scores[short], pos[short] = s2, p2
        return scores, pos

    def _search_gpu(
        self, q: np.ndarray, k: int, need: int,
        sel: tuple[np.ndarray, np.ndarray, int] | None, reach: int | None,
    ) -> tuple[np.ndarray, np.ndarray]:
        assert self._gpu is not None
        knob = self.index_kind.knob
        sp = None  # GPU indexes take no selector; GPU IVF takes its nprobe, nothing else
        if knob is not None and knob.gpu_search_params is not None:
            sp = knob.gpu_search_params(reach)
        if sel is None:
            return self._gpu.index.search(q, k, params=sp)
        return _oversample_search(
            self._gpu.index, q, k, need, sel[0], sp,
            fallback=lambda rows: self._search_cpu(q[rows], k, need, sel, reach))

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
        x = check_vectors(vectors, "vectors", self.dim)
        ids, domains = check_rows(ids, domains, len(x))
        clash = [i for i in ids if i in self._pos]
        if clash:
            raise CdirError(
                f"{len(clash)} id(s) are already in the index (e.g. {', '.join(clash[:3])}): "
                "add only new images, or rebuild with `cdir index build`")
        if not len(x):
            return
        start = len(self)
        with faiss_quiet():  # on-disk lists say they grow
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
            meta.normalize_dim = (self.normalizer.pca_dim
                                  if self.normalizer.out_dim < self.normalizer.dim else 0)
        else:
            meta.normalize, meta.normalize_fingerprint, meta.normalize_dim = "none", "", 0
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
            fsync(tmp_rows)
            meta.files = checksums({files.faiss: tmp_faiss, files.rows: tmp_rows})
            write_meta(meta, tmp_meta)
        self.meta.files = meta.files
        self.meta.normalize = meta.normalize
        self.meta.normalize_fingerprint = meta.normalize_fingerprint
        self.meta.normalize_dim = meta.normalize_dim
        if self.normalizer is None:  # a plain index replacing a normalised one of this name
            normalizer_file(path).unlink(missing_ok=True)
        keep = self.meta.params.get("ivfdata")
        for old in files.faiss.parent.glob(f"{files.faiss.stem}.*.ivfdata"):
            if old.name != keep:  # the lists of an index this one replaced
                old.unlink(missing_ok=True)
        return files.faiss


@contextmanager
def faiss_quiet() -> Iterator[None]:
    """FAISS's on-disk inverted lists print lines of their own from C++ ("resizing FILE to N
    bytes" as they grow, "IO_FLAG_ONDISK_SAME_DIR: updating ondisk filename ..." when read),
    with no flag to turn them off: while this block runs, the process's stdout and stderr go
    to /dev/null (C's buffers flushed on both sides, so nothing printed inside leaks later and
    nothing printed before is lost)."""
    import ctypes
    import sys

    try:
        libc = ctypes.CDLL(None)
        saved = [os.dup(fd) for fd in (1, 2)]
    except OSError:  # no C library to flush, or no stdout/stderr to silence: nothing to hide
        yield
        return
    for stream in (sys.stdout, sys.stderr):
        if stream is not None:
            stream.flush()
    libc.fflush(None)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(devnull, fd)
        yield
    finally:
        libc.fflush(None)
        for fd, copy in zip((1, 2), saved, strict=True):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(devnull)


def _write_faiss(index: Any, path: Path) -> None:
    import faiss

    faiss.write_index(index, str(path))
    fsync(path)


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
    truncation and a save interrupted between its renames). ``gpu`` as in
    `indexes.build.build_index`. ``normalizer``: load and check the normalisation statistics
    (the caller may do it itself)."""
    import pyarrow.parquet as pq

    files = index_files(path)
    meta = read_meta(files.faiss)
    check_meta(meta, expect_encoder, expect_fingerprint, str(files.faiss))
    device, reason = choose_device(meta.kind, gpu)  # fail fast on --gpu without a GPU
    log_device(meta.kind, gpu, device, reason)
    verify_files(files, meta, verify)
    import faiss

    try:
        flags = faiss.IO_FLAG_ONDISK_SAME_DIR if meta.params.get("ivfdata") else 0
        if flags and not (files.faiss.parent / meta.params["ivfdata"]).exists():
            raise CdirError(f"the inverted lists {meta.params['ivfdata']} of {files.faiss} are "
                            "missing: rebuild with `cdir index build`")
        with faiss_quiet():  # on-disk lists name the file they map
            cpu_index = faiss.read_index(str(files.faiss), flags)
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
