"""Augmentation recipes for self-supervised pretraining, selected by name from the config.

Recipes (each maps a PIL RGB image to a normalised tensor):

- ``moco_v2``: MoCo v2 "aug+" (RandomResizedCrop 0.2-1, colour jitter 0.4/0.4/0.4/0.1 p=0.8,
  greyscale p=0.2, Gaussian blur sigma 0.1-2 p=0.5, horizontal flip). The ISD "strong" view.
- ``moco_v1``: MoCo v1 (RandomResizedCrop 0.2-1, greyscale 0.2, jitter 0.4/0.4/0.4/0.4, flip).
- ``weak``: RandomResizedCrop + flip only. The ISD "weak" (teacher) view.
- ``emoji``: a style-removing recipe for drawings on a white canvas (the emoji gallery). Measured
  on that gallery, the standard recipe alone scores *below* raw pixels, while random line art from
  edge maps, added dark outlines, posterisation, silhouettes, stroke thickening/thinning and strong
  greyscale lift cross-domain P@1 several-fold. No horizontal flip (emoji come in left/right
  pairs) and the colour jitter leaves the white background white, so that neither becomes a cue
  that separates the art sets.
- ``emoji_weak``: the crop of ``emoji`` alone (teacher view for ISD on drawings).

All randomness comes from torch's global generator, which DataLoader seeds per worker, so a run
with a fixed seed draws the same augmentations.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image, ImageFilter
from torchvision import transforms as T

from cdir.core.errors import CdirError
from encoders.zoo import IMAGENET_MEAN, IMAGENET_STD

RECIPES = ("moco_v2", "moco_v1", "weak", "emoji", "emoji_weak")


@dataclass
class AugConfig:
    """Which recipe each view kind uses, and the knobs shared by the recipes."""

    strong: str = "moco_v2"  # recipe for views the method calls "strong"
    weak: str = "weak"  # recipe for views the method calls "weak"
    size: int = 224  # output crop size
    scale: tuple[float, float] = (0.2, 1.0)  # RandomResizedCrop area range
    flip: bool = True
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5  # 0 for 32 px images, where blur erases most of the content
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    # emoji recipe: probability of applying one style-removing op, and the op weights
    style_p: float = 0.8
    style_weights: dict[str, float] = field(
        default_factory=lambda: {
            "line_art": 2.0,
            "outline": 1.5,
            "posterize": 1.0,
            "silhouette": 1.0,
            "thicken": 1.0,
            "thin": 1.0,
        }
    )
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    # evaluation: resize the short side to size * eval_resize, then centre-crop ``size``
    # (256/224 = 1.143 for ImageNet; 1.0 keeps the whole canvas for drawings)
    eval_resize: float = 256 / 224

    def __post_init__(self) -> None:
        self.scale = tuple(self.scale)  # type: ignore[assignment]
        self.jitter = tuple(self.jitter)  # type: ignore[assignment]
        self.blur_sigma = tuple(self.blur_sigma)  # type: ignore[assignment]
        self.mean = tuple(self.mean)  # type: ignore[assignment]
        self.std = tuple(self.std)  # type: ignore[assignment]
        for name in (self.strong, self.weak):
            if name not in RECIPES:
                raise CdirError(
                    f"unknown augmentation recipe {name!r}; choose one of {', '.join(RECIPES)}"
                )
        bad = set(self.style_weights) - set(STYLE_OPS)
        if bad:
            raise CdirError(
                f"unknown style op(s) {sorted(bad)} in aug.style_weights; "
                f"choose from {', '.join(STYLE_OPS)}"
            )


def _uniform(lo: float, hi: float) -> float:
    return float(torch.empty(()).uniform_(lo, hi))


def _coin(p: float) -> bool:
    return p > 0 and float(torch.rand(())) < p


def _randint(lo: int, hi: int) -> int:
    """Integer in [lo, hi] inclusive."""
    return int(torch.randint(lo, hi + 1, ()))


class GaussianBlur:
    """PIL Gaussian blur with a random radius (MoCo v2 draws sigma in [0.1, 2.0])."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)) -> None:
        self.sigma = sigma

    def __call__(self, img: Image.Image) -> Image.Image:
        return img.filter(ImageFilter.GaussianBlur(radius=_uniform(*self.sigma)))


# --- style-removing operations for drawings on white --------------------------------------------

_WHITE = 245  # a pixel darker than this in any channel counts as ink


def _ink_mask(arr: np.ndarray) -> np.ndarray:
    return arr.min(axis=2) < _WHITE


def _mask_image(mask: np.ndarray) -> Image.Image:
    return Image.fromarray(mask.astype(np.uint8) * 255)  # 2-D uint8 -> mode "L"


def _dark_colour() -> np.ndarray:
    """Black most of the time, otherwise a random dark colour."""
    if _coin(0.6):
        return np.zeros(3, dtype=np.uint8)
    return (torch.rand(3) * 90).to(torch.uint8).numpy()


def line_art(img: Image.Image) -> Image.Image:
    """Dark lines along colour edges on white: turns flat-colour art into a sketch."""
    edges = np.asarray(img.filter(ImageFilter.FIND_EDGES)).max(axis=2)
    # FIND_EDGES marks the canvas border; drop it
    edges[0, :] = edges[-1, :] = edges[:, 0] = edges[:, -1] = 0
    lines = edges > _uniform(20, 70)
    if _coin(0.5):
        lines = np.asarray(_mask_image(lines).filter(ImageFilter.MaxFilter(3))) > 0
    out = np.full((*lines.shape, 3), 255, dtype=np.uint8)
    out[lines] = _dark_colour()
    return Image.fromarray(out)


def outline(img: Image.Image) -> Image.Image:
    """Add a dark outline around the drawing (and, half the time, along inner colour edges):
    the look of art sets with thick black contours."""
    arr = np.asarray(img).copy()
    ink = _ink_mask(arr)
    width = 5 if _coin(0.3) else 3
    grown = np.asarray(_mask_image(ink).filter(ImageFilter.MaxFilter(width))) > 0
    ring = grown & ~ink
    colour = _dark_colour()
    arr[ring] = colour
    if _coin(0.5):
        edges = np.asarray(img.filter(ImageFilter.FIND_EDGES)).max(axis=2) > 60
        edges[0, :] = edges[-1, :] = edges[:, 0] = edges[:, -1] = False
        arr[edges & ink] = colour
    return Image.fromarray(arr)


def posterize(img: Image.Image) -> Image.Image:
    """Few flat colours; white stays exactly white and light ink does not vanish into it."""
    arr = np.asarray(img)
    if _coin(0.5):
        levels = _randint(3, 5)
        a = arr.astype(np.float32) / 255.0
        out = (np.round(a * (levels - 1)) / (levels - 1) * 255).astype(np.uint8)
    else:
        q = img.quantize(colors=_randint(3, 8), method=Image.Quantize.MEDIANCUT)
        out = np.asarray(q.convert("RGB")).copy()
    # clear (not anti-aliasing fringe) ink that rounded to white becomes light grey
    lost = (arr.min(axis=2) < 200) & ~_ink_mask(out)
    out[lost] = 200
    return Image.fromarray(out)


def silhouette(img: Image.Image) -> Image.Image:
    """The drawing's shape filled with one colour: only the outline of the object survives."""
    ink = _ink_mask(np.asarray(img))
    out = np.full((*ink.shape, 3), 255, dtype=np.uint8)
    out[ink] = _dark_colour() if _coin(0.7) else (torch.rand(3) * 200).to(torch.uint8).numpy()
    return Image.fromarray(out)


def thicken(img: Image.Image) -> Image.Image:
    """Dark strokes grow into the white around them (a min filter on a light background)."""
    return img.filter(ImageFilter.MinFilter(5 if _coin(0.2) else 3))


def thin(img: Image.Image) -> Image.Image:
    """Dark strokes shrink (a max filter on a light background)."""
    return img.filter(ImageFilter.MaxFilter(3))


_STYLE_FNS: dict[str, Callable[[Image.Image], Image.Image]] = {
    "line_art": line_art,
    "outline": outline,
    "posterize": posterize,
    "silhouette": silhouette,
    "thicken": thicken,
    "thin": thin,
}
STYLE_OPS = tuple(_STYLE_FNS)


class RandomStyle:
    """With probability ``p`` apply one style op, picked with the given weights."""

    def __init__(self, p: float, weights: dict[str, float]) -> None:
        self.p = p
        self.names = [n for n, w in weights.items() if w > 0]
        self.weights = torch.tensor([weights[n] for n in self.names], dtype=torch.float)

    def __call__(self, img: Image.Image) -> Image.Image:
        if not self.names or not _coin(self.p):
            return img
        name = self.names[int(torch.multinomial(self.weights, 1))]
        return _STYLE_FNS[name](img)


class WhitePreservingJitter:
    """Colour jitter (applied with probability ``p``) that leaves the white canvas white, so the
    background never tells one art set from another."""

    def __init__(self, jitter: tuple[float, float, float, float], p: float) -> None:
        self.jitter = T.ColorJitter(*jitter)
        self.p = p

    def __call__(self, img: Image.Image) -> Image.Image:
        if not _coin(self.p):
            return img
        arr = np.asarray(img)
        white = ~_ink_mask(arr)
        out = np.asarray(self.jitter(img)).copy()
        out[white] = 255
        return Image.fromarray(out)


# --- recipes -------------------------------------------------------------------------------------


def _finish(cfg: AugConfig) -> list[Callable]:
    return [T.ToTensor(), T.Normalize(cfg.mean, cfg.std)]


def _crop(cfg: AugConfig) -> T.RandomResizedCrop:
    return T.RandomResizedCrop(cfg.size, scale=cfg.scale, antialias=True)


def build_view_transform(recipe: str, cfg: AugConfig) -> Callable[[Image.Image], torch.Tensor]:
    """The transform of one view, by recipe name (see the module docstring)."""
    flip = [T.RandomHorizontalFlip()] if cfg.flip else []
    if recipe == "moco_v2":
        ops: list[Callable] = [
            _crop(cfg),
            T.RandomApply([T.ColorJitter(*cfg.jitter)], p=cfg.jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p),
        ]
        if cfg.blur_p > 0:
            ops.append(T.RandomApply([GaussianBlur(cfg.blur_sigma)], p=cfg.blur_p))
        ops += flip
    elif recipe == "moco_v1":
        ops = [
            _crop(cfg),
            T.RandomGrayscale(p=cfg.grayscale_p),
            T.ColorJitter(0.4, 0.4, 0.4, 0.4),
            *flip,
        ]
    elif recipe == "weak":
        ops = [_crop(cfg), *flip]
    elif recipe == "emoji":
        # style ops run after the crop, at the output size: 4x cheaper than on a 128 px canvas,
        # and augmentation, not the network, limits the speed on CPU. No flip whatever
        # cfg.flip says: mirrored emoji are different emoji.
        ops = [
            _crop(cfg),
            RandomStyle(cfg.style_p, cfg.style_weights),
            WhitePreservingJitter(cfg.jitter, cfg.jitter_p),
            T.RandomGrayscale(p=cfg.grayscale_p),
        ]
        if cfg.blur_p > 0:
            ops.append(T.RandomApply([GaussianBlur(cfg.blur_sigma)], p=cfg.blur_p))
    elif recipe == "emoji_weak":
        ops = [_crop(cfg)]
    else:
        raise CdirError(
            f"unknown augmentation recipe {recipe!r}; choose one of {', '.join(RECIPES)}"
        )
    return T.Compose(ops + _finish(cfg))


def build_eval_transform(cfg: AugConfig) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic transform for feature extraction: resize the short side, centre-crop."""
    resize = max(cfg.size, int(round(cfg.size * cfg.eval_resize)))
    return T.Compose(
        [T.Resize(resize, antialias=True), T.CenterCrop(cfg.size), *_finish(cfg)]
    )


class MultiView:
    """Apply one transform per view; returns the list of view tensors."""

    def __init__(self, transforms: Sequence[Callable[[Image.Image], torch.Tensor]]) -> None:
        self.transforms = list(transforms)

    def __call__(self, img: Image.Image) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]


def build_multiview(views: Sequence[str], cfg: AugConfig) -> MultiView:
    """Transforms for a method's ``views`` (e.g. ``("weak", "strong")``), in that order."""
    recipes = {"strong": cfg.strong, "weak": cfg.weak}
    out = []
    for v in views:
        if v not in recipes:
            raise CdirError(
                f"the method asks for a view kind {v!r}; only 'strong' and 'weak' exist"
            )
        out.append(build_view_transform(recipes[v], cfg))
    return MultiView(out)
