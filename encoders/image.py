"""Image encoders, named by model spec strings (parsed and validated by `encoders.specs`):

    clip:ARCH/PRETRAINED     open_clip image tower (grammar in encoders/clip.py)
    ckpt:PATH[?arch=A&size=S&features=F&grid=N&layers=L]
                             a checkpoint of this project (`cdir train`, full or exported), a
                             reference MoCo/SynCo checkpoint (``state_dict`` with
                             ``module.encoder_q.*``; the MLP ``fc`` head is dropped), or a plain
                             torchvision state dict (ResNet depth inferred; any other torchvision
                             model with ``?arch=NAME``, e.g. ``?arch=convnext_tiny``).
                             ``features=head``: the momentum encoder and its projection head
                             (what UCDIR and ProtoOT evaluate; a full `cdir train` checkpoint or a
                             MoCo one with ``encoder_k``); ``features=backbone`` is the default.
                             ``grid=N``: the backbone's last map average-pooled to N x N cells
                             and flattened (N^2 times the dim), not one global vector: keeps
                             the layout of centred drawings (emoji, icons, sketches).
                             ``layers=3,4`` (with grid): the maps of those layers, each
                             L2-normalised, joined (parts and whole objects).
                             ``bn=domain``: AdaBN, each domain's images embedded with BatchNorm
                             statistics re-estimated on that domain (`encoders.adabn`; the embed
                             stage estimates and stores them, search uses the query's)
    ckpt:timm:NAME[?file=PATH]
                             a timm model with pretrained weights from PATH (default: the timm
                             weights in the local Hugging Face cache)
    pixels                   32x32 greyscale pixels minus their mean (dim 1024): the raw-pixel
                             floor every learned encoder must beat

`load_image_encoder(spec)` returns an `ImageEncoder`: ``transform(pil) -> Tensor`` is picklable (it
runs in DataLoader workers) and ``encode(batch) -> Tensor (B, dim)`` gives L2-normalised float32
rows on the CPU.

Evaluation transform of ``ckpt:`` ResNets (UCDIR protocol): Resize 256 -> CenterCrop 224 ->
ImageNet mean/std; a project checkpoint trained on small images uses the size and normalisation
recorded in its config (Resize size*256/224 -> CenterCrop size), ``?size=S`` overrides the size.
timm models use their own pretrained data config (size, crop, mean/std).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from cdir.core.device import resolve_device, resolve_dtype
from cdir.core.errors import CdirError, ModelUnavailable
from encoders.specs import parse_spec

if TYPE_CHECKING:
    from encoders.specs import Spec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PIXELS_SIZE = 32


class ImageEncoder:
    """An image model behind one interface.

    ``spec``: the spec string; ``dim``: embedding size; ``device``: where ``encode`` computes;
    ``params``: what identifies the weights beyond the spec (stored with the embeddings so vectors
    of different weights are never mixed; ``weights`` is `encoders.hub.model_identity`, which a
    reader computes without loading the model); ``transform``: PIL RGB image -> input tensor;
    ``domain_bn``: the spec asks for per-domain BatchNorm statistics (``?bn=domain``), which the
    caller estimates (`estimate_bn_stats`) and sets (`use_bn_stats`) before encoding a domain.
    """

    spec: str
    dim: int
    device: torch.device
    params: dict
    transform: Callable[[Image.Image], torch.Tensor]
    domain_bn: bool = False

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def estimate_bn_stats(self, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
        raise CdirError(f"{self.spec} has no BatchNorm statistics to estimate")

    def use_bn_stats(self, stats: dict[str, torch.Tensor]) -> None:
        raise CdirError(f"{self.spec} has no BatchNorm statistics to set")

    def encode_images(self, images: list[Image.Image]) -> np.ndarray:
        """Convenience for a few query images: transform, stack, encode → (n, dim) numpy."""
        if not images:
            return np.zeros((0, self.dim), np.float32)
        return self.encode(torch.stack([self.transform(im) for im in images])).numpy()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r}, dim={self.dim}, device={self.device})"


class TorchImageEncoder(ImageEncoder):
    """A torch module (or a function of one) mapping a batch to features; AMP on CUDA."""

    def __init__(self, spec: str, model: torch.nn.Module, dim: int,
                 transform: Callable[[Image.Image], torch.Tensor], device: torch.device,
                 forward: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 params: dict | None = None, channels_last: bool = False):
        self.spec, self.dim, self.device = spec, int(dim), device
        self.transform = transform
        self.params = dict(params or {})
        self.model = model.to(device).eval()
        self.channels_last = channels_last and device.type == "cuda"
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self._forward = forward or self.model
        # autocast on GPU only (in the half precision the GPU has); fp32 on CPU
        self.amp_dtype = resolve_dtype(device) if device.type == "cuda" else None

    def _input(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def _amp(self) -> contextlib.AbstractContextManager:
        return (torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype
                else contextlib.nullcontext())

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        x = self._input(batch)
        with torch.inference_mode(), self._amp():
            y = self._forward(x)
        y = y.float().flatten(1)
        return torch.nn.functional.normalize(y, dim=1).cpu()

    def estimate_bn_stats(self, batches: Iterable[torch.Tensor]) -> dict[str, torch.Tensor]:
        """AdaBN statistics of the model on ``batches`` (CPU tensors of ``transform``ed images),
        computed as `encode` computes (device, precision); the model keeps its own."""
        from encoders.adabn import estimate_bn_stats

        with self._amp():
            return estimate_bn_stats(self.model, (self._input(b) for b in batches),
                                     forward=self._forward)

    def use_bn_stats(self, stats: dict[str, torch.Tensor]) -> None:
        """Encode with these BN statistics from now on (as `estimate_bn_stats` returns)."""
        from encoders.adabn import set_bn_stats

        set_bn_stats(self.model, stats)


# -- pixels ----------------------------------------------------------------------------------------

class PixelsTransform:
    """PIL → 32x32 greyscale in [0, 1], flattened, minus its own mean (so brightness cancels)."""

    def __init__(self, size: int = PIXELS_SIZE):
        self.size = size

    def __call__(self, img: Image.Image) -> torch.Tensor:
        grey = img.convert("L").resize((self.size, self.size), Image.Resampling.BILINEAR)
        a = np.asarray(grey, dtype=np.float32).reshape(-1) / 255.0
        return torch.from_numpy(a - a.mean())

    def __repr__(self) -> str:
        return f"PixelsTransform(size={self.size})"


class PixelsEncoder(ImageEncoder):
    """The raw-pixel floor: no weights, the transform is the whole model (always on the CPU)."""

    def __init__(self, spec: str = "pixels"):
        self.spec, self.dim, self.device = spec, PIXELS_SIZE * PIXELS_SIZE, torch.device("cpu")
        self.params = {"size": PIXELS_SIZE}
        self.transform = PixelsTransform(PIXELS_SIZE)

    def encode(self, batch: torch.Tensor) -> torch.Tensor:
        # a flat image is all zeros after mean removal; it stays a zero vector (cosine 0 to all)
        return torch.nn.functional.normalize(batch.float().flatten(1), dim=1)


def pixels_encoder(spec: Spec, device: torch.device) -> ImageEncoder:
    return PixelsEncoder(spec.text)


# -- clip ------------------------------------------------------------------------------------------

def clip_encoder(spec: Spec, device: torch.device) -> ImageEncoder:
    from encoders.clip import load_open_clip_info

    model, preprocess, _, info = load_open_clip_info(spec)
    model = model.to(device)  # shared with the text tower of the same spec (see load_open_clip)
    size = info.get("image_size") or 224
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    with torch.inference_mode():  # the output width, whatever the tower (ViT, ResNet, timm)
        dim = int(model.encode_image(torch.zeros(1, 3, h, w, device=device)).shape[-1])
    return TorchImageEncoder(info["spec"], model, dim, preprocess, device,
                             forward=model.encode_image, params={"weights": info["weights"]})


# -- ckpt ------------------------------------------------------------------------------------------

def eval_transform(size: int = 224, resize_ratio: float = 256 / 224,
                   mean: tuple = IMAGENET_MEAN, std: tuple = IMAGENET_STD):
    """Resize (short side size*ratio) -> CenterCrop(size) -> tensor -> normalise (picklable)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(int(round(size * resize_ratio)), interpolation=T.InterpolationMode.BILINEAR),
        T.CenterCrop(size),
        T.ToTensor(),
        T.Normalize(list(mean), list(std)),
    ])


class BatchFinish:
    """What ends a torchvision transform (ToTensor, then Normalize or nothing), on a whole batch
    of (B, H, W, C) uint8 images at once: to channel order, float, normalised. The same float
    operations element for element, so the same numbers as per image (picklable)."""

    def __init__(self, mean: list[float] | None = None, std: list[float] | None = None):
        self.mean, self.std = mean, std

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        x = batch.permute(0, 3, 1, 2).to(torch.get_default_dtype(),
                                          memory_format=torch.contiguous_format).div_(255)
        if self.mean is not None:  # Normalize
            c = (-1, 1, 1)
            x.sub_(torch.as_tensor(self.mean, dtype=x.dtype, device=x.device).view(c))
            x.div_(torch.as_tensor(self.std, dtype=x.dtype, device=x.device).view(c))
        return x


class _PilToHwc:
    """An 8-bit PIL image as an (H, W, C) uint8 tensor: ToTensor without its per-image copy into
    channel order and its float conversion (`BatchFinish` does both for the whole batch)."""

    def __call__(self, img: Image.Image) -> torch.Tensor:
        a = np.array(img)
        if a.dtype != np.uint8:
            raise CdirError(f"an 8-bit image was expected, got mode {img.mode}")
        return torch.from_numpy(a[:, :, None] if a.ndim == 2 else a)


class _CropIfNeeded:
    """A torchvision CenterCrop that passes an image of the crop size through as it is (the
    crop would copy it whole)."""

    def __init__(self, crop: Any):
        self.crop = crop

    def __call__(self, img: Image.Image) -> Image.Image:
        h, w = self.crop.size
        return img if img.size == (w, h) else self.crop(img)


def split_transform(
    transform: Callable[[Image.Image], torch.Tensor],
) -> tuple[Callable[[Image.Image], torch.Tensor], BatchFinish | None]:
    """(per image, per batch): a torchvision Compose that ends in ToTensor (and Normalize) is
    cut before them. The per-image part then yields the image's (H, W, C) uint8 tensor (a
    quarter of the bytes a loader process hands over) and `BatchFinish` does on the stacked
    batch what ToTensor and Normalize did per image, as one vectorised operation. Any other
    transform runs whole per image (no batch part)."""
    from torchvision import transforms as T

    steps = list(getattr(transform, "transforms", None) or [])
    norm = steps.pop() if steps and type(steps[-1]) is T.Normalize else None
    if not steps or not isinstance(steps[-1], T.ToTensor) or (norm is not None and norm.inplace):
        return transform, None
    steps[-1] = _PilToHwc()
    steps = [_CropIfNeeded(t) if type(t) is T.CenterCrop else t for t in steps]
    finish = (BatchFinish() if norm is None else
              BatchFinish([float(m) for m in norm.mean], [float(v) for v in norm.std]))
    return T.Compose(steps), finish


def _torch_load(path: Path, spec: str) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - legacy (non-zip) files cannot be memory-mapped
        pass
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        from cdir.core.errors import unreadable

        raise CdirError(f"{spec}: {unreadable(path, e)}") from None


def _tensor_dicts(obj: Any) -> list[tuple[str, dict]]:
    """Candidate state dicts in a checkpoint: the top level and common containers."""
    out = []
    if isinstance(obj, dict):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            out.append(("", obj))
        for key in ("encoder", "state_dict", "model", "module", "teacher", "student"):
            v = obj.get(key)
            if isinstance(v, dict) and v and all(isinstance(t, torch.Tensor) for t in v.values()):
                out.append((key, v))
    return out


def _describe_keys(ckpt: Any) -> str:
    if not isinstance(ckpt, dict):
        return f"a {type(ckpt).__name__}, not a dict"
    parts = []
    for name, sd in _tensor_dicts(ckpt)[:1]:
        keys = list(sd)
        where = f"{name!r} holds" if name else "tensors:"
        parts.append(f"{where} {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''} "
                     f"({len(keys)} keys)")
    if not parts:
        keys = list(ckpt)
        parts.append(f"top-level keys: {', '.join(map(str, keys[:12]))}"
                     f"{' ...' if len(keys) > 12 else ''}")
    return "; ".join(parts)


def _strip_head(model: torch.nn.Module) -> tuple[str, int]:
    """Replace the classifier by Identity; returns (its attribute path, feature dim).

    ResNet-style ``fc`` goes whole (MoCo's ``fc`` is an MLP projection head, also not part of the
    encoder); otherwise the last Linear layer (convnext/efficientnet ``classifier.N``, ViT
    ``heads.head``), keeping any norm/flatten before it."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    if not linears:
        raise CdirError(f"{type(model).__name__} has no Linear classifier to remove")
    if isinstance(getattr(model, "fc", None), torch.nn.Module):
        first = next(m for n, m in linears if n == "fc" or n.startswith("fc."))
        name, dim = "fc", first.in_features
    else:
        name, last = linears[-1]
        dim = last.in_features
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, torch.nn.Identity())
    return name, dim


def _torchvision_encoder(path: Path, arch: str, spec: str) -> tuple[torch.nn.Module, int]:
    """Any torchvision classification model from a plain (or prefixed) state dict."""
    import torchvision

    from encoders.engine.checkpoint import REFERENCE_PREFIXES

    names = torchvision.models.list_models(module=torchvision.models)
    if arch not in names:
        raise CdirError(f"{spec}: unknown torchvision architecture {arch!r} "
                        "(see torchvision.models.list_models())")
    model = torchvision.models.get_model(arch, weights=None)
    head, dim = _strip_head(model)
    want = set(model.state_dict())
    ckpt = _torch_load(path, spec)
    best: dict = {}
    # the state dict may sit in a container and under a prefix (DataParallel, MoCo encoder_q)
    for _, sd in _tensor_dicts(ckpt):
        for prefix in REFERENCE_PREFIXES:
            sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
            if len(set(sub) & want) > len(set(best) & want):
                best = sub
    if not best:
        raise CdirError(f"{spec}: no {arch} weights in {path}; found {_describe_keys(ckpt)}")
    sd = {k: v.float() if v.is_floating_point() else v for k, v in best.items()
          if not (k == head or k.startswith(head + "."))}
    missing, unexpected = sorted(want - set(sd)), sorted(set(sd) - want)
    if missing or unexpected:
        raise CdirError(f"{spec}: weights do not fit {arch}: missing {missing[:5]} "
                        f"({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)})")
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:  # same keys, other shapes (e.g. another width)
        raise CdirError(f"{spec}: weights do not fit {arch}: "
                        f"{str(e).strip().splitlines()[-1].strip()[:300]}") from None
    return model, dim


def timm_encoder(spec: Spec, device: torch.device) -> ImageEncoder:
    import timm
    from timm.data import create_transform, resolve_model_data_config

    from encoders.hub import hub_file, model_identity, timm_weights

    name = spec.body
    if not name or not timm.is_model(name):
        raise CdirError(f"{spec.text}: unknown timm model {name!r} (see timm.list_models())")
    path = spec.file
    if path is not None:
        if not path.is_file():
            raise CdirError(f"{spec.text}: no such weights file {path}")
    else:
        weights = timm_weights(name)
        if weights is None:
            raise ModelUnavailable(f"{spec.text}: timm knows no downloadable weights for "
                                   f"{name}; pass a local file: ckpt:timm:{name}?file=PATH")
        how = (f"provide it: download {weights[0]} on a machine with internet "
               f"(`python -c \"import timm; timm.create_model('{name}', pretrained=True)\"`) and "
               "copy its ~/.cache/huggingface/hub folder here, or pass "
               f"ckpt:timm:{name}?file=PATH")
        path = Path(hub_file(*weights, spec.text, how))
    try:
        model = timm.create_model(name, pretrained=True, num_classes=0,
                                  pretrained_cfg_overlay={"file": str(path)})
    except Exception as e:  # noqa: BLE001 - wrong file for the model
        lines = str(e).strip().splitlines()
        raise CdirError(f"{spec.text}: cannot load {path} into timm {name}: "
                        f"{lines[0][:300] if lines else e.__class__.__name__}") from None
    transform = create_transform(**resolve_model_data_config(model), is_training=False)
    return TorchImageEncoder(spec.text, model, int(model.num_features), transform, device,
                             params={"weights": model_identity(spec.text).id},
                             channels_last=True)


def ckpt_encoder(spec: Spec, device: torch.device) -> ImageEncoder:
    """``ckpt:PATH[?options]`` (the options and their combinations are checked by the
    grammar, `encoders.specs`)."""
    from encoders.hub import model_identity

    s, body = spec.text, spec.body
    features = spec.option("features") or "backbone"
    if not body:
        raise CdirError(f"{s}: give a checkpoint path, e.g. ckpt:runs/synco/encoder.pt")
    path = spec.checkpoint
    if not path.is_file():
        raise CdirError(f"{s}: no such checkpoint file {path}")
    size = int(spec.option("size")) if spec.has("size") else None
    if spec.option("arch"):
        model, dim = _torchvision_encoder(path, spec.option("arch"), s)
        transform = eval_transform(size or 224)
    elif features == "head":
        from encoders.engine.checkpoint import encoder_preprocess
        from encoders.ssl.momentum import load_momentum_head

        try:
            model, dim = load_momentum_head(path)
        except CdirError as e:
            raise CdirError(f"{s}: {str(e).removeprefix(f'{path}: ')}") from None
        pp = encoder_preprocess(path)
        transform = eval_transform(size or pp["size"], pp["eval_resize"], tuple(pp["mean"]),
                                   tuple(pp["std"]))
        size = size or pp["size"]
    else:
        from encoders.engine.checkpoint import encoder_preprocess, load_encoder

        try:
            model, dim = load_encoder(path)
            pp = encoder_preprocess(path)
        except CdirError as e:
            found = _describe_keys(_torch_load(path, s))
            why = str(e).removeprefix(f"{path}: ")
            raise CdirError(f"{s}: {why}; found {found}. A torchvision model other than a "
                            f"ResNet needs ckpt:{body}?arch=NAME; timm weights: "
                            f"ckpt:timm:NAME?file={body}") from None
        transform = eval_transform(size or pp["size"], pp["eval_resize"], tuple(pp["mean"]),
                                   tuple(pp["std"]))
        size = size or pp["size"]
    if spec.option("grid"):
        model, dim = _grid_pooled(s, model, int(spec.option("grid")),
                                  spec.option("layers") or "4")
    enc = TorchImageEncoder(s, model, dim, transform, device, channels_last=True,
                            params={"weights": model_identity(s).id, "size": size or 224})
    if spec.has("bn"):
        from encoders.adabn import bn_layers

        if not bn_layers(model):
            raise CdirError(f"{s}: bn=domain needs a model with BatchNorm layers")
        enc.domain_bn = True
    return enc


def _grid_pooled(spec: str, model: torch.nn.Module, cells: int, layers: str
                 ) -> tuple[torch.nn.Module, int]:
    """``?grid=N[&layers=3,4]``: the backbone's last map (or the maps of ``layers``) pooled to
    N x N cells instead of one vector."""
    from encoders.zoo.backbones import GridPooled, ResNetTrunk

    if not isinstance(model, ResNetTrunk):
        raise CdirError(f"{spec}: grid=N needs the backbone of a ResNet checkpoint of this "
                        "project or MoCo/SynCo (not features=head or ?arch=)")
    pooled = GridPooled(model, cells, tuple(int(k) for k in layers.split(",")))
    return pooled.eval(), pooled.out_dim


# -- registry --------------------------------------------------------------------------------------

def load_image_encoder(spec: str, device: str | torch.device | None = None) -> ImageEncoder:
    """Build the image encoder named by ``spec`` on ``device`` (default: CUDA when available).

    Raises CdirError for an unknown scheme or a bad spec, ModelUnavailable for weights that are
    neither cached nor downloadable (naming the model and how to provide it)."""
    parsed = parse_spec(spec, role="image")
    return parsed.info.image(parsed, resolve_device(device))
