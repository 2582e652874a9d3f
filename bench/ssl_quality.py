"""Cross-domain retrieval quality of MoCo v2, SynCo and ISD on the emoji gallery, with the same
budget and several seeds, against the raw-pixel baseline: every stage through the `cdir` CLI.

    python bench/ssl_quality.py --epochs 15 --seeds 0 1 2 [--workspace DIR] [--out DIR]

For each method and seed: `cdir train METHOD --config configs/emoji_small.yaml --epochs E --seed S`,
then `cdir embed` and `cdir eval` of its encoder on the workspace (every directed pair, UCDIR P@1).
Prints a Markdown table (per pair: mean ± std over seeds) and writes it to OUT/quality.md and .json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from encoders.ssl.plugin import METHODS  # noqa: E402

# isd_plus is ISD with the ResNet-50 recipe's heads and temperatures: not part of the default sweep
DEFAULT_METHODS = [m for m in METHODS if m != "isd_plus"]


def cdir(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "cdir", *map(str, args)], check=True,
                   stdout=subprocess.DEVNULL)


def pair_p1(ws: Path, run: str) -> dict[str, float]:
    rows = json.loads((ws / "reports" / run / "results.json").read_text())["results"]
    return {r["pair"]: r["P@1"] for r in rows}


def evaluate(ws: Path, encoder: str, run: str) -> dict[str, float]:
    cdir("embed", "-w", ws, "--encoder", encoder, "--no-progress")
    cdir("eval", "-w", ws, "--encoder", encoder, "--run", run, "--examples", "0")
    return pair_p1(ws, run)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--epochs", type=int, default=15)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=METHODS)
    ap.add_argument("--workspace", type=Path, default=Path("runs/emoji"))
    ap.add_argument("--out", type=Path, default=Path("runs/quality"))
    ap.add_argument("--config", default="configs/emoji_small.yaml")
    args = ap.parse_args()
    ws, gallery = args.workspace, args.workspace / "gallery"
    if not (ws / "manifest.parquet").exists():
        cdir("data", "emoji", "-w", ws)
    results: dict[str, list[dict[str, float]]] = {"pixels": [evaluate(ws, "pixels", "q-pixels")]}
    minutes: dict[str, list[float]] = {}
    for method in args.methods:
        for seed in args.seeds:
            out = args.out / f"{method}-s{seed}"
            t0 = time.perf_counter()
            if not (out / "encoder.pt").exists():
                cdir("train", method, "--config", args.config, "--data", gallery, "--out", out,
                     "--epochs", args.epochs, "--seed", seed, "--resume", "auto",
                     "--set", "monitor.path=null", "--set", "train.progress=false")
            minutes.setdefault(method, []).append((time.perf_counter() - t0) / 60)
            p1 = evaluate(ws, f"ckpt:{out / 'encoder.pt'}", f"q-{method}-s{seed}")
            results.setdefault(method, []).append(p1)
            print(f"{method} seed {seed}: mean P@1 {p1['mean']:.2f}", flush=True)

    pairs = list(results["pixels"][0])
    lines = ["| pair | " + " | ".join(results) + " |", "|---|" + "---:|" * len(results)]
    for pair in pairs:
        cells = []
        for runs in results.values():
            vals = [r[pair] for r in runs]
            sd = f" ± {statistics.stdev(vals):.2f}" if len(vals) > 1 else ""
            cells.append(f"{statistics.mean(vals):.2f}{sd}")
        lines.append(f"| {pair} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    note = (f"UCDIR P@1 (%) on the emoji gallery, every directed pair; {args.epochs} epochs of "
            f"{args.config} per run, seeds {args.seeds}, mean ± std over seeds; training minutes "
            "per run: " + ", ".join(f"{m} {statistics.mean(v):.1f}" for m, v in minutes.items()))
    print(f"\n{table}\n{note}")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.md").write_text(f"# SSL quality on the emoji gallery\n\n{table}\n{note}\n")
    (args.out / "quality.json").write_text(json.dumps({"results": results, "note": note}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
