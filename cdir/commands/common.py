"""Flag blocks shared by several commands: every command spells -w/--workspace, --device and
--no-progress the same way, through these helpers."""

from __future__ import annotations

import argparse

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


def positive_int(text: str) -> int:
    """An argparse ``type``: an integer >= 1 (refused at the flag, before any work)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
