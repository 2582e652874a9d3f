"""`cdir data KIND`: describe a gallery as a workspace manifest (the gallery stage)."""

from __future__ import annotations

import argparse

from cdir.commands.common import add_progress, add_workspace, positive_int

# what the positional argument of a gallery kind is (`GalleryKind.source`)
SOURCE_HELP = {"ROOT": "the dataset folder", "TABLE": "the table file",
               "FONTS": "the fonts folder"}


def register(sub: argparse._SubParsersAction) -> None:
    from cdir.galleries import KINDS

    p = sub.add_parser(
        "data", help="describe a gallery: write the workspace manifest",
        description="Scan a dataset and write WORKSPACE/manifest.parquet (id, path, domain, "
        "label, class_name, split) and WORKSPACE/gallery.json. Labels are the index of the class "
        "name in the byte-sorted class names, as in the UCDIR literature.")
    kinds = p.add_subparsers(dest="kind", metavar="KIND", required=True)
    for kind, gk in KINDS.items():
        k = kinds.add_parser(kind, help=gk.help, description=gk.help)
        if gk.source:
            k.add_argument("root", metavar=gk.source, nargs="?" if gk.build else None,
                           help=SOURCE_HELP[gk.source] + (
                               " (default: where its Debian package puts it)"
                               if gk.build else ""))
        add_workspace(k)
        add_progress(k)
        if gk.build:
            k.add_argument("--limit", type=positive_int, default=None,
                           help="keep N categories (emoji: evenly spread) or drawings, for "
                                "small galleries")
            k.add_argument("--size", type=positive_int, default=128,
                           help="image size in pixels (default: 128)")
        elif gk.filters:
            k.add_argument("--domains", help="comma-separated domains to keep (default: all)")
            k.add_argument("--classes", help="class subset: a,b,c | FILE.txt" + gk.classes_help)
            k.add_argument("--split", default="all", choices=gk.splits,
                           help=f"which split to keep, default all ({gk.split_help})")
        k.set_defaults(func=run)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from cdir.stages.gallery import describe_gallery

    summary = describe_gallery(
        args.workspace, args.kind, root=getattr(args, "root", None),
        domains=getattr(args, "domains", None), classes=getattr(args, "classes", None),
        split=getattr(args, "split", None) or "all", limit=getattr(args, "limit", None),
        size=getattr(args, "size", None), progress=not args.no_progress)
    print(summary["summary"])
    return 0
