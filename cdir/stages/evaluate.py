"""The retrieval evaluation job behind `cdir eval`: modes → scorers → directed pairs → report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from cdir.core.errors import CdirError
from cdir.core.workspace import Workspace, spec_key
from cdir.stages.modes import MODES, ModeConfig, build_scorer, configured_modes, parse_weights


def parse_ks(text: str | None) -> tuple[int, ...] | None:
    if not text:
        return None
    try:
        ks = tuple(int(k) for k in text.split(","))
    except ValueError:
        raise CdirError(f"--ks must be comma-separated integers, got {text!r}") from None
    if any(k < 1 for k in ks):
        raise CdirError("--ks values must be >= 1")
    return ks


def parse_pairs(text: str | None, domains: list[str]) -> list[tuple[str, str]] | None:
    if not text:
        return None
    pairs = []
    for part in text.split(","):
        a, sep, b = part.partition(":")
        if not sep:
            raise CdirError(f"bad pair {part!r}: use QUERY_DOMAIN:GALLERY_DOMAIN")
        for d in (a, b):
            if d not in domains:
                raise CdirError(f"unknown domain {d!r}; the gallery has {', '.join(domains)}")
        pairs.append((a, b))
    return pairs


def mode_config(args: argparse.Namespace) -> ModeConfig:
    fuse = tuple(m for m in (args.fuse or "").split(",") if m)
    for m in fuse:
        if m not in MODES[:3]:
            raise CdirError(f"--fuse takes {', '.join(MODES[:3])}, not {m!r}")
    return ModeConfig(encoder=args.encoder, text_encoder=args.text_encoder, clip=args.clip,
                      captions=args.captions if (args.captions or args.text_encoder or args.clip)
                      else None,
                      fusion=fuse, weights=parse_weights(args.weights),
                      fusion_method=args.fusion_method)


def requested_modes(args: argparse.Namespace, cfg: ModeConfig) -> list[str]:
    if args.mode:
        modes = [m.strip() for m in args.mode.split(",") if m.strip()]
        for m in modes:
            if m not in MODES:
                raise CdirError(f"unknown mode {m!r}: choose from {', '.join(MODES)}")
        return modes
    modes = configured_modes(cfg)
    if not modes:
        raise CdirError("nothing to evaluate: give --encoder SPEC (visual), and/or --captions with "
                        "--text-encoder (cm-text) or --clip (cm-image)")
    return modes


def run_retrieval_eval(args: argparse.Namespace) -> int:
    from eval.protocol import default_ks, evaluate_pairs
    from eval.report import format_table, write_report

    if not args.workspace:
        raise CdirError("give the workspace: cdir eval -w DIR --encoder SPEC")
    ws = Workspace(args.workspace).require()
    manifest = ws.manifest()
    domains = sorted(manifest["domain"].astype(str).unique())
    if len(domains) < 2:
        raise CdirError(f"cross-domain evaluation needs at least two domains; {ws.root} has "
                        f"{len(domains)} ({', '.join(domains)})")
    ks = parse_ks(args.ks) or default_ks(ws.info().get("dataset", "folder"))
    pairs = parse_pairs(args.pairs, domains)
    cfg = mode_config(args)
    modes = requested_modes(args, cfg)
    run_name = args.run or spec_key("|".join(
        [",".join(modes)] + [s for s in (cfg.encoder, cfg.text_encoder, cfg.clip, cfg.captions)
                             if s]))
    out_root = ws.reports_dir(run_name)
    t0 = time.perf_counter()
    tables: dict[str, list[dict]] = {}
    for mode in modes:
        scorer, ok = build_scorer(ws, manifest, mode, cfg, device=args.device)
        sub = manifest[ok].reset_index(drop=True)
        if (~ok).any():
            print(f"[{mode}] {int((~ok).sum())} of {len(manifest)} images have no vector "
                  "(unreadable or uncaptioned) and are left out")
        if args.sweep and mode == "fusion":
            from eval.fusion import sweep_weights

            scorer, chosen, sub_q = sweep_weights(scorer, sub, pairs, ks, mode_names=(
                list(cfg.fusion) or configured_modes(cfg)))
            print(f"[fusion] weights chosen on the held-out half: {chosen}")
        else:
            sub_q = None
        results = evaluate_pairs(scorer, sub, pairs=pairs, ks=ks, keep_examples=args.examples,
                                 **({"query_mask": sub_q} if sub_q is not None else {}))
        title = f"{mode}: " + ", ".join(
            s for s in (cfg.encoder if mode in ("visual", "fusion") else None,
                        cfg.text_encoder if mode in ("cm-text", "fusion") else None,
                        cfg.clip if mode in ("cm-image", "fusion") else None) if s)
        if sub_q is not None:
            title += " (weights swept on one half of the queries; the other half reported)"
        out = out_root / mode if len(modes) > 1 else out_root
        write_report(results, out, title, manifest=sub)
        tables[mode] = results
        print(f"\n## {title}\n")
        print(format_table(results))
    if len(modes) > 1:
        comparison = compare_modes(tables, ks)
        from cdir.core.io import write_text

        write_text(out_root / "comparison.md", f"# Modes compared (UCDIR P@k)\n\n{comparison}")
        print("## modes compared (UCDIR P@k)\n")
        print(comparison)
    print(f"evaluated {len(modes)} mode(s) × {len(next(iter(tables.values()))) - 1} pairs in "
          f"{time.perf_counter() - t0:.1f}s; report in {Path(out_root)}")
    return 0


def compare_modes(tables: dict[str, list[dict]], ks: tuple[int, ...]) -> str:
    """One Markdown table: a row per directed pair, the P@k of every mode side by side."""
    from eval.report import format_value

    modes = list(tables)
    cols = [f"{m} P@{k}" for m in modes for k in ks]
    lines = ["| pair | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    pairs = [r["pair"] for r in tables[modes[0]]]
    by_mode = {m: {r["pair"]: r for r in rows} for m, rows in tables.items()}
    for pair in pairs:
        cells = []
        for m in modes:
            row = by_mode[m].get(pair, {})
            cells += [format_value(row.get(f"P@{k}")) for k in ks]
        name = f"**{pair}**" if pair == "mean" else pair
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

