"""`cdir adapt` on the emoji gallery: retrieval before and after the label-free adaptation.

    python bench/adapt_emoji.py [-w runs/emoji] [--encoder ckpt:encoders/weights/emoji_synco.pt]
        [--config configs/adapt_emoji.yaml] [--seeds 0 1 2] [--epochs E] [--steps S]
        [--set KEY=VALUE ...] [--features "grid=4&layers=3,4"] [--lodo] [--out runs/bench-adapt]

Needs the emoji workspace (``cdir data emoji -w runs/emoji``). Every evaluation embeds the
encoder (spec ``ckpt:PATH?FEATURES``, ``--features`` default ``grid=4&layers=3,4`` as `make run`;
empty: global pooling) into the workspace and runs
`cdir.stages.evaluate.evaluate` with ``normalize="none,domain-whiten"`` and
``rerank="none,csls,dual-softmax"``; the figures are UCDIR P@1 (%), the mean over the evaluated
directed pairs, for plain cosine, domain-whitened vectors, and domain-whitened vectors with CSLS
or with the dual softmax.

1. Seeds: the starting encoder, then one `adapt_encoder` run per seed (``--epochs`` epochs,
   default 2; ``--steps`` caps the steps per epoch via ``train.max_steps_per_epoch``; ``--set``
   items pass through; no label monitor) into ``OUT/seed-N/``, and its ``encoder.pt`` (the
   label-free choice of the run) evaluated on all six directed pairs. The table has the adapt
   wall time and the label-free criterion the run logged last (``select_mutual_nn_rate`` of the
   last line of ``OUT/seed-N/metrics.jsonl``: that of the final encoder, which is not always
   the one behind encoder.pt; the start row has the value of the epoch-0 round, i.e. of the
   starting encoder), the epoch encoder.pt comes from (0: the starting weights were kept), the
   mean ± sample std over the seeds and the ratio adapted mean / start. ``--seeds`` with no
   value skips this part.
2. ``--lodo`` (leave one domain out): for each domain H, a workspace ``OUT/lodo-H/ws`` over the
   same gallery folder without H, adaptation there (the first seed, the same budget; with two
   domains the miner skips the cycle check by itself), then the adapted encoder and the
   starting one on the full workspace, only the four directed pairs that involve H; the adapted
   one also with per-domain BatchNorm statistics (``&bn=domain``: the unseen domain's estimated
   on its own images at embedding time, no training on it).

Labels are used only by `evaluate`, to score; the adaptation never sees them. Writes only
under ``--out`` and the workspace's ``embeddings/`` and ``reports/`` folders.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from cdir.commands.common import add_overrides  # noqa: E402
from cdir.core.errors import CdirError  # noqa: E402
from cdir.core.workspace import Workspace  # noqa: E402

VARIANTS = {"plain": "visual", "whitened": "visual+domain-whiten",
            "whitened+CSLS": "visual+domain-whiten+csls",
            "whitened+dual-softmax": "visual+domain-whiten+dual-softmax"}
CRITERION = "select_mutual_nn_rate"


def default_encoder() -> str:
    from encoders.weights import shipped

    return f"ckpt:{shipped('emoji_synco.pt')}"


def say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def scores(workspace: str, encoder: str, features: str,
           pairs: list[tuple[str, str]] | None = None, split: str = "test") -> dict[str, float]:
    """Embed ``encoder`` (a ``ckpt:PATH`` spec, with ``?features`` when not empty) into the
    workspace and return the mean P@1 (%) over ``pairs`` (default: all) of each variant, on the
    categories of ``split``."""
    from cdir.stages.embed import embed_images
    from cdir.stages.evaluate import evaluate

    spec = encoder + (f"?{features}" if features else "")
    t = time.perf_counter()
    emb = embed_images(workspace, spec, progress=False)
    res = evaluate(workspace, encoder=spec, normalize="none,domain-whiten",
                   rerank="none,csls,dual-softmax",
                   pairs=[f"{a}:{b}" for a, b in pairs] if pairs else None, examples=0,
                   progress=False, split=split, normalize_dim=0)  # full width, as recorded
    out = {}
    for name, key in VARIANTS.items():
        rows = json.loads((Path(res["report"]) / key / "results.json").read_text())["results"]
        assert rows[-1]["pair"] == "mean"
        out[name] = float(rows[-1]["P@1"])
    say(f"  {spec}: embedded {emb['new']} new rows in {emb['seconds']:.0f} s; embed + evaluate "
        f"({len(res['results'][VARIANTS['plain']]) - 1} pairs) {time.perf_counter() - t:.0f} s")
    return out


def adapt(workspace: str, args: argparse.Namespace, seed: int, out: Path) -> dict:
    """One adaptation run: its encoder.pt, the epoch it comes from, the wall seconds, the
    criterion logged last (the final encoder's) and the one of the epoch-0 round (the starting
    encoder's)."""
    from cdir.stages.adapt import adapt_encoder
    from encoders.engine.checkpoint import encoder_settings

    sets = [*(["train.max_steps_per_epoch=" + str(args.steps)] if args.steps else []),
            *args.set, "train.progress=false"]
    t = time.perf_counter()
    summary = adapt_encoder(workspace, args.encoder, "xdomain", args.config, sets, out=out,
                            epochs=args.epochs, seed=seed, monitor=False, force=True)
    wall = time.perf_counter() - t
    if not summary.get("encoder"):
        raise CdirError(f"the adaptation into {out} wrote no encoder.pt")
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    # the final encoder's value has a key of its own (select_final_...)
    final = CRITERION.replace("select_", "select_final_", 1)
    last = float(lines[-1].get(final, lines[-1].get(CRITERION, math.nan))) if lines else math.nan
    first = float(lines[0].get("mine_" + CRITERION[len("select_"):], math.nan)) if lines \
        else math.nan
    chosen = encoder_settings(summary["encoder"])["epoch"]
    losses = ", ".join(f"{x:.4f}" for x in summary["epoch_losses"])
    say(f"  adapted seed {seed} into {out} in {wall:.0f} s (epoch losses {losses}; encoder.pt "
        f"from epoch {chosen})")
    return {"encoder": summary["encoder"], "epoch": chosen, "wall": wall, "criterion": last,
            "start_criterion": first}


def cell(x: float, digits: int = 2) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def mean_std(values: list[float], digits: int = 2) -> str:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return "-"
    std = statistics.stdev(values) if len(values) > 1 else math.nan
    return f"{statistics.fmean(values):.{digits}f} ± {cell(std, digits)}"


def seeds_table(args: argparse.Namespace, out: Path) -> None:
    say(f"starting encoder {args.encoder}; scored on the {args.split} categories")
    start = scores(args.workspace, args.encoder, args.features, split=args.split)
    runs = []
    for seed in args.seeds:
        say(f"seed {seed}")
        run = adapt(args.workspace, args, seed, out / f"seed-{seed}")
        adapted = scores(args.workspace, f"ckpt:{run['encoder']}", args.features,
                         split=args.split)
        runs.append((seed, adapted, run))

    names = list(VARIANTS)
    start_crit = runs[0][2]["start_criterion"]
    print(f"\n## P@1 (%), mean over the 6 directed pairs: {args.encoder}"
          f"{f'?{args.features}' if args.features else ''}, {args.epochs} epoch(s)"
          f"{f', {args.steps} steps/epoch' if args.steps else ''}\n")
    print("| encoder | " + " | ".join(names)
          + f" | adapt wall (s) | {CRITERION} (last line) | encoder.pt epoch |")
    print("|---|" + "---:|" * (len(names) + 3))
    print("| start | " + " | ".join(cell(start[n]) for n in names)
          + f" | - | {cell(start_crit, 4)} (epoch-0 round) | - |")
    for seed, sc, run in runs:
        print(f"| seed {seed} | " + " | ".join(cell(sc[n]) for n in names)
              + f" | {run['wall']:.0f} | {cell(run['criterion'], 4)} | {run['epoch']} |")
    cols = {n: [sc[n] for _, sc, _ in runs] for n in names}
    crits = [run["criterion"] for _, _, run in runs]
    print("| adapted mean ± std | " + " | ".join(mean_std(cols[n]) for n in names)
          + f" | {mean_std([run['wall'] for _, _, run in runs], 0)} | {mean_std(crits, 4)} | - |")
    known = [c for c in crits if math.isfinite(c)]
    ratio = statistics.fmean(known) / start_crit if start_crit and known else math.nan
    print("| adapted mean / start | "
          + " | ".join(cell(statistics.fmean(cols[n]) / start[n], 3) if start[n] else "-"
                       for n in names) + f" | - | {cell(ratio, 3)} | - |")


def lodo_table(args: argparse.Namespace, out: Path) -> None:
    from cdir.stages.gallery import describe_gallery

    ws = Workspace(args.workspace)
    domains = sorted(ws.manifest()["domain"].astype(str).unique())
    gallery = ws.info().get("root") or str(ws.root / "gallery")
    seed = args.seeds[0] if args.seeds else 0
    rows = []
    for held in domains:
        kept = [d for d in domains if d != held]
        say(f"held out {held}: adapting on {', '.join(kept)}")
        sub = out / f"lodo-{held}" / "ws"
        describe_gallery(sub, "folder", root=gallery, domains=",".join(kept), progress=False)
        run = adapt(str(sub), args, seed, out / f"lodo-{held}" / "adapt")
        pairs = [p for d in kept for p in ((held, d), (d, held))]
        adapted = f"ckpt:{run['encoder']}"
        with_bn = "&".join(filter(None, (args.features, "bn=domain")))
        rows.append((held, scores(args.workspace, args.encoder, args.features, pairs, args.split),
                     scores(args.workspace, adapted, args.features, pairs, args.split),
                     scores(args.workspace, adapted, with_bn, pairs, args.split),
                     run["wall"], run["epoch"]))

    names = list(VARIANTS)
    print(f"\n## leave one domain out: P@1 (%), mean over the 4 directed pairs with the held-out "
          f"domain (adapted on the other two, seed {seed})\n")
    print("| held out | " + " | ".join(f"start {n} | adapted {n} | adapted+BN {n}"
                                       for n in names) + " | adapt wall (s) | encoder.pt epoch |")
    print("|---|" + "---:|" * (3 * len(names) + 2))
    for held, *cols, wall, epoch in rows:
        print(f"| {held} | " + " | ".join(" | ".join(cell(c[n]) for c in cols) for n in names)
              + f" | {wall:.0f} | {epoch} |")
    print("| **mean** | " + " | ".join(
        " | ".join(cell(statistics.fmean(r[j][n] for r in rows)) for j in (1, 2, 3))
        for n in names) + f" | {statistics.fmean(r[4] for r in rows):.0f} | - |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-w", "--workspace", default=str(ROOT / "runs" / "emoji"))
    ap.add_argument("--encoder", default=default_encoder(), help="starting encoder (ckpt:PATH)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "adapt_emoji.yaml"))
    ap.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2],
                    help="adaptation seeds (none: skip the seeds table)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="train.max_steps_per_epoch")
    add_overrides(ap, "method.partner_p=0.9")  # passed to cdir adapt
    ap.add_argument("--features", default="grid=4&layers=3,4",
                    help="encoder options of every evaluation (ckpt:PATH?FEATURES; '' for none)")
    ap.add_argument("--lodo", action="store_true", help="also leave each domain out")
    ap.add_argument("--split", default="test", choices=("dev", "test", "all"),
                    help="the categories scored: test (what is reported; default), dev (what "
                         "choices are made on) or all")
    ap.add_argument("--out", default=str(ROOT / "runs" / "bench-adapt"))
    args = ap.parse_args()

    if not (Path(args.workspace) / "manifest.parquet").exists():
        print(f"no emoji workspace at {args.workspace}: make it with "
              f"`cdir data emoji -w {args.workspace}`", file=sys.stderr)
        return 2
    out = Path(args.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    try:
        if args.seeds:
            seeds_table(args, out)
        if args.lodo:
            lodo_table(args, out)
    except CdirError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"\ntotal wall time: {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
