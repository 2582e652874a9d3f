"""Unlabelled drawing corpora (`cdir data openclipart|tuxpaint`): dedup, filters, the size cap,
bad files skipped and listed, resume."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
from PIL import Image

from cdir.galleries.corpus import build_corpus, sources
from tests.helpers.cli import cdir
from tests.helpers.trees import draw_shape, make_bomb_png

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="40">'
       '<circle cx="20" cy="20" r="15" fill="#c33"/></svg>')


def _stamps(root: Path) -> Path:
    """A tuxpaint-like tree: drawings with descriptions, a copy, a variant, bad files."""
    (root / "animals").mkdir(parents=True)
    (root / "food").mkdir()
    for i, shape in enumerate(("circle", "square", "triangle")):
        draw_shape(shape, "a", i, size=96).save(root / "animals" / f"{shape}.png")
        (root / "animals" / f"{shape}.txt").write_text(f"A {shape}.\nfr.utf8=Un {shape}\n")
    (root / "food" / "copy_of_circle.png").write_bytes((root / "animals/circle.png").read_bytes())
    draw_shape("square", "a", 1, size=96).transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(
        root / "animals" / "square_mirror.png")  # a pre-made variant: left out
    (root / "food" / "apple.svg").write_text(SVG)
    (root / "food" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    Image.new("RGBA", (50, 50), (255, 255, 255, 0)).save(root / "food" / "blank.png")
    make_bomb_png(root / "food" / "huge.png", 4000, 4000)
    return root


def test_sources_filters_variants_and_prefers_png(tmp_path: Path):
    root = _stamps(tmp_path / "stamps")
    (root / "animals" / "circle.svg").write_text(SVG)  # a PNG of that name exists: left out
    rels = [s.rel for s in sources("tuxpaint", root)]
    assert "animals/square_mirror.png" not in rels and "animals/circle.svg" not in rels
    assert "food/apple.svg" in rels and rels == sorted(rels)
    desc = {s.rel: s.description for s in sources("tuxpaint", root)}
    assert desc["animals/circle.png"] == "A circle."


def test_build_dedups_caps_and_lists_bad_files(tmp_path: Path):
    root = _stamps(tmp_path / "stamps")
    out = tmp_path / "out"
    s = build_corpus("tuxpaint", root, out, size=48, max_pixels=1_000_000, progress=False)
    assert (s["found"], s["kept"], s["duplicates"], s["skipped"]) == (8, 4, 1, 3)
    skipped = {r["path"]: r["reason"] for r in json.loads((out / "skipped.json").read_text())}
    assert skipped["food/huge.png"].startswith("too large")
    assert skipped["food/broken.png"].startswith("unreadable")
    assert skipped["food/blank.png"].startswith("blank")
    files = sorted((out / "tuxpaint" / "unlabelled").glob("*.png"))
    assert len(files) == 4 and all(Image.open(f).size == (48, 48) for f in files)

    # resume: a lost rendering is made again, the others are not touched
    stamp = {f.name: f.stat().st_mtime_ns for f in files}
    files[0].unlink()
    (out / "corpus.json").unlink()
    again = build_corpus("tuxpaint", root, out, size=48, max_pixels=1_000_000, progress=False)
    assert again["kept"] == 4
    for f in files[1:]:
        assert f.stat().st_mtime_ns == stamp[f.name]
    assert files[0].exists()
    # another size: renderings of the old size are not served
    build_corpus("tuxpaint", root, out, size=32, max_pixels=1_000_000, progress=False)
    sizes = {Image.open(f).size for f in (out / "tuxpaint" / "unlabelled").glob("*.png")}
    assert sizes == {(32, 32)}


def test_cdir_data_tuxpaint_writes_an_unlabelled_manifest(tmp_path: Path, capsys):
    root = _stamps(tmp_path / "stamps")
    ws = tmp_path / "ws"
    assert cdir("data", "tuxpaint", root, "-w", ws, "--size", "40", "--no-progress") == 0
    m = pd.read_parquet(ws / "manifest.parquet")
    assert len(m) == 4 and set(m["domain"]) == {"tuxpaint"} and set(m["class_name"]) == {
        "unlabelled"}
    assert "A circle." in set(m["description"])
    assert all(os.path.exists(p) for p in m["path"])


def test_missing_package_is_one_line(tmp_path: Path, capsys):
    assert cdir("data", "openclipart", tmp_path / "nowhere", "-w", tmp_path / "ws") != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install openclipart-png" in err[0]
