"""The help of every command tells the truth: each config file it cites exists in the
repository, and no flag shows a default it does not have."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cdir.cli import build_parser
from tests.helpers.cli import command_parsers

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def helps() -> dict[str, str]:
    """The --help text of every command, as `cdir WORDS --help` prints it on a wide terminal
    (so that no path is wrapped)."""
    mp = pytest.MonkeyPatch()
    mp.setenv("COLUMNS", "400")
    try:
        return {" ".join(("cdir", *words)): p.format_help()
                for words, p in command_parsers().items()}
    finally:
        mp.undo()


def test_every_config_path_cited_in_help_exists(helps: dict[str, str]) -> None:
    cited = {(command, m.rstrip(".,;:)")) for command, text in helps.items()
             for m in re.findall(r"configs/[\w./{}*-]*", text)}
    assert any(path.endswith(".yaml") for _, path in cited)  # the scan finds files
    missing = [(command, path) for command, path in sorted(cited)
               if not ((REPO / path).exists() or "*" in path and any(REPO.glob(path)))]
    assert not missing, missing


def test_no_flag_shows_a_default_of_true_or_false(helps: dict[str, str]) -> None:
    wrong = [(command, line.strip()) for command, text in helps.items()
             for line in text.splitlines() if re.search(r"default: (True|False)\b", line)]
    assert not wrong, wrong


def test_index_build_cpu_and_gpu_flags() -> None:
    parse = build_parser().parse_args
    base = ["index", "build", "-w", "ws", "--encoder", "pixels"]
    assert parse(base).gpu is None  # a GPU when there is one
    assert parse([*base, "--cpu"]).gpu is False and parse([*base, "--gpu"]).gpu is True
