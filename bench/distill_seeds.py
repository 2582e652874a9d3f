"""The default encoder's final stage (label-free distillation) over several seeds at a small
budget, against its start, in one run.

    python bench/distill_seeds.py [-w runs/emoji] [--seeds 0 1 2] [--epochs 5]
        [--config configs/distill/emoji_label_free.yaml] [--split test]
        [--out runs/bench-distill-seeds]

Rows: the teacher (the adapted encoder at its ``size``, the stage's input); the start, i.e. what the
student's weights give before distillation: the teacher's own features at the student's 64 px
(``&size=64``, the same trunk and input, no training); then one `cdir distill rrd --label-free`
run per seed with the recipe's settings and ``--epochs`` epochs (the schedule shrunk to fit:
warm-up and cosine over those epochs), each student embedded and scored. Every row is scored by
`cdir eval` on the ``--split`` categories with the same normalisation (whitening after the
default shared PCA to 512 dims): mean P@1 (%) over the six directed pairs, plain and whitened,
each alone, with CSLS and with the dual softmax; the last rows are mean ± sample std over the
seeds and the mean's gain over the start. Labels are read only by the evaluation; the
distillation never sees them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from distill_emoji import TEACHER, mean_p1  # noqa: E402  (the same scoring as that bench)

# the modes distill_emoji.mean_p1 reports, as this table names them
VARIANTS = {"plain": "visual", "CSLS": "visual+csls", "dual softmax": "visual+dual-softmax",
            "whitened": "visual+domain-whiten", "whitened + CSLS": "visual+domain-whiten+csls",
            "whitened + dual softmax": "visual+domain-whiten+dual-softmax"}


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def scores(workspace: str, spec: str, split: str) -> dict[str, float]:
    """Mean P@1 (%) of each variant, whitening after the default shared PCA."""
    p1 = mean_p1(workspace, spec, split, None)
    return {name: p1[key] for name, key in VARIANTS.items()}


def at_size(spec: str, size: int) -> str:
    """``spec`` with its ``size`` option set to ``size`` (added, or replacing the one it has)."""
    base, _, query = spec.partition("?")
    options = [o for o in query.split("&") if o and not o.startswith("size=")]
    return f"{base}?{'&'.join([*options, f'size={size}'])}"


def row(name: str, p1: dict[str, float], extra: str = "") -> str:
    return f"| {name} | " + " | ".join(f"{v:.2f}" for v in p1.values()) + f" | {extra} |"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-w", "--workspace", default="runs/emoji")
    ap.add_argument("--teacher", default=TEACHER)
    ap.add_argument("--config", default="configs/distill/emoji_label_free.yaml")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--split", default="test", choices=("dev", "test", "all"))
    ap.add_argument("--out", default="runs/bench-distill-seeds")
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error("--epochs must be at least 1")

    from cdir.stages.distill import distill_label_free_run

    start_spec = at_size(args.teacher, 64)
    from encoders.image import load_image_encoder

    size = load_image_encoder(args.teacher, "cpu").params["size"]  # the spec's, or the file's
    rows = [row(f"teacher ({size} px)", scores(args.workspace, args.teacher, args.split)),
            row("start: the teacher at 64 px", start := scores(args.workspace, start_spec,
                                                                args.split))]
    runs = []
    for seed in args.seeds:
        t0 = time.perf_counter()
        res = distill_label_free_run("rrd", args.workspace, args.teacher, args.config,
                                     resume="auto", progress=False, seed=seed,
                                     epochs=args.epochs, out=f"{args.out}/seed-{seed}")
        wall = time.perf_counter() - t0
        p1 = scores(args.workspace, f"ckpt:{res['student']}", args.split)
        say(f"seed {seed}: {p1} ({wall:.0f} s)")
        runs.append(p1)
        rows.append(row(f"student, seed {seed}", p1, f"{wall / 60:.1f} min"))
    mean = {k: statistics.mean(r[k] for r in runs) for k in VARIANTS}
    if len(runs) > 1:
        std = {k: statistics.stdev(r[k] for r in runs) for k in VARIANTS}
        rows.append("| **students, mean ± std** | "
                    + " | ".join(f"**{mean[k]:.2f}** ± {std[k]:.2f}" for k in VARIANTS) + " | |")
    rows.append("| gain over the start | "
                + " | ".join(f"{mean[k] - start[k]:+.2f}" for k in VARIANTS) + " | |")
    print(f"\nmean P@1 %, six directed pairs, {args.split} categories; students: "
          f"{args.config}, {args.epochs} epochs, seeds {' '.join(map(str, args.seeds))}\n")
    print("| encoder | " + " | ".join(VARIANTS) + " | distillation wall |")
    print("|---|" + "---:|" * (len(VARIANTS) + 1))
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
