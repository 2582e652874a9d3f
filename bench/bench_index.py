"""Build and query time of flat vs IVF vs IVF-PQ vs HNSW on clustered random unit vectors.

    python bench/bench_index.py [--n 100000] [--dim 128] [--queries 1000] [--threads 1]

Flat (exact) is the baseline measured in the same run: the ×flat columns are speed-ups against it
(batched queries, and one query at a time as in the demo), and R@10 is the share of flat's top 10
that each index returns. A batched domain-filtered search (one domain of three) is timed too.
"""

from __future__ import annotations

import argparse
import time

import numpy as np


def clustered(n: int, dim: int, clusters: int, seed: int = 0, sigma: float = 0.35) -> np.ndarray:
    """Unit vectors around random centres: nearest neighbours are meaningful, unlike pure noise."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((clusters, dim)).astype(np.float32)
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    x = centers[rng.integers(0, clusters, n)]
    x += (sigma / np.sqrt(dim)) * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def main(argv: list[str] | None = None) -> None:
    from indexes.kinds import KINDS

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--queries", type=int, default=1000)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kinds", nargs="+", default=list(KINDS))
    args = ap.parse_args(argv)

    import faiss

    from indexes.build import build_index

    faiss.omp_set_num_threads(args.threads)
    data = clustered(args.n + args.queries, args.dim, clusters=max(10, args.n // 500))
    x, q = data[: args.n], data[args.n:]
    ids = [str(i) for i in range(args.n)]
    domains = [("a", "b", "c")[i % 3] for i in range(args.n)]
    print(f"{args.n} × {args.dim} vectors, {args.queries} queries, k={args.k}, "
          f"{args.threads} thread(s), faiss {faiss.__version__}")
    print(f"{'kind':6} {'params':46} {'build s':>8} {'batch ms/q':>10} {'×flat':>6} "
          f"{'1-query ms':>10} {'×flat':>6} {'filtered ms/q':>13} {'R@10':>5}")
    truth = None
    base = base_one = None
    for kind in (["flat"] + [k for k in args.kinds if k != "flat"]):
        t0 = time.perf_counter()
        index = build_index(x, ids, domains, kind, gpu=False)
        build_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        pos = index.search(q, args.k).positions
        query_ms = (time.perf_counter() - t0) * 1000 / len(q)
        t0 = time.perf_counter()
        index.search(q, args.k, domain="b")
        filt_ms = (time.perf_counter() - t0) * 1000 / len(q)
        single = q[: min(len(q), 200)]  # the demo's case: one query at a time, no batching
        t0 = time.perf_counter()
        for v in single:
            index.search(v, args.k)
        one_ms = (time.perf_counter() - t0) * 1000 / len(single)
        if truth is None:
            truth, base, base_one = pos, query_ms, one_ms
        recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(pos, truth, strict=True)])
        params = ",".join(f"{k}={v}" for k, v in index.meta.params.items() if k != "seed")
        print(f"{kind:6} {params or '-':46} {build_s:8.2f} {query_ms:10.3f} "
              f"{base / query_ms:6.1f} {one_ms:10.3f} {base_one / one_ms:6.1f} {filt_ms:13.3f} "
              f"{recall:5.3f}")


if __name__ == "__main__":
    main()
