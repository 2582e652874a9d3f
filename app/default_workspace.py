"""The workspace `cdir demo` serves when none is given: the emoji gallery embedded with the
project's own encoder, the same one `make run` builds (reused when it is there), with a plain
and a per-domain whitened index so the page can switch between them."""

from __future__ import annotations

from pathlib import Path

DEFAULT_WORKSPACE = Path("runs") / "emoji"
NORMALIZATIONS = ("domain-whiten", "none")


def default_encoder() -> str:
    from cdir.commands.embed import _default_encoder

    return f"ckpt:{_default_encoder()}?grid=4&layers=3,4"


def ensure_default_workspace(root: str | Path = DEFAULT_WORKSPACE) -> Path:
    """Build whatever is missing of the default workspace (each step skips work already
    done); returns its folder."""
    from cdir.cli import build_parser

    root, spec = str(root), default_encoder()
    steps = [["data", "emoji", "-w", root], ["embed", "-w", root, "--encoder", spec]]
    steps += [["index", "build", "-w", root, "--encoder", spec, "--type", "flat",
               "--normalize", n] for n in NORMALIZATIONS]
    parser = build_parser()
    for argv in steps:  # as if typed: a failure is that command's CdirError
        args = parser.parse_args(argv)
        args.func(args)
    return Path(root)
