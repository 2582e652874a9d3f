"""`cdir index build|info`: FAISS indexes over a workspace's image or caption embeddings."""

from __future__ import annotations

import argparse

from cdir.cli import HelpFormatter
from cdir.commands.common import add_workspace, non_negative_int, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from indexes.kinds import KINDS
    from indexes.normalize import DEFAULT_PCA_DIM, NORMALIZERS

    p = sub.add_parser("index", help="build or inspect FAISS indexes over embeddings",
                       description="Build a FAISS index over the embeddings of a workspace, or "
                       "show what the workspace's indexes hold.")
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    b = actions.add_parser(
        "build", help="build (or extend) an index",
        description="Build a cosine index over image embeddings (--encoder) or caption "
        "embeddings (--captions with --text-encoder). If an index of the same encoder and type "
        "exists and the gallery only grew, the new images are added to it. Gallery images "
        "without a vector yet (run `cdir embed` first) are refused unless --allow-missing.",
        formatter_class=HelpFormatter)
    add_workspace(b)
    b.add_argument("--encoder", help="image encoder spec whose embeddings are indexed")
    b.add_argument("--captions", help="index caption embeddings of this caption source instead")
    b.add_argument("--text-encoder", help="text encoder of the caption embeddings")
    b.add_argument("--type", choices=(*KINDS, "auto"), default="flat",
                   help="; ".join(f"{k}: {v.help}" for k, v in KINDS.items())
                   + "; auto: chosen from the vector count, dimension and --memory, its nprobe "
                     "/ efSearch tuned to --recall")
    b.add_argument("--memory", default=None,
                   help="--type auto: memory budget of the index, e.g. 4GB (default: none)")
    b.add_argument("--recall", type=float, default=0.95,
                   help="--type auto: recall@10 against exact search to tune for (default 0.95)")
    b.add_argument("--normalize", choices=tuple(NORMALIZERS), default="none",
                   help="per-domain normalisation of the indexed vectors, fitted on the gallery "
                        "without labels (statistics saved beside the index; queries get their "
                        "domain's transform): " + "; ".join(
                            f"{k}: {v.help}" for k, v in NORMALIZERS.items()))
    b.add_argument("--normalize-dim", type=non_negative_int, default=None, metavar="N",
                   help="with --normalize: a shared PCA to N dims (fitted on every gallery row, "
                        "no labels) before the per-domain statistics, so they stay small; 0 "
                        f"keeps the full dimension (default: {DEFAULT_PCA_DIM} for domain-whiten "
                        "over wider vectors, else 0)")
    b.add_argument("--name", help="index name: letters, digits, . _ - (default: from the "
                                  "encoder and type)")
    b.add_argument("--force", action="store_true",
                   help="replace an index of this name built with another encoder or type")
    b.add_argument("--allow-missing", action="store_true",
                   help="index the images that have a vector, leaving out those not embedded "
                        "yet")
    gpu = b.add_mutually_exclusive_group()
    gpu.add_argument("--gpu", dest="gpu", action="store_true", default=None,
                     help="require a GPU (faiss-gpu and a CUDA device)")
    # both flags share one dest whose default (None: a GPU when there is one) is --gpu's
    gpu.add_argument("--cpu", dest="gpu", action="store_false", default=None,
                     help="stay on the CPU")
    b.add_argument("--nlist", type=positive_int, help="IVF lists (default ≈ 4·√N)")
    b.add_argument("--m", type=positive_int,
                   help="PQ sub-quantizers (ivfpq) or graph degree (hnsw)")
    b.add_argument("--refine", type=positive_int, default=None, metavar="K",
                   help="ivfpq: keep the exact vectors too and re-rank K x k PQ candidates by "
                        "their exact scores (more memory, far better recall)")
    b.add_argument("--shards", type=positive_int, default=None, metavar="N",
                   help="ivf / ivfpq larger than memory: build N shards one at a time and merge "
                        "their lists into one file on disk, searched memory-mapped")
    b.add_argument("--rebuild", action="store_true", help="rebuild even if it could be extended")
    b.set_defaults(func=run_build)
    i = actions.add_parser("info", help="list the indexes of a workspace")
    add_workspace(i)
    i.set_defaults(func=run_info)


def run_build(args: argparse.Namespace) -> int:
    import sys

    from cdir.stages.index import build_index

    summary = build_index(args.workspace, encoder=args.encoder, text_encoder=args.text_encoder,
                          captions=args.captions, kind=args.type, name=args.name, gpu=args.gpu,
                          nlist=args.nlist, m=args.m, rebuild=args.rebuild, force=args.force,
                          allow_missing=args.allow_missing, normalize=args.normalize,
                          normalize_dim=args.normalize_dim,
                          memory=args.memory, recall=args.recall, refine=args.refine,
                          shards=args.shards)
    for note in summary["notes"]:
        print(note, file=sys.stderr)
    print(summary["summary"])
    return 0


def run_info(args: argparse.Namespace) -> int:
    from cdir.core.workspace import Workspace
    from cdir.stages.index import list_indexes, update_commands

    ws = Workspace(args.workspace)
    rows = list_indexes(ws.root)
    if not rows:
        print(f"no indexes in {ws.root}: build one with `cdir index build`")
        return 0
    for r in rows:
        norm = r.get("normalize", "none")
        update = update_commands(ws, r["encoder_spec"], r["kind"], r["name"], norm,
                                 r.get("normalize_dim", 0))
        stale = "" if r["current"] else (
            f"  [stale: the gallery changed; update with `{update}`]")
        normalized = f", {norm}" if norm != "none" else ""
        if r.get("normalize_dim"):
            normalized += f" after a shared PCA to {r['normalize_dim']}"
        if r.get("stats_bytes") is not None:  # the statistics file beside the index
            normalized += f", statistics {r['stats_bytes'] / 1e6:.1f} MB"
        print(f"{r['name']}: {r['kind']} over {r['count']} vectors of {r['encoder_spec']} "
              f"(dim {r['dim']}{normalized}){stale}")
    return 0
