"""`--type auto` at a million vectors: the family chosen for a memory budget, its nprobe /
efSearch tuned to a recall@10 target against exact search, and a single query's time, beside
exact search on the same data in the same run.

    python bench/bench_index_auto.py [--n 1000000] [--dim 512] [--memory 4GB] [--recall 0.95]

Data: clustered unit vectors (bench_index.clustered: 1000 centres). Timing: one query at a
time, ``--threads`` FAISS threads (default 2), p50 over ``--queries`` queries drawn from the
data (each left out of its own answers, as the tuning does).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import clustered  # noqa: E402


def p50_ms(search, queries: np.ndarray) -> float:
    times = []
    for q in queries:
        t0 = time.perf_counter()
        search(q[None])
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--memory", default="4GB")
    ap.add_argument("--recall", type=float, default=0.95)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import faiss

    from indexes.auto import choose, describe, parse_memory, tune
    from indexes.build import build_index

    faiss.omp_set_num_threads(args.threads)
    t0 = time.perf_counter()
    x = clustered(args.n, args.dim, 1000)
    print(f"data: {args.n:,} x {args.dim} clustered unit vectors ({x.nbytes / 1e9:.2f} GB) in "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    choice = choose(args.n, args.dim, parse_memory(args.memory))
    print(f"choice for {args.memory}: {choice.kind} {choice.params} ({choice.reason})", flush=True)
    t0 = time.perf_counter()
    index = build_index(x, [str(i) for i in range(args.n)], ["d"] * args.n, kind=choice.kind,
                        gpu=False, **choice.params)
    build_s = time.perf_counter() - t0
    print(f"built in {build_s:.0f} s: {index.meta.params}", flush=True)
    t0 = time.perf_counter()
    record = tune(index, x, args.recall, n_queries=args.queries)
    print(describe(choice, record) + f" [tuning {time.perf_counter() - t0:.0f} s]", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        faiss.write_index(index._cpu, os.path.join(tmp, "auto.faiss"))
        size = os.path.getsize(os.path.join(tmp, "auto.faiss"))
    rng = np.random.default_rng(1)
    queries = x[rng.choice(args.n, size=args.queries, replace=False)]
    auto_ms = p50_ms(lambda q: index.search(q, k=11), queries)
    exact = faiss.IndexFlatIP(args.dim)
    exact.add(x)
    exact_ms = p50_ms(lambda q: exact.search(q, 11), queries[:50])
    print(f"\n| index | memory | build s | recall@10 | p50 ms / query ({args.threads} threads) |")
    print("|---|---:|---:|---:|---:|")
    tuned = " ".join(f"{p} {record[p]}" for p in ("nprobe", "ef_search") if p in record)
    print(f"| auto: {choice.kind} {tuned} | {size / 1e9:.2f} GB | {build_s:.0f} | "
          f"{record['recall']:.3f} | {auto_ms:.3f} |")
    print(f"| exact (flat) | {x.nbytes / 1e9:.2f} GB | 0 | 1.000 | {exact_ms:.3f} |")
    print(f"\nauto / exact time per query: {auto_ms / exact_ms:.3f}x "
          f"({exact_ms / auto_ms:.0f}x faster); target: recall@10 >= {args.recall} at <= 1 ms")
    ok = record["recall"] >= args.recall and auto_ms <= 1.0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
