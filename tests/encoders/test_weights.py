"""The shipped offline encoder: one spec, for the demo, `cdir embed`'s hint and `make run`."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from encoders.weights import default_encoder, shipped

REPO = Path(__file__).resolve().parents[2]


def test_default_encoder_is_the_spec_make_run_uses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    make = re.search(r"^ENCODER \?= (.+)$", (REPO / "Makefile").read_text(), re.M)
    assert make and default_encoder() == make.group(1).strip()  # the same embeddings folder
    assert Path(default_encoder().removeprefix("ckpt:").split("?")[0]).is_file()


def test_shipped_weights_outside_the_repository_by_absolute_path(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    far = Path(shipped("emoji_synco.pt"))
    assert far.is_absolute() and far == REPO / "encoders" / "weights" / "emoji_synco.pt"
    assert far.is_file()
