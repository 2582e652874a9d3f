"""What a recipe run prints and writes: the plan, the preflight, and the reproduction report
(WORKSPACE/reports/<name>/reproduction.md and .json, our numbers beside the literature's)."""

from __future__ import annotations

import dataclasses
import importlib.metadata
import os
import time
from typing import TYPE_CHECKING, Protocol

import yaml

from cdir.core.io import write_json, write_text
from cdir.recipe.config import LiteratureEntry
from cdir.stages.modes import MODES
from eval.protocol import one_relevant, pair_name
from eval.report import METRIC_NOTES, ONE_RELEVANT_NOTE, format_value, jsonable

if TYPE_CHECKING:
    from pathlib import Path

    from cdir.core.workspace import Workspace
    from cdir.recipe.config import Recipe
    from cdir.recipe.methods import Method
    from cdir.recipe.plan import Stage
    from cdir.recipe.preflight import Check


class Run(Protocol):
    """What the report reads of a recipe's run (the runner, which calls the report)."""

    r: Recipe
    ws: Workspace
    ws_root: Path
    report_dir: Path
    ks: tuple[int, ...]
    checks: list[Check]
    keys: dict[int, str]  # captioner index -> caption source key
    results: dict[str, dict]  # method id -> its evaluation

    def methods(self) -> list[Method]: ...

    def device_line(self) -> str: ...


# What the report says about the metrics, ours and the literature's.
OUR_METRIC = (
    "**Ours: UCDIR P@k** (the `retrieval_precision_cal` of conghui1002/UCDIR, also used by "
    "ProtoOT). For each query, R is the number of gallery images of its class "
    "and t = min(k, R); P@k = 100 × Σ(correct among the top t) / Σ t over all queries of the pair "
    "(a micro-average, truncated by R; *not* standard precision@k, which divides by k). Every "
    "image of domain A queries all images of domain B (transductive, no split), ranked by cosine "
    "similarity; ties go to the lower manifest row. The mean column is the unweighted mean over "
    "the directed pairs. At k = 1, UCDIR P@1 equals top-1 accuracy (standard precision@1) "
    "whenever every query has a relevant gallery image, so a reported \"Precision@1\" compares "
    "directly. Beside P@k: mAP@All (average precision over the whole ranked gallery, the mAP of "
    "the newer papers), and recall@k where every query has one relevant item. Each metric is "
    "defined below.")
LIT_METRIC = (
    "**Literature: values and metric names exactly as reported.** For CM (arXiv 2403.15152) and "
    "CoDA (arXiv 2302.06081) only the wizwand.com extracted-benchmark pages were accessible, not "
    "the papers' tables, so the definition behind a label such as \"Retrieval Accuracy (Ar → Cl)\" "
    "or \"C-S Score\" (which k; whether it is UCDIR P@k) is **not known**. CM most likely follows "
    "the UCDIR protocol (Office-Home P@1/5/15, the DomainNet 7-class subset P@50/100/200), but "
    "that is unverified. An entry without a stated k is shown in every P@k table, marked †; read "
    "those comparisons as indicative only until they are checked against the paper "
    "(arxiv.org/html/2403.15152v3). CM's BLIP-2 checkpoint, CLIP variant and captioning prompt are "
    "not stated in any accessible source either: the models below are this "
    "recipe's choices.")
_SUBSET_WARNING = (
    "  This class list is not checked against the papers that use it, so our numbers on it are "
    "**not comparable** with the literature's until it is (fix it in cdir/galleries/common.py "
    "CLASS_SUBSETS, or set dataset.classes).")
_DAGGER_NOTE = (
    "† The source does not say which k (or which precision) this value is: it is repeated in "
    "every P@k table. Its metric name as reported is in the next section.")


# -- printed before the run -----------------------------------------------------------------------

def format_plan(runner: Run, stages: list[Stage]) -> str:
    r = runner.r
    sets = f" with --set {' '.join(r.overrides)}" if r.overrides else ""
    lines = [f"recipe {r.name} ({r.config_path or '(config)'}{sets})",
             f"workspace {runner.ws_root}", f"device {runner.device_line()}", "plan:"]
    lines += [f"  {n:2d}. {st.kind:<15} {st.label}" for n, st in enumerate(stages, 1)]
    return "\n".join(lines)


def format_preflight(checks: list[Check]) -> str:
    lines = ["preflight:"]
    lines += [f"  {c.status.upper() if c.blocking else c.status:<8} {c.what}: {c.message}"
              for c in checks]
    missing = [c for c in checks if c.blocking]
    if not missing:
        skipped = any(c.status == "skipped" for c in checks)
        lines.append("preflight passed" + (" (some optional items are skipped)" if skipped else ""))
        return "\n".join(lines)
    lines.append(f"{len(missing)} required item(s) missing.")
    fetch = dict.fromkeys(c.fetch for c in missing if c.fetch)
    if fetch:
        lines.append("On a machine with internet (pip install -U huggingface_hub gives the `hf` "
                     "command):")
        lines += [f"  {f}" for f in fetch]
        lines.append("then copy that machine's Hugging Face cache (~/.cache/huggingface/hub) "
                     "here, or set HF_HOME to a copy of it.")
    return "\n".join(lines)


# -- the reproduction report ----------------------------------------------------------------------

def _pair_name(pair: str | None) -> str | None:
    """QUERY:GALLERY as our result rows name it (QUERY→GALLERY)."""
    if not pair:
        return None
    a, _, b = pair.partition(":")
    return pair_name(a.strip(), b.strip())


def _lit_value(e: LiteratureEntry) -> str:
    return f"{e.value_text} {e.unit}" if e.unit else e.value_text


def _cdir_version() -> str:
    try:
        return importlib.metadata.version("cdir")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _setup(runner: Run, methods: list[Method], info: dict, n_images: int,
           n_classes: int) -> list[str]:
    r, ds = runner.r, runner.r.dataset
    counts = info.get("counts") or {}
    doms = ", ".join(f"{d} {counts.get(d, '?')}" for d in sorted(counts)) or "?"
    md = ["## Setup", "",
          f"- **Dataset**: {ds.kind} at `{info.get('root', ds.root)}`; {n_images} images "
          f"({doms}); {n_classes} classes; split {ds.split}; fingerprint "
          f"`{info.get('fingerprint', '?')}`."]
    if ds.subset:
        state = "verified" if ds.subset.verified else "**UNVERIFIED**"
        md.append(f"- **Class subset `{ds.subset.name}`** ({state}): "
                  f"{', '.join(ds.subset.classes)}. Source: {ds.subset.source}.")
        if not ds.subset.verified:
            md.append(_SUBSET_WARNING)
    elif ds.classes:
        md.append(f"- **Classes**: {ds.classes}.")
    for i in sorted({m.captioner for m in methods if m.captioner is not None}):
        c = r.captioners[i]
        prompt = repr(c.prompt) if c.prompt else "none (the family's default)"
        md.append(f"- **Captioner** {c.display}: `{c.spec}`, prompt {prompt}, "
                  f"max_new_tokens {c.max_new_tokens}, min_new_tokens "
                  f"{c.min_new_tokens}, num_beams {c.num_beams}, dtype {c.dtype}; caption source "
                  f"`{runner.keys.get(i, '?')}`.")
    md.append(f"- **Protocol**: every directed pair of distinct domains"
              f"{'' if r.eval.pairs == 'all' else ' listed in eval.pairs'}; "
              f"k = {', '.join(map(str, runner.ks))}.")
    md.append("- **Methods** (rows of the tables):")
    for m in methods:
        res = runner.results[m.id]
        left = res["n_total"] - res["n_used"] if res["n_total"] else 0
        what = MODES[m.mode].about + (f" ({', '.join(m.fusion)}; {r.eval.fusion.method})"
                                      if MODES[m.mode].fuses else "")
        models = "; ".join(f"{k} `{v}`" for k, v in (("image encoder", m.encoder),
                                                      ("text encoder", m.text_encoder),
                                                      ("CLIP", m.clip)) if v)
        extra = f"; {left} images without a vector were left out" if left else ""
        rel = os.path.relpath(res["report_dir"], runner.report_dir)
        md.append(f"  - `{m.label}`: {what}. {models}{extra}. Full report: "
                  f"[{rel}/results.md]({rel}/results.md)")
    md += [f"- Skipped (optional, not available): {c.what}." for c in runner.checks
           if c.status == "skipped"]
    return md


def _precision_tables(runner: Run, methods: list[Method], pairs: list[str]) -> list[str]:
    """One table per k: our methods, then the literature's entries for our pairs at that k (an
    entry without a stated k in every table, marked †)."""
    cols = pairs + ["mean"]
    md: list[str] = []
    dagger = False
    for k in runner.ks:
        md += [f"## UCDIR P@{k} (%), every directed pair", "",
               "| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for m in methods:
            by_pair = {row["pair"]: row for row in runner.results[m.id]["rows"]}
            cells = [format_value(by_pair.get(p, {}).get(f"P@{k}")) for p in cols]
            md.append(f"| {m.short} | " + " | ".join(cells) + " |")
        reported: dict[str, dict[str, list[str]]] = {}  # method -> pair -> values
        for e in runner.r.literature:
            pname = _pair_name(e.pair)
            if not e.comparable or pname not in pairs:
                continue
            if e.compare_with and e.compare_with != f"P@{k}":
                continue
            mark = "" if e.compare_with else "†"
            reported.setdefault(e.method, {}).setdefault(pname, []).append(_lit_value(e) + mark)
            dagger = dagger or bool(mark)
        for method, values in reported.items():
            cells = [" / ".join(values.get(p, [])) for p in cols]
            md.append(f"| *{method} (reported)* | " + " | ".join(cells) + " |")
        md.append("")
    rows = [row for m in methods for row in runner.results[m.id]["rows"]]
    one = one_relevant(rows)
    extra = ([f"recall@{k}" for k in runner.ks if k != 1] if one else []) + ["mAP@All"]
    for col in extra:  # ours only: the literature entries above are all P@k
        md += [f"## {col} (%), every directed pair", ""]
        if one:
            md += [ONE_RELEVANT_NOTE + ".", ""]
        md += ["| method | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
        for m in methods:
            by_pair = {row["pair"]: row for row in runner.results[m.id]["rows"]}
            md.append(f"| {m.short} | " + " | ".join(
                format_value(by_pair.get(p, {}).get(col)) for p in cols) + " |")
        md.append("")
    return md + ([_DAGGER_NOTE, ""] if dagger else [])


def _literature_rows(runner: Run, methods: list[Method], pairs: list[str]) -> list[dict]:
    """Each literature entry as reported, with every method's numbers for its pair."""
    rows = []
    for e in runner.r.literature:
        pname = _pair_name(e.pair)
        ours = {}
        for m in methods:
            row = next((x for x in runner.results[m.id]["rows"] if x["pair"] == pname), None)
            if row is not None:
                ours[m.label] = {f"P@{k}": row.get(f"P@{k}") for k in runner.ks}
        rows.append({**dataclasses.asdict(e), "pair_name": pname, "ours": ours,
                     "in_our_pairs": pname in pairs})
    return rows


def _literature_table(runner: Run, methods: list[Method], lit_rows: list[dict]) -> list[str]:
    md = ["## Literature (as reported) beside ours", ""]
    if not lit_rows:
        return md + ["No published numbers are listed for this dataset in the recipe."]
    primary = methods[0] if methods else None
    head = f"ours ({primary.short})" if primary else "ours"
    md += [f"| method | pair | metric as reported | value | {head} | source | status |",
           "|---|---|---|---:|---|---|---|"]
    for e, row in zip(runner.r.literature, lit_rows, strict=True):
        if e.pair and not e.comparable:
            ours = "not comparable (different benchmark)"
        elif primary and row["in_our_pairs"] and e.comparable:
            values = row["ours"].get(primary.label, {})
            shown = [e.compare_with] if e.compare_with else [f"P@{k}" for k in runner.ks]
            ours = ", ".join(f"{c} {format_value(values.get(c))}" for c in shown)
        elif e.pair and not row["in_our_pairs"]:
            ours = "pair not evaluated here"
        elif not e.pair:
            ours = "not a per-pair number"
        else:
            ours = ""
        status = ("verified" if e.verified else "unverified") + (f": {e.note}" if e.note else "")
        paper = f" ({e.paper})" if e.paper else ""
        md.append(f"| {e.method}{paper} | {row['pair_name'] or '—'} | {e.metric} | "
                  f"{_lit_value(e)} | {ours} | {e.source} | {status} |")
    return md + ["", "Every method's value for each listed pair is in `reproduction.json` "
                     "(`literature[].ours`) and in the P@k tables above."]


def write_reproduction(runner: Run, stages: list[Stage]) -> None:
    """Write reproduction.md, reproduction.json and the resolved recipe.yaml into the report
    folder, from the eval stages' results."""
    r, ds = runner.r, runner.r.dataset
    methods = [m for m in runner.methods() if m.id in runner.results]
    pairs = list(dict.fromkeys(row["pair"] for m in methods for row in runner.results[m.id]["rows"]
                               if row["pair"] != "mean"))
    info = runner.ws.info()
    manifest = runner.ws.manifest()
    n_classes = int(manifest["class_name"].nunique())
    version = _cdir_version()
    lit_rows = _literature_rows(runner, methods, pairs)

    sets = f", overrides `{' '.join(r.overrides)}`" if r.overrides else ""
    md = [f"# {r.title or r.name}", "",
          f"Recipe `{r.name}` (`{r.config_path}`{sets}), written "
          f"{time.strftime('%Y-%m-%d %H:%M:%S')} by cdir {version} on {runner.device_line()}. "
          f"Workspace `{runner.ws_root}`; the resolved config is `recipe.yaml` beside this file.",
          ""]
    md += _setup(runner, methods, info, len(manifest), n_classes)
    md += ["", "## Metrics: what is compared", "", OUR_METRIC, "", METRIC_NOTES, LIT_METRIC, ""]
    md += _precision_tables(runner, methods, pairs)
    md += _literature_table(runner, methods, lit_rows)
    if r.notes:
        md += ["", "## Notes", ""] + [f"- {n}" for n in r.notes]
    md += ["", "## Stages", "", "| # | stage | what | status | seconds |",
           "|---:|---|---|---|---:|"]
    md += [f"| {n} | {st.kind} | {st.label} | {st.status}"
           f"{': ' + st.detail if st.detail else ''} | {st.seconds:.1f} |"
           for n, st in enumerate(stages, 1)]
    md.append("")

    subset = ds.subset
    counts = info.get("counts") or {}
    doc = {
        "recipe": r.name, "title": r.title, "config": r.config_path, "overrides": r.overrides,
        "written": time.strftime("%Y-%m-%dT%H:%M:%S"), "cdir_version": version,
        "device": runner.device_line(), "workspace": str(runner.ws_root),
        "dataset": {"kind": ds.kind, "root": info.get("root", ds.root), "counts": counts,
                    "images": len(manifest), "classes": n_classes, "split": ds.split,
                    "domains": sorted(counts), "fingerprint": info.get("fingerprint"),
                    "class_subset": {"name": subset.name, "classes": list(subset.classes),
                                     "source": subset.source, "verified": subset.verified}
                    if subset else None},
        "ks": list(runner.ks), "pairs": pairs,
        "metrics": {"ours": OUR_METRIC, "literature": LIT_METRIC},
        "methods": [{"id": m.id, "label": m.label, "short": m.short, "mode": m.mode,
                     "captioner": r.captioners[m.captioner].spec
                     if m.captioner is not None else None,
                     "captions": runner.keys.get(m.captioner), "encoder": m.encoder,
                     "text_encoder": m.text_encoder, "clip": m.clip, "fusion": list(m.fusion),
                     **runner.results[m.id]} for m in methods],
        "literature": lit_rows, "notes": r.notes,
        "skipped": [{"what": c.what, "reason": c.message} for c in runner.checks
                    if c.status == "skipped"],
        "stages": [{"kind": s.kind, "label": s.label, "status": s.status, "detail": s.detail,
                    "seconds": s.seconds} for s in stages],
    }
    write_text(runner.report_dir / "reproduction.md", "\n".join(md))
    write_json(runner.report_dir / "reproduction.json", jsonable(doc))
    write_text(runner.report_dir / "recipe.yaml",
               yaml.safe_dump(r.to_dict(), sort_keys=False, allow_unicode=True))
