"""SynCo's overhead over MoCo v2, both measured in the same run.

Default (loss head only, any device): forward + backward of the loss given q, k and the queue,
at the paper's sizes (batch 256, K = 65536, d = 128, N = 1024 hard negatives, 960 synthetic
negatives per query). MoCo = InfoNCE over [pos | queue]; SynCo adds top-N selection, the six
generators and the synthetic logits.

``--full`` (for a GPU): a whole training step (query forward/backward, EMA, key forward,
loss, enqueue, SGD step) of a ResNet-50 at 224 px under bf16 autocast, MoCo versus SynCo with the
synthetic negatives switched on. Target: SynCo <= 1.05x MoCo.

    python bench/bench_synco.py                 # CPU loss head, 1 thread
    python bench/bench_synco.py --full --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.timing import time_interleaved  # noqa: E402
from encoders.engine.parts import infonce_logits, infonce_loss  # noqa: E402
from encoders.ssl.synco import synco_logits  # noqa: E402
from encoders.ssl.synthetic import (  # noqa: E402
    SyntheticConfig,
    select_hard,
    synthesize,
    synthetic_logits,
)


def bench_loss(args: argparse.Namespace, device: torch.device) -> None:
    g = torch.Generator(device="cpu").manual_seed(0)
    b, d, k_size = args.batch, args.dim, args.queue
    q0 = F.normalize(torch.randn(b, d, generator=g), dim=1).to(device)
    k = F.normalize(torch.randn(b, d, generator=g), dim=1).to(device)
    queue = F.normalize(torch.randn(k_size, d, generator=g), dim=1).to(device)
    cfg = SyntheticConfig(n_hard=args.n_hard)
    vectors = SyntheticConfig(n_hard=args.n_hard, logits="materialize")
    tau = 0.2

    def moco() -> None:
        q = q0.clone().requires_grad_(True)
        infonce_loss(infonce_logits(q, k, queue), tau).backward()

    def step(c: SyntheticConfig) -> Callable[[], None]:
        def run() -> None:
            q = q0.clone().requires_grad_(True)
            logits, _ = synco_logits(q, k, queue, c)
            infonce_loss(logits, tau).backward()
        return run

    print(f"loss head: batch {b}, K {k_size}, d {d}, N {cfg.n_hard}, "
          f"{cfg.total} synthetic/query, device {device}, threads {torch.get_num_threads()}")
    times = time_interleaved({"moco": moco, "synco": step(cfg), "materialized": step(vectors)},
                             args.reps, args.warmup, device)
    report(times, "loss head (fwd+bwd)")

    # the part SynCo adds, forward only, against the queue logits it starts from
    neg = q0 @ queue.t()

    def queue_logits() -> None:
        q0 @ queue.t()

    def added(c: SyntheticConfig) -> Callable[[], None]:
        def run() -> None:
            hard = select_hard(neg, c.n_hard)
            if c.logits == "closed_form":
                synthetic_logits(q0, neg, queue, hard, c)
            else:
                torch.bmm(synthesize(q0, queue, hard, c), q0.unsqueeze(2))
        return run

    print("selection + synthetic logits (forward) vs the queue logits q @ queue.T:")
    times = time_interleaved({"moco": queue_logits, "synco": added(cfg),
                              "materialized": added(vectors)}, args.reps, args.warmup, device)
    report(times, "selection + synthetic logits")


def bench_full(args: argparse.Namespace, device: torch.device) -> None:
    from encoders.ssl.plugin import build_method

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[args.amp]
    steps: dict[str, Callable[[], None]] = {}
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(args.batch, 3, args.size, args.size, generator=g).to(device)
    x = x.contiguous(memory_format=torch.channels_last)
    views = [x, x.flip(3)]
    for name in ("moco", "synco"):
        kw = {"queue_size": args.queue, "dim": args.dim}
        if name == "synco":
            kw.update(n_hard=args.n_hard, warmup_epochs=0)
        method = build_method(name, args.arch, {"width": args.width}, **kw).to(device)
        method = method.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD([p for p in method.parameters() if p.requires_grad], lr=0.03,
                              momentum=0.9, weight_decay=1e-4)

        def step(method=method, opt=opt) -> None:
            amp = (torch.autocast(device.type, dtype=dtype) if dtype is not None
                   else contextlib.nullcontext())
            with amp:
                out = method(views)
            out["loss"].backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        steps[name] = step
    print(f"full step: {args.arch} x{args.width} {args.size}px batch {args.batch}, K {args.queue}, "
          f"amp {args.amp}, device {device}")
    times = time_interleaved(steps, args.reps, args.warmup, device)
    report(times, "full training step")


def report(times: dict[str, list[float]], what: str) -> None:
    med = {k: statistics.median(v) for k, v in times.items()}
    if "materialized" in med:
        print(f"{what}: materialized synthetic vectors {med['materialized'] * 1e3:.1f} ms = "
              f"{med['materialized'] / med['moco']:.3f}x the baseline; closed form "
              f"{med['synco'] * 1e3:.1f} ms = {med['synco'] / med['moco']:.3f}x")
    ratio = med["synco"] / med["moco"]
    # Adjacent pairs share the machine's momentary load, so their ratios are the least noisy.
    paired = statistics.median(s / m for s, m in zip(times["synco"], times["moco"], strict=True))
    best = min(times["synco"]) / min(times["moco"])
    print(f"{what}: moco {med['moco'] * 1e3:.1f} ms, synco {med['synco'] * 1e3:.1f} ms "
          f"(medians of {len(times['moco'])}); synco/moco = {ratio:.3f}x "
          f"(+{(ratio - 1) * 100:.1f}%); median paired ratio {paired:.3f}x; "
          f"ratio of minima {best:.3f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="time a whole ResNet training step")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--queue", type=int, default=65536)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--n-hard", type=int, default=1024)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--arch", default="resnet50", help="--full only")
    ap.add_argument("--width", type=float, default=1.0, help="--full only: backbone width")
    ap.add_argument("--size", type=int, default=224, help="--full only: image size")
    ap.add_argument("--amp", choices=("bf16", "fp16", "fp32"), default="bf16", help="--full only")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if args.full:
        bench_full(args, device)
    else:
        bench_loss(args, device)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
