"""`cdir caption`: caption the gallery with a captioning model, or import / export / list captions.

    cdir caption -w WS [--captioner hf:ID-OR-FOLDER] [--prompt TEXT] [--batch-size N]
                 [--max-new-tokens N] [--min-new-tokens N] [--num-beams N]
    cdir caption -w WS --from-file captions.csv [--name NAME]
    cdir caption -w WS --export out.csv|out.jsonl [--source KEY]
    cdir caption -w WS --list
"""

from __future__ import annotations

import argparse

from cdir.commands.common import (
    add_command,
    add_device,
    add_progress,
    add_workspace,
    non_negative_int,
    positive_int,
)

EPILOG = """\
captioner families (detected from the model's config; hf:/path/to/folder works like a hub id):
  blip       Salesforce/blip-image-captioning-base (default), -large; --prompt is a text prefix
  blip-2     Salesforce/blip2-opt-2.7b, Salesforce/blip2-flan-t5-xl; optional --prompt
  git        microsoft/git-base-coco, microsoft/git-large-coco; --prompt is a text prefix
  florence2  florence-community/Florence-2-base, -large; --prompt is the task (default <CAPTION>,
             or <DETAILED_CAPTION>, <MORE_DETAILED_CAPTION>)
  chat       llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf and other image-text-to-
             text chat models; --prompt is the instruction (default "Describe the main object in
             this image in one short sentence.")
  vision-encoder-decoder  nlpconnect/vit-gpt2-image-captioning (no prompt)

Captions are stored per (captioner, prompt, generation parameters) in WS/captions/; a re-run
captions only the missing images, and an interrupted run loses at most the batch in flight.
Without network, models must be in the Hugging Face cache (download once with `hf download ID`)
or in a local folder. Import files: CSV/TSV/JSONL with columns id (or path) and caption."""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "caption", help="caption the gallery images (resumable), or import/export captions",
        description="Caption every image of the workspace with a Hugging Face captioning model, "
        "import captions from a file as a named source, export a source, or list the sources.",
        epilog=EPILOG)
    add_workspace(p)
    add_device(p)
    add_progress(p)
    g = p.add_argument_group("captioning with a model")
    g.add_argument("--captioner", metavar="SPEC", default=None,
                   help="hf:<hub id or folder> (default hf:Salesforce/blip-image-captioning-base)")
    g.add_argument("--prompt", default=None,
                   help="text prefix / task / instruction, depending on the family (see below)")
    g.add_argument("--batch-size", type=positive_int, default=32,
                   help="images per batch; halved automatically on out-of-memory (default 32)")
    g.add_argument("--max-new-tokens", type=positive_int, default=30,
                   help="most tokens generated per caption (default 30)")
    g.add_argument("--min-new-tokens", type=non_negative_int, default=0,
                   help="fewest tokens generated per caption (default 0)")
    g.add_argument("--num-beams", type=positive_int, default=1,
                   help="beam search width; 1 = greedy (default 1)")
    g.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto",
                   help="weights precision (default: bf16/fp16 on GPU, fp32 on CPU)")
    g.add_argument("--trust-remote-code", action="store_true",
                   help="allow the model repository's own Python code (e.g. microsoft/Florence-2)")
    g.add_argument("--limit", type=positive_int, default=None,
                   help="caption at most N of the missing images (a quick check; re-run to finish)")
    io = p.add_argument_group("import, export, list")
    io.add_argument("--from-file", metavar="FILE",
                    help="import captions from CSV/TSV/JSONL (columns id or path, and caption)")
    io.add_argument("--name", help="name of the imported source (default: the file name)")
    io.add_argument("--export", metavar="OUT", help="write a caption source to OUT (.csv/.jsonl)")
    io.add_argument("--source", metavar="KEY",
                    help="the source to export: its key, import name or a unique part of the key "
                         "(default: the only source)")
    io.add_argument("--list", action="store_true", help="list the workspace's caption sources")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from cdir.core.errors import CdirError
    from cdir.core.workspace import Workspace

    ws = Workspace(args.workspace)
    modes = [m for m in ("from_file", "export", "list") if getattr(args, m)]
    if len(modes) > 1:
        raise CdirError("use one of --from-file, --export, --list at a time")
    if args.list:
        return _list(ws)
    if args.export:
        from cdir.stages.caption import export_captions

        print(export_captions(ws.require(), args.source, args.export)["line"])
        return 0
    if args.from_file:
        from cdir.stages.caption import import_captions

        result = import_captions(ws.require(), args.from_file, args.name)
        for m in result["messages"]:
            print(m, file=sys.stderr)
        print(result["line"])
        return 0
    if args.name or args.source:
        raise CdirError("--name goes with --from-file, --source with --export")

    from cdir.core.dist import torchrun_group
    from cdir.core.rows import print_summary
    from cdir.stages.caption import DEFAULT_CAPTIONER, caption_workspace

    with torchrun_group(args.device) as d:  # torchrun: the rows are split over ranks
        summary = caption_workspace(
            ws.require(), args.captioner or DEFAULT_CAPTIONER, batch_size=args.batch_size,
            prompt=args.prompt, max_new_tokens=args.max_new_tokens,
            min_new_tokens=args.min_new_tokens, num_beams=args.num_beams,
            device=str(d.device) if d else args.device, dtype=args.dtype,
            trust_remote_code=args.trust_remote_code, limit=args.limit,
            progress=not args.no_progress and (d is None or d.main))
    if d is not None and not d.main:
        return 0  # torchrun: rank 0 reports the whole run
    print_summary(summary)
    return 0


def _list(ws) -> int:
    from cdir.core.caption_store import list_sources

    sources = list_sources(ws)
    if not sources:
        print(f"no caption sources in {ws.root}")
        return 0
    for s in sources:
        extra = "".join(f", {s[k]} {k}" for k in ("empty", "failed") if s[k])
        print(f"{s['key']}\t{s['kind']}, {s['count']} captions{extra}")
    return 0
