"""Label-free cross-domain correspondence mining, and the label-free model-selection criteria.

Input: embeddings (normalised by the caller, e.g. per-domain whitening from
``indexes.normalize``; rows L2-normalised, cosine = dot product) and the domain name of each row.
Labels are never read here, except by :func:`pair_precision`, which is for reports only.

Matchers between two domains A and B (``MATCHERS``, each ``(a, b, **options) -> Pairs``):

- ``mutual-nn``: (i, j) with j the nearest B item of i and i the nearest A item of j, blockwise
  top-2 both ways. Confidence: the margin, min(best - second best of row i, of column j).
- ``sinkhorn``: an entropic optimal-transport plan with uniform marginals on the similarity
  matrix (log domain); pairs are the mutual argmaxes of the plan (one-to-one). Confidence: the
  share of i's (and j's) mass on the partner, in [0, 1]. The dense plan costs O(n_A n_B) memory:
  above ``max_size`` items on either side (default 4096, i.e. a 64 MB float32 matrix) it falls
  back to mutual-nn and says so in ``Pairs.method``.
- ``hungarian``: the maximum-similarity one-to-one assignment (scipy's ``linear_sum_assignment``,
  used only when scipy is importable; not a dependency of the project). Confidence: the margin of
  the assigned similarity over the best alternative in its row and column (may be negative).
  Same size limit and fallback as sinkhorn.

One-to-one matchers suit instance galleries (each item has one partner in the other domain); on
category galleries prefer mutual-nn.

Filters: cycle consistency through a third domain C (nearest-neighbour maps: a pair (i, j) of
(A, B) survives C when j -> C -> A returns to i and, with ``both_ways``, i -> C -> B returns to
j) and a confidence threshold (a quantile per domain pair, or an absolute value).

Cost: mutual-nn and the maps are blockwise top-k (O(n_A n_B D), a bounded block in memory).
Sinkhorn is O(n_A n_B) per iteration in numpy: about 2-8 s for 1,275 x 1,275 at eps 0.05
on 2 CPU cores, roughly ten times more per iteration at the 4,096 limit.

Criteria (:func:`mining_stats`, spec section 6): the mutual-NN rate, the cycle-consistency rate
A -> B -> C -> A, the hubness (skew of the k-occurrence distribution) and, for mined pairs, their
count, coverage, mean confidence, mutual agreement and cycle rate.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from itertools import combinations, permutations

import numpy as np

from cdir.core.errors import CdirError
from cdir.core.knn import DEFAULT_BLOCK, as_matrix, nearest

# Largest side of a dense assignment (Sinkhorn plan, Hungarian cost matrix) before the fallback.
DEFAULT_MAX_SIZE = 4096
DEFAULT_EPS = 0.05  # entropic regularisation of Sinkhorn, on cosine similarities
DEFAULT_SINKHORN_ITERS = 200
DEFAULT_K = 10  # neighbourhood size of the hubness statistic


@dataclass(frozen=True, eq=False)  # arrays: no elementwise ==
class Pairs:
    """Mined correspondences: rows ``a[t]`` and ``b[t]`` (of the two collections given, or global
    rows after :meth:`remap`) with ``confidence[t]`` (higher = surer) and their cosine
    ``similarity[t]`` (NaN when unknown). ``info``: scalars about the matching as a whole."""

    a: np.ndarray
    b: np.ndarray
    confidence: np.ndarray
    similarity: np.ndarray | None = None
    method: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        a = np.asarray(self.a, np.int64).reshape(-1)
        sim = np.full(len(a), np.nan) if self.similarity is None else self.similarity
        object.__setattr__(self, "a", a)
        object.__setattr__(self, "b", np.asarray(self.b, np.int64).reshape(-1))
        object.__setattr__(self, "confidence",
                           np.asarray(self.confidence, np.float32).reshape(-1))
        object.__setattr__(self, "similarity", np.asarray(sim, np.float32).reshape(-1))
        if not len(a) == len(self.b) == len(self.confidence) == len(self.similarity):
            raise ValueError("a, b, confidence and similarity must have the same length")

    def __len__(self) -> int:
        return len(self.a)

    def select(self, mask: np.ndarray) -> Pairs:
        """The pairs where ``mask`` (bool, or indices) holds."""
        return Pairs(self.a[mask], self.b[mask], self.confidence[mask], self.similarity[mask],
                     self.method, dict(self.info))

    def remap(self, rows_a: np.ndarray, rows_b: np.ndarray) -> Pairs:
        """Local indices -> ``rows_a[a]``, ``rows_b[b]`` (e.g. the manifest rows of each domain)."""
        return Pairs(np.asarray(rows_a)[self.a], np.asarray(rows_b)[self.b], self.confidence,
                     self.similarity, self.method, dict(self.info))

    def to_array(self) -> np.ndarray:
        """[n, 3] float64: index_a, index_b, confidence."""
        return np.stack([self.a, self.b, self.confidence.astype(np.float64)], axis=1) \
            if len(self) else np.zeros((0, 3))

    @staticmethod
    def concat(parts: Sequence[Pairs], method: str = "") -> Pairs:
        """One Pairs of several (their ``info`` is dropped)."""
        if not parts:
            return _empty(method)
        return Pairs(np.concatenate([p.a for p in parts]), np.concatenate([p.b for p in parts]),
                     np.concatenate([p.confidence for p in parts]),
                     np.concatenate([p.similarity for p in parts]), method)


def _empty(method: str, info: dict | None = None) -> Pairs:
    return Pairs(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros(0), method, info or {})


def nn_map(a: np.ndarray, b: np.ndarray, block: int = DEFAULT_BLOCK) -> np.ndarray:
    """The index of the nearest row of ``b`` for each row of ``a`` (int64 [n_a])."""
    return nearest(a, b, 1, block)[0][:, 0]


def _margin(sim: np.ndarray) -> np.ndarray:
    # best minus second best; a lone candidate counts against the cosine floor -1
    return sim[:, 0] - np.maximum(sim[:, 1], -1.0)


def mutual_nn(a: np.ndarray, b: np.ndarray, block: int = DEFAULT_BLOCK,
              confidence: str = "margin") -> Pairs:
    """Mutual nearest neighbours of ``a`` and ``b``; ``confidence`` "margin" (see the module
    docstring) or "similarity"."""
    if confidence not in ("margin", "similarity"):
        raise CdirError(f"confidence must be 'margin' or 'similarity', not {confidence!r}")
    ia, sa = nearest(a, b, 2, block)
    ib, sb = nearest(b, a, 2, block)
    if len(a) == 0 or len(b) == 0:
        return _empty("mutual-nn")
    i = np.flatnonzero(ib[ia[:, 0], 0] == np.arange(len(a)))
    j = ia[i, 0]
    conf = (sa[i, 0] if confidence == "similarity"
            else np.minimum(_margin(sa)[i], _margin(sb)[j]))
    return Pairs(i, j, conf, sa[i, 0], "mutual-nn")


def _logsumexp(z: np.ndarray, axis: int) -> np.ndarray:
    top = z.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(z - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def sinkhorn_potentials(sim: np.ndarray, eps: float = DEFAULT_EPS,
                        iters: int = DEFAULT_SINKHORN_ITERS, tol: float = 1e-4
                        ) -> tuple[np.ndarray, np.ndarray, dict]:
    """Log-domain Sinkhorn on ``sim`` [n_a, n_b] with uniform marginals: the potentials (f, g)
    of the plan P = exp(sim/eps + f_i + g_j), iterated until the row marginals are within
    ``tol`` (mean relative error) or ``iters`` rounds. Returns (f, g, {"iterations",
    "marginal_error"}). ``sim + eps * g`` ranks each row like its plan row: a transductive,
    hubness-correcting score for retrieval."""
    sim = np.asarray(sim, np.float32)
    n_a, n_b = sim.shape
    f = np.zeros(n_a, np.float32)
    g = np.zeros(n_b, np.float32)
    if n_a == 0 or n_b == 0:
        return f, g, {"iterations": 0, "marginal_error": 0.0}
    m = sim / np.float32(eps)
    log_mu, log_nu = -np.log(n_a), -np.log(n_b)
    err, done = np.inf, 0
    while done < max(1, iters) and err >= tol:
        f = (log_mu - _logsumexp(m + g[None, :], 1)).astype(np.float32)
        g = (log_nu - _logsumexp(m + f[:, None], 0)).astype(np.float32)
        done += 1
        if done % 5 == 0 or done == iters:  # the check costs a third pass: not every time
            # after the g-step columns are exact; the rows tell how far from converged
            err = float(np.abs(np.exp(_logsumexp(m + g[None, :], 1) + f) * n_a - 1.0).mean())
    return f, g, {"iterations": done, "marginal_error": err}


def sinkhorn_plan(sim: np.ndarray, eps: float = DEFAULT_EPS,
                  iters: int = DEFAULT_SINKHORN_ITERS, tol: float = 1e-4
                  ) -> tuple[np.ndarray, dict]:
    """The entropic OT plan P [n_a, n_b] (sums to 1, marginals 1/n_a and 1/n_b) maximising
    <P, sim> + eps H(P) (see :func:`sinkhorn_potentials`). Returns (P float32, info)."""
    sim = np.asarray(sim, np.float32)
    f, g, info = sinkhorn_potentials(sim, eps, iters, tol)
    plan = np.exp(sim / np.float32(eps) + f[:, None] + g[None, :])
    return plan.astype(np.float32), info


def _too_big(a: np.ndarray, b: np.ndarray, max_size: int) -> bool:
    return max(len(a), len(b)) > max_size


def _fallback(a: np.ndarray, b: np.ndarray, block: int, method: str, max_size: int) -> Pairs:
    p = mutual_nn(a, b, block)
    return Pairs(p.a, p.b, p.confidence, p.similarity,
                 f"mutual-nn (fallback: {method} is limited to {max_size} items a side)")


def sinkhorn_match(a: np.ndarray, b: np.ndarray, eps: float = DEFAULT_EPS,
                   iters: int = DEFAULT_SINKHORN_ITERS, max_size: int = DEFAULT_MAX_SIZE,
                   block: int = DEFAULT_BLOCK) -> Pairs:
    """One-to-one pairs: mutual argmaxes of the Sinkhorn plan between ``a`` and ``b``."""
    a, b = as_matrix(a, "a"), as_matrix(b, "b")
    if _too_big(a, b, max_size):
        return _fallback(a, b, block, "sinkhorn", max_size)
    sim = a @ b.T
    plan, info = sinkhorn_plan(sim, eps, iters)
    if plan.size == 0:
        return _empty("sinkhorn", info)
    j = plan.argmax(1)
    i = np.flatnonzero(plan.argmax(0)[j] == np.arange(len(a)))
    j = j[i]
    conf = np.minimum(plan[i, j] * len(a), plan[i, j] * len(b))
    # the mean similarity under the plan: a label-free criterion (spec section 6)
    info["plan_similarity"] = float((plan.astype(np.float64) * sim).sum())
    return Pairs(i, j, conf, sim[i, j], "sinkhorn", info)


def hungarian_match(a: np.ndarray, b: np.ndarray, max_size: int = DEFAULT_MAX_SIZE,
                    block: int = DEFAULT_BLOCK) -> Pairs:
    """The maximum-similarity one-to-one assignment (scipy), min(n_a, n_b) pairs."""
    try:
        from scipy.optimize import linear_sum_assignment
    except ImportError:
        raise CdirError("the hungarian matcher needs scipy, which is not installed: "
                        "use sinkhorn") from None
    a, b = as_matrix(a, "a"), as_matrix(b, "b")
    if _too_big(a, b, max_size):
        return _fallback(a, b, block, "hungarian", max_size)
    if len(a) == 0 or len(b) == 0:
        return _empty("hungarian")
    sim = a @ b.T
    i, j = linear_sum_assignment(sim, maximize=True)
    matched = sim[i, j].copy()
    sim[i, j] = -np.inf  # the best alternative in the row and the column
    other = np.maximum(sim.max(1)[i] if sim.shape[1] > 1 else -1.0,
                       sim.max(0)[j] if sim.shape[0] > 1 else -1.0)
    other = np.maximum(other, -1.0)
    return Pairs(i, j, matched - other, matched, "hungarian",
                 {"assignment_similarity": float(matched.mean())})


# The one list of matcher names: keys of the dispatch table.
MATCHERS: dict[str, Callable[..., Pairs]] = {
    "mutual-nn": mutual_nn,
    "sinkhorn": sinkhorn_match,
    "hungarian": hungarian_match,
}


def threshold(pairs: Pairs, quantile: float | None = None,
              min_confidence: float | None = None) -> Pairs:
    """Keep the pairs whose confidence reaches the ``quantile`` (0..1) of these pairs'
    confidences and/or ``min_confidence``: a higher bar trades coverage for precision."""
    keep = np.ones(len(pairs), bool)
    if quantile is not None and quantile > 0 and len(pairs):
        if not 0.0 <= quantile <= 1.0:
            raise CdirError(f"quantile must be in [0, 1], not {quantile}")
        keep &= pairs.confidence >= np.quantile(pairs.confidence, quantile)
    if min_confidence is not None:
        keep &= pairs.confidence >= min_confidence
    return pairs.select(keep)


def follow(start: np.ndarray, maps: Sequence[np.ndarray]) -> np.ndarray:
    """Where ``start`` indices land after the chain of index ``maps`` (-1: lost on the way)."""
    cur = np.asarray(start, np.int64).copy()
    for m in maps:
        m = np.asarray(m, np.int64)
        ok = cur >= 0
        cur[ok] = m[cur[ok]]
    return cur


def cycle_mask(pairs: Pairs, back: Sequence[np.ndarray],
               forward: Sequence[np.ndarray] | None = None) -> np.ndarray:
    """Which pairs (i in A, j in B) are cycle-consistent: the chain of maps ``back`` (e.g.
    [B->C, C->A]) takes j to i, and, if given, ``forward`` (e.g. [A->C, C->B]) takes i to j."""
    ok = follow(pairs.b, back) == pairs.a
    if forward is not None:
        ok &= follow(pairs.a, forward) == pairs.b
    return ok


def cycle_rate(maps: Sequence[np.ndarray]) -> float:
    """The fraction of items of the first domain that a closed chain of maps (A->B, B->C, ...,
    ->A) returns to themselves."""
    n = len(maps[0])
    return float((follow(np.arange(n), maps) == np.arange(n)).mean()) if n else float("nan")


def pairs_to_map(pairs: Pairs, n_a: int) -> np.ndarray:
    """A -> B index map of ``pairs`` (-1 where i has no partner; a later pair wins)."""
    out = np.full(n_a, -1, np.int64)
    out[pairs.a] = pairs.b
    return out


def k_occurrence_skew(a: np.ndarray, b: np.ndarray, k: int = DEFAULT_K,
                      block: int = DEFAULT_BLOCK) -> float:
    """Hubness of ``b`` for queries ``a``: the skewness of N_k(y), the number of rows of ``a``
    having y among their k nearest rows of ``b`` (0 for a flat distribution, large with hubs)."""
    idx, _ = nearest(a, b, k, block)
    counts = np.bincount(idx[idx >= 0], minlength=len(b)).astype(np.float64)
    sd = counts.std()
    return float(((counts - counts.mean()) ** 3).mean() / sd**3) if sd > 0 else 0.0


# -- over all domains of a gallery ---------------------------------------------------------------


def _split(x: np.ndarray, domains: Sequence[str] | np.ndarray
           ) -> tuple[list[str], dict[str, np.ndarray], dict[str, np.ndarray]]:
    x = as_matrix(x, "embeddings")
    dom = np.asarray(domains).astype(str)
    if dom.shape != (len(x),):
        raise CdirError(f"{len(x)} embeddings for {dom.size} domain names")
    names = sorted(set(dom.tolist()))
    rows = {d: np.flatnonzero(dom == d) for d in names}
    return names, rows, {d: x[r] for d, r in rows.items()}


def nn_maps(x: np.ndarray, domains: Sequence[str] | np.ndarray, block: int = DEFAULT_BLOCK
            ) -> dict[tuple[str, str], np.ndarray]:
    """The nearest-neighbour map (local indices) of every ordered pair of domains."""
    names, _, parts = _split(x, domains)
    return {(s, t): nn_map(parts[s], parts[t], block) for s, t in permutations(names, 2)}


@dataclass
class Mining:
    """The result of :func:`mine`: the kept pairs (global rows of ``x``; ``a`` from the
    byte-earlier domain), per domain pair their counts before/after each filter, and the
    criteria of :func:`mining_stats`; ``maps``: the nearest-neighbour maps (local indices) of
    every ordered domain pair."""

    pairs: Pairs
    per_pair: dict[str, dict]
    stats: dict
    maps: dict[tuple[str, str], np.ndarray] | None = None  # the nearest-neighbour maps read


def mine(x: np.ndarray, domains: Sequence[str] | np.ndarray, method: str = "mutual-nn",
         cycle: str | None = "any", both_ways: bool = True, quantile: float | None = None,
         min_confidence: float | None = None, block: int = DEFAULT_BLOCK,
         **match_options) -> Mining:
    """Mine cross-domain pairs between every two domains of ``x`` (normalised, L2 rows).

    ``method``: a key of MATCHERS (``match_options`` go to it). ``cycle``: "any" keeps a pair
    consistent through at least one third domain, "all" through every one, None skips the
    check (as does a gallery of two domains); ``both_ways``: consistent through C means
    j -> C -> A returns i and i -> C -> B returns j (False: the first only). Then
    ``quantile``/``min_confidence`` (see :func:`threshold`), applied per domain pair.
    """
    if method not in MATCHERS:
        raise CdirError(f"unknown matcher {method!r}: choose one of {', '.join(MATCHERS)}")
    if cycle not in (None, "any", "all"):
        raise CdirError(f"cycle must be 'any', 'all' or None, not {cycle!r}")
    names, rows, parts = _split(x, domains)
    maps = {(s, t): nn_map(parts[s], parts[t], block) for s, t in permutations(names, 2)}
    kept, per_pair = [], {}
    for s, t in combinations(names, 2):
        p = MATCHERS[method](parts[s], parts[t], block=block, **match_options)
        counts = {"matched": len(p), "method": p.method}
        mutual = maps[(t, s)][p.b] == p.a
        mutual &= maps[(s, t)][p.a] == p.b
        counts["mutual_agreement"] = float(mutual.mean()) if len(p) else float("nan")
        thirds = [c for c in names if c not in (s, t)]
        if thirds:
            masks = np.stack([cycle_mask(p, [maps[(t, c)], maps[(c, s)]],
                                         [maps[(s, c)], maps[(c, t)]] if both_ways else None)
                              for c in thirds])
            consistent = masks.any(0) if cycle != "all" else masks.all(0)
            counts["cycle_consistent"] = float(consistent.mean()) if len(p) else float("nan")
            if cycle is not None:
                p = p.select(consistent)
        counts["after_cycle"] = len(p)
        p = threshold(p, quantile, min_confidence)
        counts["kept"] = len(p)
        if "plan_similarity" in p.info:
            counts["plan_similarity"] = p.info["plan_similarity"]
        per_pair[f"{s}|{t}"] = counts
        kept.append(p.remap(rows[s], rows[t]))
    pairs = Pairs.concat(kept, method)
    stats = mining_stats(x, domains, pairs, block=block, maps=maps)
    return Mining(pairs, per_pair, stats, maps)


def mining_stats(x: np.ndarray, domains: Sequence[str] | np.ndarray,
                 pairs: Pairs | None = None, k: int = DEFAULT_K, block: int = DEFAULT_BLOCK,
                 maps: dict[tuple[str, str], np.ndarray] | None = None) -> dict:
    """Label-free model-selection criteria of embeddings ``x`` with ``domains``:

    mutual_nn_rate   mean over ordered domain pairs (A, B) of the share of A's items whose
                     nearest B item has them as its nearest A item (higher is better)
    cycle_rate       mean over ordered triples (A, B, C) of the share of A's items that
                     A -> B -> C -> A nearest-neighbour maps return home (NaN below 3 domains)
    hubness          mean k-occurrence skewness over ordered pairs (lower is better)
    and, with ``pairs`` (global rows): pairs (count), coverage (share of images in a pair),
    mean_confidence. ``per_pair`` holds the per-pair values.
    """
    names, rows, parts = _split(x, domains)
    if maps is None:
        maps = {(s, t): nn_map(parts[s], parts[t], block) for s, t in permutations(names, 2)}
    per_pair: dict[str, dict] = {}
    for s, t in permutations(names, 2):
        n = len(parts[s])
        per_pair[f"{s}->{t}"] = {
            "mutual_nn_rate": float((maps[(t, s)][maps[(s, t)]] == np.arange(n)).mean())
            if n else float("nan"),
            "hubness": k_occurrence_skew(parts[s], parts[t], k, block),
        }
    triples = [cycle_rate([maps[(s, t)], maps[(t, c)], maps[(c, s)]])
               for s, t, c in permutations(names, 3)]

    def mean(key: str) -> float:
        vals = [v[key] for v in per_pair.values() if np.isfinite(v[key])]
        return float(np.mean(vals)) if vals else float("nan")

    out: dict = {
        "mutual_nn_rate": mean("mutual_nn_rate"),
        "cycle_rate": float(np.mean(triples)) if triples else float("nan"),
        "hubness": mean("hubness"),
    }
    if pairs is not None:
        covered = np.zeros(len(np.asarray(domains)), bool)
        covered[pairs.a] = True
        covered[pairs.b] = True
        out["pairs"] = len(pairs)
        out["coverage"] = float(covered.mean()) if covered.size else float("nan")
        out["mean_confidence"] = float(pairs.confidence.mean()) if len(pairs) else float("nan")
    out["per_pair"] = per_pair
    return out


def pair_precision(pairs: Pairs, labels: Sequence | np.ndarray,
                   labels_b: Sequence | np.ndarray | None = None) -> float:
    """EVALUATION ONLY, for reports: the share of pairs whose two items have the same label
    (``labels`` indexed by ``pairs.a``, and by ``pairs.b`` unless ``labels_b`` is given). Never
    use it to choose a threshold, a method or a checkpoint: that would select on labels."""
    la = np.asarray(labels)
    lb = la if labels_b is None else np.asarray(labels_b)
    return float((la[pairs.a] == lb[pairs.b]).mean()) if len(pairs) else float("nan")


def soft_neighbours(x: np.ndarray, domains: Sequence[str] | np.ndarray, k: int = 10,
                    temperature: float = 0.05, block: int = DEFAULT_BLOCK
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Each row's ``k`` nearest rows in every other domain of ``x`` (normalised, L2 rows) with
    softmax weights at ``temperature``: (indices [n, k * (D - 1)] global rows, weights, each
    domain's block summing to 1 / (D - 1), so a row's weights sum to 1). A target distribution
    over the other domains' items for every image, not only for the mined pairs."""
    names, rows, parts = _split(x, domains)
    others = len(names) - 1
    n = len(np.asarray(domains))
    idx = np.zeros((n, k * max(others, 1)), np.int64)
    w = np.zeros((n, k * max(others, 1)), np.float32)
    for s in names:
        col = 0
        for t in names:
            if t == s:
                continue
            near, sim = nearest(parts[s], parts[t], k, block)
            z = np.where(np.isfinite(sim), sim / np.float32(temperature), -np.inf)
            p = np.exp(z - z[:, :1])
            p /= p.sum(1, keepdims=True) * others
            idx[rows[s], col:col + k] = rows[t][np.maximum(near, 0)]
            w[rows[s], col:col + k] = p
            col += k
    return idx, w
