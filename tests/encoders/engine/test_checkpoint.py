"""A file that is not a checkpoint (random bytes, text, a truncated one) is one line saying so,
wherever cdir reads one: never torch's weights_only advice, never a bare KeyError's text."""

from __future__ import annotations

import fractions
import os
from pathlib import Path

import pytest
import torch

from cdir.core.errors import CdirError
from tests.helpers.cli import cdir

NOT_A_CHECKPOINT = "is not a checkpoint (not a file written by torch.save, or a damaged one)"


def _junk(folder: Path) -> dict[str, Path]:
    """Files no checkpoint loader should read: random bytes, a text file, an empty file and
    the start of a real checkpoint."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {"random": os.urandom(4096), "text": b"hello, this is not a checkpoint\n",
             "empty": b""}
    torch.save({"w": torch.ones(64, 64)}, folder / "real.pt")
    files["truncated"] = (folder / "real.pt").read_bytes()[:3000]
    for name, data in files.items():
        (folder / f"{name}.pt").write_bytes(data)
    return {name: folder / f"{name}.pt" for name in files}


def _one_line(message: str, path: Path) -> None:
    assert message.endswith(f"{path} {NOT_A_CHECKPOINT}"), message
    assert "\n" not in message and "weights_only" not in message


def test_read_file_says_a_junk_file_is_not_a_checkpoint(tmp_path: Path) -> None:
    from encoders.engine.checkpoint import load_checkpoint, read_file

    for path in _junk(tmp_path).values():
        for load in (read_file, load_checkpoint):
            with pytest.raises(CdirError) as e:
                load(path)
            _one_line(str(e.value), path)


def test_a_class_weights_only_loading_refuses_is_named(tmp_path: Path) -> None:
    from encoders.engine.checkpoint import read_file

    path = tmp_path / "pickled.pt"
    torch.save({"ratio": fractions.Fraction(1, 2)}, path)
    with pytest.raises(CdirError) as e:
        read_file(path)
    assert str(e.value) == (f"cannot read checkpoint {path}: it holds fractions.Fraction, which "
                            "weights-only loading refuses (not a file cdir reads)")


def test_an_encoder_spec_on_a_junk_file_is_one_line(tmp_path: Path) -> None:
    from encoders.image import load_image_encoder

    for path in _junk(tmp_path).values():
        with pytest.raises(CdirError) as e:
            load_image_encoder(f"ckpt:{path}", "cpu")
        _one_line(str(e.value), path)
        assert str(e.value).startswith(f"ckpt:{path}: ")


def test_train_export_of_a_junk_file_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    for path in _junk(tmp_path).values():
        capsys.readouterr()
        assert cdir("train", "export", path, tmp_path / "out.pt") == 2
        out, err = capsys.readouterr()
        assert out == "" and err == f"cdir train: error: {path} {NOT_A_CHECKPOINT}\n"
        assert not (tmp_path / "out.pt").exists()
