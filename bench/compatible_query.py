"""A compatible query encoder against the index's own encoder, in one run: mean cross-domain
P@1 of student queries against the index's gallery vectors beside the teacher's queries against
the same vectors, and the CPU latency of one query end to end (read, encode, normalise when the
index does, search) with each.

    python bench/compatible_query.py -w runs/emoji --index NAME \\
        --student ckpt:runs/query-enc/student.pt [--split test|dev|all]

The student is a `cdir distill ... --compatible NAME` checkpoint. P@1: every indexed image is a
query (in its domain) against the index's vectors of each other domain, the evaluation's directed
pairs and their unweighted mean; the teacher's queries are the index's own vectors (a gallery
image's query vector is its indexed vector), the student's its embeddings of the same images
(computed first when missing). Latency: ``--queries`` gallery images searched one at a time by
each encoder in turns (``--repeats`` times, median per query), so both see the same machine
state.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def mean_p1(workspace: str, index: str, student: str, split: str | None = None
            ) -> tuple[dict[str, float], str]:
    """(mean P@1 (%) of the teacher's and the student's queries against index ``index``, the
    split scored): both over the indexed images of the ``split`` categories (``all``: every
    indexed image; None: ``test`` where the manifest has a split column, else ``all``)."""
    import numpy as np

    from cdir.core.store import EmbeddingStore
    from cdir.core.workspace import Workspace
    from cdir.stages.distill import index_rows
    from cdir.stages.embed import embed_images
    from cdir.stages.search import Searcher
    from eval.protocol import evaluate_pairs
    from eval.topk import CosineScorer

    ws = Workspace(workspace)
    Searcher(workspace, index=index, query_encoder=student, device="cpu")  # checks the record
    paths, gallery, _, _ = index_rows(ws, index, progress=False)
    embed_images(ws, student, progress=False)
    m = ws.manifest()
    x, ok = EmbeddingStore(ws.embeddings_dir(student)).load(m)
    row = {p: i for i, p in enumerate(m["path"].astype(str))}
    rows = np.array([row[p] for p in paths])
    keep = ok[rows]
    have = set(m["split"].astype(str)) if "split" in m.columns else set()
    if split is None:
        split = "test" if "test" in have else "all"
    if split != "all":  # queries and gallery alike, as `cdir eval --split`
        if split not in have:
            raise SystemExit(f"--split {split}: the manifest has no such split")
        keep &= m["split"].astype(str).to_numpy()[rows] == split
    rows, gallery = rows[keep], gallery[keep]
    manifest = m.iloc[rows].reset_index(drop=True)
    out = {}
    for name, queries in (("teacher", gallery), ("student", x[rows])):
        res = evaluate_pairs(CosineScorer(queries, gallery, device="cpu", normalize=True),
                             manifest, ks=(1,), progress=False)
        p1 = float(next(r for r in res if r["pair"] == "mean")["P@1"])
        out[name] = 100 * p1 if p1 <= 1 else p1
    return out, split


def latency(workspace: str, index: str, student: str, queries: int,
            repeats: int) -> dict[str, float]:
    """Median ms per query, end to end, of the index's encoder and of the student."""
    from cdir.core.images import load_image
    from cdir.core.workspace import Workspace
    from cdir.stages.search import Searcher

    searchers = {"teacher": Searcher(workspace, index=index, device="cpu"),
                 "student": Searcher(workspace, index=index, query_encoder=student,
                                     device="cpu")}
    paths = Workspace(workspace).manifest()["path"].astype(str).tolist()[:queries]
    for s in searchers.values():  # warm-up: models loaded, first call paid
        s.search([load_image(paths[0])], k=10)
    times: dict[str, list[float]] = {n: [] for n in searchers}
    for _ in range(repeats):
        for p in paths:
            for name, s in searchers.items():
                t0 = time.perf_counter()
                s.search([load_image(p)], k=10)
                times[name].append(1000 * (time.perf_counter() - t0))
    return {n: statistics.median(v) for n, v in times.items()}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-w", "--workspace", default="runs/emoji")
    p.add_argument("--index", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--queries", type=int, default=100)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--split", default=None,
                   help="the categories scored: test, dev or all (default: test where the "
                        "gallery has a split of categories, else all)")
    args = p.parse_args()

    import torch

    print(f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    p1, split = mean_p1(args.workspace, args.index, args.student, args.split)
    ms = latency(args.workspace, args.index, args.student, args.queries, args.repeats)
    print(f"\nindex {args.index}; P@1 on the {split} categories; {args.queries} queries "
          f"one at a time, median of {args.repeats}\n")
    print("| queries by | mean P@1 vs the index's gallery | ms / query (CPU, end to end) |")
    print("|---|---:|---:|")
    for n in ("teacher", "student"):
        print(f"| {n} | {p1[n]:.2f} | {ms[n]:.1f} |")
    print(f"\nstudent: P@1 {p1['student'] - p1['teacher']:+.2f}, "
          f"{ms['teacher'] / ms['student']:.2f}x faster per query")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
