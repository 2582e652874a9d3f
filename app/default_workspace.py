"""The workspace `cdir demo` serves when none is given: the emoji gallery embedded with the
project's own encoder, indexed as `make run` indexes it (one flat, per-domain whitened index).
The demo adds no index to a workspace that has one: a second index would make `cdir search -w
runs/emoji` ask which one to search."""

from __future__ import annotations

import sys
from pathlib import Path

DEFAULT_WORKSPACE = Path("runs") / "emoji"
DEFAULT_NORMALIZE = "domain-whiten"  # the Makefile's NORMALIZE: what `make run` builds


def ensure_default_workspace(root: str | Path = DEFAULT_WORKSPACE, *, encoder: str | None = None,
                             limit: int | None = None) -> Path:
    """Build whatever is missing of the default workspace (each stage skips work already done),
    printing each stage's summary; returns its folder. An up-to-date index of any kind is served
    as it is; a stale one of the encoder is updated with its own settings; only a workspace
    without one gets the index `make run` builds. ``encoder`` (default: the shipped one,
    `encoders.weights.default_encoder`) and ``limit`` (emoji per set; default all) make a smaller
    one."""
    from cdir.core.workspace import Workspace
    from cdir.stages.embed import embed_images
    from cdir.stages.gallery import describe_gallery
    from cdir.stages.index import build_index, list_indexes
    from encoders.weights import default_encoder

    spec = encoder or default_encoder()
    print(describe_gallery(root, "emoji", limit=limit)["summary"])
    rows = list_indexes(root)
    if any(r["current"] for r in rows):
        names = ", ".join(r["name"] for r in rows if r["current"])
        print(f"serving the index(es) already in {root}: {names}")
        return Path(root)
    wanted = [(r["kind"], r.get("normalize") or "none", r["name"]) for r in rows
              if r.get("encoder_spec") == spec] or [("flat", DEFAULT_NORMALIZE, None)]
    embed_images(Workspace(root).require(), spec)  # prints its own summary line
    for kind, normalize, name in wanted:
        built = build_index(root, encoder=spec, kind=kind, normalize=normalize, name=name)
        for note in built["notes"]:
            print(note, file=sys.stderr)
        print(built["summary"])
    return Path(root)
