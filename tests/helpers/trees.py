"""Tiny image galleries drawn on the fly, for tests: shapes whose class decides the shape and
colour and whose domain decides the style, written as Office-Home- or DomainNet-shaped trees, and
files that are not readable images.

- :func:`draw_shape` draws one image: the CLASS decides the shape and its colour, the DOMAIN the
  style (Art: painted strokes on canvas; Clipart: flat colour with a thick outline; Product: a
  small object on white; Real World: shaded object on a gradient). So a class is recognisable
  across domains (even the ``pixels`` baseline and CLIP do better than chance), while domains
  still look different.
- :func:`write_shape_tree`, :func:`write_domainnet_tree`, :func:`write_corrupt_files`,
  :func:`make_bomb_png`.

The fixtures over these (``officehome_root``, ``make_officehome``, ``make_domainnet``,
``corrupt_dir``) are in ``tests/conftest.py``.
"""

from __future__ import annotations

import hashlib
import io
import random
import struct
import zlib
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

OFFICEHOME_DOMAINS: tuple[str, ...] = ("Art", "Clipart", "Product", "Real World")
SHAPE_CLASSES: tuple[str, ...] = ("Circle", "Cross", "Square", "Triangle")

# class -> (shape, RGB colour); any other class name gets a shape and colour from its hash.
_SHAPES = ("circle", "cross", "square", "triangle", "diamond", "ring", "bar", "star")
_CLASS_STYLE: dict[str, tuple[str, tuple[int, int, int]]] = {
    "Circle": ("circle", (220, 30, 30)),
    "Cross": ("cross", (140, 40, 200)),
    "Square": ("square", (30, 70, 220)),
    "Triangle": ("triangle", (20, 170, 40)),
}

# name -> substring expected in the BadImage reason from cdir.core.images.load_image
CORRUPT_FILES: dict[str, str] = {
    "truncated.jpg": "cannot decode",
    "empty.jpg": "empty file",
    "text.jpg": "not an image",
    "bomb.png": "too large",
}


def _seed(*parts: object) -> int:
    return int.from_bytes(hashlib.sha1("|".join(map(str, parts)).encode()).digest()[:8], "big")


def class_style(class_name: str) -> tuple[str, tuple[int, int, int]]:
    """(shape, colour) for a class: fixed for :data:`SHAPE_CLASSES`, hashed for any other name."""
    if class_name in _CLASS_STYLE:
        return _CLASS_STYLE[class_name]
    rng = random.Random(_seed("class", class_name))
    colour = tuple(rng.randrange(20, 230) for _ in range(3))
    return _SHAPES[rng.randrange(len(_SHAPES))], colour  # type: ignore[return-value]


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "cross":
        t = r * 0.32
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t),
                (cx + r, cy + t), (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r),
                (cx - t, cy + t), (cx - r, cy + t), (cx - r, cy - t), (cx - t, cy - t)]
    if shape == "star":
        import math

        pts = []
        for i in range(10):
            a = -math.pi / 2 + i * math.pi / 5
            rr = r if i % 2 == 0 else r * 0.45
            pts.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return pts
    return None


def _draw(d: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
          fill: tuple[int, int, int], outline: tuple[int, int, int] | None, width: int) -> None:
    box = [cx - r, cy - r, cx + r, cy + r]
    poly = _polygon(shape, cx, cy, r)
    if poly is not None:
        d.polygon(poly, fill=fill, outline=outline, width=width)
    elif shape == "circle":
        d.ellipse(box, fill=fill, outline=outline, width=width)
    elif shape == "ring":
        d.ellipse(box, outline=fill, width=max(3, int(r * 0.35)))
    elif shape == "square":
        d.rectangle([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=fill,
                    outline=outline, width=width)
    else:  # bar
        d.rectangle([cx - r, cy - r * 0.3, cx + r, cy + r * 0.3], fill=fill, outline=outline,
                    width=width)


def draw_shape(class_name: str, domain: str, index: int = 0, size: int = 64) -> Image.Image:
    """One RGB image of ``class_name`` in the style of ``domain`` (deterministic per arguments)."""
    shape, colour = class_style(class_name)
    rng = random.Random(_seed(class_name, domain, index, size))
    s = size
    style = domain.lower().replace("_", " ")
    jitter = s * 0.08
    cx = s / 2 + rng.uniform(-jitter, jitter)
    cy = s / 2 + rng.uniform(-jitter, jitter)
    if style.startswith("art"):
        img = Image.new("RGB", (s, s), (236, 226, 200))
        d = ImageDraw.Draw(img)
        for _ in range(12):  # painted strokes in muted tones
            x0, y0 = rng.uniform(0, s), rng.uniform(0, s)
            c = tuple(int(v) for v in (rng.uniform(150, 220), rng.uniform(140, 200),
                                       rng.uniform(110, 170)))
            d.line([x0, y0, x0 + rng.uniform(-s / 3, s / 3), y0 + rng.uniform(-s / 3, s / 3)],
                   fill=c, width=max(1, s // 24))
        paint = tuple(min(255, int(v * 0.85 + 30)) for v in colour)
        _draw(d, shape, cx, cy, s * rng.uniform(0.28, 0.34), paint, (60, 40, 30), max(1, s // 32))
        img = img.filter(ImageFilter.SMOOTH_MORE)
    elif style.startswith("clip"):
        img = Image.new("RGB", (s, s), (255, 255, 255))
        d = ImageDraw.Draw(img)
        _draw(d, shape, cx, cy, s * rng.uniform(0.3, 0.36), colour, (0, 0, 0), max(2, s // 16))
    elif style.startswith("prod"):
        img = Image.new("RGB", (s, s), (255, 255, 255))
        d = ImageDraw.Draw(img)
        _draw(d, shape, s / 2, s / 2, s * rng.uniform(0.22, 0.28), colour, None, 1)
        d.ellipse([s * 0.3, s * 0.86, s * 0.7, s * 0.92], fill=(225, 225, 225))  # a shadow
    else:  # Real World and anything else: shaded object on a gradient background
        top = (rng.randrange(90, 150), rng.randrange(120, 170), rng.randrange(150, 200))
        img = Image.new("RGB", (s, s))
        px = img.load()
        for y in range(s):
            f = y / max(1, s - 1)
            row = tuple(int(top[i] * (1 - f) + 90 * f) for i in range(3))
            for x in range(s):
                px[x, y] = row
        d = ImageDraw.Draw(img)
        r = s * rng.uniform(0.26, 0.34)
        dark = tuple(int(v * 0.6) for v in colour)
        _draw(d, shape, cx + s * 0.03, cy + s * 0.03, r, dark, None, 1)
        _draw(d, shape, cx, cy, r, colour, None, 1)
        img = img.filter(ImageFilter.GaussianBlur(radius=max(0.5, s / 96)))
    return img


def write_shape_tree(
    root: str | Path,
    domains: Sequence[str] = OFFICEHOME_DOMAINS,
    classes: Sequence[str] = SHAPE_CLASSES,
    per_class: int = 3,
    size: int = 64,
    folder_names: dict[str, str] | None = None,
    train_level: bool = False,
    top_folder: str | None = None,
    ext: str = ".jpg",
    n_corrupt: int = 0,
) -> Path:
    """Write ``root/[top_folder/]<folder>/[train/]<class>/<nnnnn><ext>`` and return the folder
    that holds the domain folders.

    ``folder_names`` renames domain folders (e.g. ``{"Real World": "Real_World"}``), ``train_level``
    adds UCDIR's ``train/`` level, ``top_folder`` nests everything (e.g.
    ``"OfficeHomeDataset_10072016"``), ``n_corrupt`` adds that many corrupt files (cycling through
    :data:`CORRUPT_FILES`) to the first domain's first class, named ``zz_<kind>``.
    """
    base = Path(root) / top_folder if top_folder else Path(root)
    folder_names = folder_names or {}
    for dom in domains:
        for cls in classes:
            cdir = base / folder_names.get(dom, dom)
            if train_level:
                cdir = cdir / "train"
            cdir = cdir / cls
            cdir.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                img = draw_shape(cls, dom, i, size)
                path = cdir / f"{i + 1:05d}{ext}"
                if ext.lower() in (".jpg", ".jpeg"):
                    img.save(path, quality=90)
                else:
                    img.save(path)
    if n_corrupt:
        first = base / folder_names.get(domains[0], domains[0])
        first = (first / "train" if train_level else first) / classes[0]
        names = list(CORRUPT_FILES)
        tmp = base / ".corrupt_tmp"
        write_corrupt_files(tmp)
        for k in range(n_corrupt):
            name = names[k % len(names)]
            (first / f"zz_{k:02d}_{name}").write_bytes((tmp / name).read_bytes())
        for f in tmp.iterdir():
            f.unlink()
        tmp.rmdir()
    return base


DOMAINNET_MINI_DOMAINS: tuple[str, ...] = ("clipart", "painting", "sketch")
# Includes an upper-case name (byte order puts it first) and DomainNet's t-shirt.
DOMAINNET_MINI_CLASSES: tuple[str, ...] = ("The_Eiffel_Tower", "bird", "t-shirt", "zebra")


def write_domainnet_tree(
    root: str | Path,
    domains: Sequence[str] = DOMAINNET_MINI_DOMAINS,
    classes: Sequence[str] = DOMAINNET_MINI_CLASSES,
    per_split: int = 2,
    size: int = 32,
    split_files: bool = True,
    split_dir: str = "",
    missing: Sequence[str] = (),
    painting_tshirt_gap: bool = True,
) -> Path:
    """Write a DomainNet-shaped tree ``root/<domain>/<class>/<domain>_<ccc>_<nnnnnn>.jpg`` (``.png``
    for quickdraw) with ``per_split`` train and ``per_split`` test images per class and domain,
    and, if ``split_files``, ``root/[split_dir/]<domain>_{train,test}.txt`` with lines
    ``<domain>/<class>/<file> <label>`` (label: DomainNet's own case-insensitive alphabetical
    order). ``missing`` lists relative paths to put in the split files without writing the image
    (the first ``train`` list of their domain). ``painting_tshirt_gap`` leaves ``t-shirt`` out of
    painting_train.txt, like the official file (its images are still written)."""
    root = Path(root)
    official = {c: i for i, c in enumerate(sorted(classes, key=str.lower))}
    for dom in domains:
        ext = ".png" if dom == "quickdraw" else ".jpg"
        lists: dict[str, list[str]] = {"train": [], "test": []}
        for cls in classes:
            cdir = root / dom / cls
            cdir.mkdir(parents=True, exist_ok=True)
            for k in range(2 * per_split):
                sp = "train" if k < per_split else "test"
                name = f"{dom}_{official[cls] + 1:03d}_{k + 1:06d}{ext}"
                draw_shape(cls, "Clipart" if dom != "real" else "Real World", k, size).save(
                    cdir / name)
                if painting_tshirt_gap and dom == "painting" and cls == "t-shirt" \
                        and sp == "train":
                    continue
                lists[sp].append(f"{dom}/{cls}/{name} {official[cls]}")
        for rel in missing:
            if rel.startswith(dom + "/"):
                cls = rel.split("/")[1]
                lists["train"].append(f"{rel} {official.get(cls, 0)}")
        if split_files:
            sdir = root / split_dir if split_dir else root
            sdir.mkdir(parents=True, exist_ok=True)
            for sp, lines in lists.items():
                (sdir / f"{dom}_{sp}.txt").write_text("\n".join(lines) + "\n")
    return root


def make_bomb_png(path: str | Path, width: int, height: int) -> Path:
    """A PNG that is only a header claiming ``width`` x ``height`` RGB pixels (a few dozen bytes):
    enough for Pillow's decompression-bomb check, which runs on open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 16)  # far too little data: decoding would fail anyway
    path = Path(path)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat)
                     + chunk(b"IEND", b""))
    return path


def write_corrupt_files(folder: str | Path) -> Path:
    """Write the files of :data:`CORRUPT_FILES` into ``folder`` and return it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    draw_shape("Circle", "Real World", 0, 96).save(buf, format="JPEG", quality=95)
    data = buf.getvalue()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.jpg").write_text("<html><body>404 Not Found</body></html>\n")
    make_bomb_png(folder / "bomb.png", 100_000, 100_000)
    return folder


def manifest_rows(base: str | Path) -> list[dict]:
    """Manifest rows (id, path, domain, class_name) of every file of a ``<domain>/<class>/`` tree,
    corrupt ones included: the stages must skip and list those themselves."""
    rows = []
    for p in sorted(Path(base).rglob("*")):
        if p.is_file():
            rel = p.relative_to(base)
            rows.append({"id": rel.as_posix(), "path": str(p), "domain": rel.parts[0],
                         "class_name": rel.parts[1]})
    return rows


def permute_labels(manifest: Path, seed: int = 0) -> None:
    """Shuffle a workspace manifest's labels (and class names) over its rows, in place: the same
    images with wrong labels, for tests that labels cannot change a label-free run."""
    import numpy as np
    import pandas as pd

    df = pd.read_parquet(manifest)
    order = np.random.default_rng(seed).permutation(len(df))
    for col in ("label", "class_name"):
        df[col] = df[col].to_numpy()[order]
    df.to_parquet(manifest)
