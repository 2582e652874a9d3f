"""`cdir embed`: image embeddings of a workspace's gallery, or text embeddings of one of its
caption sources (resumable, sharded, L2-normalised)."""

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

ENCODER_HELP = """\
image encoder spec:
  clip:ARCH/PRETRAINED   open_clip, e.g. clip:ViT-B-32/openai, clip:hf-hub:ORG/NAME,
                         clip:ViT-B-32/path/to/weights.pt, clip:path/to/config.json/random
  ckpt:PATH              a `cdir train` checkpoint, a MoCo/SynCo checkpoint or a torchvision
                         state dict (ckpt:PATH?arch=NAME for non-ResNets, ?size=PX to override the
                         input size); ckpt:timm:NAME?file=PATH for timm
                         ckpt:PATH?bn=domain: each domain with BatchNorm statistics
                         re-estimated on its own images (AdaBN)
  pixels                 32x32 greyscale pixels: the sanity floor

offline (no model hub needed): ckpt:encoders/weights/emoji_student.pt, the encoder this project
trained without labels on the emoji gallery (SynCo, `cdir adapt`, then distilled to 64 px), what
`make run` uses; "ckpt:encoders/weights/emoji_adapted.pt?grid=4&layers=3,4", its 128 px teacher;
encoders/weights/emoji_synco.pt, the SynCo encoder they started from; or pixels. clip: tags need
their weights in the local Hugging Face cache.

caption embeddings (for the cm-text and cm-image modes of `cdir eval`):
  cdir embed -w WS --captions SOURCE --text-encoder st:all-MiniLM-L6-v2
  cdir embed -w WS --captions SOURCE --text-encoder clip:ViT-B-32/openai
  SOURCE is a captioner spec or imported name as listed by `cdir caption -w WS --list`."""


def register(sub: argparse._SubParsersAction) -> None:
    p = add_command(
        sub, "embed", help="compute image embeddings of the gallery (resumable)",
        description="Embed every image of the workspace manifest with an image encoder.\n"
        "Vectors are L2-normalised and written in shards to WORKSPACE/embeddings/<key>/.\n"
        "An interrupted run continues where it stopped: rows already embedded are skipped.\n"
        "Unreadable images are skipped, listed in failed.json and retried on the next run.",
        epilog=ENCODER_HELP)
    add_workspace(p, "workspace directory")
    _add_image_options(p)
    p.add_argument("--captions", metavar="SOURCE", nargs="?", const="",
                   help="embed the captions of this source instead of the images (no value: "
                        "the workspace's only caption source)")
    p.add_argument("--text-encoder", metavar="SPEC",
                   help="text encoder of the captions: st:ID-OR-PATH or clip:ARCH/PRETRAINED")
    p.set_defaults(func=run)


def _add_image_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder", metavar="SPEC", help="image encoder spec (see below)")
    p.add_argument("--batch-size", type=positive_int, default=64,
                   help="images per batch (default 64)")
    p.add_argument("--workers", type=non_negative_int, default=None,
                   help="DataLoader worker processes decoding images (default min(4, CPUs); "
                        "0 = in the main process)")
    add_device(p)
    p.add_argument("--shard-rows", type=positive_int, default=4096,
                   help="rows per shard file: an interruption loses at most one shard "
                        "(default 4096)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="embed at most N of the missing rows (a quick check; re-run to finish)")
    add_progress(p)


def run(args: argparse.Namespace) -> int:
    from cdir.core.errors import CdirError
    from encoders.weights import default_encoder

    if args.captions is not None or args.text_encoder:
        if not args.text_encoder:
            raise CdirError("embedding captions needs --text-encoder, e.g. "
                            "st:all-MiniLM-L6-v2 or clip:ViT-B-32/openai")
        if args.encoder:
            raise CdirError("give either --encoder (images) or --captions/--text-encoder")
        from cdir.stages.embed import embed_captions

        summary = embed_captions(args.workspace, args.captions or None, args.text_encoder,
                                 device=args.device, progress=not args.no_progress)
        print(summary["line"])  # also without progress
        return 0
    if not args.encoder:
        raise CdirError(f"give the image encoder: --encoder SPEC, e.g. --encoder "
                        f"'{default_encoder()}' (offline, trained on "
                        "the emoji gallery) or "
                        "--encoder pixels; clip:ViT-B-32/openai needs its weights in the Hugging "
                        "Face cache (see `cdir embed --help`)")
    return _run_images(args)


def _run_images(args: argparse.Namespace) -> int:
    from cdir.core.dist import torchrun_group
    from cdir.core.rows import print_summary
    from cdir.core.workspace import Workspace
    from cdir.stages.embed import embed_images

    with torchrun_group(args.device) as d:  # torchrun: the rows are split over ranks
        summary = embed_images(
            Workspace(args.workspace).require(), args.encoder, batch_size=args.batch_size,
            num_workers=args.workers, device=str(d.device) if d else args.device,
            shard_rows=args.shard_rows, limit=args.limit,
            progress=not args.no_progress and (d is None or d.main))
    if d is None or d.main:  # torchrun: rank 0 reports the whole run
        print_summary(summary)
    return 0
