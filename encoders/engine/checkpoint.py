"""Checkpoints of self-supervised runs, encoder export, and loading an encoder for retrieval.

Training checkpoint (``latest.pt``, ``checkpoint_XXXX.pt``; one schema for every method)::

    {"version": 1, "method": "synco", "config": {...resolved run config...},
     "encoder_arch": {"name": "resnet50", "kwargs": {...}}, "encoder_prefix": "encoder_q.",
     "model": method.state_dict(),             # includes the queue buffers
     "optimizer": ..., "scheduler": ..., "scaler": ... | None,
     "epoch": epochs completed (the next epoch to run), "step": optimizer steps done,
     "rng": {"python", "numpy", "torch", "cuda", "ranks": [per-rank states under DDP]},
     "meta": {"git_sha", "torch", "world_size", "time", ...}}

Exported encoder (small; what ``ckpt:<path>`` loads for retrieval)::

    {"version": 1, "method": ..., "config": ..., "encoder_arch": ...,
     "encoder": backbone state_dict, "epoch": ...}

Everything in these files loads with ``torch.load(weights_only=True)``: RNG states are stored as
tensors and plain Python values, not pickled objects.

:func:`load_encoder` also takes reference MoCo/SynCo checkpoints (``{"state_dict":
{"module.encoder_q.*"}, "arch"}``), ISD checkpoints (``encoder_q.module.*``) and plain torchvision
ResNet state dicts; projection heads (``fc.*``) are dropped and every other key must match.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cdir.core.dist import all_gather_object, rank_world
from cdir.core.errors import CdirError, unreadable
from cdir.core.io import atomic_path

SCHEMA_VERSION = 1

# Prefixes under which reference checkpoints keep the query encoder / student backbone.
REFERENCE_PREFIXES = ("module.encoder_q.", "encoder_q.module.", "encoder_q.", "module.", "")


# --- RNG state ----------------------------------------------------------------------------------


def rng_state() -> dict[str, Any]:
    """The state of every generator the run draws from, as weights-only-loadable values."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": [version, torch.tensor(mt, dtype=torch.int64), gauss],
        "numpy": [
            np_state[0],
            torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
            int(np_state[2]),
            int(np_state[3]),
            float(np_state[4]),
        ],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA states only where the devices exist)."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(v) for v in mt.tolist()), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def run_rng_state() -> dict[str, Any]:
    """:func:`rng_state` of this process, plus every rank's under DDP (``"ranks"``). A collective
    when there is a process group: every rank must call it."""
    state = rng_state()
    if rank_world()[1] > 1:
        state = {**state, "ranks": all_gather_object(state)}
    return state


def restore_run_rng_state(state: dict[str, Any]) -> None:
    """Restore :func:`run_rng_state`'s capture: each rank its own draws when the number of
    processes is unchanged; otherwise the same data order but other augmentation draws."""
    rank, world = rank_world()
    ranks = state.get("ranks")
    if world > 1:
        if ranks and len(ranks) == world:
            set_rng_state(ranks[rank])
            return
        print(
            "warning: resumed with a different number of processes; the data order is the same "
            "but augmentation draws are not",
            file=sys.stderr,
        )
        return
    if ranks and len(ranks) != 1:
        print("warning: resumed a multi-process run in one process; augmentation draws differ",
              file=sys.stderr)
    set_rng_state(state)


# --- save / load --------------------------------------------------------------------------------


def save_checkpoint(path: str | os.PathLike, ckpt: dict[str, Any]) -> Path:
    """Write ``ckpt`` atomically (a temporary file renamed into place)."""
    path = Path(path)
    with atomic_path(path) as tmp:
        torch.save(ckpt, tmp)
    return path


def read_file(path: Path, map_location: str | torch.device = "cpu") -> Any:
    """Any checkpoint file, loaded weights-only (ISD's argparse options allowed); CdirError in
    one line for a file that is missing or unreadable."""
    if not path.is_file():
        raise CdirError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - retry below, then explain
        first = e
    # ISD checkpoints keep their argparse options (``opt``): allow that one class, nothing else.
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # noqa: BLE001
        raise unreadable(path, first) from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Load a training checkpoint written by this project; checks the schema version."""
    path = Path(path)
    ckpt = read_file(path, map_location)
    if not isinstance(ckpt, dict) or "model" not in ckpt or "version" not in ckpt:
        raise CdirError(
            f"{path} is not a training checkpoint of this project (no 'model'/'version'); "
            "to resume you need latest.pt or checkpoint_XXXX.pt from `cdir train`"
        )
    if ckpt["version"] != SCHEMA_VERSION:
        raise CdirError(
            f"{path}: checkpoint schema version {ckpt['version']} is not supported "
            f"(this cdir reads version {SCHEMA_VERSION})"
        )
    return ckpt


def encoder_state_dict(ckpt: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The backbone weights of a project checkpoint (full or exported)."""
    if "encoder" in ckpt:
        return dict(ckpt["encoder"])
    prefix = ckpt["encoder_prefix"]
    sd = {k[len(prefix):]: v for k, v in ckpt["model"].items() if k.startswith(prefix)}
    if not sd:
        raise CdirError(f"no weights under encoder prefix {prefix!r} in the checkpoint")
    return sd


def export_encoder(
    ckpt_path: str | os.PathLike | dict[str, Any], out_path: str | os.PathLike,
    half: bool = False, extra: dict[str, Any] | None = None,
) -> Path:
    """Write the small encoder-only file of a training checkpoint (a path, or the checkpoint's
    dict); ``half`` stores fp16; ``extra``: more top-level entries (plain data)."""
    ckpt = ckpt_path if isinstance(ckpt_path, dict) else read_file(Path(ckpt_path))
    if not isinstance(ckpt, dict) or "encoder_arch" not in ckpt:
        raise CdirError(f"{ckpt_path} is not a checkpoint written by `cdir train`")
    sd = encoder_state_dict(ckpt)
    if half:
        sd = {k: v.half() if v.is_floating_point() else v for k, v in sd.items()}
    out = {
        "version": SCHEMA_VERSION,
        "method": ckpt.get("method"),
        "config": ckpt.get("config", {}),
        "encoder_arch": ckpt["encoder_arch"],
        "encoder": {k: v.detach().cpu().contiguous().clone() for k, v in sd.items()},
        "epoch": ckpt.get("epoch"),
        **(extra or {}),
    }
    return save_checkpoint(out_path, out)


# --- loading an encoder for retrieval / evaluation ----------------------------------------------


def _infer_arch(sd: dict[str, torch.Tensor]) -> str:
    """torchvision ResNet depth from the block counts of a state dict."""
    blocks = []
    for layer in range(1, 5):
        idx = {int(k.split(".")[1]) for k in sd if k.startswith(f"layer{layer}.")}
        blocks.append(len(idx))
    bottleneck = any(k.endswith("conv3.weight") for k in sd)
    depths = {
        (False, (2, 2, 2, 2)): "resnet18",
        (False, (3, 4, 6, 3)): "resnet34",
        (True, (3, 4, 6, 3)): "resnet50",
        (True, (3, 4, 23, 3)): "resnet101",
        (True, (3, 8, 36, 3)): "resnet152",
    }
    arch = depths.get((bottleneck, tuple(blocks)))
    if arch is None:
        raise CdirError(f"cannot tell the ResNet depth of this checkpoint (blocks {blocks})")
    return arch


def reference_encoder(ckpt: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Backbone weights and arch of a reference MoCo/SynCo/ISD checkpoint or a plain state dict."""
    sd = ckpt.get("state_dict", ckpt.get("model", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not sd or not all(
        isinstance(v, torch.Tensor) for v in sd.values()
    ):
        raise CdirError(f"{path}: not a checkpoint this project can read (no tensor state dict)")
    for prefix in REFERENCE_PREFIXES:
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if "conv1.weight" in sub:
            break
    else:
        raise CdirError(
            f"{path}: no ResNet encoder found (looked for conv1.weight under "
            f"{', '.join(repr(p) for p in REFERENCE_PREFIXES if p)})"
        )
    # the projection head (MoCo's MLP fc, ISD-plus projection) is not part of the encoder
    sub = {k: v for k, v in sub.items() if not k.startswith("fc.")}
    arch = ckpt.get("arch") if isinstance(ckpt, dict) else None
    name = arch if isinstance(arch, str) and arch.startswith("resnet") else _infer_arch(sub)
    kwargs: dict[str, Any] = {}
    if sub["conv1.weight"].shape[-1] == 3:  # 3x3 stem: CIFAR (stride 1) vs small: undecidable
        name = "cifar_" + name
    width = sub["conv1.weight"].shape[0] / 64  # stem width is 64 x width for every ResNet
    if abs(width - 1.0) > 1e-6:
        kwargs["width"] = width
    return sub, {"name": name, "kwargs": kwargs}


def load_encoder(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[nn.Module, int]:
    """Build the backbone of a checkpoint and load its weights; returns ``(module, feature_dim)``.

    Accepts project checkpoints (full or exported) and reference MoCo/SynCo/ISD checkpoints.
    The module is in eval mode, float32, on ``map_location``. Missing or unexpected keys raise
    CdirError naming them (never a silent partial load)."""
    from encoders.zoo.backbones import build_backbone
    from encoders.zoo.files import PooledFeatures, is_zoo_file, load_zoo_model

    path = Path(path)
    ckpt = read_file(path, map_location)
    if is_zoo_file(ckpt):  # a distillation student or teacher: its pooled features
        feats = PooledFeatures(load_zoo_model(ckpt, path))
        return feats.to(map_location).eval(), feats.out_dim
    if isinstance(ckpt, dict) and "encoder_arch" in ckpt:
        sd = encoder_state_dict(ckpt)
        arch = ckpt["encoder_arch"]
    else:
        sd, arch = reference_encoder(ckpt, path)
    model, dim = build_backbone(arch["name"], **arch.get("kwargs", {}))
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    result = model.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CdirError(
            f"{path}: weights do not fit {arch['name']}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}"
        )
    return model.to(map_location).eval(), dim


def load_init(method: nn.Module, path: str | os.PathLike) -> None:
    """Start ``method`` (an SSL or adapt method) from the backbone weights of an encoder file:
    its online backbone and, when it has one, its momentum backbone. The architecture must fit
    exactly (CdirError naming the keys otherwise)."""
    src, _ = load_encoder(path)
    sd = src.state_dict()
    for prefix in (method.encoder_prefix, getattr(method, "momentum_prefix", None)):
        name = (prefix or "").rstrip(".")
        if name and hasattr(method, name):
            load_strict(method.get_submodule(name), sd, Path(path), "the model's backbone")


def load_strict(module: nn.Module, sd: dict[str, torch.Tensor], path: Path, what: str) -> None:
    """Load ``sd`` (as float32) into ``module``; CdirError naming the keys that do not fit."""
    sd = {k: v.float() if v.is_floating_point() else v for k, v in sd.items()}
    result = module.load_state_dict(sd, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CdirError(f"{path}: weights do not fit {what}: missing {result.missing_keys[:5]}, "
                        f"unexpected {result.unexpected_keys[:5]}")


def encoder_settings(path: str | os.PathLike) -> dict[str, Any]:
    """What training from an encoder file needs to know: ``{"arch": {"name", "kwargs"},
    "aug": {...} (the input settings it was trained with; empty for reference checkpoints),
    "epoch": ... or None}``. CdirError for a file that holds no readable ResNet encoder."""
    path = Path(path)
    ckpt = read_file(path)
    if isinstance(ckpt, dict) and "encoder_arch" in ckpt:
        arch = ckpt["encoder_arch"]
        aug = dict((ckpt.get("config") or {}).get("aug") or {})
    else:
        _, arch = reference_encoder(ckpt, path)
        aug = {}
    return {"arch": {"name": arch["name"], "kwargs": dict(arch.get("kwargs", {}))}, "aug": aug,
            "epoch": ckpt.get("epoch") if isinstance(ckpt, dict) else None}


def encoder_preprocess(path_or_ckpt: str | os.PathLike | dict) -> dict[str, Any]:
    """Input size, normalisation and eval resize ratio an encoder was trained with.

    Reference checkpoints carry no config: they get the ImageNet values (224 px, 256/224)."""
    from encoders.zoo import IMAGENET_MEAN, IMAGENET_STD
    from encoders.zoo.files import is_zoo_file, zoo_preprocess

    ckpt = path_or_ckpt
    if not isinstance(ckpt, dict):
        ckpt = read_file(Path(ckpt))
    if is_zoo_file(ckpt):
        return zoo_preprocess(ckpt)
    aug = (ckpt.get("config") or {}).get("aug", {}) if isinstance(ckpt, dict) else {}
    return {
        "size": int(aug.get("size", 224)),
        "mean": list(aug.get("mean", IMAGENET_MEAN)),
        "std": list(aug.get("std", IMAGENET_STD)),
        "eval_resize": float(aug.get("eval_resize", 256 / 224)),
    }
