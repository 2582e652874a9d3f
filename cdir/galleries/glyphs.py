"""Glyph galleries: the same characters drawn by font families of clearly different styles.

Category = one character, domain = one style; an instance gallery like the emoji one (one image
per category and domain), framed the same way (`cdir.galleries.framing`), so size and position do
not give the style away. Two sets, one gallery kind each:

- ``glyphs``: the 3,755 Chinese characters of GB 2312 level 1 (the most frequent) in five styles:
  brush (AR PL UKai), Ming serif (AR PL UMing), Hei sans (WenQuanYi Zen Hei), Noto Sans CJK and
  Noto Serif CJK — ``apt-get install fonts-arphic-ukai fonts-arphic-uming fonts-wqy-zenhei
  fonts-noto-cjk``.
- ``glyphs-latin``: letters and digits (62) in serif, sans and monospace (DejaVu: Debian's
  ``fonts-dejavu-core``, or the copies matplotlib ships), handwriting (URW Chancery,
  ``fonts-urw-base35``) and blackletter (UnifrakturMaguntia, ``fonts-unifraktur``).

Fonts are looked up by file name below the fonts folder (default ``/usr/share/fonts``; the DejaVu
faces also in matplotlib's folder). A style without its font is left out with a note; a
character is kept only where every style has it and draws it with visible ink. Layout::

    out_dir/<style>/<category>/<style>_<category>.png
    out_dir/params.json   (written first: a re-run with the same parameters keeps what is drawn)
    out_dir/gallery.json  (written last: the "complete" marker)
"""

from __future__ import annotations

import io
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path, read_json, write_json

if TYPE_CHECKING:  # PIL is imported inside the functions that need it
    from PIL import ImageFont

FORMAT_VERSION = 1
MARKER = "gallery.json"
FONTS_DIR = "/usr/share/fonts"


@dataclass(frozen=True)
class Face:
    package: str  # the Debian package that ships the font
    file: str  # the font file's name, looked up below the fonts folder
    name: str = ""  # the face's full name inside a collection (.ttc); "" for the first face


def gb2312_level1() -> list[str]:
    """The 3,755 characters of GB 2312 level 1 (rows 16-55), in the standard's order."""
    out = []
    for hi in range(0xB0, 0xD8):
        for lo in range(0xA1, 0xFF):
            try:
                out.append(bytes([hi, lo]).decode("gb2312"))
            except UnicodeDecodeError:
                continue  # the unassigned cells at the end of row 55
    return out


def latin() -> list[str]:
    return [chr(c) for r in ("AZ", "az", "09") for c in range(ord(r[0]), ord(r[1]) + 1)]


@dataclass(frozen=True)
class GlyphSet:
    styles: dict[str, Face]
    characters: Callable[[], list[str]]


GLYPH_SETS: dict[str, GlyphSet] = {
    "glyphs": GlyphSet({
        "brush": Face("fonts-arphic-ukai", "ukai.ttc", "AR PL UKai CN"),
        "ming": Face("fonts-arphic-uming", "uming.ttc", "AR PL UMing CN"),
        "hei": Face("fonts-wqy-zenhei", "wqy-zenhei.ttc", "WenQuanYi Zen Hei"),
        "noto_sans": Face("fonts-noto-cjk", "NotoSansCJK-Regular.ttc", "Noto Sans CJK SC"),
        "noto_serif": Face("fonts-noto-cjk", "NotoSerifCJK-Regular.ttc", "Noto Serif CJK SC"),
    }, gb2312_level1),
    "glyphs-latin": GlyphSet({
        "serif": Face("fonts-dejavu-core", "DejaVuSerif.ttf"),
        "sans": Face("fonts-dejavu-core", "DejaVuSans.ttf"),
        "mono": Face("fonts-dejavu-core", "DejaVuSansMono.ttf"),
        "handwriting": Face("fonts-urw-base35", "Z003-MediumItalic.otf"),
        "blackletter": Face("fonts-unifraktur", "UnifrakturMaguntia.ttf"),
    }, latin),
}


def category_name(ch: str) -> str:
    """``u4e00`` for a CJK character; ``upper_a``, ``lower_a``, ``digit_0`` for Latin ones (no
    two names differ by case alone: case-insensitive file systems)."""
    if ch.isascii() and ch.isalnum():
        kind = "digit" if ch.isdigit() else "upper" if ch.isupper() else "lower"
        return f"{kind}_{ch.lower()}"
    return f"u{ord(ch):05x}"


def _font_dirs(fonts_dir: str | os.PathLike) -> list[Path]:
    dirs = [Path(fonts_dir)]
    try:
        import matplotlib

        dirs.append(Path(matplotlib.__file__).parent / "mpl-data" / "fonts" / "ttf")
    except ImportError:
        pass
    return dirs


def find_faces(kind: str, fonts_dir: str | os.PathLike = FONTS_DIR
               ) -> tuple[dict[str, tuple[Path, int]], list[str]]:
    """({style: (font file, face index)} for the styles whose font is installed, [notes on the
    missing ones])."""
    found: dict[str, tuple[Path, int]] = {}
    notes = []
    files: dict[str, Path] = {}
    for d in _font_dirs(fonts_dir):
        if d.is_dir():
            for dirpath, _, names in os.walk(d):
                for n in names:
                    files.setdefault(n, Path(dirpath) / n)
    for style, face in GLYPH_SETS[kind].styles.items():
        path = files.get(face.file)
        index = _face_index(path, face.name) if path else None
        if path is None or index is None:
            notes.append(f"style {style} left out: {face.file} not found "
                         f"(apt-get install {face.package})")
        else:
            found[style] = (path, index)
    return found, notes


def _face_index(path: Path, name: str) -> int | None:
    """The index of the face called ``name`` in a font file (0 when ``name`` is empty)."""
    if not name:
        return 0
    from fontTools.ttLib import TTCollection

    if path.suffix.lower() != ".ttc":
        return 0
    for i, font in enumerate(TTCollection(str(path), lazy=True).fonts):
        if font["name"].getDebugName(4) == name:
            return i
    return None


@lru_cache(maxsize=16)
def _cmap(path: Path, index: int) -> frozenset[int]:
    from fontTools.ttLib import TTCollection, TTFont

    font = (TTCollection(str(path), lazy=True).fonts[index] if path.suffix.lower() == ".ttc"
            else TTFont(str(path), lazy=True))
    return frozenset(font.getBestCmap())


@lru_cache(maxsize=16)
def _font(path: Path, index: int, px: int) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    return ImageFont.truetype(str(path), px, index=index)


def render_glyph(path: Path, index: int, ch: str, size: int = 128) -> bytes | None:
    """One framed glyph as PNG bytes, or None when it draws no visible ink."""
    from PIL import Image, ImageDraw

    from cdir.galleries.framing import fit_size, frame

    font = _font(path, index, 2 * fit_size(size))
    left, top, right, bottom = font.getbbox(ch)
    pad = font.size // 4
    im = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (255, 255, 255, 0))
    ImageDraw.Draw(im).text((pad - left, pad - top), ch, font=font, fill=(0, 0, 0, 255))
    framed = frame(im, size)
    if framed is None:
        return None
    buf = io.BytesIO()
    framed.save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def build_glyphs(kind: str, source: str | os.PathLike | None, out_dir: str | os.PathLike,
                 size: int = 128, limit: int | None = None, progress: bool = True
                 ) -> dict[str, Any]:
    """Draw the glyph gallery ``kind`` (a key of `GLYPH_SETS`) into ``out_dir`` with the fonts
    found below ``source`` (default /usr/share/fonts); ``limit`` keeps N characters evenly spread
    over the set's order. Returns the summary written to ``gallery.json``."""
    from tqdm import tqdm

    from cdir.galleries.emoji import spread

    faces, notes = find_faces(kind, source or FONTS_DIR)
    if len(faces) < 2:
        missing = dict.fromkeys(f.package for s, f in GLYPH_SETS[kind].styles.items()
                                if s not in faces)
        raise CdirError(f"the {kind} gallery needs the fonts of at least two styles, found "
                        f"{len(faces)} below {source or FONTS_DIR}: apt-get install "
                        f"{' '.join(missing)}, or pass the folder that holds them")
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    out = Path(out_dir)
    params = {"format": FORMAT_VERSION, "kind": kind, "size": size, "limit": limit,
              "fonts": {s: [str(p), i] for s, (p, i) in sorted(faces.items())}}
    if (out / MARKER).exists() and read_json(out / MARKER).get("params") == params:
        return read_json(out / MARKER)
    if (out / "params.json").exists() and read_json(out / "params.json") != params:
        shutil.rmtree(out)  # drawn with other fonts or sizes: nothing of it is reused
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "params.json", params)
    chars = [ch for ch in GLYPH_SETS[kind].characters()
             if all(ord(ch) in _cmap(p, i) for p, i in faces.values())]
    if limit:
        chars = [chars[i] for i in spread(len(chars), min(limit, len(chars)))]
    kept = 0
    for ch in tqdm(chars, desc=f"{kind} gallery", unit="char", disable=not progress):
        cat = category_name(ch)
        targets = {s: out / s / cat / f"{s}_{cat}.png" for s in faces}
        if all(t.exists() for t in targets.values()):
            kept += 1
            continue
        drawn = {s: render_glyph(p, i, ch, size) for s, (p, i) in faces.items()}
        if any(png is None for png in drawn.values()):
            continue  # blank in some style: the category would be incomplete
        for s, png in drawn.items():
            targets[s].parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(targets[s]) as tmp:
                Path(tmp).write_bytes(png)
        kept += 1
    summary = {"params": params, "categories": kept, "styles": sorted(faces),
               "left_out": len(GLYPH_SETS[kind].characters()) - len(chars), "notes": notes}
    write_json(out / MARKER, summary)
    return summary
