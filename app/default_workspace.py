"""The workspace `cdir demo` serves when none is given: the emoji gallery embedded with the
project's own encoder, the same one `make run` builds (reused when it is there), with a plain
and a per-domain whitened index so the page can switch between them."""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_WORKSPACE = Path("runs") / "emoji"
NORMALIZATIONS = ("domain-whiten", "none")


def ensure_default_workspace(root: str | Path = DEFAULT_WORKSPACE, *, encoder: str | None = None,
                             limit: int | None = None) -> Path:
    """Build whatever is missing of the default workspace (each stage skips work already done),
    printing each stage's summary; returns its folder. ``encoder`` (default: the shipped one,
    `encoders.weights.default_encoder`) and ``limit`` (emoji per set; default all) make a smaller
    one."""
    from cdir.core.workspace import Workspace
    from cdir.stages.embed import embed_images
    from cdir.stages.gallery import describe_gallery
    from cdir.stages.index import build_index
    from encoders.weights import default_encoder

    spec = encoder or default_encoder()
    print(describe_gallery(root, "emoji", limit=limit)["summary"])
    embed_images(Workspace(root).require(), spec)  # prints its own summary line
    for normalize in NORMALIZATIONS:
        built = build_index(root, encoder=spec, kind="flat", normalize=normalize)
        for note in built["notes"]:
            print(note, file=sys.stderr)
        print(built["summary"])
    return Path(root)
