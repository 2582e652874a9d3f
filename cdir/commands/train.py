"""`cdir train moco|synco|isd|isd_plus`: self-supervised pretraining; `cdir train export`:
the encoder-only file.

The same command runs in one process (CPU or one GPU) and under torchrun (DDP):
    torchrun --nproc_per_node 4 -m cdir train synco --config configs/imagenet_r50_200ep.yaml \
        --data /data/imagenet/train
"""

from __future__ import annotations

import argparse

from cdir.commands.common import add_training_run, non_negative_int, positive_int, recipe_sets
from encoders.ssl.plugin import METHODS


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="self-supervised pretraining (MoCo v2, SynCo, ISD); distillation teachers",
        description="Pretrain an image encoder without labels, or export its encoder. Recipes "
        "live in configs/. Evaluate it with `cdir eval knn|linear --encoder ckpt:PATH --data DIR`"
        " or `cdir eval -w WORKSPACE --encoder ckpt:PATH` (cross-domain retrieval).",
    )
    actions = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name in METHODS:
        m = actions.add_parser(
            name, help=f"pretrain with {name}",
            description=f"Pretrain with {name}. Settings come from the recipe (--config), its "
            f"'methods.{name}' section, then --set, then the flags below. Writes latest.pt every "
            "epoch, checkpoint_XXXX.pt every train.save_every epochs, encoder.pt at the end, "
            "TensorBoard scalars in OUT/tb. Ctrl-C or SIGTERM stops the epoch in flight; "
            "latest.pt keeps the last finished one (continue with --resume auto).",
        )
        m.add_argument("--config", help="YAML recipe (optional with --resume: the checkpoint's "
                       "own config is used)")
        m.add_argument("--data", action="append", metavar="SOURCE",
                       help="training images: a folder (searched recursively), a workspace (the "
                       "images of its manifest) or a manifest .parquet/.csv with a path column; "
                       "repeat to train on several (each image once)")
        m.add_argument("--out", help="output folder (default runs/<method>-<recipe>)")
        m.add_argument("--epochs", type=positive_int, help="total epochs (sets optim.epochs)")
        m.add_argument("--batch-size", type=positive_int,
                       help="global batch size (sets optim.batch_size)")
        m.add_argument("--workers", type=non_negative_int, help="data loader workers per process")
        m.add_argument("--seed", type=int, help="random seed (sets train.seed)")
        m.add_argument("--monitor", help="labelled folder for kNN / P@1 monitoring "
                       "(sets monitor.path)")
        add_training_run(m, "optim.lr=0.06")
        m.set_defaults(func=run)

    t = actions.add_parser(
        "teacher", help="train a classifier with cross-entropy (a distillation teacher)",
        description="Train a model of the distillation zoo with cross-entropy on labelled data "
        "(the testbed's teacher recipe, also its vanilla students): OUT/last.pt and OUT/best.pt "
        "are what `cdir distill METHOD --teacher` takes. See `cdir distill --help`.",
    )
    from cdir.commands.distill import add_labelled_flags

    add_labelled_flags(t)
    t.add_argument("--arch", help="zoo model name, e.g. resnet32x4, wrn_40_2, vgg13 "
                   "(default resnet8x4)")
    t.set_defaults(func=run_teacher)

    e = actions.add_parser(
        "export", help="write the small encoder-only file of a checkpoint",
        description="Keep only the retrieval encoder (backbone) of a training checkpoint: what "
        "`ckpt:PATH` loads for embedding and search.",
    )
    e.add_argument("checkpoint")
    e.add_argument("output")
    e.add_argument("--half", action="store_true", help="store float16 weights (half the size)")
    e.set_defaults(func=run_export)


def run(args: argparse.Namespace) -> int:
    import sys

    from cdir.stages.train import summary_line, train_encoder

    sets = recipe_sets(args)
    summary = train_encoder(
        args.method, args.config, sets, data=args.data, out=args.out, epochs=args.epochs,
        batch_size=args.batch_size, workers=args.workers, seed=args.seed, monitor=args.monitor,
        resume=args.resume, stop_at=args.stop_at, force=args.force,
    )
    if summary["rank"] == 0:  # under torchrun every process runs the command; one reports
        print(summary_line(summary), file=sys.stderr)
    return 0


def run_teacher(args: argparse.Namespace) -> int:
    import sys

    from cdir.commands.distill import labelled_values
    from cdir.stages.distill import distill_run, summary_line

    sets = recipe_sets(args)
    summary = distill_run("teacher", args.config, sets, resume=args.resume,
                          stop_at=args.stop_at, force=args.force, seeds=args.seeds,
                          student=args.arch, **labelled_values(args))
    if summary["rank"] == 0:
        print(summary_line(summary), file=sys.stderr)
    return 0


def run_export(args: argparse.Namespace) -> int:
    import sys
    from pathlib import Path

    from encoders.engine.checkpoint import export_encoder

    out = export_encoder(args.checkpoint, args.output, half=args.half)
    size = Path(out).stat().st_size / 2**20
    print(f"wrote {out} ({size:.1f} MiB)", file=sys.stderr)
    return 0


