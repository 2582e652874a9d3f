"""`cdir demo`: the Gradio search demo over a workspace's indexes."""

from __future__ import annotations

import argparse

from cdir.commands.common import add_command, add_device, add_workspace


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(sub, "demo", help="the Gradio search demo over a workspace's indexes",
                    description="Serve a web page: drop a query image, choose a target "
                    "domain and an index, see the top-k results (and the query's caption "
                    "for caption indexes).")
    add_workspace(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on")
    p.add_argument("--port", type=int, default=7860)
    add_device(p)
    p.add_argument("--share", action="store_true", help="also open a public Gradio link")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    from app.demo import launch

    launch(args.workspace, host=args.host, port=args.port, device=args.device, share=args.share)
    return 0
