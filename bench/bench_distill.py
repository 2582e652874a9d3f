"""Training-step time of each distillation loss against a plain cross-entropy step, same run.

    python bench/bench_distill.py [--steps 10] [--warmup 3] [--batch-size 64] [--queue-size 16384]
        [--teacher resnet32x4] [--student resnet8x4] [--threads N] [--device cpu|cuda]
        [--json out.json]

The CRD testbed's sizes: CIFAR-shaped batches (64 x 3 x 32 x 32, 100 classes), feat_dim 128,
K = 16384 (CRD's ``nce_k``, the FIFO losses' ``queue_size``), n_data 50000 (CRD's memory rows).
One step = teacher forward (frozen, eval, no grad) + student forward (train mode) +
``StudentObjective`` with the README recipe weights + backward + SGD (lr 0.05, momentum 0.9,
wd 5e-4) over the student's and the loss's parameters. Rows:

- ``ce``: the baseline, CE only and no teacher forward (a vanilla student);
- ``ce+teacher``: CE plus the teacher forward that every distiller pays;
- ``kd``, ``crd``, ``crd_fifo``, ``dcd``, ``rrd``: each loss alone (``kd``'s recipe has beta 0:
  its term is the objective's own KD term); ``dcd+kd``, ``rrd+kd``: their "+KD" recipes.

Every row has its own student (same seed, same initial weights), loss and optimiser; the rows
are interleaved step by step so drifting machine load hits them alike, and the median of
``--steps`` timed steps (after ``--warmup``) is reported. "Head alone" times the objective and
the loss (forward + backward) on random features and logits of the networks' shapes, without the
networks, against the CE head alone.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import time_interleaved  # noqa: E402
from encoders.distill.losses import build_loss, loss_options  # noqa: E402
from encoders.distill.losses.base import DistillLoss  # noqa: E402
from encoders.distill.losses.objective import StudentObjective  # noqa: E402
from encoders.zoo import create_model  # noqa: E402

ROWS = ("ce", "ce+teacher", "kd", "crd", "crd_fifo", "dcd", "rrd", "dcd+kd", "rrd+kd")
N_DATA = 50_000
NUM_CLASSES = 100
FEAT_DIM = 128
SEED = 0


@dataclass
class Batch:
    x: torch.Tensor  # (B, 3, 32, 32) images
    y: torch.Tensor  # (B,) labels
    idx: torch.Tensor  # (B,) dataset indices (CRD's memory rows)


@dataclass
class Row:
    """One benchmark row: its objective weights, its loss (None: CE only) and whether it runs
    the teacher."""

    name: str
    objective: StudentObjective
    loss_name: str | None
    uses_teacher: bool


def parse_row(name: str) -> Row:
    if name == "ce":
        return Row(name, StudentObjective(alpha=0.0, beta=0.0), None, False)
    if name == "ce+teacher":
        return Row(name, StudentObjective(alpha=0.0, beta=0.0), None, True)
    loss, _, kd = name.partition("+")
    return Row(name, StudentObjective.recipe(loss, with_kd=kd == "kd"), loss, True)


def make_loss(name: str, s_dim: int, t_dim: int, queue_size: int,
              device: torch.device) -> DistillLoss:
    """Loss ``name`` at the benchmark's sizes (only the options it has), seeded, in train mode."""
    sizes = {"feat_dim": FEAT_DIM, "nce_k": queue_size, "queue_size": queue_size}
    options = {k: v for k, v in sizes.items() if k in loss_options(name)}
    torch.manual_seed(SEED)
    return build_loss(name, s_dim, t_dim, N_DATA, **options).to(device).train()


def random_batch(batch_size: int, device: torch.device) -> Batch:
    g = torch.Generator().manual_seed(SEED)
    x = torch.randn(batch_size, 3, 32, 32, generator=g)
    y = torch.randint(0, NUM_CLASSES, (batch_size,), generator=g)
    idx = torch.randperm(N_DATA, generator=g)[:batch_size]
    return Batch(x.to(device), y.to(device), idx.to(device))


def make_teacher(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(SEED)
    teacher = create_model(name, NUM_CLASSES).to(device).eval()
    teacher.requires_grad_(False)
    return teacher


def make_step(row: Row, args: argparse.Namespace, teacher: torch.nn.Module, batch: Batch,
              device: torch.device) -> Callable[[], None]:
    """A closure running one training step of ``row`` on its own student, loss and optimiser."""
    torch.manual_seed(SEED)  # every row's student starts from the same weights
    student = create_model(args.student, NUM_CLASSES).to(device).train()
    params = list(student.parameters())
    loss = None
    if row.loss_name is not None:
        loss = make_loss(row.loss_name, student.feat_dim, teacher.feat_dim, args.queue_size,
                         device)
        params += [p for p in loss.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=5e-4)
    objective = row.objective

    def step() -> None:
        f_t = z_t = None
        if row.uses_teacher:
            with torch.no_grad():
                f_t, z_t = teacher(batch.x)
        f_s, z_s = student(batch.x)
        method = loss(f_s, f_t, z_s, z_t, idx=batch.idx) if objective.beta else None
        total, _ = objective(z_s, batch.y, z_t, method)
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()

    return step


def make_head(row: Row, args: argparse.Namespace, s_dim: int, t_dim: int,
              device: torch.device) -> Callable[[], None]:
    """A closure running the objective and the loss (forward + backward) on random features and
    logits of the networks' shapes, without the networks."""
    g = torch.Generator().manual_seed(SEED)
    b = args.batch_size
    f_s = torch.randn(b, s_dim, generator=g).to(device).requires_grad_(True)
    z_s = torch.randn(b, NUM_CLASSES, generator=g).to(device).requires_grad_(True)
    f_t = torch.randn(b, t_dim, generator=g).to(device)
    z_t = torch.randn(b, NUM_CLASSES, generator=g).to(device)
    idx = torch.randperm(N_DATA, generator=g)[:b].to(device)
    y = torch.randint(0, NUM_CLASSES, (b,), generator=g).to(device)
    loss = None
    if row.loss_name is not None:
        loss = make_loss(row.loss_name, s_dim, t_dim, args.queue_size, device)
    objective = row.objective

    def head() -> None:
        f_s.grad = z_s.grad = None
        if loss is not None:
            loss.zero_grad(set_to_none=True)
        method = loss(f_s, f_t, z_s, z_t, idx=idx) if objective.beta else None
        total, _ = objective(z_s, y, z_t, method)
        total.backward()

    return head


def summarise(step_times: dict[str, list[float]],
              head_times: dict[str, list[float]]) -> list[dict[str, float | str | None]]:
    """Medians (ms) and ratios per row; a row without its own head timing gets None there."""
    step = {k: statistics.median(v) * 1e3 for k, v in step_times.items()}
    head = {k: statistics.median(v) * 1e3 for k, v in head_times.items()}
    rows = []
    for name, ms in step.items():
        h = head.get(name)
        rows.append({
            "loss": name, "step_ms": ms, "x_ce": ms / step["ce"],
            "x_ce_teacher": ms / step["ce+teacher"], "head_ms": h,
            "head_x_ce": None if h is None else h / head["ce"],
        })
    return rows


def print_table(rows: list[dict[str, float | str | None]]) -> None:
    print("\n| loss | ms/step (median) | × ce | × ce+teacher | head alone, ms | head × ce head |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        head = "(= ce)" if r["head_ms"] is None else f"{r['head_ms']:.2f}"
        head_x = "" if r["head_x_ce"] is None else f"{r['head_x_ce']:.1f}"
        print(f"| {r['loss']} | {r['step_ms']:.0f} | {r['x_ce']:.2f} | "
              f"{r['x_ce_teacher']:.2f} | {head} | {head_x} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per row (median)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--queue-size", type=int, default=16384, help="K: nce_k / queue_size")
    ap.add_argument("--teacher", default="resnet32x4")
    ap.add_argument("--student", default="resnet8x4")
    ap.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    t_start = time.perf_counter()

    teacher = make_teacher(args.teacher, device)
    s_dim = create_model(args.student, NUM_CLASSES).feat_dim
    batch = random_batch(args.batch_size, device)
    rows = [parse_row(name) for name in ROWS]
    print(f"teacher {args.teacher} ({teacher.feat_dim}-d) -> student {args.student} ({s_dim}-d); "
          f"batch {args.batch_size} x 3 x 32 x 32, {NUM_CLASSES} classes, K {args.queue_size}, "
          f"feat_dim {FEAT_DIM}, n_data {N_DATA}; device {device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} thread(s); warmup {args.warmup}, {args.steps} timed steps")

    steps = {r.name: make_step(r, args, teacher, batch, device) for r in rows}
    step_times = time_interleaved(steps, args.steps, args.warmup, device, "step")
    heads = {r.name: make_head(r, args, s_dim, teacher.feat_dim, device)
             for r in rows if r.name != "ce+teacher"}  # its head is ce's
    head_times = time_interleaved(heads, args.steps, args.warmup, device, "head")

    results = summarise(step_times, head_times)
    print_table(results)
    wall = time.perf_counter() - t_start
    print(f"\nwall time {wall:.0f} s")
    if args.json is not None:
        payload = {
            "teacher": args.teacher, "student": args.student, "batch_size": args.batch_size,
            "queue_size": args.queue_size, "feat_dim": FEAT_DIM, "n_data": N_DATA,
            "num_classes": NUM_CLASSES, "device": str(device), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "warmup": args.warmup, "steps": args.steps,
            "wall_s": wall, "rows": results,
            "step_times_s": step_times, "head_times_s": head_times,
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
