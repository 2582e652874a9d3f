"""`--type auto`: the index family chosen from the collection's size, its dimension and a memory
budget, then its search parameter tuned on held-out queries to reach a recall target.

The choice (vectors of ``dim`` float32 take ``4 * dim`` bytes each):

    exact search is fast enough (n * dim <= 2e7, about 1 ms a query)    flat
    the vectors and an HNSW graph fit the budget, n <= 2M                hnsw (efSearch tuned)
    the vectors fit the budget                                           ivf  (nprobe tuned)
    they do not                                                          ivfpq, codes sized to it

Tuning: a sample of the indexed vectors serves as queries, each left out of its own answers
(its own vector is trivially its nearest), with exact search as the truth; the smallest nprobe
or efSearch whose recall@10 reaches the target is kept (the largest tried when none does, and the
sidecar says so), with the measured recall and the single-query time.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from cdir.core.errors import CdirError
from indexes.kinds import KINDS

if TYPE_CHECKING:
    from indexes.index import CdirIndex

FLAT_MAX_WORK = 2e7  # n * dim of an exact search of about a millisecond (2 CPU threads)
HNSW_MAX_N = 2_000_000  # beyond this an HNSW graph takes long to build on a few cores
HNSW_M = 32
UNITS = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
TUNE_QUERIES = 200
TIME_QUERIES = 100


def parse_memory(text: str | None) -> float | None:
    """'4GB' -> 4e9 bytes (also KB, MB, TB, and KiB..TiB); None stays None."""
    if text is None:
        return None
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = (m.group(2).lower() or "b") if m else ""
    if not m or unit not in UNITS or float(m.group(1)) <= 0:
        raise CdirError(f"--memory {text!r}: give a size such as 4GB, 512MB or 16GiB")
    return float(m.group(1)) * UNITS[unit]


@dataclass
class Choice:
    kind: str
    params: dict[str, Any]
    reason: str


def choose(n: int, dim: int, memory: float | None = None) -> Choice:
    """The index family for ``n`` vectors of ``dim`` within ``memory`` bytes (None: no limit)."""
    vectors = 4.0 * n * dim
    budget = math.inf if memory is None else memory
    mb = f"{vectors / 1e6:,.0f} MB of vectors"
    if n * dim <= FLAT_MAX_WORK and vectors <= budget:
        return Choice("flat", {}, f"{n} × {dim}: exact search is about a millisecond")
    graph = n * HNSW_M * 2 * 4.0
    if n <= HNSW_MAX_N and vectors + graph <= budget:
        return Choice("hnsw", {"hnsw_m": HNSW_M},
                      f"{mb} and an HNSW graph fit the budget; n ≤ {HNSW_MAX_N:,}")
    if vectors * 1.05 <= budget:
        return Choice("ivf", {}, f"{mb} fit the budget; IVF lists keep a query's work small")
    per_vector = budget / max(n, 1) * 0.9  # the codes, leaving room for the coarse quantizer
    m = max((d for d in range(1, min(dim, 64) + 1) if dim % d == 0 and d <= per_vector),
            default=None)
    if m is None:
        raise CdirError(f"{n:,} vectors cannot fit in {budget / 1e6:,.0f} MB even as 1-byte PQ "
                        "codes: raise --memory")
    return Choice("ivfpq", {"pq_m": m},
                  f"{mb} exceed the budget: PQ codes of {m} bytes a vector")


def _ground_truth(x: np.ndarray, queries: np.ndarray, rows: np.ndarray, k: int,
                  block: int = 65536) -> np.ndarray:
    """Exact top-``k`` positions of each query among all rows but its own, blockwise."""
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.full((len(queries), k), -1, np.int64)
    for s in range(0, len(x), block):
        sims = queries @ x[s:s + block].T
        own = (rows >= s) & (rows < s + block)
        sims[own.nonzero()[0], rows[own] - s] = -np.inf
        cand_s = np.concatenate([best_s, sims], 1)
        cand_i = np.concatenate([best_i, np.broadcast_to(np.arange(s, s + sims.shape[1]),
                                                         sims.shape)], 1)
        top = np.argpartition(-cand_s, k - 1, axis=1)[:, :k]
        best_s = np.take_along_axis(cand_s, top, 1)
        best_i = np.take_along_axis(cand_i, top, 1)
    return best_i


def _recall(index: CdirIndex, queries: np.ndarray, rows: np.ndarray, truth: np.ndarray, k: int,
            **search: int) -> float:
    res = index.search(queries, k=k + 1, **search)
    hits = 0
    for r, got, want in zip(rows, res.positions, truth, strict=True):
        got = [p for p in got if p != r and p >= 0][:k]
        hits += len(set(got) & set(want.tolist()))
    return hits / truth.size


def _ms_per_query(index: CdirIndex, queries: np.ndarray, **search: int) -> float:
    times = []
    for q in queries[:TIME_QUERIES]:
        t0 = time.perf_counter()
        index.search(q[None], k=10, **search)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def tune(index: CdirIndex, x: np.ndarray, target: float = 0.95, k: int = 10,
         n_queries: int = TUNE_QUERIES, seed: int = 0) -> dict[str, Any]:
    """Set ``index``'s nprobe / efSearch to the smallest value whose recall@``k`` against exact
    search reaches ``target`` on ``n_queries`` held-out rows of ``x`` (the indexed vectors, in
    index order); returns what was measured (also stored in ``index.meta.params['auto']``)."""
    if not 0 < target <= 1:
        raise CdirError(f"--recall must be in (0, 1], got {target}")
    n = len(x)
    k = min(k, n - 1)
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=min(n_queries, n), replace=False))
    queries = np.ascontiguousarray(x[rows])
    record: dict[str, Any] = {"recall_target": target, "k": k, "queries": len(rows)}
    knob = KINDS[index.kind].knob  # None: exact, nothing to tune
    if knob is None or k < 1:
        record.update(recall=1.0, ms_per_query=_ms_per_query(index, queries))
        index.meta.params["auto"] = record
        return record
    truth = _ground_truth(x, queries, rows, k)
    name, values = knob.name, knob.tries(index.meta.params)
    tried = []
    for v in values:
        r = _recall(index, queries, rows, truth, k, **{name: v})
        tried.append((v, r))
        if r >= target:
            break
    value, recall = tried[-1]
    index.meta.params[name] = value
    record.update({name: value, "recall": recall, "reached": recall >= target,
                   "tried": [[v, round(r, 4)] for v, r in tried],
                   "ms_per_query": _ms_per_query(index, queries)})
    index.meta.params["auto"] = record
    return record


def describe(choice: Choice, record: dict[str, Any]) -> str:
    """One line for the user: the family, why, the tuned parameter and what was measured."""
    knob = KINDS[choice.kind].knob
    if knob is None:
        return (f"auto: flat ({choice.reason}); exact, {record['ms_per_query']:.2f} ms a query "
                f"(timed on {min(record['queries'], TIME_QUERIES)} queries)")
    tuned = f"{knob.name} {record[knob.name]}" if knob.name in record else ""
    reached = ("" if record.get("reached", True)
               else f" (target {record['recall_target']} not reached)")
    return (f"auto: {choice.kind} ({choice.reason}); {tuned + ', ' if tuned else ''}"
            f"recall@{record['k']} {record['recall']:.3f}{reached} on {record['queries']} "
            f"held-out queries, {record['ms_per_query']:.2f} ms a query")
