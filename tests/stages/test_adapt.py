"""`cdir adapt`'s schedule flags (--rounds with --epochs: the epochs given are the epochs run)
and the command it prints to continue an interrupted run (one that works as printed)."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import cdir
from tests.helpers.tiny_models import write_tiny_encoder
from tests.helpers.trees import write_shape_tree

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(workspace over 3 domains x 5 shapes x 2 images, tiny encoder file, a recipe of 3 epochs
    in rounds of 2)."""
    import yaml

    parent = tmp_path_factory.mktemp("adapt")
    root = write_shape_tree(parent / "gallery", domains=("a", "b", "c"),
                            classes=("circle", "square", "triangle", "cross", "ring"),
                            per_class=2, size=32, ext=".png")
    ws = parent / "ws"
    assert cdir("data", "folder", root, "-w", ws) == 0
    recipe = parent / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "data": {"workers": 0}, "optim": {"epochs": 3, "batch_size": 10, "lr": 0.05},
        "train": {"save_every": 0, "progress": False, "threads": 1, "amp": "none"},
        "methods": {"xdomain": {"dim": 16, "round_epochs": 2, "cycle": None}}}))
    return ws, write_tiny_encoder(parent / "enc.pt"), recipe


def _epochs(out: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_rounds_with_epochs_run_the_epochs_given(tiny, tmp_path: Path, capsys) -> None:
    from encoders.engine.checkpoint import load_checkpoint

    ws, enc, recipe = tiny
    base = ["adapt", "-w", ws, "--encoder", f"ckpt:{enc}", "--config", recipe, "--no-monitor",
            "--no-progress"]
    out = tmp_path / "one"
    assert cdir(*base, "--out", out, "--rounds", "1", "--epochs", "1") == 0
    ckpt = load_checkpoint(out / "latest.pt")
    assert ckpt["epoch"] == 1 and ckpt["config"]["optim"]["epochs"] == 1
    assert ckpt["config"]["method_kwargs"]["round_epochs"] == 1
    assert "(now 1/1)" in capsys.readouterr().err

    # epochs that do not split into the rounds: one line, nothing run
    assert cdir(*base, "--out", tmp_path / "uneven", "--rounds", "2", "--epochs", "3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--epochs 3 do not split into 2 rounds" in err[0], err
    assert not (tmp_path / "uneven" / "latest.pt").exists()


def test_an_interrupted_run_prints_a_continuation_that_works(tiny, tmp_path: Path, capsys,
                                                             monkeypatch) -> None:
    from encoders.adapt.trainer import _AdaptRun
    from encoders.engine.checkpoint import load_checkpoint

    ws, enc, recipe = tiny
    out = tmp_path / "run"
    end_epoch = _AdaptRun.end_epoch

    def interrupted_after_one(self, done: int, *rest) -> None:
        end_epoch(self, done, *rest)
        if done == 1:
            raise KeyboardInterrupt  # Ctrl-C after the first epoch is saved

    monkeypatch.setattr(_AdaptRun, "end_epoch", interrupted_after_one)
    assert cdir("adapt", "-w", ws, "--encoder", f"ckpt:{enc}", "--config", recipe, "--out", out,
                "--no-monitor", "--no-progress") == 130
    monkeypatch.setattr(_AdaptRun, "end_epoch", end_epoch)
    err = capsys.readouterr().err
    (line,) = [ln for ln in err.splitlines() if ln.startswith("cdir adapt: interrupted")]
    command = shlex.split(re.search(r"continue with `([^`]+)`", line).group(1))
    assert command[0] == "cdir" and command[-2:] == ["--resume", "auto"]
    # a plain re-run is refused: the folder holds a run
    assert cdir(*command[1:-2]) == 2
    assert "--resume auto" in capsys.readouterr().err
    assert cdir(*command[1:]) == 0  # as printed
    assert load_checkpoint(out / "latest.pt")["epoch"] == 3 and _epochs(out) == [1, 2, 3]


def test_resuming_a_finished_run_says_it_is_finished(tiny, tmp_path: Path, capsys) -> None:
    ws, enc, recipe = tiny
    out = tmp_path / "done"
    run = ["adapt", "-w", ws, "--encoder", f"ckpt:{enc}", "--config", recipe, "--out", out,
           "--no-monitor", "--no-progress", "--epochs", "1"]
    assert cdir(*run) == 0
    encoder = (out / "encoder.pt").read_bytes()
    capsys.readouterr()
    assert cdir(*run, "--resume", "auto") == 0
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "for 0 epoch" not in line, line
    assert line.startswith(f"xdomain: already finished, 1/1 epoch(s) in {out / 'latest.pt'}")
    assert (out / "encoder.pt").read_bytes() == encoder  # nothing re-trained
