"""`cdir index info` and the stale-index hint of an index built under its own --name."""

from __future__ import annotations

import shlex
import shutil
from pathlib import Path

from tests.helpers.cli import cdir, pixels_workspace
from tests.helpers.trees import write_shape_tree


def _grow(ws: Path) -> None:
    """A third shape added to the gallery of ``ws`` and described again (not embedded yet)."""
    root = ws.parent / "gallery"
    extra = write_shape_tree(ws.parent / "extra", domains=("a", "b"), classes=("triangle",),
                             per_class=2)
    for dom in ("a", "b"):
        shutil.copytree(extra / dom / "triangle", root / dom / "triangle")
    assert cdir("data", "folder", root, "-w", ws) == 0


def test_a_custom_named_stale_index_is_marked_and_its_hint_names_it(tmp_path, capsys):
    root, ws = pixels_workspace(tmp_path)
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--name", "mine") == 0
    for f in (ws / "indexes").iterdir():  # keep only the custom-named index
        if not f.name.startswith("mine."):
            f.unlink()
    _grow(ws)
    capsys.readouterr()
    assert cdir("index", "info", "-w", ws) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("mine:") and "[stale" in line
    hint = line[line.index("`") + 1:line.rindex("`")]
    assert shlex.split(hint.split(" && ")[-1])[-2:] == ["--name", "mine"]

    query = sorted((root / "a" / "circle").iterdir())[0]
    assert cdir("search", "-w", ws, "--image", query, "--index", "mine") == 2
    err = capsys.readouterr().err
    assert "stale" in err and "--name mine" in err
    for c in hint.split(" && "):  # pasted as printed, it updates the index of that name
        assert cdir(*shlex.split(c)[1:]) == 0, c
    capsys.readouterr()
    assert cdir("index", "info", "-w", ws) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert line.startswith("mine:") and "stale" not in line
