"""Counts and sizes are parsed by the shared argparse types of `cdir.commands.common` on every
command: `--size 0` or `--examples -3` is refused at the flag, never turned into a default."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from cdir.cli import build_parser
from cdir.commands.common import non_negative_int, positive_int
from cdir.core.errors import CdirError
from tests.helpers.cli import command_parsers

# whole numbers any value of which means something
ANY_INT = {"seed", "seeds"}


def test_every_count_and_size_flag_uses_a_shared_type() -> None:
    plain = [(" ".join(words), a.option_strings[0])
             for words, p in command_parsers().items() for a in p._actions
             if a.type is int and a.dest not in ANY_INT]
    assert not plain, plain
    counts = {a.option_strings[0]: a.type for words, p in command_parsers().items()
              for a in p._actions
              if words[:1] in (("data",), ("eval",), ("search",)) and a.option_strings}
    assert counts["--size"] is positive_int and counts["-k"] is positive_int
    assert counts["--examples"] is non_negative_int


@pytest.mark.parametrize("argv, message", [
    (["data", "emoji", "-w", "ws", "--size", "0"], "--size: must be at least 1, got 0"),
    (["data", "emoji", "-w", "ws", "--size", "-5"], "--size: must be at least 1, got -5"),
    (["data", "emoji", "-w", "ws", "--limit", "0"], "--limit: must be at least 1, got 0"),
    (["eval", "-w", "ws", "--examples", "-3"], "--examples: must be at least 0, got -3"),
    (["search", "-w", "ws", "--image", "q.png", "-k", "0"], "-k: must be at least 1, got 0"),
    (["embed", "-w", "ws", "--batch-size", "0"], "--batch-size: must be at least 1, got 0"),
    (["caption", "-w", "ws", "--num-beams", "0"], "--num-beams: must be at least 1, got 0"),
    (["train", "moco", "--epochs", "0"], "--epochs: must be at least 1, got 0"),
    (["data", "emoji", "-w", "ws", "--size", "big"], "--size: 'big' is not an integer"),
])
def test_a_bad_count_is_refused_at_the_flag(argv: list[str], message: str, capsys) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith(f"error: argument {message}"), err


def test_the_stages_refuse_them_too(tmp_path: Path) -> None:
    """Called from Python (the app, recipes), the stage checks what the flag would have."""
    from cdir.stages.evaluate import evaluate
    from cdir.stages.gallery import describe_gallery

    for size in (0, -1):
        with pytest.raises(CdirError, match=f"positive number of pixels, got {size}"):
            describe_gallery(tmp_path / "ws", "emoji", size=size)
    assert not (tmp_path / "ws").exists()  # refused before anything was written
    with pytest.raises(CdirError, match="examples must be .* at least 0, got -3"):
        evaluate(tmp_path / "ws", encoder="pixels", examples=-3)


def test_the_shared_types() -> None:
    assert positive_int("3") == 3 and non_negative_int("0") == 0
    for parse, text in ((positive_int, "0"), (non_negative_int, "-1"), (positive_int, "2.5")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)
