"""`cdir adapt`: unsupervised cross-domain adaptation of an encoder on a workspace whose images
carry domain names (no labels are used).

    cdir adapt -w runs/oh --encoder ckpt:enc.pt --method xdomain --rounds 5 --out runs/adapt
    torchrun --nproc_per_node 8 -m cdir adapt -w runs/oh --encoder ckpt:enc.pt ...
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
from encoders.adapt.plugin import METHODS as ADAPT_METHODS

EPILOG = """\
methods:
  xdomain  rounds of: embed -> per-domain normalisation -> mine cross-domain pairs (mutual
           nearest neighbours, cycle-consistent through a third domain) -> contrastive training
           with a mined partner's view as the positive and negatives from the positive's own
           domain only. Fits instance galleries (one image per thing per domain) and category
           galleries alike.
  ucdir    the UCDIR baseline (ECCV 2022): in-domain instance and prototype contrast with
           per-domain memory banks and k-means, then cross-domain self-entropy and
           distance-of-distance terms after the warm-up.

encoder.pt is chosen without labels: the encoder whose mined pairs agree best
(--selection, measured at each round and after the last epoch); encoder_last.pt is the last.
When the gallery has labels, the pair precision and P@1 are logged for the report only.

examples:
  cdir adapt -w runs/emoji --encoder ckpt:encoders/weights/emoji_synco.pt \\
      --config configs/adapt_emoji.yaml
  cdir adapt -w runs/oh --encoder ckpt:moco_v2_800ep.pth --method ucdir --epochs 200
  cdir adapt -w runs/emoji --encoder ckpt:enc.pt --resume auto --out runs/adapt
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "adapt", "adapt an encoder across a gallery's domains (no labels)",
                    "Unsupervised cross-domain adaptation: train an encoder of this project (or "
                    "a MoCo/SynCo ResNet) on a workspace's images and their domain names so that "
                    "the same thing in another style lands near. Settings: the encoder's own "
                    "input settings, then the recipe (--config), its 'methods.METHOD' section, "
                    "--set, then the flags. Writes latest.pt every epoch, encoder.pt at the "
                    "end, metrics.jsonl and TensorBoard scalars; Ctrl-C or SIGTERM keeps the "
                    "last finished epoch (continue with --resume auto).", EPILOG)
    add_workspace(p, "workspace with the gallery (from `cdir data`)")
    p.add_argument("--encoder", required=True, help="starting encoder, ckpt:PATH")
    p.add_argument("--method", default="xdomain", choices=ADAPT_METHODS,
                   help="adaptation method (default xdomain)")
    p.add_argument("--config", help="YAML recipe (sections as in `cdir train` recipes)")
    p.add_argument("--out", help="output folder (default WORKSPACE/adapt/METHOD-RECIPE)")
    p.add_argument("--rounds", type=positive_int,
                   help="mining rounds (epochs = rounds x method.round_epochs; with "
                        "--epochs: that many epochs in this many equal rounds)")
    p.add_argument("--epochs", type=positive_int, help="total epochs (sets optim.epochs)")
    p.add_argument("--batch-size", type=positive_int, help="global batch size")
    p.add_argument("--workers", type=non_negative_int, help="data loader workers per process")
    p.add_argument("--seed", type=int, help="random seed (sets train.seed)")
    p.add_argument("--normalize", default="domain-whiten",
                   help="per-domain normalisation before mining (none, domain-center, "
                   "domain-whiten)")
    p.add_argument("--selection", default="mutual_nn_rate",
                   help="label-free criterion that picks encoder.pt: mutual_nn_rate, "
                   "cycle_rate or hubness")
    p.add_argument("--no-monitor", action="store_true",
                   help="do not log label-based figures even when the gallery has labels")
    add_training_run(p, "method.partner_p=0.9")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from cdir.stages.adapt import adapt_encoder
    from cdir.stages.train import summary_line

    sets = recipe_sets(args)
    summary = adapt_encoder(
        args.workspace, args.encoder, args.method, args.config, sets, out=args.out,
        rounds=args.rounds, epochs=args.epochs, batch_size=args.batch_size, workers=args.workers,
        seed=args.seed, normalize=args.normalize, selection=args.selection,
        monitor=not args.no_monitor, resume=args.resume, stop_at=args.stop_at, force=args.force,
    )
    if summary["rank"] == 0:
        print(summary_line(summary), file=sys.stderr)
    return 0
