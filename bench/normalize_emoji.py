"""Search-time normalisation and correspondence mining on the emoji workspace (numpy only).

    python bench/normalize_emoji.py [-w runs/emoji] [--encoder-dir DIR] [--k 10]

Reads the manifest and the stored embeddings of one encoder (default: the only, or the
``emoji_synco``, store under ``WORKSPACE/embeddings/``) and prints

1. mean UCDIR P@1 (%) over the directed domain pairs (every image of A queries all images of B,
   one correct item: the same ``label``) for none / domain-center / domain-whiten (several
   shrinkage settings), each plain, with CSLS and with the inverted softmax; then transductive
   assignment retrieval (the Sinkhorn plan's rows, the Hungarian partner) of each pair;
2. the label-free criteria of each normalisation (mutual-NN rate, cycle rate, hubness), to see
   whether they track P@1 without labels;
3. mined pairs on whitened vectors (mutual-NN, Sinkhorn, Hungarian; with and without the cycle
   check, several confidence quantiles): count, coverage and their precision.

Labels are used only to score; nothing is chosen with them here.
"""

from __future__ import annotations

import argparse
import sys
import time
from itertools import permutations
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from cdir.core.store import EmbeddingStore  # noqa: E402
from cdir.core.workspace import Workspace  # noqa: E402
from encoders.adapt.mining import (  # noqa: E402
    DEFAULT_EPS,
    hungarian_match,
    mine,
    mining_stats,
    pair_precision,
    sinkhorn_potentials,
)
from indexes.normalize import (  # noqa: E402
    DomainNormalizer,
    csls_scores,
    csls_terms,
    inverted_softmax_log_norm,
    inverted_softmax_scores,
)

BLOCK = 2048


def load(workspace: str, encoder_dir: str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ws = Workspace(workspace)
    manifest = ws.manifest()
    if encoder_dir is None:
        dirs = sorted(p for p in (Path(workspace) / "embeddings").iterdir() if p.is_dir())
        synco = [p for p in dirs if "emoji_synco" in p.name]
        encoder_dir = str((synco or dirs)[0])
    x, valid = EmbeddingStore(encoder_dir).load(manifest)
    print(f"embeddings: {encoder_dir} ({int(valid.sum())} of {len(valid)} rows, dim {x.shape[1]})")
    keep = np.flatnonzero(valid)
    return (x[keep], manifest["domain"].to_numpy().astype(str)[keep],
            manifest["label"].to_numpy()[keep])


def top1(qa: np.ndarray, gb: np.ndarray, score: str = "cosine", k: int = 10,
         beta: float = 30.0) -> np.ndarray:
    """The best gallery row of ``gb`` for each query of ``qa``, query block by query block."""
    if score == "csls":
        r_q, r_g = csls_terms(qa, gb, k)
    elif score == "isoftmax":
        log_z = inverted_softmax_log_norm(gb, qa, beta)
    elif score != "cosine":
        raise ValueError(score)
    out = np.empty(len(qa), np.int64)
    for s in range(0, len(qa), BLOCK):
        q = qa[s:s + BLOCK]
        if score == "csls":
            block = csls_scores(q, gb, r_q[s:s + BLOCK], r_g)
        elif score == "isoftmax":
            block = inverted_softmax_scores(q, gb, log_z, beta)
        else:
            block = q @ gb.T
        out[s:s + BLOCK] = block.argmax(1)
    return out


def p_at_1(z: np.ndarray, dom: np.ndarray, lab: np.ndarray, score: str = "cosine",
           k: int = 10, beta: float = 30.0) -> dict[str, float]:
    """P@1 (%) of every directed pair with R = 1 (P@1 = hit rate of the top item)."""
    out = {}
    for a, b in permutations(sorted(set(dom.tolist())), 2):
        top = top1(z[dom == a], z[dom == b], score, k, beta)
        out[f"{a}->{b}"] = 100.0 * float((lab[dom == b][top] == lab[dom == a]).mean())
    return out


def assignment_p_at_1(z: np.ndarray, dom: np.ndarray, lab: np.ndarray, how: str) -> float:
    """Mean P@1 (%) of transductive one-to-one retrieval: "sinkhorn" ranks each query's row by
    its Sinkhorn plan row (cosine + eps * column potential), "hungarian" answers with the
    query's partner in the maximum-similarity assignment."""
    vals = []
    for a, b in permutations(sorted(set(dom.tolist())), 2):
        qa, gb = z[dom == a], z[dom == b]
        if how == "sinkhorn":
            sim = qa @ gb.T
            _, g, _ = sinkhorn_potentials(sim, DEFAULT_EPS)
            hits = lab[dom == b][(sim + DEFAULT_EPS * g[None, :]).argmax(1)] == lab[dom == a]
        else:
            p = hungarian_match(qa, gb)
            hits = lab[dom == a][p.a] == lab[dom == b][p.b]
        vals.append(100.0 * float(hits.sum()) / len(qa))
    return float(np.mean(vals))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", default=str(ROOT / "runs" / "emoji"))
    ap.add_argument("--encoder-dir", default=None)
    ap.add_argument("--k", type=int, default=10, help="CSLS neighbourhood")
    args = ap.parse_args()
    x, dom, lab = load(args.workspace, args.encoder_dir)

    settings = [("none", {}), ("domain-center", {}),
                ("domain-whiten", {"shrinkage": "ledoit-wolf"}),
                ("domain-whiten", {"shrinkage": 0.0}), ("domain-whiten", {"shrinkage": 0.05}),
                ("domain-whiten", {"shrinkage": 0.1}), ("domain-whiten", {"shrinkage": 0.3})]
    normalised = {}
    print("\n## P@1 (%), mean over the 6 directed pairs\n")
    print(f"| normalisation | alpha | cosine | CSLS k={args.k} | inv. softmax | MNN rate "
          "| cycle rate | hubness | fit+transform s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, opts in settings:
        t = time.perf_counter()
        norm = DomainNormalizer(method, **opts).fit(x, dom)
        z = norm.transform(x, dom)
        dt = time.perf_counter() - t
        alphas = norm.alphas[np.isfinite(norm.alphas)]
        alpha = f"{opts['shrinkage']}" if "shrinkage" in opts else "-"
        if opts.get("shrinkage") == "ledoit-wolf":
            alpha = f"LW ({alphas.min():.3f}-{alphas.max():.3f})"
        crit = mining_stats(z, dom, block=BLOCK)
        row = [np.mean(list(p_at_1(z, dom, lab, s, args.k).values()))
               for s in ("cosine", "csls", "isoftmax")]
        print(f"| {method} | {alpha} | {row[0]:.2f} | {row[1]:.2f} | {row[2]:.2f} | "
              f"{100 * crit['mutual_nn_rate']:.1f} | {100 * crit['cycle_rate']:.1f} | "
              f"{crit['hubness']:.2f} | {dt:.2f} |")
        normalised[(method, alpha)] = z

    z = DomainNormalizer("domain-whiten").fit(x, dom).transform(x, dom)
    print("\n## per pair, domain-whiten (Ledoit-Wolf)\n")
    per = {s: p_at_1(z, dom, lab, s, args.k) for s in ("cosine", "csls")}
    raw = p_at_1(x, dom, lab)
    print("| pair | none | whiten | whiten+CSLS |\n|---|---:|---:|---:|")
    for key in raw:
        print(f"| {key} | {raw[key]:.2f} | {per['cosine'][key]:.2f} | {per['csls'][key]:.2f} |")

    print("\n## one-to-one assignment as retrieval (P@1 %, mean of 6 directed pairs)\n")
    print(f"| vectors | sinkhorn plan (eps {DEFAULT_EPS}) | hungarian |\n|---|---:|---:|")
    for name, vecs in (("none", x), ("domain-whiten (LW)", z)):
        print(f"| {name} | {assignment_p_at_1(vecs, dom, lab, 'sinkhorn'):.2f} | "
              f"{assignment_p_at_1(vecs, dom, lab, 'hungarian'):.2f} |")

    print("\n## mined pairs on domain-whiten (LW) vectors; precision uses labels (report only)\n")
    print("| matcher | cycle | quantile | pairs | coverage % | precision % | s |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for method in ("mutual-nn", "sinkhorn", "hungarian"):
        for cycle, both in ((None, True), ("any", False), ("any", True)):
            for q in (None, 0.5, 0.8):
                t = time.perf_counter()
                m = mine(z, dom, method, cycle=cycle, both_ways=both, quantile=q, block=BLOCK)
                dt = time.perf_counter() - t
                label = "-" if cycle is None else ("both ways" if both else "back only")
                print(f"| {method} | {label} | {q or 0} | {len(m.pairs)} | "
                      f"{100 * m.stats['coverage']:.1f} | "
                      f"{100 * pair_precision(m.pairs, lab):.1f} | {dt:.1f} |")


if __name__ == "__main__":
    main()
