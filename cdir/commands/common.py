"""Flag blocks shared by several commands."""

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


def add_workspace(p: argparse.ArgumentParser, help: str | None = None,
                  required: bool = True) -> None:
    p.add_argument("-w", "--workspace", required=required, help=help)


def add_device(p: argparse.ArgumentParser) -> None:
    """--device of the commands that load a model for queries (search, demo, eval)."""
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
