"""Glyph galleries (`cdir data glyphs|glyphs-latin`), built from the fonts matplotlib ships."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
from PIL import Image

from cdir.galleries.glyphs import category_name, find_faces, gb2312_level1, latin
from cdir.galleries.splits import category_split
from tests.helpers.cli import cdir


def test_character_sets_and_names():
    chars = gb2312_level1()
    assert len(chars) == 3755 and len(set(chars)) == 3755 and chars[0] == "啊"
    names = [category_name(c) for c in latin()]
    assert len(names) == 62 and len({n.lower() for n in names}) == 62  # none differ by case alone
    assert category_name("A") == "upper_a" and category_name("啊") == "u0554a"


def test_latin_gallery_from_pypi_fonts(tmp_path: Path, capsys):
    no_fonts = tmp_path / "fonts"
    no_fonts.mkdir()  # only matplotlib's DejaVu faces: serif, sans, mono
    ws = tmp_path / "ws"
    assert cdir("data", "glyphs-latin", no_fonts, "-w", ws, "--limit", "12", "--size", "48",
                "--no-progress") == 0
    err = capsys.readouterr().err
    assert "style handwriting left out" in err and "fonts-urw-base35" in err
    m = pd.read_parquet(ws / "manifest.parquet")
    assert set(m["domain"]) == {"serif", "sans", "mono"}
    assert m["class_name"].nunique() == 12 and len(m) == 36
    assert (m["split"] == m["class_name"].map(category_split)).all()
    assert all(Image.open(p).size == (48, 48) for p in m["path"])
    # styles really differ: the same letter is not the same picture in two fonts
    one = m[m["class_name"] == m["class_name"].iloc[0]]
    assert len({Image.open(p).tobytes() for p in one["path"]}) == 3

    # a re-run keeps what is drawn; another size redraws everything
    stamps = {p: Path(p).stat().st_mtime_ns for p in m["path"]}
    assert cdir("data", "glyphs-latin", no_fonts, "-w", ws, "--limit", "12", "--size", "48",
                "--no-progress") == 0
    assert all(Path(p).stat().st_mtime_ns == t for p, t in stamps.items())
    assert cdir("data", "glyphs-latin", no_fonts, "-w", ws, "--limit", "12", "--size", "40",
                "--no-progress") == 0
    m2 = pd.read_parquet(ws / "manifest.parquet")
    assert all(Image.open(p).size == (40, 40) for p in m2["path"])


def test_missing_fonts_is_one_line(tmp_path: Path, capsys):
    faces, notes = find_faces("glyphs", tmp_path)
    assert not faces and len(notes) == 5
    assert cdir("data", "glyphs", tmp_path, "-w", tmp_path / "ws") != 0
    lines = [x for x in capsys.readouterr().err.strip().splitlines() if "error:" in x]
    assert len(lines) == 1 and "fonts-arphic-ukai" in lines[0]
