"""The on-disk workspace: where each pipeline stage reads its inputs and writes its outputs.

<ws>/manifest.parquet, <ws>/captions/<key>.parquet, <ws>/embeddings/<key>/,
<ws>/indexes/<name>.faiss, <ws>/reports/<run>/.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from cdir.core.errors import CdirError


def spec_key(spec: str) -> str:
    """A filesystem-safe, collision-free key for a model spec or any parameter string."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "-", spec).strip("-.")[:60] or "x"
    return f"{readable}-{hashlib.sha1(spec.encode()).hexdigest()[:8]}"


_CAPTIONS = "@captions:"


def caption_spec(text_encoder: str, captions_key: str) -> str:
    """The spec of caption embeddings, ``<text encoder>@captions:<caption source key>``: it keys
    their folder under ``embeddings/`` and is the encoder spec recorded by a caption index."""
    return f"{text_encoder}{_CAPTIONS}{captions_key}"


def split_caption_spec(spec: str) -> tuple[str, str] | None:
    """(text encoder, caption source key) of a `caption_spec`; None for an image encoder spec."""
    text_encoder, sep, key = spec.partition(_CAPTIONS)
    return (text_encoder, key) if sep else None


class Workspace:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        # every command builds one first: a file given as -w is one line here, not a traceback
        # wherever the first write or read happens to fail
        if self.root.exists() and not self.root.is_dir():
            raise CdirError(f"the workspace {self.root} is a file, not a folder: give -w a "
                            "folder (a new one, or one written by `cdir data`)")

    def create(self) -> Workspace:
        """Make the workspace folder (and its parents); one line when that is impossible."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CdirError(f"cannot create the workspace folder {self.root}: "
                            f"{e.strerror or e}") from None
        return self

    @property
    def manifest_path(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def info_path(self) -> Path:
        """Facts about the gallery (dataset kind, source root) written by `cdir data`."""
        return self.root / "gallery.json"

    def embeddings_dir(self, spec: str) -> Path:
        return self.root / "embeddings" / spec_key(spec)

    def captions_path(self, key: str) -> Path:
        return self.root / "captions" / f"{spec_key(key)}.parquet"

    def index_path(self, name: str) -> Path:
        return self.root / "indexes" / f"{name}.faiss"

    def reports_dir(self, run: str) -> Path:
        return self.root / "reports" / run

    def require(self) -> Workspace:
        if not self.manifest_path.exists():
            raise CdirError(
                f"{self.root} is not a cdir workspace (no manifest.parquet): "
                "create it with `cdir data {emoji|folder|officehome|domainnet|csv} ... -w "
                f"{self.root}`")
        return self

    def manifest(self):
        from cdir.core.manifest import load_manifest

        return load_manifest(self.require().manifest_path)

    def info(self) -> dict:
        from cdir.core.io import read_json

        return read_json(self.info_path) if self.info_path.exists() else {}
