"""End to end through the `cdir` command line: data → embed → index → search → eval, on a small
emoji gallery and on an Office-Home-shaped tree with a tiny open_clip model, plus bad input."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers.cli import cdir, emoji_workspace, pixels_workspace
from tests.helpers.tiny_models import write_tiny_clip_config
from tests.helpers.trees import write_shape_tree

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def emoji_ws(tmp_path_factory) -> Path:
    return emoji_workspace(tmp_path_factory.mktemp("emoji"), 30)


def test_emoji_pipeline(emoji_ws, capsys):
    ws = emoji_ws
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    capsys.readouterr()
    assert cdir("eval", "-w", ws, "--encoder", "pixels", "--run", "px", "--examples", "2") == 0
    out = capsys.readouterr().out
    # every directed pair of the three art sets, plus the mean row
    for pair in ("noto_mono→openmoji", "openmoji→twemoji", "twemoji→noto_mono"):
        assert f"| {pair} | 30 | 30 |" in out
    report = ws / "reports" / "px"
    for name in ("results.md", "results.csv", "results.json", "heatmap.png", "gallery.png",
                 "gallery.html"):
        assert (report / name).stat().st_size > 0, name
    results = json.loads((report / "results.json").read_text())["results"]
    mean = results[-1]
    assert mean["pair"] == "mean"
    # far above chance (1/30 = 3.3%) for raw pixels on 30 categories, and not perfect
    assert 10 < mean["P@1"] < 90

    # search: a gallery image finds itself first; the domain filter holds
    query = sorted((ws / "gallery" / "twemoji").rglob("*.png"))[3]
    assert cdir("search", "-w", ws, "--image", query, "-k", "3", "--json") == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    assert hits[0]["path"] == str(query) and hits[0]["score"] == pytest.approx(1.0, abs=1e-5)
    assert cdir("search", "-w", ws, "--image", query, "-k", "5", "--domain", "openmoji",
                "--json") == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    assert len(hits) == 5 and {h["domain"] for h in hits} == {"openmoji"}


def test_officehome_tree_with_tiny_clip(tmp_path, capsys):
    root = write_shape_tree(tmp_path / "OfficeHome", per_class=3, n_corrupt=4,
                            folder_names={"Real World": "Real_World"})
    ws = tmp_path / "ws"
    spec = f"clip:{write_tiny_clip_config(tmp_path)}/random"
    assert cdir("data", "officehome", root, "-w", ws) == 0
    assert cdir("embed", "-w", ws, "--encoder", spec, "--workers", "0", "--batch-size", "8") == 0
    captured = capsys.readouterr()
    assert "4 failed" in captured.out + captured.err  # corrupt files skipped and listed
    failed = json.loads(next((ws / "embeddings").glob("*/failed.json")).read_text())
    assert len(failed) == 4 and all(r["reason"] for r in failed)

    # a re-run embeds nothing new and still lists the unreadable files
    assert cdir("embed", "-w", ws, "--encoder", spec, "--workers", "0") == 0
    assert "0 new" in capsys.readouterr().out

    assert cdir("index", "build", "-w", ws, "--encoder", spec, "--type", "hnsw") == 0
    assert "built hnsw index" in capsys.readouterr().out
    query = next((root / "Art").rglob("00001.jpg"))
    assert cdir("search", "-w", ws, "--image", query, "--domain", "Clipart", "-k", "4",
                "--json") == 0
    hits = json.loads(capsys.readouterr().out)[0]["results"]
    assert len(hits) == 4 and {h["domain"] for h in hits} == {"Clipart"}

    assert cdir("eval", "-w", ws, "--encoder", spec, "--run", "tiny") == 0
    out = capsys.readouterr().out
    assert "| Art→Real World |" in out and "| Real World→Product |" in out
    rows = json.loads((ws / "reports" / "tiny" / "results.json").read_text())["results"]
    assert len(rows) == 12 + 1  # 12 directed Office-Home pairs and the mean
    assert {r["n_queries"] for r in rows[:-1] if r["query_domain"] == "Art"} == {12}


def test_bad_input_one_line_and_nonzero_exit(tmp_path, emoji_ws, capsys):
    def fails(*args: str, match: str) -> None:
        assert cdir(*args) == 2
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if ": error: " in line]
        assert len(errors) == 1 and "Traceback" not in err, err
        assert match in errors[0], err

    fails("data", "folder", tmp_path / "missing", "-w", tmp_path / "ws", match="missing")
    (tmp_path / "empty" / "a" / "b").mkdir(parents=True)
    fails("data", "folder", tmp_path / "empty", "-w", tmp_path / "ws2", match="no images")
    fails("embed", "-w", emoji_ws, "--encoder", "nonsense:thing", match="nonsense")
    fails("eval", "-w", tmp_path / "nowhere", "--encoder", "pixels", match="not a cdir workspace")
    fails("eval", "-w", emoji_ws, "--encoder", "pixels", "--ks", "1,x", match="--ks")
    fails("search", "-w", emoji_ws, "--image", tmp_path / "nope.jpg", match="nope.jpg")


def test_index_refused_when_gallery_changed(tmp_path, capsys):
    root, ws = pixels_workspace(tmp_path)
    # the gallery grows: the old index no longer describes it
    write_shape_tree(root, domains=("a", "b"), classes=("circle", "square", "triangle"),
                     per_class=2)
    assert cdir("data", "folder", root, "-w", ws) == 0
    query = next(root.rglob("*.jpg"))
    capsys.readouterr()
    assert cdir("search", "-w", ws, "--image", query) == 2
    assert "cdir index build" in capsys.readouterr().err
    # embedding the new images and rebuilding extends the index in place
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    assert "added 4 vectors" in capsys.readouterr().out
    assert cdir("search", "-w", ws, "--image", query, "-k", "1") == 0
