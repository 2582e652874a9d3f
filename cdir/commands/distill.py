"""`cdir distill METHOD`: knowledge distillation of a small student from a teacher, on the
CIFAR/ImageNet testbed with labels, or label-free on a workspace gallery for retrieval.
(`cdir train teacher` shares the labelled flags: :func:`add_labelled_flags`.)

    cdir distill dcd --teacher ckpt:runs/t/best.pt --student resnet8x4 --data cifar100
    torchrun --nproc_per_node 8 -m cdir distill rrd \
        --config configs/distill/imagenet_resnet34_resnet18.yaml
    cdir distill rrd --label-free -w runs/emoji --teacher ckpt:enc.pt --out runs/small
"""

from __future__ import annotations

import argparse

from cdir.commands.common import (
    add_command,
    add_training_run,
    add_workspace,
    non_negative_int,
    positive_int,
    recipe_sets,
)
from encoders.distill.losses import LOSSES

EPILOG = """\
methods (the student objective is gamma * CE + alpha * KD + beta * METHOD; without --alpha,
--beta, --gamma the method's published weights are used, and --with-kd picks its "+KD" row):
  kd        Hinton's KD on the logits, T = 4 (weights 0.1 CE + 0.9 KD)
  crd       CRD with the paper's two momentum memory banks and NCE (beta 0.8)
  crd_fifo  CRD as InfoNCE against a FIFO queue of teacher embeddings (beta 0.8)
  dcd       DCD: in-batch contrast + consistency, learnable logit scale and bias (beta 1)
  rrd       RRD: relational soft contrast against a FIFO queue of teacher embeddings (beta 1)
Method options (queue size, temperatures, ...) go through --set method.NAME=VALUE.

The testbed recipe is the default (batch 64, SGD lr 0.05 -- 0.01 for MobileNetV2 and the
ShuffleNets --, weight decay 5e-4, 240 epochs, lr x0.1 at 150, 180, 210). After every epoch the
student is tested; OUT/last.pt is the last epoch's student (what the tables report), OUT/best.pt
the best epoch's, chosen on a validation split with --val-split, else on the test set as the
reference code does (reported beside last, never alone). --seeds 0 1 2 runs one folder per seed
and prints mean +- std of both.

label-free (--label-free -w WORKSPACE): no labels and no logits; the teacher is any encoder
spec (ckpt:, clip:, ...) whose embeddings of the workspace images come from its embedding store
(computed first when missing), the student a ResNet backbone with an embedding head
(--student resnet18 --set model.backbone_kwargs.width=0.25 by default), the loss the method
term alone (dcd, rrd or crd_fifo). OUT/student.pt is an ordinary encoder: `cdir embed -w WS
--encoder ckpt:OUT/student.pt`, then index and evaluate as usual. --compatible INDEX (implies
--label-free) trains it into that index's space instead: `cdir search -w WS --index INDEX
--query-encoder ckpt:OUT/student.pt` encodes the queries with the student against the big
encoder's index.

examples:
  cdir train teacher --arch resnet32x4 --data cifar100 --download --out runs/t
  cdir distill dcd --teacher ckpt:runs/t/best.pt --student resnet8x4 --data cifar100 \\
      --alpha 1 --beta 1
  cdir distill rrd --config configs/distill/cifar100_wrn_40_2_wrn_16_2.yaml --seeds 0 1 2
  cdir distill rrd --label-free -w runs/emoji \\
      --teacher "ckpt:encoders/weights/emoji_adapted.pt?grid=4&layers=3,4" --out runs/small
  cdir distill rrd -w runs/emoji --compatible emoji_adapted --out runs/query-encoder
"""


def add_labelled_flags(p: argparse.ArgumentParser) -> None:
    """The flags of a labelled run, shared by `cdir train teacher` and `cdir distill`."""
    p.add_argument("--config", help="YAML recipe (configs/distill/); sections as in `cdir "
                   "train` recipes plus 'distill'")
    p.add_argument("--data", help="labelled data: cifar100, cifar10, digits (scikit-learn's "
                   "handwritten digits, offline), or a folder with train/<class>/ and "
                   "test/<class>/")
    p.add_argument("--root", help="where named datasets live (default data/)")
    p.add_argument("--download", action="store_true",
                   help="download a named dataset that is missing (needs internet)")
    p.add_argument("--val-split", type=float, metavar="FRACTION",
                   help="hold out this fraction of the training set to choose best.pt on")
    p.add_argument("--out", help="output folder (default runs/<method>-<recipe>)")
    p.add_argument("--epochs", type=positive_int, help="total epochs (sets optim.epochs)")
    p.add_argument("--batch-size", type=positive_int, help="global batch size")
    p.add_argument("--lr", type=float, help="learning rate (sets optim.lr)")
    p.add_argument("--workers", type=non_negative_int, help="data loader workers per process")
    seed = p.add_mutually_exclusive_group()
    seed.add_argument("--seed", type=int, help="random seed (sets train.seed)")
    seed.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                      help="one run per seed into OUT/seed_<s>/; prints mean +- std of last "
                      "and best")
    add_training_run(p, "method.queue_size=4096")


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "distill", "distil a small student from a teacher (KD, CRD, DCD, RRD)",
                    "Knowledge distillation on the CIFAR/ImageNet testbed (labels), or "
                    "label-free on a workspace gallery to make a retrieval encoder small and "
                    "fast. Writes latest.pt every epoch, metrics.jsonl, TensorBoard scalars; "
                    "Ctrl-C or SIGTERM keeps the last finished epoch (--resume auto).", EPILOG)
    methods = p.add_subparsers(dest="method", metavar="METHOD", required=True)
    for name in LOSSES:
        m = methods.add_parser(name, help=f"distil with {name}", description=EPILOG,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
        add_labelled_flags(m)
        m.add_argument("--teacher", help="teacher: a checkpoint of `cdir train teacher` or "
                       "of the testbed (ckpt:PATH or PATH); label-free: any encoder spec")
        m.add_argument("--teacher-arch", help="the teacher's zoo name when the file does not "
                       "say (default: the testbed's folder name <arch>_vanilla)")
        m.add_argument("--teacher-sha256", help="refuse a teacher file with another sha256")
        m.add_argument("--student", help="student: a zoo model name (labelled; default "
                       "resnet8x4) or a ResNet backbone (label-free; default resnet18)")
        m.add_argument("--gamma", type=float, help="cross-entropy weight")
        m.add_argument("--alpha", type=float, help="KD weight")
        m.add_argument("--beta", type=float, help="weight of the method's term")
        m.add_argument("--with-kd", action="store_true",
                       help="the method's published '+KD' weights")
        m.add_argument("--label-free", action="store_true",
                       help="distil on a workspace gallery without labels (needs -w)")
        add_workspace(m, "label-free: the workspace with the gallery", required=False)
        m.add_argument("--embed-dim", type=positive_int,
                       help="label-free: the student's embedding size (default 256)")
        m.add_argument("--compatible", metavar="INDEX",
                       help="label-free: train the student into index INDEX's space (its "
                       "encoder is the teacher, its normalisation applied, the student as wide "
                       "as its vectors); `cdir search --query-encoder ckpt:OUT/student.pt` then "
                       "encodes queries with it against that index")
        m.add_argument("--teacher-normalize", choices=("none", "domain-whiten"),
                       help="label-free: distil the teacher's embeddings as stored (none, "
                       "the default) or per-domain whitened")
        m.set_defaults(func=run)


LABELLED_ONLY = ("data", "root", "download", "val_split", "teacher_arch", "teacher_sha256",
                 "gamma", "alpha", "beta", "with_kd", "seeds")


def labelled_values(args: argparse.Namespace) -> dict:
    return {"data": args.data, "root": args.root, "download": args.download,
            "val_split": args.val_split, "out": args.out, "epochs": args.epochs,
            "batch_size": args.batch_size, "lr": args.lr, "workers": args.workers,
            "seed": args.seed}


def run(args: argparse.Namespace) -> int:
    import sys

    from cdir.core.errors import CdirError
    from cdir.stages.distill import distill_label_free_run, distill_run, summary_line

    sets = recipe_sets(args)
    if args.label_free or args.compatible:
        given = [f"--{k.replace('_', '-')}" for k in LABELLED_ONLY
                 if getattr(args, k) not in (None, False)]
        if given:
            raise CdirError(f"{', '.join(given)} do not apply to --label-free runs")
        if not args.workspace or not (args.teacher or args.compatible):
            raise CdirError("--label-free needs -w WORKSPACE and --teacher SPEC (or "
                            "--compatible INDEX)")
        summary = distill_label_free_run(
            args.method, args.workspace, args.teacher, args.config, sets, resume=args.resume,
            stop_at=args.stop_at, force=args.force, progress=not args.no_progress,
            compatible=args.compatible,
            out=args.out, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
            workers=args.workers, seed=args.seed, student=args.student,
            embed_dim=args.embed_dim, teacher_normalize=args.teacher_normalize)
        if summary["rank"] == 0:
            from cdir.stages.train import summary_line as train_line

            print(train_line(summary) + (f"; use it as ckpt:{summary['student']}"
                                         if summary["student"] else ""), file=sys.stderr)
        return 0
    if args.workspace or args.embed_dim or args.teacher_normalize:
        raise CdirError("-w, --embed-dim and --teacher-normalize go with --label-free")
    summary = distill_run(
        args.method, args.config, sets, resume=args.resume, stop_at=args.stop_at,
        force=args.force, seeds=args.seeds, teacher=args.teacher,
        teacher_arch=args.teacher_arch, teacher_sha256=args.teacher_sha256,
        student=args.student, gamma=args.gamma, alpha=args.alpha, beta=args.beta,
        with_kd=args.with_kd, **labelled_values(args))
    if summary["rank"] == 0:
        print(summary_line(summary), file=sys.stderr)
    return 0
