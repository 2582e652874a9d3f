"""The one model-spec grammar: ``SCHEME:BODY[?NAME=VALUE&...]`` names every model of cdir.

    pixels                          the raw-pixel baseline (no body, no options)
    clip:ARCH/PRETRAINED            open_clip, both towers (ARCH/PRETRAINED: `encoders.clip`)
    ckpt:PATH[?arch=&size=&features=&grid=&layers=&bn=]
                                    a checkpoint of this project, MoCo/SynCo or torchvision
                                    (the options: `encoders.image`)
    ckpt:timm:NAME[?file=PATH]      a timm model
    st:ID-OR-FOLDER                 a sentence-transformers text encoder
    hf:ID-OR-FOLDER                 a transformers captioner (``hf:`` may be left out there)

`parse_spec` splits and validates a spec (each scheme declares its options; a wrong one is refused
in one line naming the valid ones) and returns a `Spec`; `SCHEMES` is the one table that
dispatches on the scheme: image and text loaders, the identity of the weights (the cache key of
everything computed from them) and the preflight check. Its callables import their modules on
first use, so this module stays free of torch (``cdir --help`` stays fast).

A caption spec (``<text encoder spec>@captions:<source>``, `cdir.core.workspace.caption_spec`)
wraps a text-encoder spec: split it off first.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote

from cdir.core.errors import CdirError

# the project's root (the folder of the `encoders` package, where encoders/weights/ lives)
PROJECT_ROOT = Path(__file__).resolve().parents[1]


def local_file(text: str) -> Path:
    """A file path written in a spec: as given, from the current folder; a relative path that is
    not there but is under the project root (the shipped weights) is taken from there, so the
    README's ``ckpt:encoders/weights/...`` specs work from any folder."""
    path = Path(text).expanduser()
    if not path.is_absolute() and not path.exists() and (PROJECT_ROOT / path).exists():
        return PROJECT_ROOT / path
    return path


def _lazy(target: str) -> Callable[..., Any]:
    """``module:function``, imported on the first call (the loaders import torch)."""
    module, _, name = target.partition(":")

    def call(*args: Any, **kwargs: Any) -> Any:
        return getattr(importlib.import_module(module), name)(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    call.__doc__ = f"{target}, imported on first use"
    return call


@dataclass(frozen=True)
class Scheme:
    """One scheme of model spec. ``help``: its usage line (printed in errors and help);
    ``options``: the ``?NAME=`` it takes; ``misplaced``: options of other schemes that users put
    here, with why they do not apply; ``check``: validates option values and combinations.
    ``image(spec, device)`` / ``text(spec, device)`` / ``captioner(spec, **settings)``: its
    loaders (None: not that kind of model); ``identity(spec, hints) -> ModelId``: what its
    weights are, without loading them; ``preflight(spec) -> Ready``: is it here (nothing loaded
    or downloaded)."""

    help: str
    identity: Callable[..., Any]
    preflight: Callable[..., Any]
    options: tuple[str, ...] = ()
    misplaced: dict[str, str] = field(default_factory=dict)
    check: Callable[[Spec], None] | None = None
    image: Callable[..., Any] | None = None
    text: Callable[..., Any] | None = None
    captioner: Callable[..., Any] | None = None
    word: bool = False  # the whole spec is the scheme's name (pixels): no body

    @property
    def cross_modal(self) -> bool:
        """Both towers in one space (CLIP): its text queries meet its image vectors."""
        return self.image is not None and self.text is not None


def _check_ckpt(spec: Spec) -> None:
    """The option values and combinations a ``ckpt:`` checkpoint takes."""
    s, features, arch = spec.text, spec.option("features") or "backbone", spec.option("arch")
    if spec.has("bn") and spec.option("bn") != "domain":
        raise CdirError(f"{s}: bn takes only the value domain (per-domain BatchNorm "
                        f"statistics), got {spec.option('bn')!r}")
    if spec.has("bn") and (features == "head" or arch):
        raise CdirError(f"{s}: bn=domain needs the backbone of a ResNet checkpoint of this "
                        "project or MoCo/SynCo (not features=head or ?arch=)")
    if features not in ("backbone", "head"):
        raise CdirError(f"{s}: features must be backbone or head, got {features!r}")
    if features == "head" and arch:
        raise CdirError(f"{s}: features=head needs a checkpoint of `cdir train` or MoCo, "
                        "not a torchvision state dict (?arch=)")
    if spec.option("grid") and (features == "head" or arch):
        raise CdirError(f"{s}: grid=N needs the backbone of a ResNet checkpoint of this "
                        "project or MoCo/SynCo (not features=head or ?arch=)")
    if spec.option("size") is not None:
        try:
            size = int(spec.option("size") or "")
        except ValueError:
            size = 0
        if size <= 0:
            raise CdirError(f"{s}: size must be a positive integer, got {spec.option('size')!r}")
    if spec.option("layers") and not spec.option("grid"):
        raise CdirError(f"{s}: layers=3,4 goes with grid=N (grid=1: one vector per layer)")
    grid = spec.option("grid")
    if grid:
        if not (grid.isdigit() and int(grid) >= 1):
            raise CdirError(f"{s}: grid must be a positive integer (cells per side), "
                            f"got {grid!r}")
        layers = spec.option("layers") or "4"
        if not all(k.strip() in ("1", "2", "3", "4") for k in layers.split(",")):
            raise CdirError(f"{s}: layers must list ResNet layers 1-4, e.g. layers=3,4; "
                            f"got {layers!r}")


_NOT_TIMM = "needs a ResNet checkpoint of this project or MoCo/SynCo, not a timm model"

SCHEMES = {
    "pixels": Scheme(
        help="pixels (raw-pixel baseline)", word=True,
        image=_lazy("encoders.image:pixels_encoder"), identity=_lazy("encoders.hub:no_identity"),
        preflight=_lazy("encoders.hub:builtin_ready")),
    "clip": Scheme(
        help="clip:ARCH/PRETRAINED (open_clip, e.g. clip:ViT-B-32/openai)",
        image=_lazy("encoders.image:clip_encoder"), text=_lazy("encoders.text:ClipTextEncoder"),
        identity=_lazy("encoders.clip:clip_identity"),
        preflight=_lazy("encoders.clip:clip_ready")),
    "ckpt:timm": Scheme(
        help="ckpt:timm:NAME[?file=PATH] (timm, by default its weights in the Hugging Face cache)",
        options=("file",),
        misplaced={"bn": f"bn=domain {_NOT_TIMM}", "grid": f"grid=N {_NOT_TIMM}",
                   "layers": f"layers=3,4 {_NOT_TIMM}"},
        image=_lazy("encoders.image:timm_encoder"), identity=_lazy("encoders.hub:timm_identity"),
        preflight=_lazy("encoders.hub:timm_ready")),
    "ckpt": Scheme(
        help="ckpt:PATH[?arch=&size=&features=&grid=&layers=&bn=] (a checkpoint of `cdir "
             "train`, MoCo/SynCo or torchvision)",
        options=("arch", "size", "features", "grid", "layers", "bn"), check=_check_ckpt,
        image=_lazy("encoders.image:ckpt_encoder"), identity=_lazy("encoders.hub:ckpt_identity"),
        preflight=_lazy("encoders.hub:ckpt_ready")),
    "st": Scheme(
        help="st:ID-OR-PATH (sentence-transformers text encoder)",
        text=_lazy("encoders.text:SentenceTransformerEncoder"),
        identity=_lazy("encoders.hub:st_identity"), preflight=_lazy("encoders.hub:st_ready")),
    "hf": Scheme(
        help="hf:ID-OR-FOLDER (transformers captioner)",
        captioner=_lazy("encoders.captioners:load_captioner"),
        identity=_lazy("encoders.hub:no_identity"),
        preflight=_lazy("encoders.hub:captioner_ready")),
}
# the longest prefix first: ckpt:timm: before ckpt:
_PREFIXES = sorted(((k if s.word else k + ":", k) for k, s in SCHEMES.items()),
                   key=lambda p: -len(p[0]))
# a scheme-like word before the first colon (not a Windows drive letter such as C:)
_SCHEME_WORD = re.compile(r"[A-Za-z][A-Za-z0-9+.-]+")


@dataclass(frozen=True)
class Spec:
    """A parsed model spec. ``options``: (name, value) pairs in the written order; ``text``: the
    spec as written (stripped), which names the model in messages and keys its embeddings.
    ``str(spec)`` is the canonical text (the same for every spec written canonically)."""

    scheme: str
    body: str
    options: tuple[tuple[str, str], ...] = ()
    text: str = field(default="", compare=False, repr=False)

    def __post_init__(self) -> None:
        if not self.text:  # built by hand, not parsed: written canonically
            object.__setattr__(self, "text", str(self))

    def __str__(self) -> str:
        head = self.scheme if SCHEMES[self.scheme].word else f"{self.scheme}:{self.body}"
        if not self.options:
            return head
        return head + "?" + "&".join(f"{k}={quote(v, safe='/,:@~')}" for k, v in self.options)

    @property
    def info(self) -> Scheme:
        """The scheme's entry of `SCHEMES`."""
        return SCHEMES[self.scheme]

    def has(self, name: str) -> bool:
        return any(k == name for k, _ in self.options)

    def option(self, name: str, default: str | None = None) -> str | None:
        """The value of ``?name=`` (the last one when given twice), else ``default``."""
        return next((v for k, v in reversed(self.options) if k == name), default)

    @property
    def checkpoint(self) -> Path | None:
        """The checkpoint file of a ``ckpt:PATH`` spec; None for any other scheme."""
        return local_file(self.body) if self.scheme == "ckpt" else None

    @property
    def file(self) -> Path | None:
        """The local weights file the spec names: the checkpoint of ``ckpt:``, the ``?file=``
        of ``ckpt:timm:``; None when it names none (hub models, folders, pixels)."""
        if self.scheme == "ckpt:timm":
            file = self.option("file")
            return local_file(file) if file else None
        return self.checkpoint

    @property
    def cross_modal(self) -> bool:
        """Both towers in one space (CLIP): its text queries meet its image vectors."""
        return self.info.cross_modal


@dataclass(frozen=True)
class Role:
    """What a model can be. ``noun``: its name in messages; ``default``: the scheme of a spec
    of this role written without one."""

    noun: str
    default: str | None = None


# the Scheme field holding a role's loader -> the role (``hf:`` is optional for a captioner)
ROLES = {"image": Role("image encoder"), "text": Role("text encoder"),
         "captioner": Role("captioner", default="hf")}


def _a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def parse_spec(text: str | Spec, default: str | None = None, role: str | None = None) -> Spec:
    """Split and validate a model spec. ``role`` (a key of `ROLES`): refuse a spec that names
    another kind of model; ``default``: the scheme of a spec written without one (``ckpt``
    where a bare checkpoint path is accepted; else the role's). Raises CdirError (one line) for
    an unknown scheme, a spec of another role, or an unknown, misplaced or bad option. A `Spec`
    is taken as its text (its role checked)."""
    text = (text.text if isinstance(text, Spec) else text).strip()
    noun = ROLES[role].noun if role else "model spec"
    default = default or (ROLES[role].default if role else None)
    scheme = next((k for prefix, k in _PREFIXES
                   if text.startswith(prefix) and (not SCHEMES[k].word or text == prefix
                                                   or text.startswith(prefix + "?"))), None)
    rest = text[len(scheme) + (0 if SCHEMES[scheme].word else 1):] if scheme else text
    if scheme is None:
        head = text.split("/", 1)[0].partition(":")
        if default is None or (head[1] and _SCHEME_WORD.fullmatch(head[0])):
            raise CdirError(f"unknown {noun} {text!r}; known: {usage(role)}")
        scheme, rest = default, text
    if role and getattr(SCHEMES[scheme], role) is None:
        served = " and ".join(_a(ROLES[r].noun) for r in ROLES if getattr(SCHEMES[scheme], r))
        raise CdirError(f"{text!r} is not {_a(noun)} spec ({scheme}: names {served}); "
                        f"known: {usage(role)}")
    body, query = rest, ""
    if "?" in rest:
        body, _, query = rest.rpartition("?")
    options = tuple(parse_qsl(query, keep_blank_values=True))
    spec = Spec(scheme, body, options, text)
    _check_options(spec)
    return spec


def _check_options(spec: Spec) -> None:
    scheme = spec.info
    allowed = ", ".join(scheme.options) or f"none ({spec.scheme}: takes no ?options)"
    names = [k for k, _ in spec.options]
    misplaced = [k for k in names if k not in scheme.options and k in scheme.misplaced]
    if misplaced:
        raise CdirError(f"{spec.text}: {scheme.misplaced[misplaced[0]]}; allowed: {allowed}")
    unknown = sorted(set(names) - set(scheme.options))
    if unknown:
        raise CdirError(f"{spec.text}: unknown option(s) {', '.join(unknown)}; "
                        f"allowed: {allowed}")
    if scheme.check is not None:
        scheme.check(spec)


def usage(role: str | None = None) -> str:
    """The usage lines of every scheme (of ``role``, a key of `ROLES`): what a spec can be."""
    return "; ".join(s.help for s in SCHEMES.values() if role is None or getattr(s, role))


def plain_checkpoint(text: str, refusal: str) -> Path:
    """The file of a checkpoint given as ``ckpt:PATH`` or a bare ``PATH``, without options (the
    trainers and probes that read a checkpoint of this project); CdirError(``refusal``) for
    any other spec."""
    try:
        spec = parse_spec(text, default="ckpt")
    except CdirError:
        raise CdirError(refusal) from None
    if spec.checkpoint is None or spec.options:
        raise CdirError(refusal)
    return spec.checkpoint
