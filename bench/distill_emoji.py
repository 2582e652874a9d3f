"""The label-free distilled emoji student against its teacher, in one run: the parameters the
embedding uses, FLOPs per image, embedding throughput (the encoders as retrieval runs them:
preprocessing + model, and the model alone on prepared tensors), and mean cross-domain P@1
over the six directed pairs, plain and with the label-free per-domain whitening, CSLS and the
dual softmax.

    python bench/distill_emoji.py --student ckpt:runs/emoji-student/student.pt

Throughput: the same ``--images`` gallery images, embedded in batches of ``--batch-size`` by
the teacher and the student in turns (``--repeats`` times, median), so both see the same
machine state; the ratio is what to read. P@1 comes from ``cdir eval`` on the workspace
(embeddings are computed first when missing).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# the default student's teacher: the adapted encoder at 192 px (README, section 8)
TEACHER = "ckpt:encoders/weights/emoji_adapted.pt?grid=4&layers=3,4&size=192"


def flops_per_image(enc) -> float:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    size = int(enc.params.get("size", 224))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        enc.model.eval()(torch.zeros(1, 3, size, size))
    return float(counter.get_total_flops())


def parameters_used(enc) -> int:
    """Parameters the embedding depends on: those a backward pass from it reaches (a checkpoint's
    unused heads do not count)."""
    import torch

    size = int(enc.params.get("size", 224))
    model = enc.model.eval()
    model.zero_grad(set_to_none=True)
    model(torch.zeros(2, 3, size, size)).float().sum().backward()
    n = sum(p.numel() for p in model.parameters() if p.grad is not None)
    model.zero_grad(set_to_none=True)
    return n


def throughput(encoders: dict, images: list, batch: int, repeats: int) -> dict[str, dict]:
    """images/s of each encoder, end to end (PIL images in) and model only (tensors in)."""
    import torch

    tensors = {name: [torch.stack([enc.transform(im) for im in images[i:i + batch]])
                      for i in range(0, len(images), batch)] for name, enc in encoders.items()}
    times: dict[str, dict[str, list[float]]] = {n: {"end_to_end": [], "model": []}
                                                for n in encoders}
    for enc in encoders.values():  # warm-up
        enc.encode_images(images[:batch])
    for _ in range(repeats):
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            for i in range(0, len(images), batch):
                enc.encode_images(images[i:i + batch])
            times[name]["end_to_end"].append(len(images) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            with torch.no_grad():
                for x in tensors[name]:
                    enc.model(x)
            times[name]["model"].append(len(images) / (time.perf_counter() - t0))
    return {n: {k: statistics.median(v) for k, v in t.items()} for n, t in times.items()}


def mean_p1(workspace: str, spec: str, split: str, normalize_dim: int | None) -> dict[str, float]:
    from cdir.stages.embed import embed_images
    from cdir.stages.evaluate import evaluate

    embed_images(workspace, spec, progress=False)
    # teacher and student get the same normalisation: the index default (a shared PCA to
    # 512 dims before per-domain whitening) unless --normalize-dim says otherwise
    res = evaluate(workspace, encoder=spec, normalize="none,domain-whiten",
                   rerank="none,csls,dual-softmax", progress=False, examples=0, split=split,
                   normalize_dim=normalize_dim)
    out = {}
    for key, rows in res["results"].items():
        mean = next(r for r in rows if r["pair"] == "mean")
        out[key] = 100 * float(mean["P@1"]) if float(mean["P@1"]) <= 1 else float(mean["P@1"])
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-w", "--workspace", default="runs/emoji")
    p.add_argument("--teacher", default=TEACHER)
    p.add_argument("--student", required=True)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-eval", action="store_true", help="throughput and FLOPs only")
    p.add_argument("--split", default="test", choices=("dev", "test", "all"),
                   help="the categories P@1 is computed on (default: test)")
    p.add_argument("--normalize-dim", type=int, default=None,
                   help="shared PCA before whitening, for both encoders (default: the index "
                        "default; 0: full width)")
    args = p.parse_args()

    import torch

    from cdir.core.images import load_image
    from cdir.core.workspace import Workspace
    from encoders.image import load_image_encoder

    print(f"torch threads {torch.get_num_threads()}", file=sys.stderr)
    encoders = {"teacher": load_image_encoder(args.teacher, "cpu"),
                "student": load_image_encoder(args.student, "cpu")}
    paths = Workspace(args.workspace).manifest()["path"].tolist()[:args.images]
    images = [load_image(x) for x in paths]
    flops = {n: flops_per_image(e) for n, e in encoders.items()}
    params = {n: parameters_used(e) for n, e in encoders.items()}
    speed = throughput(encoders, images, args.batch_size, args.repeats)
    p1 = {} if args.no_eval else {n: mean_p1(args.workspace, s, args.split, args.normalize_dim)
                                  for n, s in
                                  (("teacher", args.teacher), ("student", args.student))}

    print(f"\n{len(images)} images, batch {args.batch_size}, median of {args.repeats}; "
          f"P@1 on {args.split} categories\n")
    print("| encoder | dim | M parameters | MFLOPs / image | img/s end to end | img/s model only |"
          + "".join(f" {k} |" for k in p1.get("teacher", {})))
    print("|---|---:|---:|---:|---:|---:|" + "---:|" * len(p1.get("teacher", {})))
    for n, enc in encoders.items():
        cells = "".join(f" {v:.2f} |" for v in p1.get(n, {}).values())
        print(f"| {n} | {enc.dim} | {params[n] / 1e6:.2f} | {flops[n] / 1e6:.1f} | "
              f"{speed[n]['end_to_end']:.0f} | {speed[n]['model']:.0f} |{cells}")
    t, s = speed["teacher"], speed["student"]
    print(f"\nstudent / teacher: parameters {params['student'] / params['teacher']:.2f}x, "
          f"FLOPs {flops['teacher'] / flops['student']:.2f}x fewer, "
          f"throughput {s['end_to_end'] / t['end_to_end']:.2f}x end to end, "
          f"{s['model'] / t['model']:.2f}x model only")
    for key in p1.get("teacher", {}):
        print(f"P@1 {key}: teacher {p1['teacher'][key]:.2f}, student {p1['student'][key]:.2f}"
              f" ({p1['student'][key] - p1['teacher'][key]:+.2f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
