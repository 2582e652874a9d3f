"""The one device and precision rule: ``auto``/None is CUDA when a GPU is visible, else CPU; an
explicit CUDA request without a GPU is an error, never a silent fall-back. torch is imported inside
the functions so that importing this module stays cheap."""

from __future__ import annotations

from typing import TYPE_CHECKING

from cdir.core.errors import CdirError

if TYPE_CHECKING:
    import torch

# the dtype names accepted, each mapped to its torch attribute (torch is imported when used)
DTYPES = {"fp32": "float32", "float32": "float32", "fp16": "float16", "float16": "float16",
          "bf16": "bfloat16", "bfloat16": "bfloat16"}


def resolve_device(device: str | torch.device | None = None, flag: str = "--device",
                   index: int | None = None) -> torch.device:
    """The device to run on. ``flag`` names the setting in the error (``--set train.device``);
    ``index`` picks the GPU for ``auto`` (a torchrun process's LOCAL_RANK)."""
    import torch

    if device is None or str(device) in ("", "auto"):
        if not torch.cuda.is_available():
            return torch.device("cpu")
        return torch.device("cuda", index) if index is not None else torch.device("cuda")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise CdirError(f"{flag} {device!r} is not a device: use auto, cpu, cuda or cuda:N") \
            from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise CdirError(f"{flag} {device} asked for, but no CUDA GPU is visible here: "
                        f"use {flag} cpu")
    if dev.type == "cuda" and dev.index is None and index is not None:
        return torch.device("cuda", index)
    return dev


def resolve_dtype(device: torch.device, dtype: str | torch.dtype | None = None) -> torch.dtype:
    """Inference precision: ``auto``/None is bf16 on GPUs that have it, else fp16 on GPU, and fp32
    on CPU (half precision is slow there)."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "", "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if dtype not in DTYPES:
        raise CdirError(f"unknown dtype {dtype!r}: use auto or one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[dtype])
