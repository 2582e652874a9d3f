"""Robust image loading: every image becomes RGB on white, every failure a one-line reason."""

from __future__ import annotations

import warnings
from pathlib import Path

from PIL import Image, ImageFile

from cdir.errors import CdirError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}

# Decoding a truncated file must fail, not yield a half-grey image silently.
ImageFile.LOAD_TRUNCATED_IMAGES = False


class BadImage(CdirError):
    """An image that cannot be decoded; the run skips it and lists it."""


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
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits before converting
        img = img.point(lambda v: v / 256).convert("L")
    return img.convert("RGB") if img.mode != "RGB" else img


def load_image(path: str | Path) -> Image.Image:
    """Open, fully decode and convert to RGB; raise BadImage with the reason on any failure,
    including images over Pillow's decompression-bomb limit."""
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                img.load()
                return to_rgb(img)
    except FileNotFoundError:
        raise BadImage(f"{path}: file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImage(f"{path}: too large ({e.__class__.__name__})") from None
    except Image.UnidentifiedImageError:
        size = path.stat().st_size if path.exists() else 0
        raise BadImage(f"{path}: not an image" + (" (empty file)" if size == 0 else "")) from None
    except (OSError, ValueError, SyntaxError) as e:
        raise BadImage(f"{path}: cannot decode ({e})") from None
