"""`cdir reproduce CONFIG`: run a paper-reproduction recipe (configs/cm_*.yaml) end to end and
write our numbers beside the literature's.

    cdir reproduce configs/cm_officehome.yaml --root /data/OfficeHome --dry-run
    cdir reproduce configs/cm_officehome.yaml --root /data/OfficeHome
    cdir reproduce configs/cm_emoji.yaml --set dataset.limit=50 --set device=cpu
"""

from __future__ import annotations

import argparse

from cdir.commands.common import (
    add_command,
    add_device,
    add_overrides,
    add_progress,
    add_workspace,
)

EPILOG = """\
stages (each skipped when its output is complete; re-run to continue an interrupted run):
  data            the gallery manifest (cdir data)
  caption         caption every image with each captioner (cdir caption)
  embed-captions  caption embeddings per text encoder / CLIP text tower (cdir embed --captions)
  embed-images    image embeddings per image encoder / CLIP image tower (cdir embed)
  eval            UCDIR P@k, mAP@All (and the rest) of every method on every pair (cdir eval)
  report          WORKSPACE/reports/<name>/reproduction.md and .json, beside the literature

Before any stage runs, a preflight checks the dataset folder and that every model is in the local
Hugging Face cache (nothing is downloaded by the check). Anything required that is missing is
listed with how to provide it (e.g. `hf download Salesforce/blip2-opt-2.7b` on a machine with
internet), and the command exits with status 2 having run nothing. Entries marked optional in the
recipe are skipped instead.

--set KEY=VALUE overrides any recipe value (YAML values; list items by index), e.g.
  --set device=cpu  --set batch.caption=8  --set dataset.domains=[clipart,sketch]
  --set captioners.0.spec=hf:/models/blip2-opt-2.7b  --set eval.modes=[cm-image,visual]"""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "reproduce", help="run a reproduction recipe (configs/cm_*.yaml) end to end",
        description="Run a YAML recipe: data -> caption -> embed captions -> embed images -> "
        "eval of every mode -> a report of our numbers beside the literature's.",
        epilog=EPILOG)
    p.add_argument("config", help="the YAML recipe, e.g. configs/cm_officehome.yaml")
    p.add_argument("--root", help="the dataset folder (sets dataset.root)")
    add_workspace(p, "workspace folder (default: the recipe's, else runs/<name>)",
                  required=False)
    add_device(p, "cpu, cuda or cuda:N (sets the recipe's device; default: the recipe's, "
                  "else cuda when available)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the plan and the preflight only; run nothing")
    add_overrides(p, "device=cpu")
    add_progress(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cdir.recipe.config import load_recipe
    from cdir.recipe.runner import Runner

    device = [f"device={args.device}"] if args.device else []  # the same as --set device=...
    recipe = load_recipe(args.config, overrides=[*args.set, *device], root=args.root,
                         workspace=args.workspace)
    Runner(recipe, progress=not args.no_progress).run(dry_run=args.dry_run)
    return 0
