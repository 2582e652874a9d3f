"""An IVF index built shard by shard from the embedding store, against the same index built from
vectors loaded whole, in the same run: peak memory (each build in its own process), wall time
and agreement of their answers.

    python bench/bench_index_shards.py [--n 500000] [--dim 512] [--nlist 1024] [--shards 8]

Memory is the peak of the process's anonymous memory: what the build needs. Its peak RSS also
counts the pages of the memory-mapped store and lists files it touched, which the kernel reclaims
under pressure, so it is printed beside it, not compared.

Data: clustered unit vectors (bench_index.clustered) written into an `EmbeddingStore` of
50,000-row shard files, as `cdir embed` leaves them. The single build is what `cdir index build
--type ivf` does (`EmbeddingStore.load`, then `build_index`); the sharded one is `--shards N`
(`EmbeddingStore.rows`, a view read on demand, then `build_sharded`: lists merged on disk).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_index import clustered  # noqa: E402

STORE_SHARD = 50_000


class PeakAnon:
    """The peak anonymous memory (RssAnon: heap and arrays, not the pages of memory-mapped files,
    which the kernel can drop and re-read at will) of this process, sampled every 20 ms."""

    def __init__(self) -> None:
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            for line in Path("/proc/self/status").read_text().splitlines():
                if line.startswith("RssAnon:"):
                    self.peak = max(self.peak, int(line.split()[1]))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak / 2**20  # KiB -> GiB


def child(mode: str, store_dir: str, out: str, nlist: int, shards: int, threads: int) -> None:
    """One build in this process; prints a JSON line with its wall time and peak RSS."""
    import faiss

    from cdir.core.store import EmbeddingStore
    from indexes.build import build_index, build_sharded

    faiss.omp_set_num_threads(threads)
    store = EmbeddingStore(store_dir)
    anon = PeakAnon()
    t0 = time.perf_counter()
    if mode == "single":
        x, _ = store.load()
        ids = [str(i) for i in range(len(x))]
        index = build_index(x, ids, ["d"] * len(x), kind="ivf", gpu=False, nlist=nlist)
    else:
        x, _ = store.rows()
        ids = [str(i) for i in range(len(x))]
        index = build_sharded(x, ids, ["d"] * len(x), out, shards, kind="ivf", nlist=nlist)
    index.save(out)
    wall = time.perf_counter() - t0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    print(json.dumps({"wall_s": wall, "peak_gib": anon.stop(), "rss_gib": rss}))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=500_000)
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--nlist", type=int, default=1024)
    ap.add_argument("--shards", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--queries", type=int, default=200)
    ap.add_argument("--child", choices=["single", "sharded"], help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child, args.store, args.out, args.nlist, args.shards, args.threads)
        return 0

    from cdir.core.store import EmbeddingStore
    from indexes.index import load_index

    with tempfile.TemporaryDirectory() as tmp:
        store = EmbeddingStore(Path(tmp) / "store")
        store.open("bench", args.dim)
        for a in range(0, args.n, STORE_SHARD):  # written a shard at a time, like cdir embed
            part = clustered(min(STORE_SHARD, args.n - a), args.dim, 1000, seed=a)
            store.append([str(i) for i in range(a, a + len(part))], part)
        gb = args.n * args.dim * 4 / 1e9
        print(f"store: {args.n:,} x {args.dim} ({gb:.2f} GB) in {STORE_SHARD:,}-row shards; "
              f"ivf nlist {args.nlist}, {args.threads} threads", flush=True)
        runs = {}
        for mode in ("single", "sharded"):
            out = str(Path(tmp) / mode / "idx")
            cmd = [sys.executable, __file__, "--child", mode, "--store", str(store.dir),
                   "--out", out, "--nlist", str(args.nlist), "--shards", str(args.shards),
                   "--threads", str(args.threads)]
            line = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[mode] = {**json.loads(line.strip().splitlines()[-1]), "path": out}
            print(f"{mode:8s} build: {runs[mode]['wall_s']:6.1f} s, peak anonymous memory "
                  f"{runs[mode]['peak_gib']:.2f} GiB (peak RSS with mapped file pages "
                  f"{runs[mode]['rss_gib']:.2f} GiB)", flush=True)
        one = load_index(runs["single"]["path"], gpu=False)
        many = load_index(runs["sharded"]["path"], gpu=False)
        q, _ = store.rows()
        q = q[np.linspace(0, args.n - 1, args.queries).astype(np.int64)]
        a = one.search(q, k=10, nprobe=16).positions
        b = many.search(q, k=10, nprobe=16).positions
        same = float((a == b).mean())
    s, m = runs["single"], runs["sharded"]
    print(f"sharded / single: peak memory {m['peak_gib'] / s['peak_gib']:.2f}x, wall "
          f"{m['wall_s'] / s['wall_s']:.2f}x; same top-10 (nprobe 16): {same:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
