"""Robust image loading: every image becomes RGB on white, every failure a one-line reason."""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from PIL import Image, ImageFile

from cdir.core.errors import CdirError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Decoding a truncated file must fail, not yield a half-grey image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# load_image enforces the decompression-bomb limit itself (thread-safely), so Pillow's warning
# would only repeat it.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


class BadImage(CdirError):
    """An image that cannot be decoded; the run skips it and lists it."""


# What reading an image for a model raises when the file is bad: load_image's BadImage, or
# OSError / ValueError from a transform of what it decoded. Datasets catch these and nothing else.
DECODE_ERRORS: tuple[type[Exception], ...] = (BadImage, OSError, ValueError)


def is_image_file(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB on a white background: transparency (RGBA, LA, palette with tRNS) is composited, CMYK
    and 16-bit modes are converted."""
    if img.mode == "P":
        img = img.convert("RGBA") if "transparency" in img.info else img.convert("RGB")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        canvas.alpha_composite(img)
        return canvas.convert("RGB")
    if img.mode.startswith("I"):
        # 16/32-bit greyscale: scale to 8 bits (via mode I: point() rejects I;16B)
        img = img.convert("I").point(lambda v: v / 256).convert("L")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | Path, data: bytes | None = None) -> Image.Image:
    """Open, fully decode and convert to RGB; raise BadImage with the reason on any failure,
    including images over Pillow's decompression-bomb limit. ``data``: the file's bytes, already
    read (``path`` then only names it)."""
    path = Path(path)
    try:
        with Image.open(path if data is None else io.BytesIO(data)) as img:
            limit = Image.MAX_IMAGE_PIXELS
            if limit and img.size[0] * img.size[1] > limit:
                raise BadImage(f"{path}: too large ({img.size[0]}×{img.size[1]} pixels, over "
                               f"Pillow's decompression-bomb limit of {limit})")
            img.load()
            return to_rgb(img)
    except FileNotFoundError:
        raise BadImage(f"{path}: file not found") from None
    except Image.DecompressionBombError as e:
        raise BadImage(f"{path}: too large ({e})") from None
    except Image.UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        raise BadImage(f"{path}: not an image" + (" (empty file)" if size == 0 else "")) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"{path}: cannot decode ({e})") from None


def load_image_hashed(path: str | Path) -> tuple[Image.Image, str]:
    """`load_image` and the content hash (`file_sha256`'s) of the very bytes decoded: the file
    is read once, and a vector or caption is never recorded with the hash of other bytes."""
    from cdir.core.manifest import bytes_sha256

    try:
        data = Path(path).read_bytes()
    except OSError:
        return load_image(path), ""  # raises BadImage with the reason
    return load_image(path, data), bytes_sha256(data)


def failure_reason(path: str, e: BaseException) -> str:
    """One line without the path (the failure record carries it): 'not an image (empty file)'."""
    text = (str(e).strip().splitlines() or [""])[0]
    if text.startswith(f"{path}: "):
        return text[len(path) + 2:]
    return f"{e.__class__.__name__}: {text}" if text else e.__class__.__name__


def failure_report(records: list[dict], where: str | Path, show: int = 5) -> str:
    """The skipped images of a run ({id, reason} records), a few named, for the end of a job."""
    lines = [f"{len(records)} image(s) could not be read and were skipped (listed in {where}):"]
    lines += [f"  {r['id']}: {r['reason']}" for r in records[:show]]
    if len(records) > show:
        lines.append(f"  ... and {len(records) - show} more")
    return "\n".join(lines)


class ImageList:
    """A map-style dataset of images with a readable flag: item i is ``(transform(image i),
    label i, True)``, or ``(zeros of shape blank, label i, False)`` when image i cannot be read
    (`DECODE_ERRORS`), so one bad file never stops a run and the caller drops or lists the rows
    flagged rather than use a blank image as if it were one.

    ``images[i]`` is what ``read`` opens (default: a file path for `load_image`); ``labels[i]``
    an int (default: i itself, the row); ``say``: print each unreadable image to stderr."""

    def __init__(self, images: Sequence[Any], transform: Callable[[Image.Image], Any],
                 blank: tuple[int, ...], labels: Sequence[int] | None = None,
                 read: Callable[[Any], Image.Image] = load_image, say: bool = False) -> None:
        if labels is not None and len(labels) != len(images):
            raise CdirError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels = images, labels
        self.transform, self.blank, self.read, self.say = transform, tuple(blank), read, say

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Any, int, bool]:
        label = i if self.labels is None else int(self.labels[i])
        try:
            return self.transform(self.read(self.images[i])), label, True
        except DECODE_ERRORS as e:
            if self.say:
                print(f"skipping unreadable image: {e}", file=sys.stderr)
            import torch

            return torch.zeros(self.blank), label, False
