"""A real labelled distillation check that runs offline: scikit-learn's handwritten digits
(1797 images, 8x8 upsampled to 32 px; 30 training images per class so a student has room to be
helped, the other 1497 images the test set), a teacher trained here, then the vanilla student
and every distiller over several seeds, mean +- std of the last and the best epoch.

    python bench/distill_digits.py                      # resnet20 -> resnet8, 3 seeds
    python bench/distill_digits.py --epochs 10 --seeds 0   # a quick look

Every row runs through ``cdir.stages.distill.distill_run`` (what `cdir distill` runs), with the
testbed's schedule shrunk to ``--epochs`` (lr x0.1 at 62.5 %, 75 % and 87.5 % of them, as 150,
180, 210 are of 240), tested every ``--eval-every`` epochs and after the last. "best" is
chosen on the test set, as the reference code does: it is
reported beside "last" only. Results go to OUT/table.md and OUT/table.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# row -> (method, with_kd); "teacher" trains the teacher architecture, "vanilla" the student
ROWS = {"teacher": ("teacher", False), "vanilla": ("teacher", False), "KD": ("kd", False),
        "CRD": ("crd", False), "DCD": ("dcd", False), "DCD+KD": ("dcd", True),
        "RRD": ("rrd", False), "RRD+KD": ("rrd", True)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default="resnet20")
    p.add_argument("--student", default="resnet8")
    p.add_argument("--epochs", type=int, default=60)
    p.add_argument("--eval-every", type=int, default=5, help="epochs between test evaluations")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--out", default="runs/bench-distill-digits")
    p.add_argument("--workers", type=int, default=0)
    args = p.parse_args()

    from cdir.stages.distill import distill_run

    out = Path(args.out)
    e = args.epochs
    milestones = [round(e * f) for f in (0.625, 0.75, 0.875)]
    sets = [f"optim.milestones={milestones}", "train.progress=false", "train.save_every=0",
            f"distill.eval_every={args.eval_every}"]
    # the queue-based losses on a 300-image set: a queue of 16384 would be mostly stale keys
    queue = {"rrd": ["method.queue_size=256"], "crd": ["method.nce_k=256"]}
    common = {"data": "digits", "epochs": e, "workers": args.workers}
    results: dict[str, dict] = {}
    walls: dict[str, float] = {}
    teacher_file = out / f"{args.teacher}_vanilla" / "seed_0" / "last.pt"
    for row in args.rows:
        method, with_kd = ROWS[row]
        arch = args.teacher if row == "teacher" else args.student
        folder = out / (f"{args.teacher}_vanilla" if row == "teacher" else row.lower())
        extra = {} if method == "teacher" else {"teacher": str(teacher_file),
                                                "with_kd": with_kd}
        t0 = time.perf_counter()
        res = distill_run(method, None, [*sets, *queue.get(method, [])], seeds=args.seeds,
                          out=folder, student=arch, **common, **extra)
        walls[row] = time.perf_counter() - t0
        results[row] = res
        print(f"{row}: last {res['last']['mean']:.2f} ± {res['last']['std']:.2f}, best "
              f"{res['best']['mean']:.2f} ± {res['best']['std']:.2f} ({walls[row]:.0f} s)",
              file=sys.stderr)

    lines = [f"digits (30 train images per class, 1497 test), {args.teacher} -> {args.student},"
             f" {e} epochs, seeds {' '.join(map(str, args.seeds))}; top-1 % mean ± std", "",
             "| row | model | last | best (on test) | wall (s) |", "|---|---|---:|---:|---:|"]
    for row, res in results.items():
        arch = args.teacher if row == "teacher" else args.student
        lines.append(f"| {row} | {arch} | {res['last']['mean']:.2f} ± {res['last']['std']:.2f}"
                     f" | {res['best']['mean']:.2f} ± {res['best']['std']:.2f} | "
                     f"{walls[row]:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text)
    (out / "table.json").write_text(json.dumps({"rows": results, "walls": walls,
                                                "args": vars(args)}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
