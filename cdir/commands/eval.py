"""`cdir eval`: cross-domain retrieval on every directed domain pair (default), or the SSL
protocols `knn` and `linear` on a labelled folder."""

from __future__ import annotations

import argparse

from cdir.commands.common import (
    add_command,
    add_device,
    add_progress,
    add_workspace,
    non_negative_int,
    positive_float,
    positive_int,
)

KINDS = ("retrieval", "knn", "linear", "transfer")


def register(sub: argparse._SubParsersAction) -> None:
    from cdir.stages.modes import MODES
    from eval.fusion import FUSION_METHODS
    from eval.rerank import DEFAULT_CSLS_K, DEFAULT_DUAL_SOFTMAX_BETA, RERANKERS
    from indexes.normalize import NORMALIZERS

    p = add_command(
        sub, "eval",
        help="evaluate retrieval on every directed domain pair (or kNN / linear probe)",
        description="Evaluate cross-domain retrieval: every image of domain A queries all images "
        "of domain B, for every ordered pair (A, B). Writes a Markdown/CSV/JSON table, a heatmap "
        "and a retrieval gallery to WORKSPACE/reports/RUN/. `cdir eval knn|linear` runs the "
        "self-supervised evaluation protocols on a labelled folder instead; `cdir eval transfer` "
        "the distillation testbed's transfer probe (a frozen student, a new linear head on "
        "STL-10, Tiny-ImageNet or a folder at 32 px).")
    p.add_argument("kind", nargs="?", choices=KINDS, default="retrieval",
                   help="what to evaluate")
    add_workspace(p, "workspace directory (retrieval)", required=False)
    p.add_argument("--encoder", help="image encoder spec of the `visual` mode (and kNN/linear)")
    p.add_argument("--mode", default=None,
                   help=f"comma-separated modes: {', '.join(MODES)} "
                        "(default: every mode the other options configure)")
    p.add_argument("--captions", help="caption source (captioner spec or imported name) for the "
                                      "cm-* modes; default: the only one in the workspace")
    p.add_argument("--text-encoder", help="text encoder of cm-text, e.g. st:all-MiniLM-L6-v2")
    p.add_argument("--clip", help="CLIP spec of cm-image (image tower × text tower)")
    p.add_argument("--fuse", help="modes fused by `fusion` (default: all configured modes)")
    p.add_argument("--weights", help="fusion weights, e.g. visual=0.3,cm-text=0.7 (default 1 each)")
    p.add_argument("--fusion-method", choices=tuple(FUSION_METHODS), default="zscore")
    p.add_argument("--sweep", action="store_true",
                   help="choose fusion weights on a held-out half of the queries, report the other")
    p.add_argument("--normalize", metavar="NAMES",
                   help=f"comma-separated per-domain normalisations: {', '.join(NORMALIZERS)}; "
                        "each is evaluated, side by side in the comparison (statistics fitted "
                        "on the evaluated gallery without labels; default: none)")
    p.add_argument("--normalize-dim", type=non_negative_int, default=None, metavar="N",
                   help="with --normalize: a shared PCA to N dims before the per-domain "
                        "statistics, as `cdir index build --normalize-dim` (default: the same "
                        "default as there; 0: the full dimension)")
    p.add_argument("--rerank", metavar="NAMES",
                   help=f"comma-separated scoring: {', '.join(RERANKERS)} (hubness "
                        "corrections per directed pair: csls, CSLS; dual-softmax, a softmax "
                        "over the gallery domain times one over the query domain; default: "
                        "none)")
    p.add_argument("--csls-k", type=positive_int, default=DEFAULT_CSLS_K,
                   help="CSLS neighbourhood size")
    p.add_argument("--dual-softmax-beta", type=positive_float, default=DEFAULT_DUAL_SOFTMAX_BETA,
                   metavar="BETA", help="the dual softmax's inverse temperature (default "
                                        f"{DEFAULT_DUAL_SOFTMAX_BETA:g})")
    p.add_argument("--protocol", choices=("ucdir",), default="ucdir",
                   help="ucdir: the UCDIR-family protocol (P@k with t=min(k,R)), beside standard "
                        "precision@k, recall@k, mAP@R and mAP@All")
    p.add_argument("--ks", help="comma-separated k values, sorted and repeats dropped (default: "
                                "1,5,15 for Office-Home and folders, 50,100,200 for DomainNet)")
    p.add_argument("--pairs", help="directed pairs to evaluate, e.g. Art:Clipart,Clipart:Art "
                                   "(default: every ordered pair of distinct domains)")
    p.add_argument("--split", default="all",
                   help="evaluate only the manifest rows of this split (queries and gallery "
                        "alike): dev or test for the emoji gallery's fixed category split, any "
                        "value of a table's split column; default all")
    p.add_argument("--allow-missing", action="store_true",
                   help="evaluate a partly embedded store (cdir embed --limit, a killed or "
                        "running embed, a grown gallery) without the images not embedded yet; "
                        "the report gives their counts (default: refused, naming the command "
                        "that completes the store)")
    p.add_argument("--run", help="report name under WORKSPACE/reports/ (default: from every "
                                 "setting that changes the report, so runs never overwrite "
                                 "each other)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="SEED",
                   help="evaluate one trained model per seed: {seed} in --encoder/--text-encoder/"
                        "--clip is replaced by each seed (e.g. ckpt:runs/distill/rrd/"
                        "seed_{seed}/best.pt, as `cdir distill --seeds` writes); each seed's "
                        "report in RUN/seed_<seed>/, every figure as mean ± std in RUN/seeds.md")
    p.add_argument("--examples", type=non_negative_int, default=4,
                   help="sample queries per pair shown in the retrieval gallery")
    add_device(p)
    add_progress(p)
    p.add_argument("--data", help="labelled images (knn, linear): ROOT/<class>/<image>, "
                                  "ROOT/<domain>/<class>/<image> or a manifest")
    p.add_argument("--val-data", help="separate labelled folder to evaluate on (knn, linear; "
                                      "default: kNN leave-one-out, linear probe on a held-out "
                                      "stratified fifth)")
    p.add_argument("--epochs", type=positive_int,
                   help="linear-probe epochs (default 100; transfer 120)")
    p.add_argument("--root", default="data", help="transfer: where named datasets live")
    p.add_argument("--download", action="store_true",
                   help="transfer: download a named dataset that is missing (needs internet)")
    p.add_argument("--cache-features", action="store_true",
                   help="transfer: embed the training images once, no augmentation (fast)")
    p.add_argument("--workers", type=non_negative_int, default=0,
                   help="image loader workers (knn, linear)")
    p.add_argument("--json", help="also write the kNN / linear-probe results to this file (every "
                   "figure in percent: knn.kK.top1/top5, p1 = nearest-neighbour P@1)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.kind != "retrieval":
        if args.seeds:
            from cdir.core.errors import CdirError

            raise CdirError(f"--seeds is for retrieval evaluation, not `cdir eval {args.kind}`")
        return run_ssl_eval(args)
    from cdir.core.errors import CdirError
    from cdir.stages.evaluate import evaluate

    if not args.workspace:
        raise CdirError("give the workspace: cdir eval -w DIR --encoder SPEC")
    summary = evaluate(
        args.workspace, encoder=args.encoder, text_encoder=args.text_encoder, clip=args.clip,
        captions=args.captions, modes=args.mode, fuse=args.fuse, weights=args.weights,
        fusion_method=args.fusion_method, sweep=args.sweep, ks=args.ks, pairs=args.pairs,
        run=args.run, examples=args.examples, device=args.device,
        progress=not args.no_progress, echo=print, normalize=args.normalize,
        rerank=args.rerank, csls_k=args.csls_k, dual_softmax_beta=args.dual_softmax_beta,
        split=args.split,
        allow_missing=args.allow_missing, seeds=args.seeds, normalize_dim=args.normalize_dim)
    print(summary["summary"])
    return 0


def run_ssl_eval(args: argparse.Namespace) -> int:
    """Weighted kNN (DINO-style) or the MoCo linear probe on cached features; the transfer
    probe of the distillation testbed."""
    import json

    if args.kind == "transfer":
        from cdir.stages.distill import transfer_eval

        res = transfer_eval(args.encoder, args.data, root=args.root, download=args.download,
                            epochs=args.epochs or 120, cache_features=args.cache_features,
                            workers=args.workers, device=args.device,
                            progress=not args.no_progress)
        print(json.dumps({k: v for k, v in res.items() if k != "history"}, indent=2))
        if args.json:
            from cdir.core.io import write_json

            write_json(args.json, res)
        return 0

    from cdir.core.errors import CdirError
    from cdir.core.io import write_json
    from eval.ssl import knn_eval, linear_probe

    if not args.encoder or not args.data:
        raise CdirError(f"cdir eval {args.kind} needs --encoder ckpt:PATH and --data DIR")
    from encoders.specs import plain_checkpoint

    encoder = str(plain_checkpoint(args.encoder, f"cdir eval {args.kind} takes a checkpoint "
                                                 f"(ckpt:PATH), not {args.encoder}"))
    res: dict[str, object] = {"encoder": args.encoder, "data": args.data, "test": args.val_data}
    common = {"workers": args.workers, "device": args.device, "progress": not args.no_progress}
    if args.kind == "knn":
        res["knn"] = knn_eval(encoder, args.data, args.val_data, **common)
    else:
        res["linear"] = linear_probe(encoder, args.data, args.val_data, epochs=args.epochs or 100,
                                     **common)
    print(json.dumps(res, indent=2))
    if args.json:
        write_json(args.json, res)
    return 0
