"""The recipe overrides a training command hands its stage: its --set values in order, then
``train.progress=false`` for --no-progress (one helper for every command that trains)."""

from __future__ import annotations

import pytest

from cdir.cli import build_parser
from cdir.commands.common import recipe_sets

TRAINING = [("train", "moco"), ("train", "teacher"), ("adapt", "-w", "ws", "--encoder", "ckpt:e"),
            ("distill", "rrd")]


@pytest.mark.parametrize("words", TRAINING)
def test_no_progress_follows_the_sets(words: tuple[str, ...]) -> None:
    args = build_parser().parse_args([*words, "--set", "optim.lr=0.1", "--no-progress",
                                      "--set", "train.seed=3"])
    assert recipe_sets(args) == ["optim.lr=0.1", "train.seed=3", "train.progress=false"]


@pytest.mark.parametrize("words", TRAINING)
def test_without_flags_there_is_nothing_to_override(words: tuple[str, ...]) -> None:
    assert recipe_sets(build_parser().parse_args(list(words))) == []
