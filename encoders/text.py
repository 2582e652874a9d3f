"""Text encoders for captions: the CLIP text tower (`clip:` spec, the same model as the image
tower) and sentence-transformers (`st:` spec, hub id or local folder). Both return L2-normalised
float32 vectors."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from cdir.core.device import resolve_device
from cdir.core.errors import CdirError, ModelUnavailable
from encoders.hub import model_identity, offline, resolve_st_model  # resolve_st_model: re-exported
from encoders.specs import parse_spec

if TYPE_CHECKING:
    from encoders.specs import Spec


class TextEncoder:
    spec: str
    dim: int
    device: torch.device
    params: dict

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        raise NotImplementedError


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ClipTextEncoder(TextEncoder):
    """CLIP text tower. Truncation policy: captions longer than the context (77 tokens for CLIP)
    keep their first 76 tokens and the end-of-text token (open_clip's tokenizer does this); the
    number of truncated captions is counted in ``truncated`` so reports can say so."""

    def __init__(self, spec: Spec, device: str | None = None):
        from encoders.clip import load_open_clip

        self.spec = spec.text
        self.device = resolve_device(device)
        model, _, self.tokenizer = load_open_clip(spec)
        self.model = model.to(self.device).eval()
        self.context_length = int(getattr(self.tokenizer, "context_length", 77))
        with torch.inference_mode():
            self.dim = int(self.model.encode_text(self.tokenizer(["a"]).to(self.device)).shape[1])
        self.truncated = 0
        # the weights, so captions embedded by a retrained CLIP are never mixed with the old ones
        self.params = {"truncation": f"first {self.context_length - 1} tokens + EOT",
                       "weights": model_identity(self.spec).id}

    def _count_truncated(self, texts: list[str]) -> int:
        encode = getattr(self.tokenizer, "encode", None)
        if encode is None:
            return 0
        return sum(len(encode(t)) + 2 > self.context_length for t in texts)

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        out = []
        self.truncated += self._count_truncated(texts)
        amp = torch.autocast("cuda", dtype=torch.float16) if self.device.type == "cuda" else None
        with torch.inference_mode():
            for i in range(0, len(texts), batch_size):
                tokens = self.tokenizer(texts[i:i + batch_size]).to(self.device)
                if amp:
                    with amp:
                        feats = self.model.encode_text(tokens)
                else:
                    feats = self.model.encode_text(tokens)
                out.append(feats.float().cpu().numpy())
        return _normalise(np.concatenate(out) if out else np.zeros((0, self.dim), np.float32))


class SentenceTransformerEncoder(TextEncoder):
    def __init__(self, spec: Spec, device: str | None = None):
        from sentence_transformers import SentenceTransformer

        self.spec, name = spec.text, spec.body
        if not name:
            raise CdirError("st: needs a model, e.g. st:sentence-transformers/all-MiniLM-L6-v2")
        self.device = resolve_device(device)
        source = resolve_st_model(name)
        local = Path(source).is_dir()
        if not local and ("/" in name and Path(name).is_absolute()):
            raise CdirError(f"{self.spec}: no such folder")
        try:
            self.model = SentenceTransformer(source, device=str(self.device),
                                             local_files_only=local or offline())
        except OSError as e:
            raise ModelUnavailable(
                f"{self.spec}: sentence-transformers model not found locally and the hub is not "
                "reachable; download it on a machine with internet (it is cached in "
                "~/.cache/huggingface) or pass a local folder: st:/path/to/model "
                f"({str(e).splitlines()[0][:120]})") from None
        get_dim = (getattr(self.model, "get_embedding_dimension", None)
                   or self.model.get_sentence_embedding_dimension)
        self.dim = int(get_dim())
        self.max_seq_length = int(self.model.max_seq_length)
        self.params = {"truncation": f"first {self.max_seq_length} word pieces",
                       "weights": model_identity(self.spec).id}

    def encode(self, texts: list[str], batch_size: int = 256) -> np.ndarray:
        vecs = self.model.encode(list(texts), batch_size=batch_size, convert_to_numpy=True,
                                 normalize_embeddings=True, show_progress_bar=False)
        return _normalise(vecs.reshape(len(texts), self.dim))


def load_text_encoder(spec: str, device: str | None = None) -> TextEncoder:
    """The text encoder named by ``spec``: the CLIP text tower (``clip:``) or
    sentence-transformers (``st:``)."""
    parsed = parse_spec(spec, role="text")
    return parsed.info.text(parsed, device)
