"""The demo's default workspace is built by calling the stages (no command line): the emoji
gallery, its embeddings and a plain and a whitened index; a second call finds it all done."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("faiss")


def test_default_workspace_is_built_by_the_stages_then_reused(tmp_path: Path, capsys) -> None:
    from app.default_workspace import NORMALIZATIONS, ensure_default_workspace
    from cdir.stages.index import list_indexes

    root = ensure_default_workspace(tmp_path / "emoji", encoder="pixels", limit=12)
    assert root == tmp_path / "emoji" and (root / "manifest.parquet").exists()
    first = capsys.readouterr().out
    indexes = {r["name"]: r for r in list_indexes(root)}
    assert sorted(r.get("normalize", "none") for r in indexes.values()) == sorted(NORMALIZATIONS)
    assert all(r["kind"] == "flat" and r["encoder_spec"] == "pixels" and r["current"]
               for r in indexes.values())
    assert first.count("built flat index") == len(NORMALIZATIONS)

    ensure_default_workspace(tmp_path / "emoji", encoder="pixels", limit=12)
    again = capsys.readouterr().out
    assert "built flat index" not in again and again.count("is up to date") == len(NORMALIZATIONS)
