"""Unlabelled drawing corpora: more drawings to learn from, without labels.

Two Debian packages ship thousands of clip-art drawings (install them with
``apt-get install openclipart-png tuxpaint-stamps-default``):

- ``openclipart``: ``openclipart-png`` (``/usr/share/openclipart/png``), ~8,100 PNGs, ~6,900
  distinct. Generated sets are left out by folder (spirograph stars, jigsaw pieces and the rest
  of ``shapes/``, flags, icon sets, buttons, logos, gradients and patterns): about 3,100
  drawings remain.
- ``tuxpaint``: ``tuxpaint-stamps-default`` (``/usr/share/tuxpaint/stamps``), ~1,000 stamps as
  PNG or SVG, each with a one-line description (kept in the manifest's ``description`` column).

Each drawing is decoded once, framed like the emoji gallery (`cdir.galleries.framing`) and
written at ``size`` pixels to ``out_dir/<corpus>/unlabelled/<content hash>.png``, so training
reads small files. Files with the same bytes, or rendering to the same pixels, are kept once;
files over ``max_pixels`` (some exceed 100 megapixels), unreadable files and blank renderings are
skipped and listed in ``out_dir/skipped.json``. A re-run renders only what is missing (the output
name is the source's content hash); ``corpus.json`` is written last, as the completion marker.
The manifest has one domain (the corpus) and one class, ``unlabelled``: there are no labels.
"""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path, read_json, write_json

if TYPE_CHECKING:
    import pandas as pd

FORMAT_VERSION = 1
MARKER = "corpus.json"
CLASS = "unlabelled"
DEFAULT_MAX_PIXELS = 40_000_000


@dataclass(frozen=True)
class Corpus:
    package: str  # the Debian package that ships it
    root: str  # where the package puts the drawings
    suffixes: tuple[str, ...]
    exclude: tuple[str, ...] = ()  # folders (relative to root) of generated or non-drawing sets
    variants: tuple[str, ...] = ()  # file-name endings of pre-made copies (mirrored, flipped)


CORPORA: dict[str, Corpus] = {
    "openclipart": Corpus(
        "openclipart-png", "/usr/share/openclipart/png", (".png",),
        exclude=("shapes", "signs_and_symbols/flags", "computer/icons", "special", "buttons",
                 "logos")),
    "tuxpaint": Corpus(
        "tuxpaint-stamps-default", "/usr/share/tuxpaint/stamps", (".png", ".svg"),
        variants=("_mirror", "_flip")),
}


@dataclass(frozen=True)
class Source:
    rel: str  # path relative to the corpus root, POSIX
    path: Path
    description: str


def sources(name: str, root: str | os.PathLike) -> list[Source]:
    """The corpus's drawings under ``root`` in path order: excluded folders and pre-made variants
    left out, an SVG left out where a PNG of the same name exists."""
    corpus = CORPORA[name]
    root = Path(root)
    out: list[Source] = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root).as_posix()
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and
                             _rel(rel_dir, d) not in corpus.exclude)
        names = set(filenames)
        for f in sorted(filenames):
            stem, ext = os.path.splitext(f)
            if ext.lower() not in corpus.suffixes or stem.endswith(corpus.variants):
                continue
            if ext.lower() == ".svg" and f"{stem}.png" in names:
                continue
            path = Path(dirpath) / f
            out.append(Source(_rel(rel_dir, f), path, _description(path.with_suffix(".txt"))))
    return out


def _rel(parent: str, name: str) -> str:
    return name if parent == "." else f"{parent}/{name}"


def _description(txt: Path) -> str:
    """The first line of a stamp's description file (its English text), or ''."""
    try:
        return txt.read_text(encoding="utf-8", errors="replace").splitlines()[0].strip()
    except (OSError, IndexError):
        return ""


def render(path: Path, size: int, max_pixels: int) -> tuple[bytes | None, str]:
    """(framed PNG bytes, '') or (None, why it was skipped)."""
    with warnings.catch_warnings():
        return _render(path, size, max_pixels)


def _render(path: Path, size: int, max_pixels: int) -> tuple[bytes | None, str]:
    from PIL import Image

    from cdir.galleries.framing import frame

    try:
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the size is checked here
        if path.suffix.lower() == ".svg":
            import cairosvg

            rgba = Image.open(io.BytesIO(cairosvg.svg2png(
                url=str(path), output_width=4 * size))).convert("RGBA")
        else:
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_pixels:
                    return None, f"too large ({w}x{h}, over {max_pixels:,} pixels)"
                rgba = im.convert("RGBA")
        if max(rgba.size) > 4 * size:  # frame from a smaller copy: same result, far faster
            rgba.thumbnail((4 * size, 4 * size), Image.Resampling.LANCZOS)
    except Image.DecompressionBombError as e:
        return None, f"too large ({e})"
    except Exception as e:  # noqa: BLE001 - Pillow and cairosvg raise many kinds on bad files
        return None, f"unreadable ({type(e).__name__}: {str(e)[:200]})"
    framed = frame(rgba, size)
    if framed is None:
        return None, "blank (no visible ink)"
    buf = io.BytesIO()
    framed.save(buf, format="PNG", compress_level=6)
    return buf.getvalue(), ""


def build_corpus(name: str, source: str | os.PathLike | None, out_dir: str | os.PathLike,
                 size: int = 128, limit: int | None = None,
                 max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> dict[str, Any]:
    """Render the corpus ``name`` from ``source`` (default: where its Debian package puts it)
    into ``out_dir`` (see the module docstring); ``limit`` keeps the first N drawings in path
    order. Returns the summary written to ``corpus.json``; a complete output with the same
    parameters is reused."""
    corpus = CORPORA[name]
    root = Path(source or corpus.root).expanduser()
    if not root.is_dir():
        raise CdirError(f"{root} does not exist: install the drawings with `apt-get install "
                        f"{corpus.package}` (Debian/Ubuntu), or pass the folder that holds them")
    out = Path(out_dir)
    params = {"format": FORMAT_VERSION, "corpus": name, "root": str(root.resolve()),
              "size": size, "limit": limit, "max_pixels": max_pixels}
    marker = out / MARKER
    if marker.exists():
        done = read_json(marker)
        if done.get("params") == params:
            return done
        marker.unlink()  # other parameters: rebuilt below (files of the same content reused)
    found = sources(name, root)[:limit] if limit else sources(name, root)
    dest = out / name / CLASS
    dest.mkdir(parents=True, exist_ok=True)
    keep, skipped, seen_bytes, seen_pixels, descriptions = set(), [], set(), set(), {}
    for src, digest in _hashed(found, progress):
        if digest is None:
            skipped.append({"path": src.rel, "reason": "unreadable (cannot read the file)"})
            continue
        if digest in seen_bytes:
            continue  # the same file twice
        seen_bytes.add(digest)
        # named by the source's content and the size: a re-run reuses it, nothing stale is served
        target = dest / f"{digest[:20]}_{size}.png"
        if target.exists():
            png = target.read_bytes()
        else:
            png, why = render(src.path, size, max_pixels)
            if png is None:
                skipped.append({"path": src.rel, "reason": why})
                continue
        pixels = hashlib.sha256(png).hexdigest()
        if pixels in seen_pixels:
            continue  # another file drawing the same picture
        seen_pixels.add(pixels)
        if not target.exists():
            with atomic_path(target) as tmp:
                Path(tmp).write_bytes(png)
        keep.add(target.name)
        descriptions[target.name] = {"source": src.rel, "description": src.description}
    for f in dest.glob("*.png"):
        if f.name not in keep:
            f.unlink()
    write_json(out / "sources.json", descriptions)
    write_json(out / "skipped.json", skipped)
    summary = {"params": params, "found": len(found), "kept": len(keep),
               "skipped": len(skipped), "duplicates": len(found) - len(keep) - len(skipped)}
    write_json(marker, summary)
    return summary


def load_corpus(root: str | os.PathLike) -> pd.DataFrame:
    """The manifest rows of a rendered corpus, with each drawing's ``source`` file and
    ``description``."""
    from cdir.galleries.folder import load_folder

    df = load_folder(root)
    meta = read_json(Path(root) / "sources.json")
    names = df["path"].map(lambda p: os.path.basename(str(p)))
    df["source"] = names.map(lambda n: meta.get(n, {}).get("source", ""))
    df["description"] = names.map(lambda n: meta.get(n, {}).get("description", ""))
    return df


def _hashed(found: list[Source], progress: bool) -> Iterator[tuple[Source, str | None]]:
    """Each source with the hash of its bytes (None: it cannot be read)."""
    from tqdm import tqdm

    for src in tqdm(found, desc="drawings", unit="img", disable=not progress):
        try:
            yield src, hashlib.sha256(src.path.read_bytes()).hexdigest()
        except OSError:
            yield src, None
