"""`cdir search`: the top-k gallery images for query images, optionally within one domain."""

from __future__ import annotations

import argparse

from cdir.commands.common import add_command, add_device, add_workspace, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    from cdir.stages.modes import SINGLE_MODES

    p = add_command(sub, "search", help="search a workspace index with query images",
                    description="Search a workspace index with one or more query images. "
                    "The query is encoded like the index's vectors (image encoder, or caption "
                    "+ text encoder for caption indexes).")
    add_workspace(p)
    p.add_argument("--image", action="append", required=True, metavar="PATH",
                   help="query image (repeat for several)")
    p.add_argument("-k", type=positive_int, default=10, help="results per query")
    p.add_argument("--domain", help="only return images of this domain")
    p.add_argument("--query-domain", metavar="D",
                   help="the queries' domain: on a normalised index they get that domain's "
                        "transform, with a ?bn=domain encoder its BatchNorm statistics "
                        "(default: the domain of the nearest gallery centroid, named on stderr)")
    p.add_argument("--index", help="index name (default: the only index, or the --encoder one)")
    p.add_argument("--encoder", help="pick the index built with this encoder")
    p.add_argument("--query-encoder", metavar="SPEC",
                   help="encode the queries with this small encoder instead of the index's: a "
                        "student of `cdir distill ... --compatible INDEX` trained for this very "
                        "index (anything else is refused)")
    p.add_argument("--mode", choices=SINGLE_MODES,
                   help="for caption indexes: caption the query (cm-text) or use the CLIP image "
                        "tower (cm-image)")
    p.add_argument("--captioner", help="captioner for the query (default: the gallery's)")
    p.add_argument("--allow-missing", action="store_true",
                   help="search an index built without some gallery images (index build "
                        "--allow-missing); default: refused, naming the command that completes it")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_device(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json
    import sys
    from dataclasses import asdict

    from cdir.core.errors import CdirError
    from cdir.core.images import BadImage, load_image
    from cdir.stages.search import Searcher

    # a bad query image is listed and skipped: the others are still searched (exit status 1)
    queries, images, bad = [], [], []
    for path in args.image:
        try:
            images.append(load_image(path))
            queries.append(path)
        except BadImage as e:
            bad.append((path, str(e)))
    if not images:  # nothing to search: one line, naming the (first) reason
        more = f" (and {len(bad) - 1} more unreadable)" if len(bad) > 1 else ""
        raise CdirError(f"no query image could be read: {bad[0][1]}{more}")
    for _, reason in bad:
        print(f"cdir search: error: query skipped: {reason}", file=sys.stderr)
    searcher = Searcher(args.workspace, index=args.index, encoder=args.encoder, mode=args.mode,
                        captioner=args.captioner, device=args.device,
                        allow_missing=args.allow_missing, query_encoder=args.query_encoder)
    if searcher.missing is not None:
        print(f"note: searching without the images not indexed: {searcher.missing.describe()}",
              file=sys.stderr)
    if args.query_domain is not None and args.query_encoder:
        print(f"note: --query-domain {args.query_domain} changes nothing with --query-encoder: "
              "its vectors are already in the index's normalised space", file=sys.stderr)
    elif args.query_domain is not None and not searcher.infers_domain:
        print(f"note: --query-domain {args.query_domain} changes nothing on index "
              f"{searcher.index_name}: it is not normalised per domain and its encoder has no "
              "per-domain statistics", file=sys.stderr)
    results, captions, used = searcher.search(images, k=args.k, domain=args.domain,
                                              query_domain=args.query_domain)
    inferred = searcher.infers_domain and args.query_domain is None
    if inferred:
        for query, d in zip(queries, used, strict=True):
            print(f"{query}: {searcher.domain_transform} as domain {d} (nearest gallery "
                  "centroid; --query-domain chooses)", file=sys.stderr)
    if args.json:
        print(json.dumps([{"query": q, "caption": captions[i] if captions else None,
                           "query_domain": used[i], "query_domain_inferred": inferred,
                           "results": [asdict(h) for h in hits]}
                          for i, (q, hits) in enumerate(zip(queries, results, strict=True))]
                         + [{"query": q, "error": reason, "results": []} for q, reason in bad],
                         indent=2))
        return 1 if bad else 0
    for i, (query, hits) in enumerate(zip(queries, results, strict=True)):
        caption = f'  caption: "{captions[i]}"' if captions else ""
        print(f"query {query}{caption}")
        print(f"  {'rank':>4}  {'score':>7}  {'domain':<12} {'class':<24} path")
        for h in hits:
            print(f"  {h.rank:4d}  {h.score:7.4f}  {h.domain:<12} {h.class_name:<24} {h.path}")
    where = f" in {args.domain}" if args.domain else ""
    got = max((len(hits) for hits in results), default=0)
    top = (f"top {args.k}{where}" if got >= args.k
           else f"all {got} results{where} (fewer than -k {args.k})")
    normalized = f" ({searcher.normalize})" if searcher.normalizer is not None else ""
    skipped = f"; {len(bad)} skipped (unreadable)" if bad else ""
    by = f" with queries by {args.query_encoder}" if args.query_encoder else ""
    print(f"{len(images)} quer{'y' if len(images) == 1 else 'ies'}, {top}, "
          f"{searcher.mode} search of {searcher.spec}{normalized}{by}{skipped}")
    return 1 if bad else 0
