"""`cdir demo`: the Gradio search demo over a workspace's indexes."""

from __future__ import annotations

import argparse

from cdir.commands.common import add_command, add_device, add_workspace, non_negative_int


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "demo", help="the web search demo over a workspace's indexes",
        description="Serve a web page that searches a workspace: query by image (upload, "
        "paste, webcam), by text (a CLIP or caption index) or by clicking a result; choose "
        "the mode (visual, cm-text, cm-image, fusion), the index and its per-domain "
        "normalisation, the target domain and k. Without -w: the emoji gallery with the "
        "project's own encoder (runs/emoji, what `make run` builds; built here if missing).")
    add_workspace(p, required=False,
                  help="workspace folder (default: runs/emoji, built if missing)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; "
                   "0.0.0.0 serves every network this machine is on)")
    p.add_argument("--port", type=non_negative_int, default=7860,
                   help="port to listen on (default 7860; 0: the first free one from 7860)")
    add_device(p)
    p.add_argument("--captioner", default=None,
                   help="captioner for cm-text queries on imported captions (hf:ID-OR-PATH)")
    p.add_argument("--query-encoder", metavar="SPEC",
                   help="encode image queries of the index it was trained for with this small "
                   "student of `cdir distill ... --compatible INDEX` (the other indexes keep "
                   "their own encoders)")
    p.add_argument("--max-upload", default="10mb",
                   help="largest upload accepted, e.g. 10mb (default) or 500kb")
    p.add_argument("--share", action="store_true", help="also open a public Gradio link")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import re
    import sys

    from cdir.core.errors import CdirError

    if not re.fullmatch(r"\d+\s*(b|kb|mb|gb)", args.max_upload.strip().lower()):
        raise CdirError(f"--max-upload {args.max_upload!r}: give a size such as 10mb or 500kb")
    if not 0 <= args.port <= 65535:
        raise CdirError(f"--port {args.port}: give a port between 0 and 65535")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    if "GRADIO_TEMP_DIR" not in os.environ:  # uploads in a folder of this run, removed at exit
        import tempfile

        os.environ["GRADIO_TEMP_DIR"] = tempfile.mkdtemp(prefix="cdir-demo-")
    from app.default_workspace import DEFAULT_WORKSPACE, ensure_default_workspace
    from app.demo import is_loopback, launch

    workspace = args.workspace
    if workspace is None:
        print(f"cdir demo: the emoji gallery in {DEFAULT_WORKSPACE} (building what is missing)",
              file=sys.stderr)
        workspace = ensure_default_workspace(DEFAULT_WORKSPACE)
    if not is_loopback(args.host):
        print(f"cdir demo: listening on {args.host}: anyone who can reach this machine can "
              "search the gallery and see its images", file=sys.stderr)
    launch(workspace, host=args.host, port=args.port or None, device=args.device,
           captioner=args.captioner, share=args.share, max_upload=args.max_upload,
           query_encoder=args.query_encoder)
    return 0
