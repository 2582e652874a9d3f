"""The domain-pair retrieval protocol of the UCDIR literature.

For a directed pair (A, B) every image of domain A is a query and every image of domain B is the
gallery (transductive: no split, the same images a method may have trained on). A gallery item is
relevant to a query when it has the same ``label``. By default every ordered pair of distinct
domains is evaluated, in sorted domain order. Metrics are those of :mod:`eval.metrics` (all in
percent); ties in the ranking go to the lower manifest row (:mod:`eval.topk`).

A pair (A, A) is allowed: the query itself is then excluded from its own gallery and from R.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cdir.core.errors import CdirError
from eval.metrics import (
    METRICS,
    MetricAccumulator,
    hits_from_positions,
    metric_columns,
    normalize_ks,
    required_depth,
)

if TYPE_CHECKING:
    import pandas as pd
    import torch

    from eval.topk import Scorer

META_COLUMNS = ("pair", "query_domain", "gallery_domain", "n_queries", "n_gallery",
                "min_relevant", "max_relevant")
DEFAULT_EXAMPLE_K = 10
# the manifest columns an example names its query and each result by
EXAMPLE_COLUMNS = ("id", "path", "class_name")


def default_ks(dataset: str) -> tuple[int, ...]:
    """The k values the literature reports: Office-Home 1, 5, 15; DomainNet 50, 100, 200."""
    key = re.sub(r"[^a-z0-9]", "", str(dataset).lower())
    if key.startswith("domainnet"):
        return (50, 100, 200)
    return (1, 5, 15)  # Office-Home, and any other gallery


def pair_name(query_domain: str, gallery_domain: str) -> str:
    return f"{query_domain}→{gallery_domain}"


def default_pairs(domains: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered pair of distinct domains, sorted."""
    doms = sorted(set(map(str, domains)))
    return [(a, b) for a in doms for b in doms if a != b]


def _check_manifest(manifest: pd.DataFrame) -> None:
    missing = [c for c in ("domain", "label") if c not in manifest.columns]
    if missing:
        raise CdirError(f"the manifest lacks column(s) {', '.join(missing)} needed for evaluation")
    if len(manifest) == 0:
        raise CdirError("the manifest is empty: nothing to evaluate")


def _example_picks(n_queries: int, n: int) -> np.ndarray:
    """Evenly spaced query positions: deterministic, and spread over the classes because a
    manifest is sorted by (domain, class)."""
    if n <= 0 or n_queries == 0:
        return np.zeros(0, dtype=np.int64)
    return np.unique(np.linspace(0, n_queries - 1, min(n, n_queries)).round().astype(np.int64))


def _column(manifest: pd.DataFrame, name: str, rows: np.ndarray) -> list | None:
    if name not in manifest.columns:
        return None
    return manifest[name].to_numpy()[rows].tolist()


def evaluate_pairs(
    scorer: Scorer,
    manifest: pd.DataFrame,
    pairs: Sequence[tuple[str, str]] | None = None,
    ks: Sequence[int] = (1, 5, 15),
    metrics: Sequence[str] = METRICS,
    block_size: int | None = None,
    keep_examples: int = 0,
    example_k: int | None = None,
    progress: bool = True,
    query_mask: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """Evaluate every directed domain pair; one result row per pair plus a final ``mean`` row.

    Row keys: pair ("A→B"), query_domain, gallery_domain, n_queries, n_gallery, then the metric
    columns (``P@k``, ``prec@k``, ``recall@k``, ``mAP@R``, ``mAP@All``; ``ks`` sorted, repeats
    dropped), then ``min_relevant`` and ``max_relevant`` (the range of R over the pair's queries:
    both 1 when every query has one relevant item, where P@k = prec@1 = mAP@R and recall@k is the
    informative column; see :func:`one_relevant`). The mean row averages each metric over the
    pairs (unweighted, as papers average pairs); its n_queries is the total, n_gallery None and
    its R range spans the pairs'.
    mAP@All ranks the whole gallery of each query block (the block's scores are sorted once,
    in memory bounded like the top-k's), never the full query x gallery matrix.
    With ``keep_examples > 0`` each pair row also holds ``examples``: that many sample queries with
    their top ``example_k`` results (default min(max(ks), 10)) for the retrieval gallery.
    ``query_mask`` (bool per manifest row) restricts the queries, never the gallery: e.g. to tune
    fusion weights on one half of the queries and report on the other.
    """
    from tqdm.auto import tqdm

    from eval.topk import average_precision_all, blockwise_topk

    _check_manifest(manifest)
    ks = normalize_ks(ks)  # a repeated k would count its hits twice
    metrics = tuple(metrics)
    cols = metric_columns(ks, metrics)  # validates the metric names
    n_rows = getattr(scorer, "num_rows", None)
    if n_rows is not None and n_rows != len(manifest):
        raise CdirError(f"the embeddings have {n_rows} rows but the manifest {len(manifest)}: "
                        "recompute the embeddings for this manifest")
    domains = manifest["domain"].astype(str).to_numpy()
    present = set(domains.tolist())
    pairs = default_pairs(domains) if pairs is None else [(str(a), str(b)) for a, b in pairs]
    if not pairs:
        raise CdirError("no domain pairs to evaluate: the manifest has a single domain "
                        f"({', '.join(sorted(present))}); pass pairs explicitly, e.g. (A, A)")
    for a, b in pairs:
        for d in (a, b):
            if d not in present:
                raise CdirError(f"domain {d!r} is not in the manifest (domains: "
                                f"{', '.join(sorted(present))})")
    # Compact label ids so counting relevant items is a bincount.
    _, labels = np.unique(manifest["label"].to_numpy(), return_inverse=True)
    labels = labels.astype(np.int64).ravel()
    n_labels = int(labels.max()) + 1
    example_k = example_k or min(max(ks), DEFAULT_EXAMPLE_K)

    is_query = np.ones(len(manifest), bool) if query_mask is None else np.asarray(query_mask, bool)
    if is_query.shape != (len(manifest),):
        raise ValueError(f"query_mask must have one entry per manifest row ({len(manifest)})")
    total = sum(int(((domains == a) & is_query).sum()) for a, _ in pairs)
    bar = tqdm(total=total, desc="eval", unit="query", disable=not progress)
    results: list[dict[str, Any]] = []
    try:
        for a, b in pairs:
            bar.set_postfix_str(pair_name(a, b))
            q_rows = np.flatnonzero((domains == a) & is_query)
            g_rows = np.flatnonzero(domains == b)  # ascending: ties go to the lower manifest row
            q_lab, g_lab = labels[q_rows], labels[g_rows]
            n_rel = np.bincount(g_lab, minlength=n_labels)[q_lab]
            if a == b:  # the query is left out of its own gallery, so it is not relevant to itself
                n_rel = n_rel - 1
            depth = min(required_depth(ks, metrics, int(n_rel.max())), len(g_rows))
            depth = max(depth, min(example_k, len(g_rows)) if keep_examples else 1)
            acc = MetricAccumulator(ks, metrics)
            picks = _example_picks(len(q_rows), keep_examples)
            examples: list[dict[str, Any]] = []
            ap_all: dict[int, np.ndarray] = {}

            def rank_all(start: int, s: torch.Tensor, own: np.ndarray | None,
                         q_lab: np.ndarray = q_lab, g_lab: np.ndarray = g_lab,
                         ap_all: dict[int, np.ndarray] = ap_all) -> None:
                rel = g_lab[None, :] == q_lab[start:start + s.shape[0], None]
                if own is not None:  # the query's own item is not relevant to it
                    has = np.flatnonzero(own >= 0)
                    rel[has, own[has]] = False
                ap_all[start] = average_precision_all(s, rel)

            full = rank_all if "map_all" in metrics else None
            for start, scores, pos in blockwise_topk(scorer, q_rows, g_rows, depth,
                                                     block_size=block_size, exclude_self=True,
                                                     on_block=full):
                n = len(pos)
                hits = hits_from_positions(pos, q_lab[start:start + n], g_lab)
                acc.update(hits, n_rel[start:start + n], ap_all.pop(start, None))
                for p in picks[(picks >= start) & (picks < start + n)]:
                    i = int(p - start)
                    examples.append(_example(manifest, a, b, int(q_rows[p]), int(n_rel[p]),
                                             g_rows, pos[i, :example_k], scores[i, :example_k],
                                             hits[i, :example_k]))
                bar.update(n)
            row: dict[str, Any] = {"pair": pair_name(a, b), "query_domain": a, "gallery_domain": b,
                                   "n_queries": int(len(q_rows)), "n_gallery": int(len(g_rows))}
            row.update(acc.result())
            row["min_relevant"] = int(n_rel.min()) if len(n_rel) else 0
            row["max_relevant"] = int(n_rel.max()) if len(n_rel) else 0
            if keep_examples:
                row["examples"] = examples
            results.append(row)
    finally:
        bar.close()

    mean: dict[str, Any] = {"pair": "mean", "query_domain": "", "gallery_domain": "",
                            "n_queries": int(sum(r["n_queries"] for r in results)),
                            "n_gallery": None}
    for c in cols:
        vals = [r[c] for r in results if not np.isnan(r[c])]
        mean[c] = float(np.mean(vals)) if vals else float("nan")
    asked = [r for r in results if r["n_queries"]] or results  # a pair without queries has no R
    mean["min_relevant"] = min((r["min_relevant"] for r in asked), default=0)
    mean["max_relevant"] = max((r["max_relevant"] for r in asked), default=0)
    results.append(mean)
    return results


def one_relevant(rows: Sequence[dict[str, Any]]) -> bool:
    """Does every query of these result rows have exactly one relevant gallery item (R = 1)?
    Then t = min(k, R) = 1 for every k, so every P@k, prec@1 and mAP@R are one number and only
    recall@k (and mAP@All) tell the ranks apart."""
    ranged = [r for r in rows if "min_relevant" in r and r.get("n_queries")]
    return bool(ranged) and all(r["min_relevant"] == r["max_relevant"] == 1 for r in ranged)


def _example(manifest: pd.DataFrame, a: str, b: str, q_row: int, n_rel: int, g_rows: np.ndarray,
             pos: np.ndarray, scores: np.ndarray, hits: np.ndarray) -> dict[str, Any]:
    valid = pos >= 0
    rows = g_rows[pos[valid]]
    ex: dict[str, Any] = {"pair": pair_name(a, b), "query_row": q_row, "n_relevant": n_rel,
                          "query_label": int(manifest["label"].iloc[q_row])}
    for col in EXAMPLE_COLUMNS:
        vals = _column(manifest, col, np.array([q_row]))
        if vals is not None:
            ex[f"query_{col}"] = str(vals[0])
    results = [{"row": int(r), "rank": j + 1, "score": float(s), "hit": bool(h),
                "label": int(manifest["label"].iloc[int(r)])}
               for j, (r, s, h) in enumerate(zip(rows, scores[valid], hits[valid], strict=True))]
    for col in EXAMPLE_COLUMNS:
        vals = _column(manifest, col, rows)
        if vals is not None:
            for item, v in zip(results, vals, strict=True):
                item[col] = str(v)
    ex["results"] = results
    return ex


def split_examples(results: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], list[dict]]:
    """Result rows without their ``examples``, and all the examples in pair order."""
    rows, examples = [], []
    for r in results:
        r = dict(r)
        examples += r.pop("examples", None) or []
        rows.append(r)
    return rows, examples
