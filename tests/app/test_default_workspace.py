"""The demo's default workspace is built by calling the stages (no command line): the emoji
gallery, its embeddings and the one index `make run` builds; a second call finds it all done,
and a workspace that has an index keeps exactly its indexes (`cdir search` keeps working)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers.cli import cdir

pytest.importorskip("faiss")


def test_default_workspace_is_built_by_the_stages_then_reused(tmp_path: Path, capsys) -> None:
    from app.default_workspace import DEFAULT_NORMALIZE, ensure_default_workspace
    from cdir.stages.index import list_indexes

    root = ensure_default_workspace(tmp_path / "emoji", encoder="pixels", limit=12)
    assert root == tmp_path / "emoji" and (root / "manifest.parquet").exists()
    first = capsys.readouterr().out
    indexes = list_indexes(root)
    assert [(r["kind"], r["normalize"], r["encoder_spec"], r["current"]) for r in indexes] == [
        ("flat", DEFAULT_NORMALIZE, "pixels", True)]
    assert first.count("built flat index") == 1

    ensure_default_workspace(tmp_path / "emoji", encoder="pixels", limit=12)
    again = capsys.readouterr().out
    assert "built flat index" not in again and "serving the index(es) already in" in again
    assert [r["name"] for r in list_indexes(root)] == [r["name"] for r in indexes]
    image = sorted((root / "gallery" / "openmoji").rglob("*.png"))[0]
    assert cdir("search", "-w", root, "--image", image) == 0  # one index: no --index needed


def test_the_demo_adds_no_index_to_a_workspace_that_has_one(tmp_path: Path, capsys) -> None:
    """`make run NORMALIZE=none`, then `cdir demo`: the README's `cdir search -w runs/emoji
    --image ...` still finds one index to search."""
    from app.default_workspace import ensure_default_workspace
    from cdir.stages.index import list_indexes

    root = tmp_path / "emoji"
    assert cdir("data", "emoji", "-w", root, "--limit", 6) == 0
    assert cdir("embed", "-w", root, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", root, "--encoder", "pixels", "--type", "flat") == 0
    before = [r["name"] for r in list_indexes(root)]
    ensure_default_workspace(root, encoder="pixels", limit=6)
    assert [r["name"] for r in list_indexes(root)] == before
    capsys.readouterr()
    image = sorted((root / "gallery" / "twemoji").rglob("*.png"))[0]
    assert cdir("search", "-w", root, "--image", image) == 0, capsys.readouterr().err
