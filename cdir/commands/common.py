"""Flag blocks shared by several commands: every command spells -w/--workspace, --device,
--no-progress, the flags of a resumable training run and --set the same way, through these
helpers."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from cdir.cli import HelpFormatter


def add_command(sub: argparse._SubParsersAction, name: str, help: str, description: str,
                epilog: str | None = None) -> argparse.ArgumentParser:
    """A sub-command parser. With an ``epilog`` (examples, spec grammars) the description and
    epilog keep their line breaks; without one, the help shows the meaningful defaults."""
    formatter = argparse.RawDescriptionHelpFormatter if epilog else HelpFormatter
    return sub.add_parser(name, help=help, description=description, epilog=epilog,
                          formatter_class=formatter)


def add_workspace(p: argparse.ArgumentParser, help: str | None = "workspace folder",
                  required: bool = True) -> None:
    p.add_argument("-w", "--workspace", required=required, help=help)


def add_device(p: argparse.ArgumentParser, help: str | None = None) -> None:
    """--device of the commands that run a model (embed, caption, search, demo, eval,
    reproduce)."""
    p.add_argument("--device", default=None,
                   help=help or "cpu, cuda or cuda:N (default: cuda when available)")


def add_progress(p: argparse.ArgumentParser) -> None:
    """--no-progress of the commands that draw progress bars; their summary line stays."""
    p.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the summary line is still printed)")


def add_resumable_run(p: argparse.ArgumentParser) -> None:
    """--resume, --force and --stop-at of the commands that train (train, train teacher, adapt,
    distill): a run is interrupted and continued, or replaced, the same way in each."""
    p.add_argument("--resume", metavar="CKPT", help="checkpoint to resume from, or 'auto' "
                   "for OUT/latest.pt when it exists")
    p.add_argument("--force", action="store_true", help="start over in an output folder that "
                   "holds a run: its files are moved into OUT/replaced-<time>/ first (without "
                   "--force or --resume such a folder is refused)")
    p.add_argument("--stop-at", type=positive_int, metavar="EPOCH",
                   help="stop after this many epochs in total (continue with --resume auto); "
                        "for jobs with a time limit")


def add_overrides(p: argparse.ArgumentParser, example: str = "optim.lr=0.06") -> None:
    """--set KEY=VALUE (repeatable) of the commands that read a YAML recipe; ``example``: an
    override worth showing for this command."""
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help=f"override a recipe value, e.g. --set {example} (repeatable; values "
                        "are YAML)")


def add_training_run(p: argparse.ArgumentParser, example: str) -> None:
    """The closing flags of every command that trains (train, train teacher, adapt, distill):
    --resume, --force, --stop-at, --no-progress and --set (``example``: an override worth
    showing); ``recipe_sets`` reads the last two back."""
    add_resumable_run(p)
    add_progress(p)
    add_overrides(p, example)


def recipe_sets(args: argparse.Namespace) -> list[str]:
    """The recipe overrides of a training command: its --set values, then
    ``train.progress=false`` for --no-progress."""
    return [*args.set, *(["train.progress=false"] if args.no_progress else [])]


def _int_at_least(low: int) -> Callable[[str], int]:
    """An argparse ``type`` for whole numbers of at least ``low``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


# argparse ``type``s, refused at the flag, before any work
non_negative_int = _int_at_least(0)
positive_int = _int_at_least(1)


def positive_float(text: str) -> float:
    """An argparse ``type`` for numbers above 0 (finite)."""
    import math

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value
