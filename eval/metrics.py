"""Retrieval metrics from a top-K hit matrix, vectorised and accumulable block by block.

Inputs, per block of queries:
    hits[i, j]     True when the gallery item at rank j (0-based) has query i's label;
                   ranks past the end of the gallery, or excluded items, are False.
    n_relevant[i]  R: how many gallery items share query i's label.
``hits`` must cover the top min(k, n_gallery) ranks for the @k metrics and the top R ranks of every
query for UCDIR P@k and mAP@R (the protocol passes max(max(ks), max R) capped at the gallery).

All values are percentages (0-100), so they share one table and one colour scale.

``P@k`` (key ``ucdir_p``) -- the precision of the UCDIR protocol, *not* standard precision:
    t_i = min(k, R_i); P@k = 100 * sum_i(hits in the top t_i of query i) / sum_i(t_i).
    A micro-average; a query with R = 0 has t = 0 and contributes nothing to either sum. If every
    query has R = 0 the value is NaN.
``prec@k`` (``precision``) -- standard precision: 100 * mean_i(hits in top k / k) over all queries
    (a query with R = 0 scores 0; ranks past the gallery count as misses).
``recall@k`` (``recall``) -- 100 * mean_i(hits in top k / R_i) over queries with R > 0 (the
    fraction of relevant items found, not "at least one hit").
``mAP@R`` (``map_r``) -- Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020):
    per query 1/R * sum_{i<=R} P@i * rel_i, mean over queries with R > 0.
``mAP@All`` (``map_all``) -- the mean average precision over the whole ranked gallery, as the newer
    CDIR papers (CoDA, UEM) report it: per query 1/R * sum_{i<=N} P@i * rel_i, mean over queries
    with R > 0. It needs every relevant item's rank: either a hit matrix holding all R hits of each
    query, or the per-query AP of the full ranking passed as ``ap_all``
    (:func:`eval.topk.average_precision_all`, which the protocol computes block by block).
Metrics over an empty set of queries are NaN.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

METRICS = ("ucdir_p", "precision", "recall", "map_r", "map_all")
_WHOLE = {"map_r": "mAP@R", "map_all": "mAP@All"}  # one column each, not one per k
_PREFIX = {"ucdir_p": "P", "precision": "prec", "recall": "recall"}


def check_metrics(metrics: Sequence[str]) -> tuple[str, ...]:
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}")
    return tuple(metrics)


def normalize_ks(ks: Sequence[int]) -> tuple[int, ...]:
    """``ks`` sorted and without repeats (ValueError unless all are integers >= 1): a repeated k
    would add its hits twice while counting its queries once (prec@1 = 140%)."""
    given = list(ks)
    try:
        out = tuple(sorted({int(k) for k in given}))
        exact = all(not isinstance(k, bool) and int(k) == k for k in given)
    except (TypeError, ValueError):
        exact = False
    if not exact:
        raise ValueError(f"k values must be integers, got {given}")
    if not out or out[0] < 1:
        raise ValueError(f"k values must be positive integers, got {given}")
    return out


def metric_columns(ks: Sequence[int], metrics: Sequence[str] = METRICS) -> list[str]:
    """Result keys in table order: P@k..., prec@k..., recall@k..., mAP@R, mAP@All (ks
    normalised)."""
    cols: list[str] = []
    for m in check_metrics(metrics):
        cols += [_WHOLE[m]] if m in _WHOLE else [f"{_PREFIX[m]}@{k}" for k in normalize_ks(ks)]
    return cols


def required_depth(ks: Sequence[int], metrics: Sequence[str], max_relevant: int) -> int:
    """How many ranks the hit matrix must hold (before capping at the gallery size); mAP@All
    takes its terms from the full ranking instead (``ap_all``)."""
    depth = max(normalize_ks(ks))
    if "map_r" in metrics:
        depth = max(depth, int(max_relevant))
    return depth


def _check(hits: np.ndarray, n_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hits = np.asarray(hits, dtype=bool)
    n_relevant = np.asarray(n_relevant, dtype=np.int64)
    if hits.ndim != 2 or n_relevant.shape != (hits.shape[0],):
        raise ValueError(f"hits must be (n, K) and n_relevant (n,), got {hits.shape} and "
                         f"{n_relevant.shape}")
    return hits, n_relevant


def _need_ranks(hits: np.ndarray, depth: int, what: str) -> None:
    if depth > hits.shape[1]:
        raise ValueError(f"{what} needs the top {depth} ranks but hits has only {hits.shape[1]}")


def _hits_in_top(cum: np.ndarray, t: np.ndarray) -> np.ndarray:
    """Hits among the top t_i ranks of each row, from the row-wise cumulative hit counts."""
    padded = np.concatenate([np.zeros((cum.shape[0], 1), dtype=cum.dtype), cum], axis=1)
    return padded[np.arange(cum.shape[0]), t]


class MetricAccumulator:
    """Sums the per-query terms block by block; ``result()`` gives the metrics so far."""

    def __init__(self, ks: Sequence[int] = (1, 5, 15), metrics: Sequence[str] = METRICS):
        self.ks = normalize_ks(ks)
        self.metrics = check_metrics(metrics)
        self.n_queries = 0
        self._ucdir_hits = dict.fromkeys(self.ks, 0)
        self._ucdir_t = dict.fromkeys(self.ks, 0)
        self._prec_hits = dict.fromkeys(self.ks, 0)  # exact: divided by k at the end
        self._recall = dict.fromkeys(self.ks, 0.0)
        self._n_with_relevant = 0
        self._ap = 0.0
        self._ap_all = 0.0

    def update(self, hits: np.ndarray, n_relevant: np.ndarray,
               ap_all: np.ndarray | None = None) -> None:
        """Add a block of queries. ``ap_all``: each query's AP over the full ranking, in [0, 1]
        (NaN or anything for R = 0); without it mAP@All is taken from ``hits``, which must then
        hold every relevant item of each query."""
        hits, n_relevant = _check(hits, n_relevant)
        n = hits.shape[0]
        if n == 0:
            return
        self.n_queries += n
        has_rel = n_relevant > 0
        self._n_with_relevant += int(has_rel.sum())
        cum = np.cumsum(hits, axis=1, dtype=np.int64)
        depth = hits.shape[1]
        for k in self.ks:
            in_top_k = _hits_in_top(cum, np.full(n, min(k, depth)))
            if "ucdir_p" in self.metrics:
                t = np.minimum(k, n_relevant)
                _need_ranks(hits, int(t.max()), f"P@{k}")
                self._ucdir_hits[k] += int(_hits_in_top(cum, t).sum())
                self._ucdir_t[k] += int(t.sum())
            if "precision" in self.metrics:
                self._prec_hits[k] += int(in_top_k.sum())
            if "recall" in self.metrics and has_rel.any():
                self._recall[k] += float((in_top_k[has_rel] / n_relevant[has_rel]).sum())
        if "map_r" in self.metrics and has_rel.any():
            _need_ranks(hits, int(n_relevant.max()), "mAP@R")
            ranks = np.arange(1, depth + 1)
            within_r = ranks[None, :] <= n_relevant[:, None]
            prec_at_i = cum / ranks[None, :]
            ap_sum = (prec_at_i * (hits & within_r)).sum(axis=1)
            self._ap += float((ap_sum[has_rel] / n_relevant[has_rel]).sum())
        if "map_all" in self.metrics and has_rel.any():
            if ap_all is None:
                found = cum[:, -1] if depth else np.zeros(n, dtype=np.int64)
                short = has_rel & (found != n_relevant)
                if short.any():
                    raise ValueError(
                        f"mAP@All needs every relevant item's rank: {int(short.sum())} queries "
                        "have R different from their hits; pass ap_all (the full ranking's AP, "
                        "eval.topk.average_precision_all)")
                ranks = np.arange(1, depth + 1)
                ap_all = (cum / ranks[None, :] * hits).sum(axis=1) / np.maximum(n_relevant, 1)
            ap_all = np.asarray(ap_all, dtype=np.float64)
            if ap_all.shape != (n,):
                raise ValueError(f"ap_all must have one value per query ({n}), got {ap_all.shape}")
            self._ap_all += float(ap_all[has_rel].sum())

    def result(self) -> dict[str, float]:
        out: dict[str, float] = {}
        nan = float("nan")
        for m in self.metrics:
            if m in _WHOLE:
                total = self._ap if m == "map_r" else self._ap_all
                out[_WHOLE[m]] = 100.0 * total / self._n_with_relevant \
                    if self._n_with_relevant else nan
                continue
            for k in self.ks:
                if m == "ucdir_p":
                    t = self._ucdir_t[k]
                    out[f"P@{k}"] = 100.0 * self._ucdir_hits[k] / t if t else nan
                elif m == "precision":
                    out[f"prec@{k}"] = 100.0 * self._prec_hits[k] / (k * self.n_queries) \
                        if self.n_queries else nan
                else:
                    out[f"recall@{k}"] = 100.0 * self._recall[k] / self._n_with_relevant \
                        if self._n_with_relevant else nan
        return {c: out[c] for c in metric_columns(self.ks, self.metrics)}


def compute_metrics(
    hits: np.ndarray,
    n_relevant: np.ndarray,
    ks: Sequence[int] = (1, 5, 15),
    metrics: Sequence[str] = METRICS,
    ap_all: np.ndarray | None = None,
) -> dict[str, float]:
    """All requested metrics in one go (one block holding every query)."""
    acc = MetricAccumulator(ks, metrics)
    acc.update(hits, n_relevant, ap_all)
    return acc.result()


def ucdir_precision_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """UCDIR P@k in percent (see the module docstring)."""
    return compute_metrics(hits, n_relevant, (k,), ("ucdir_p",))[f"P@{k}"]


def precision_at_k(hits: np.ndarray, k: int) -> float:
    """Standard precision@k in percent, macro-averaged over all queries."""
    hits = np.asarray(hits, dtype=bool)
    dummy = np.ones(hits.shape[0], dtype=np.int64)  # R is not used by precision
    return compute_metrics(hits, dummy, (k,), ("precision",))[f"prec@{k}"]


def recall_at_k(hits: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """Recall@k (fraction of the R relevant items in the top k) in percent, R > 0 queries only."""
    return compute_metrics(hits, n_relevant, (k,), ("recall",))[f"recall@{k}"]


def map_at_r(hits: np.ndarray, n_relevant: np.ndarray) -> float:
    """mAP@R in percent, over queries with R > 0."""
    return compute_metrics(hits, n_relevant, (1,), ("map_r",))["mAP@R"]


def map_at_all(hits: np.ndarray, n_relevant: np.ndarray) -> float:
    """mAP@All in percent from a hit matrix holding every relevant item (e.g. the whole
    ranking), over queries with R > 0."""
    return compute_metrics(hits, n_relevant, (1,), ("map_all",))["mAP@All"]


def hits_from_positions(
    positions: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray
) -> np.ndarray:
    """The hit matrix for ranked gallery positions (-1 = no item, a miss)."""
    positions = np.asarray(positions, dtype=np.int64)
    labels = np.asarray(gallery_labels)[np.maximum(positions, 0)]
    return (labels == np.asarray(query_labels)[:, None]) & (positions >= 0)
