"""open_clip models from `clip:` specs, shared by the image tower (`cdir embed`) and the text tower
(captions). One process loads each spec once (`load_open_clip` caches it).

Spec grammar: ``clip:ARCH/PRETRAINED`` (the scheme: `encoders.specs`; its body here).

ARCH is one of
  * an open_clip model name: ``ViT-B-32``, ``ViT-L-14``, ``RN50``, ... (``open_clip.list_models()``;
    these names never contain ``/``);
  * ``hf-hub:ORG/NAME``: an open_clip repository on the Hugging Face hub, which carries its own
    config and weights, so nothing follows NAME
    (``clip:hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K``);
  * a path to a model-config JSON (``embed_dim``, ``vision_cfg``, ``text_cfg``), registered with
    ``open_clip.add_model_config`` under its file stem: custom or tiny architectures;
  * a local folder with ``open_clip_config.json`` and weights (a hub repository copied by hand);
    nothing follows it.

PRETRAINED is one of
  * an open_clip tag of ARCH: ``openai``, ``laion2b_s34b_b79k``, ...
    (``open_clip.list_pretrained()``); taken from the Hugging Face cache, downloaded only when
    missing there and the hub is reachable;
  * a local checkpoint file (relative or absolute; may contain ``/``);
  * ``random``: random weights (seeded, so identical in every process), for tests and throughput
    benchmarks only; a warning is printed.

Where the spec splits: after a model name, at the first ``/`` (``clip:ViT-B-32/ckpt/my.pt`` is
ARCH ``ViT-B-32`` with the file ``ckpt/my.pt``); after a JSON config, right after ``.json/``
(``clip:cfg/tiny.json/random``; an absolute checkpoint gives a double slash:
``clip:/cfg/tiny.json//data/tiny.pt``).

Offline (HF_HUB_OFFLINE=1, or no route to the hub) with weights that are not cached, loading fails
at once with ModelUnavailable naming the model and how to provide it.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError, ModelUnavailable

if TYPE_CHECKING:
    from encoders.hub import ModelId, Ready
    from encoders.specs import Spec

PREFIX = "clip:"
RANDOM = "random"
RANDOM_SEED = 0
WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")

_cache: dict[str, tuple[Any, Any, Any, dict]] = {}
_lock = threading.Lock()
_registered_configs: set[str] = set()


@dataclass
class ClipSpec:
    """A parsed ``clip:`` spec. ``kind``: name | json | hf-hub | folder."""

    spec: str
    kind: str
    arch: str
    pretrained: str | None = None
    extra: dict = field(default_factory=dict)


def _known_models() -> list[str]:
    import open_clip

    return open_clip.list_models()


def parse_clip_spec(spec: str | Spec) -> ClipSpec:
    """Split the body of a ``clip:`` spec into architecture and weights (see the module
    docstring)."""
    from encoders.specs import parse_spec

    parsed = parse_spec(spec)
    if not parsed.cross_modal:
        raise CdirError(f"{parsed.text} is not a clip: spec")
    full, body = parsed.text, parsed.body.strip()
    usage = ("use clip:ARCH/PRETRAINED, e.g. clip:ViT-B-32/openai, clip:hf-hub:ORG/NAME, "
             "clip:path/to/config.json/random or clip:ViT-B-32/path/to/weights.pt")
    if not body:
        raise CdirError(f"empty clip spec {spec!r}: {usage}")
    if body.startswith("hf-hub:"):
        parts = body[len("hf-hub:"):].split("/")
        if len(parts) != 2 or not all(parts):
            raise CdirError(f"{full}: hf-hub models are clip:hf-hub:ORG/NAME (their weights come "
                            "from the repository, so nothing follows NAME)")
        return ClipSpec(full, "hf-hub", "/".join(parts))
    if ".json/" in body or body.endswith(".json"):
        cut = body.find(".json/")
        arch, pretrained = (body, None) if cut < 0 else (body[:cut + 5], body[cut + 6:] or None)
        return ClipSpec(full, "json", arch, pretrained)
    head, _, rest = body.partition("/")
    if head in _known_models():
        return ClipSpec(full, "name", head, rest or None)
    folder = Path(body).expanduser()
    if folder.is_dir():
        return ClipSpec(full, "folder", str(folder))
    raise CdirError(f"{full}: unknown open_clip architecture {head!r} (not a model name of "
                    f"open_clip.list_models(), a .json config or a local folder); {usage}")


class _DropRandomInitWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "initialized randomly" not in record.getMessage()


def _some(items: list[str], n: int = 8) -> str:
    return ", ".join(items[:n]) + (f", ... ({len(items)} in all)" if len(items) > n else "")


def _warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def _register_json(path_str: str, spec: str) -> str:
    """Register a model-config JSON with open_clip (once per process); returns its model name."""
    import open_clip

    path = Path(path_str).expanduser().resolve()
    if not path.is_file():
        raise CdirError(f"{spec}: model config {path_str} not found")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise CdirError(f"{spec}: cannot read model config {path}: {e}") from None
    missing = [k for k in ("embed_dim", "vision_cfg", "text_cfg") if k not in cfg]
    if missing:
        raise CdirError(f"{spec}: {path} is not an open_clip model config (lacks "
                        f"{', '.join(missing)})")
    if str(path) not in _registered_configs:
        open_clip.add_model_config(path)
        _registered_configs.add(str(path))
    return path.stem


def _how_to_provide(arch: str, tag: str, repo: str) -> str:
    return ("provide it: on a machine with internet run `python -c \"import open_clip; "
            f"open_clip.create_model('{arch}', pretrained='{tag}')\"` and copy the "
            f"models--{repo.replace('/', '--')} folder of its ~/.cache/huggingface/hub here "
            f"(or point HF_HOME at it), or pass a local checkpoint: clip:{arch}/PATH")


def hub_weights(hf_hub: str) -> tuple[str, str, list[str]]:
    """(repo, file or "" for the default names, candidate file names) of the ``hf_hub`` entry of
    an open_clip pretrained config: "org/repo/" means the default file names, else "org/repo/file"
    (a .bin/.pth file is looked for as .safetensors first)."""
    if hf_hub.endswith("/"):
        return hf_hub.rstrip("/"), "", list(WEIGHT_FILES)
    repo, _, filename = hf_hub.rpartition("/")
    names = [filename]
    if filename.endswith((".bin", ".pth")):
        names.insert(0, filename.rsplit(".", 1)[0] + ".safetensors")
    return repo, filename, names


def _resolve_weights(cs: ClipSpec, name: str) -> tuple[str | None, dict]:
    """(checkpoint path or None for random, create_model kwargs); fetches hub weights."""
    import open_clip

    from encoders.hub import hub_file

    tag = cs.pretrained
    if tag is None:
        tags = open_clip.list_pretrained_tags_by_model(name) if cs.kind == "name" else []
        known = f" (tags of {name}: {_some(tags)})" if tags else ""
        raise CdirError(f"{cs.spec}: no weights given; use {PREFIX}{cs.arch}/TAG{known}, "
                        f"{PREFIX}{cs.arch}/PATH-TO-CHECKPOINT or {PREFIX}{cs.arch}/{RANDOM}")
    if tag == RANDOM:
        _warn(f"{cs.spec}: random weights (seed {RANDOM_SEED}), for tests and throughput "
              "benchmarks only: its embeddings mean nothing")
        # open_clip would otherwise fetch pretrained HF text towers for configs that name one
        return None, {"pretrained_text": False}
    pcfg = open_clip.get_pretrained_cfg(name, tag) if cs.kind == "name" else {}
    if pcfg:
        kwargs: dict[str, Any] = {}
        if pcfg.get("quick_gelu"):  # e.g. the OpenAI weights were trained with QuickGELU
            kwargs["force_quick_gelu"] = True
        for key, arg in (("mean", "image_mean"), ("std", "image_std"),
                         ("interpolation", "image_interpolation"),
                         ("resize_mode", "image_resize_mode")):
            if pcfg.get(key) is not None:
                kwargs[arg] = pcfg[key]
        if pcfg.get("file"):
            return pcfg["file"], kwargs
        repo, _, names = hub_weights(pcfg["hf_hub"])
        return hub_file(repo, names, cs.spec, _how_to_provide(name, tag, repo)), kwargs
    path = Path(tag).expanduser()
    if path.is_file():
        return str(path), {}
    tags = open_clip.list_pretrained_tags_by_model(name) if cs.kind == "name" else []
    known = f"; tags of {name}: {_some(tags)}" if tags else ""
    raise CdirError(f"{cs.spec}: {tag!r} is neither an open_clip tag of {name} nor an existing "
                    f"checkpoint file{known}")


def _hub_folder(cs: ClipSpec) -> str:
    """The local snapshot folder of an hf-hub: repo (config + weights), fetched if needed."""
    from encoders.hub import hub_file

    how = (f"provide it: on a machine with internet run `python -c \"import open_clip; "
           f"open_clip.create_model('hf-hub:{cs.arch}')\"` and copy the "
           f"models--{cs.arch.replace('/', '--')} folder of its ~/.cache/huggingface/hub here "
           "(or point HF_HOME at it), or pass the downloaded folder: clip:PATH-TO-FOLDER")
    config = hub_file(cs.arch, ["open_clip_config.json"], cs.spec, how)
    weights = hub_file(cs.arch, list(WEIGHT_FILES), cs.spec, how)
    if Path(config).parent != Path(weights).parent:
        raise ModelUnavailable(f"{cs.spec}: the cached config and weights of {cs.arch} are from "
                               f"different revisions; {how}")
    return str(Path(config).parent)


def _folder_weights(folder: str) -> list[Path]:
    return sorted(p for n in ("*.safetensors", "*.bin", "*.pth") for p in Path(folder).glob(n))


def clip_identity(spec: str | Spec, hints: dict | None = None) -> ModelId:
    """What the weights of a ``clip:`` spec are, without building the model (see
    `encoders.hub.model_identity`): ``tag:TAG@<hub blob>``, ``hf-hub:<snapshot revision>``, the
    content hash of a checkpoint file, ``random-seed0``; a model-config JSON adds
    ``@cfg:<its hash>`` (the same weights file in another architecture is another model)."""
    from encoders.hub import ModelId, cached_blob_id, cached_file, file_fingerprint

    try:
        cs = parse_clip_spec(spec)
    except CdirError:
        return ModelId()
    seen: dict[str, dict] = {}
    if cs.kind == "hf-hub":
        config = cached_file(cs.arch, ["open_clip_config.json"])
        return ModelId(f"hf-hub:{Path(config).parent.name}") if config else ModelId()
    if cs.kind == "folder":
        weights = _folder_weights(cs.arch)
        if not weights:
            return ModelId()
        return ModelId(file_fingerprint(weights[0], hints, seen), seen, str(weights[0]))
    cfg = ""
    if cs.kind == "json":
        config = Path(cs.arch).expanduser()
        if not config.is_file():
            return ModelId()
        cfg = f"@cfg:{file_fingerprint(config, hints, seen)}"
    tag = cs.pretrained
    if tag is None:
        return ModelId()
    if tag == RANDOM:
        return ModelId(f"{RANDOM}-seed{RANDOM_SEED}{cfg}", seen)
    if cs.kind == "name":
        import open_clip

        pcfg = open_clip.get_pretrained_cfg(cs.arch, tag)
        if pcfg:
            if pcfg.get("file"):
                path = pcfg["file"] if Path(pcfg["file"]).is_file() else None
            else:
                repo, _, names = hub_weights(pcfg["hf_hub"])
                path = cached_file(repo, names)
            if not path:
                return ModelId()
            return ModelId(f"tag:{tag}@{cached_blob_id(path, hints, seen)}", seen, str(path))
    path = Path(tag).expanduser()
    if not path.is_file():
        return ModelId()
    return ModelId(f"{file_fingerprint(path, hints, seen)}{cfg}", seen, str(path))


def clip_ready(spec: Spec) -> Ready:
    """Preflight of a ``clip:`` spec: its weights in the local cache or a file (as
    `load_open_clip` finds them); nothing is loaded."""
    from encoders.hub import Ready, hub_ready

    try:
        cs = parse_clip_spec(spec)
    except CdirError as e:
        return Ready("missing", str(e))
    if cs.kind == "folder":
        if (Path(cs.arch) / "open_clip_config.json").is_file():
            return Ready("ok", f"local folder {cs.arch}")
        return Ready("missing", f"{cs.arch} has no open_clip_config.json")
    if cs.kind == "hf-hub":
        return hub_ready(cs.arch, [("open_clip_config.json",), WEIGHT_FILES])
    tag = cs.pretrained
    if tag is None:
        return Ready("missing", f"{spec}: no weights given (clip:ARCH/TAG or clip:ARCH/PATH)")
    if tag == RANDOM:
        return Ready("ok", "random weights (tests and throughput only)")
    import open_clip

    pcfg = open_clip.get_pretrained_cfg(cs.arch, tag) if cs.kind == "name" else {}
    if not pcfg:
        p = Path(tag).expanduser()
        if p.is_file():
            return Ready("ok", f"checkpoint file {p}")
        return Ready("missing", f"{tag!r} is neither an open_clip tag of {cs.arch} nor an "
                     "existing checkpoint file")
    if pcfg.get("file"):
        return Ready("ok", f"file {pcfg['file']}")
    if not pcfg.get("hf_hub"):
        return Ready("missing", f"open_clip has no Hugging Face copy of {cs.arch}/{tag}; "
                     "download its checkpoint and use clip:ARCH/PATH")
    repo, filename, names = hub_weights(pcfg["hf_hub"])
    return hub_ready(repo, [names], fetch=f"hf download {repo} {filename}".rstrip())


def _load_uncached(cs: ClipSpec) -> tuple[Any, Any, Any, dict]:
    import open_clip
    import torch

    kwargs: dict[str, Any] = {}
    if cs.kind in ("hf-hub", "folder"):
        folder = _hub_folder(cs) if cs.kind == "hf-hub" else cs.arch
        if not (Path(folder) / "open_clip_config.json").is_file():
            raise CdirError(f"{cs.spec}: {folder} has no open_clip_config.json")
        if not _folder_weights(folder):  # open_clip would silently build random weights
            raise ModelUnavailable(f"{cs.spec}: no weights (*.safetensors, *.bin, *.pth) in "
                                   f"{folder}")
        name, checkpoint = f"local-dir:{folder}", None
    else:
        name = _register_json(cs.arch, cs.spec) if cs.kind == "json" else cs.arch
        checkpoint, kwargs = _resolve_weights(cs, name)
    # the weights are local now: their identity is the one a later check computes
    fingerprint = clip_identity(cs.spec).id or "unknown"
    quiet = _DropRandomInitWarning() if cs.pretrained == RANDOM else None
    root = logging.getLogger()
    try:
        if quiet:  # we printed our own warning for random weights
            root.addFilter(quiet)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(RANDOM_SEED)  # random weights are the same in every process
            model, _, preprocess = open_clip.create_model_and_transforms(
                name, pretrained=checkpoint, **kwargs)
        tokenizer = open_clip.get_tokenizer(name)
    except (ModelUnavailable, CdirError):
        raise
    except Exception as e:  # noqa: BLE001 - wrong checkpoint for the arch, broken files
        lines = str(e).strip().splitlines()
        raise CdirError(f"cannot load {cs.spec}: {lines[0][:300] if lines else repr(e)}") from e
    finally:
        if quiet:
            root.removeFilter(quiet)
    model.eval()
    info = {"spec": cs.spec, "arch": name, "weights": fingerprint,
            "image_size": getattr(model.visual, "image_size", None)}
    return model, preprocess, tokenizer, info


def load_open_clip(spec: str | Spec) -> tuple[Any, Any, Any]:
    """(model, preprocess, tokenizer) of a ``clip:`` spec; loaded once per process.

    ``model`` is an open_clip CLIP in eval mode on the CPU as loaded; the object is shared by every
    caller of the same spec (image and text towers), so move it with ``.to(device)``. ``preprocess``
    is the evaluation image transform (picklable), ``tokenizer(list[str]) -> LongTensor``.
    """
    model, preprocess, tokenizer, _ = load_open_clip_info(spec)
    return model, preprocess, tokenizer


def load_open_clip_info(spec: str | Spec) -> tuple[Any, Any, Any, dict]:
    """`load_open_clip` plus a dict describing the weights (``weights``: their `clip_identity`),
    used to tell embeddings of different weights apart."""
    cs = parse_clip_spec(spec)
    with _lock:
        cached = _cache.get(cs.spec)
        # a checkpoint rewritten since it was loaded (a long-lived process) is loaded again
        if cached is None or cached[3]["weights"] != (clip_identity(cs.spec).id or "unknown"):
            _cache[cs.spec] = _load_uncached(cs)
        return _cache[cs.spec]


def clear_cache() -> None:
    with _lock:
        _cache.clear()
