"""The `cdir` command line. Each sub-command lives in `cdir/commands/<name>.py` and exposes
`register(subparsers)` and `run(args)`; heavy libraries are imported inside `run`, so `cdir --help`
stays fast."""

from __future__ import annotations

import argparse
import importlib
import os
import shlex
import sys

from cdir.core.errors import CdirError
from cdir.core.signals import exit_code, graceful

COMMANDS = ("data", "embed", "caption", "index", "search", "eval", "train", "adapt",
            "distill", "reproduce", "demo")

DESCRIPTION = """\
cdir: cross-domain image retrieval. Given an image in one visual style (a sketch, a clipart,
a painting, a photo), find the images of the same thing in other styles.

A workspace (-w DIR) holds each stage's output; every stage resumes and skips finished work:
  cdir data officehome ROOT -w runs/oh        describe a gallery (or: domainnet, folder, csv, emoji)
  cdir embed  -w runs/oh --encoder clip:ViT-B-32/openai     image embeddings
  cdir caption -w runs/oh --captioner hf:Salesforce/blip-image-captioning-base
  cdir index build -w runs/oh --encoder clip:ViT-B-32/openai --type flat
  cdir search -w runs/oh --image query.jpg --domain Clipart -k 10
  cdir eval   -w runs/oh --encoder clip:ViT-B-32/openai   every directed domain pair
  cdir train synco --config configs/emoji_small.yaml      self-supervised pretraining
  cdir adapt  -w runs/oh --encoder ckpt:enc.pt            cross-domain adaptation, no labels
  cdir distill rrd --label-free -w runs/oh --teacher ckpt:enc.pt   a small fast student
  cdir reproduce configs/cm_officehome.yaml --root DIR     a paper's table, stage by stage
  cdir demo   -w runs/oh                                   the Gradio search demo

Model specs: clip:ARCH/PRETRAINED (open_clip), st:ID-OR-PATH (sentence-transformers),
hf:ID-OR-PATH (captioner), ckpt:PATH (a checkpoint of this project or MoCo/SynCo), pixels.
"""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where it says something: not None/False, not already in the help."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS) or "default" in text:
            return text
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cdir", description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cdir {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"cdir.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"cdir.commands.{name}":
                raise
            continue  # a command not part of this build
        module.register(sub)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("cdir")
    except PackageNotFoundError:
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    with graceful():  # SIGTERM (kill, timeout, schedulers) keeps finished work, like Ctrl-C
        return _run(argv)


def _continuation(argv: list[str], args: argparse.Namespace | None) -> str:
    """How to go on after an interruption. A training run's folder refuses a plain re-run (it
    holds a run), so its command is given again with ``--resume auto`` (and no ``--force``,
    which would move the finished epochs aside); other commands skip their finished work."""
    if args is None or not hasattr(args, "resume"):
        return "re-run to continue"
    words, skip = [], False
    for word in argv:
        if skip:
            skip = False
        elif word == "--resume":
            skip = True
        elif word != "--force" and not word.startswith("--resume="):
            words.append(word)
    return f"continue with `{shlex.join(['cdir', *words, '--resume', 'auto'])}`"


def _run(argv: list[str] | None) -> int:
    command = "cdir"
    args = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        command = f"cdir {args.command}"
        return int(args.func(args) or 0)
    except CdirError as e:
        print(f"{command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM as signals.Terminated
        how = _continuation(sys.argv[1:] if argv is None else list(argv), args)
        print(f"{command}: interrupted; finished work is kept, {how}", file=sys.stderr)
        return exit_code(e)
    except BrokenPipeError:  # e.g. `cdir search ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
