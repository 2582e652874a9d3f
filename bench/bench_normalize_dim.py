"""How far a shared PCA before per-domain whitening (``--normalize-dim``) shrinks the statistics,
what it costs in P@1, and what it does to query latency.

    python bench/bench_normalize_dim.py [-w runs/emoji] [--encoder SPEC] [--dims 0,1024,512,256]
                                        [--split dev] [--queries 200] [--skip-eval]

For every dim (0: the full dimension, the baseline of the ratios):

- mean UCDIR P@1 (%) over the directed domain pairs of ``--split`` (`cdir eval --split dev
  --normalize domain-whiten --rerank none,csls --normalize-dim N`), whitened and whitened + CSLS;
- ``cdir index build --normalize domain-whiten --normalize-dim N`` (flat, the whole gallery, the
  index a search uses): its build time, the statistics file's size and the index file's size;
- the latency of one query from its stored encoder vector (domain inferred from the centroids,
  normalised, searched for the top 10): median and p95 over ``--queries`` single queries, so the
  encoder's time (the same for every dim) is left out.

The bench indexes are written as ``bench-normdim-N`` and removed at the end.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT_ENCODER = "ckpt:encoders/weights/emoji_adapted.pt?grid=4&layers=3,4"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-w", "--workspace", default="runs/emoji")
    p.add_argument("--encoder", default=DEFAULT_ENCODER)
    p.add_argument("--dims", default="0,1024,512,256")
    p.add_argument("--split", default="dev")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--skip-eval", action="store_true",
                   help="sizes and latency only (a re-measure on a quieter machine)")
    args = p.parse_args(argv)

    from cdir.core.store import EmbeddingStore
    from cdir.core.workspace import Workspace
    from cdir.stages.evaluate import evaluate
    from cdir.stages.index import build_index
    from indexes.index import load_index
    from indexes.meta import index_files, normalizer_file

    ws = Workspace(args.workspace).require()
    dims = [int(d) for d in args.dims.split(",")]
    manifest = ws.manifest()
    store = next(p for p in (ws.root / "embeddings").iterdir() if p.is_dir()
                 and (p / "info.json").exists() and _spec(p) == args.encoder)
    x, ok = EmbeddingStore(store).load(manifest)
    rng = np.random.default_rng(0)
    picks = rng.choice(np.flatnonzero(ok), size=min(args.queries, int(ok.sum())), replace=False)
    rows = []
    for dim in dims:
        p1 = {"visual+domain-whiten": np.nan, "visual+domain-whiten+csls": np.nan}
        if not args.skip_eval:
            res = evaluate(ws.root, encoder=args.encoder, modes="visual", split=args.split,
                           normalize="domain-whiten", rerank="none,csls", normalize_dim=dim,
                           run=f"bench-normdim-{dim}", progress=False)
            p1 = {k: float(v[-1]["P@1"]) for k, v in res["results"].items()}
        name = f"bench-normdim-{dim}"
        t0 = time.perf_counter()
        built = build_index(ws.root, encoder=args.encoder, normalize="domain-whiten",
                            normalize_dim=dim, name=name, rebuild=True, force=True)
        build_s = time.perf_counter() - t0
        path = Path(built["path"])
        index = load_index(path)
        norm = index.normalizer
        times = []
        for i in picks:
            t = time.perf_counter()
            q, _ = norm.transform_query(x[i])
            index.search(q[None], k=10)
            times.append(time.perf_counter() - t)
        rows.append({"dim": dim or x.shape[1], "whiten": p1["visual+domain-whiten"],
                     "csls": p1["visual+domain-whiten+csls"],
                     "stats_mb": normalizer_file(path).stat().st_size / 1e6,
                     "index_mb": index_files(path).faiss.stat().st_size / 1e6,
                     "build_s": build_s, "p50_ms": 1e3 * float(np.median(times)),
                     "p95_ms": 1e3 * float(np.percentile(times, 95))})
        for f in (index_files(path).faiss, index_files(path).meta, index_files(path).rows,
                  normalizer_file(path)):
            f.unlink(missing_ok=True)
        print(rows[-1], flush=True)
    base = rows[0]
    print(f"\n{args.encoder}, split {args.split} (P@1), whole gallery ({int(ok.sum())} images: "
          f"index, statistics, latency over {len(picks)} single queries)\n")
    print("| dims | P@1 whitened | P@1 whitened + CSLS | statistics (MB) | index (MB) | "
          "build (s) | query p50 (ms) | query p95 (ms) | p50 / full |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dim']} | {r['whiten']:.2f} | {r['csls']:.2f} | {r['stats_mb']:.1f} | "
              f"{r['index_mb']:.1f} | {r['build_s']:.1f} | {r['p50_ms']:.2f} | "
              f"{r['p95_ms']:.2f} | {r['p50_ms'] / base['p50_ms']:.2f} |")
    return 0


def _spec(store: Path) -> str:
    import json

    return json.loads((store / "info.json").read_text()).get("spec", "")


if __name__ == "__main__":
    raise SystemExit(main())
