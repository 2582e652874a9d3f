"""Does data loading starve the model? `cdir embed`'s pipeline (files decoded and transformed by
DataLoader workers, the model, the store) against the model alone on tensors prepared
beforehand, on the same images, in the same run.

    python bench/bench_embed.py [-w runs/emoji] [--encoder SPEC] [--images 1024] [--repeats 3]

The pipeline runs into a fresh temporary workspace over the gallery's files each time (nothing
already done); the model-only pass runs the same batches of prepared tensors. The ratio of their
images/s is what to read (target: the pipeline at >= 80 % of the model alone).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))



def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-w", "--workspace", default="runs/emoji")
    ap.add_argument("--encoder", default=None, help="default: the default offline encoder")
    ap.add_argument("--images", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--workers", type=int, default=None, help="DataLoader workers (default: "
                    "what `cdir embed` uses)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    import torch

    from cdir.core.images import load_image
    from cdir.core.manifest import save_manifest
    from cdir.core.workspace import Workspace
    from cdir.stages.embed import default_workers, embed_images
    from encoders.image import load_image_encoder
    from encoders.weights import default_encoder

    args.encoder = args.encoder or default_encoder()
    src = Workspace(args.workspace).require()
    rows = src.manifest().iloc[:args.images]
    enc = load_image_encoder(args.encoder)
    workers = default_workers() if args.workers is None else args.workers
    paths = list(rows["path"])
    tensors = [torch.stack([enc.transform(load_image(p)) for p in paths[i:i + args.batch_size]])
               for i in range(0, len(paths), args.batch_size)]
    print(f"{len(rows)} images of {src.root}, {args.encoder}, batch {args.batch_size}, "
          f"{workers} loader workers, {torch.get_num_threads()} torch threads")

    def pipeline() -> float:
        with tempfile.TemporaryDirectory() as tmp:
            ws = Workspace(Path(tmp) / "ws")
            ws.root.mkdir()
            save_manifest(rows.reset_index(drop=True), ws.manifest_path)
            out = embed_images(ws, args.encoder, batch_size=args.batch_size,
                               num_workers=workers, encoder=enc, progress=False)
            return out["images_per_s"]

    def model_only() -> float:
        t0 = time.perf_counter()
        for x in tensors:
            enc.encode(x)
        return len(rows) / (time.perf_counter() - t0)

    model_only()  # warm-up
    runs = {"pipeline": [], "model only": []}
    for _ in range(args.repeats):  # in turns, so both see the same machine state
        runs["pipeline"].append(pipeline())
        runs["model only"].append(model_only())
    med = {k: statistics.median(v) for k, v in runs.items()}
    print(f"\n| pass | images/s (median of {args.repeats}) |")
    print("|---|---:|")
    for k, v in med.items():
        print(f"| {k} | {v:.0f} |")
    ratio = med["pipeline"] / med["model only"]
    # each pipeline run against the model-only run right after it: both see the same machine
    # state, so this is the steadier figure where the machine's speed drifts between runs
    paired = statistics.median(p / m for p, m in zip(runs["pipeline"], runs["model only"],
                                                     strict=True))
    print(f"\npipeline / model only: {ratio:.2f} (target >= 0.80); median paired ratio "
          f"{paired:.2f}")
    return 0 if ratio >= 0.8 else 1


if __name__ == "__main__":
    sys.exit(main())
