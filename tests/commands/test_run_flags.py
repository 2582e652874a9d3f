"""Every command that trains takes --resume, --force, --stop-at and --set spelt and checked the
same way (one helper each); a non-positive --stop-at is refused at the flag everywhere."""

from __future__ import annotations

import argparse

import pytest

from cdir.cli import build_parser

RUN_FLAGS = ("resume", "force", "stop_at", "set")


def _commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
              ) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """Every leaf command of ``parser``, by its words."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return {path: parser}
    out = {}
    for name, sub in subs[0].choices.items():
        out.update(_commands(sub, (*path, name)))
    return out


def _flags(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {a.dest: a for a in parser._actions}


def _shape(action: argparse.Action) -> tuple:
    default = tuple(action.default) if isinstance(action.default, list) else action.default
    return (tuple(action.option_strings), type(action).__name__, action.type, action.metavar,
            default, action.help)


def test_training_commands_share_one_set_of_run_flags() -> None:
    commands = _commands(build_parser())
    training = {words: p for words, p in commands.items() if "resume" in _flags(p)}
    names = {words[0] for words in training}
    assert names == {"train", "adapt", "distill"}, names
    assert ("train", "teacher") in training and ("train", "export") not in training
    assert len({words for words in training if words[0] == "distill"}) >= 5
    for flag in RUN_FLAGS:
        shapes = {_shape(_flags(p)[flag]) for p in training.values()}
        if flag == "set":  # one helper; each command shows an example of its own
            shapes = {s[:-1] for s in shapes}
        assert len(shapes) == 1, (flag, shapes)
    # --set is the same flag where a recipe is read without a training run
    reproduce = _flags(commands[("reproduce",)])["set"]
    assert _shape(reproduce)[:-1] == _shape(_flags(training[("adapt",)])["set"])[:-1]


@pytest.mark.parametrize("words", [("train", "moco"), ("train", "teacher"), ("adapt",),
                                   ("distill", "kd")])
def test_stop_at_zero_is_refused_at_the_flag(words: tuple[str, ...], capsys) -> None:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*words, "--stop-at", "0"])
    assert e.value.code == 2
    assert "--stop-at: must be at least 1, got 0" in capsys.readouterr().err
