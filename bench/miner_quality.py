"""Does the label-free precision estimate of mined pairs (encoders/adapt/quality.py) track the
true precision? Synthetic instance galleries over a noise sweep, and real emoji features of
several qualities.

    python bench/miner_quality.py [-w runs/emoji] [--store DIR ...] [--cycle none|any]

Emoji: every ``--store`` (an embeddings folder of the workspace; default: all of them) is read
plain (L2 rows) and domain-whitened after a shared PCA to 512, 128 and 32 dims; each variant
is mined (mutual-nn, ``--cycle``) and its pairs get the estimate and, from the manifest labels
(for this measurement only), the true precision. Prints (estimate, true) per variant and the
Spearman rank correlation over them; the same for the synthetic sweep.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from encoders.adapt.mining import mine, pair_precision  # noqa: E402
from encoders.adapt.quality import estimate_precision, spearman, synthetic_gallery  # noqa: E402


def l2(z: np.ndarray) -> np.ndarray:
    return z / np.maximum(np.linalg.norm(z, axis=1, keepdims=True), 1e-12)


def measure(x: np.ndarray, labels: np.ndarray, doms: np.ndarray, cycle: str | None
            ) -> tuple[float, float, int]:
    m = mine(x, doms, cycle=cycle)
    return (estimate_precision(x, doms, m.pairs, m.maps), pair_precision(m.pairs, labels),
            len(m.pairs))


def report(name: str, rows: list[tuple[str, float, float, int]]) -> None:
    for label, est, true, n in rows:
        print(f"  {label:<58} pairs {n:5d}  estimate {est:.3f}  true {true:.3f}")
    est, true = [r[1] for r in rows], [r[2] for r in rows]
    err = np.abs(np.array(est) - np.array(true))
    print(f"{name}: Spearman {spearman(est, true):.3f}, mean |estimate - true| {err.mean():.3f}"
          f" (max {err.max():.3f}) over {len(rows)}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", default="runs/emoji")
    ap.add_argument("--store", nargs="*", default=None)
    ap.add_argument("--cycle", default="none", choices=("none", "any"))
    args = ap.parse_args()
    cycle = None if args.cycle == "none" else args.cycle
    for families in (0, 30):
        rows = []
        for noise in (0.7, 0.9, 1.1, 1.3, 1.5, 1.8, 2.2):
            x, lab, dom = synthetic_gallery(noise, families)
            rows.append((f"noise {noise}", *measure(x, lab, dom, cycle)))
        report(f"synthetic (families {families}, cycle {args.cycle})", rows)

    import pandas as pd

    from cdir.core.store import EmbeddingStore
    from indexes.normalize import fit_normalizer

    ws = Path(args.workspace)
    df = pd.read_parquet(ws / "manifest.parquet")
    stores = args.store or sorted(str(p) for p in (ws / "embeddings").iterdir() if p.is_dir())
    labels = df["label"].astype(str).to_numpy()
    doms = df["domain"].astype(str).to_numpy()
    rows = []
    for store in stores:
        x, valid = EmbeddingStore(store).load(df)
        x, lab, dom = x[valid], labels[valid], doms[valid]
        name = Path(store).name[-36:]
        rows.append((f"{name} plain", *measure(l2(x), lab, dom, cycle)))
        for dim in (512, 128, 32):
            z = fit_normalizer(x, dom, "domain-whiten", pca_dim=dim).transform(x, dom)
            rows.append((f"{name} whiten pca {dim}", *measure(l2(z), lab, dom, cycle)))
    report(f"emoji ({ws}, cycle {args.cycle})", rows)


if __name__ == "__main__":
    main()
