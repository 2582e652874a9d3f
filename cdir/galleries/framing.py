"""One way to frame a drawing: composite on white, crop to the ink, fit into 7/8 of a square
canvas, centre. Every rendered gallery (emoji, drawing corpora) is framed alike, so that size and
position do not give the source away."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # PIL is imported inside the functions that need it
    from PIL import Image

MIN_INK_FRACTION = 0.005  # fewer visible-ink pixels than this fraction: a blank image
INK_LEVEL = 245  # a pixel is ink if any channel is darker than this
ALPHA_INK = 8  # alpha above this counts towards the ink box (ignores a faint antialiased fringe)


def fit_size(size: int) -> int:
    """The side of the ink box on a ``size`` canvas."""
    return max(1, round(size * 112 / 128))


def ink_bbox(rgba: Image.Image) -> tuple[int, int, int, int] | None:
    """The box of the pixels with visible alpha, or None when there are none."""
    alpha = rgba.getchannel("A").point(lambda a: 255 if a > ALPHA_INK else 0)
    return alpha.getbbox()


def frame(rgba: Image.Image, size: int, bbox: tuple[int, int, int, int] | None = None
          ) -> Image.Image | None:
    """``rgba`` framed on a ``size``×``size`` white RGB canvas, or None when it shows no ink
    (white-on-transparent art is invisible on white too)."""
    from PIL import Image

    bbox = bbox if bbox is not None else ink_bbox(rgba)
    if bbox is None:
        return None
    white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    rgb = Image.alpha_composite(white, rgba).convert("RGB").crop(bbox)
    w, h = rgb.size
    fit = fit_size(size)
    scale = fit / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    rgb = rgb.resize((nw, nh), Image.Resampling.LANCZOS)
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(rgb, ((size - nw) // 2, (size - nh) // 2))
    grey = canvas.convert("L").point(lambda v: 255 if v < INK_LEVEL else 0)
    if grey.histogram()[255] < MIN_INK_FRACTION * size * size:
        return None
    return canvas
