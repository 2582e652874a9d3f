"""The evaluate stage: retrieval on every directed domain pair, for each mode (modes → scorers →
directed pairs → report under ``WORKSPACE/reports/RUN/``)."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.workspace import Workspace, spec_key
from cdir.stages.modes import (
    MODES,
    SINGLE_MODES,
    Coverage,
    ModeConfig,
    build_scorer,
    configured_modes,
    coverage,
    mode_models,
    parse_weights,
    require_coverage,
    vectors_scorer,
)
from eval.rerank import DEFAULT_CSLS_K, DEFAULT_DUAL_SOFTMAX_BETA, RERANKERS
from indexes.normalize import DEFAULT_PCA_DIM, NORMALIZERS

if TYPE_CHECKING:
    import pandas as pd


def _names(value: str | Sequence[str] | None) -> list[str]:
    """Comma-separated text or a list, as a list of non-empty names."""
    items = value.split(",") if isinstance(value, str) else list(value or [])
    return [str(x).strip() for x in items if str(x).strip()]


def parse_ks(text: str | Sequence[int] | None, note: Callable[[str], None] | None = None
             ) -> tuple[int, ...] | None:
    """'1,5,15' (or a list) → (1, 5, 15), sorted and without repeats (``note`` is told when that
    changed them); None when not given."""
    from eval.metrics import normalize_ks

    if not text:
        return None
    try:
        given = [int(k) for k in (text.split(",") if isinstance(text, str) else text)]
    except (TypeError, ValueError):
        raise CdirError(f"--ks must be comma-separated integers, got {text!r}") from None
    if any(k < 1 for k in given):
        raise CdirError("--ks values must be >= 1")
    ks = normalize_ks(given)
    if note is not None and list(ks) != given:
        note(f"--ks {','.join(map(str, given))} evaluated as {','.join(map(str, ks))} "
             "(sorted, repeats dropped)")
    return ks


def parse_pairs(text: str | Sequence[str] | None, domains: list[str]
                ) -> list[tuple[str, str]] | None:
    """'Art:Clipart,Clipart:Art' (or a list of QUERY:GALLERY) → directed pairs; None: all."""
    if not text:
        return None
    pairs = []
    for part in text.split(",") if isinstance(text, str) else text:
        a, sep, b = part.partition(":")
        if not sep:
            raise CdirError(f"bad pair {part!r}: use QUERY_DOMAIN:GALLERY_DOMAIN")
        for d in (a, b):
            if d not in domains:
                raise CdirError(f"unknown domain {d!r}; the gallery has {', '.join(domains)}")
        pairs.append((a, b))
    return pairs


def _recorder(echo: Callable[[str], None] | None) -> tuple[list[str], Callable[..., None]]:
    """The printed lines of an evaluation, and ``say``, which adds lines and hands each to
    ``echo`` at once (a long evaluation shows each table when it is done)."""
    lines: list[str] = []

    def say(*texts: str) -> None:
        for text in texts:
            lines.append(text)
            if echo is not None:
                echo(text)

    return lines, say


def select_split(manifest: pd.DataFrame, split: str | None) -> pd.DataFrame:
    """The rows of the manifest's ``split`` (``all`` or None: every row), renumbered from 0.
    Queries and gallery alike come from these rows: a split of categories is evaluated as a
    gallery of those categories (normalisation statistics included)."""
    if not split or split == "all":
        return manifest
    have = sorted(manifest["split"].astype(str).unique())
    if split not in have:
        raise CdirError(f"--split {split}: the manifest has no such split; its splits are "
                        f"{', '.join(have + ['all'] if 'all' not in have else have)}")
    return manifest[manifest["split"].astype(str) == split].reset_index(drop=True)


def _requested_modes(modes: str | Sequence[str] | None, cfg: ModeConfig) -> list[str]:
    if modes:
        names = _names(modes)
        for m in names:
            if m not in MODES:
                raise CdirError(f"unknown mode {m!r}: choose from {', '.join(MODES)}")
        return names
    names = configured_modes(cfg)
    if not names:
        raise CdirError("nothing to evaluate: give --encoder SPEC (visual), and/or --captions with "
                        "--text-encoder (cm-text) or --clip (cm-image)")
    return names


def _choices(value: str | Sequence[str] | None, table: dict, flag: str) -> list[str]:
    """Comma-separated names (or a list) checked against the keys of ``table``; ["none"] when
    not given."""
    names = _names(value) or ["none"]
    for name in names:
        if name not in table:
            raise CdirError(f"{flag} takes {', '.join(table)} (comma-separated), not {name!r}")
    return list(dict.fromkeys(names))  # a repeat would only evaluate the same thing twice


def variant_name(mode: str, normalize: str, rerank: str) -> str:
    """The name of one (mode, normalisation, rerank) evaluation: a column group of the comparison
    and its report folder; the plain mode keeps its own name."""
    return "+".join([mode] + [x for x in (normalize, rerank) if x != "none"])


def evaluate(workspace: str | os.PathLike, encoder: str | None = None,
             text_encoder: str | None = None, clip: str | None = None,
             captions: str | None = None, modes: str | Sequence[str] | None = None,
             fuse: str | Sequence[str] | None = None,
             weights: str | dict[str, float] | None = None, fusion_method: str = "zscore",
             sweep: bool = False, ks: str | Sequence[int] | None = None,
             pairs: str | Sequence[str] | None = None, run: str | None = None,
             examples: int = 4, device: str | None = None, progress: bool = True,
             echo: Callable[[str], None] | None = None,
             normalize: str | Sequence[str] | None = None,
             rerank: str | Sequence[str] | None = None,
             csls_k: int = DEFAULT_CSLS_K, split: str | None = None,
             allow_missing: bool = False, seeds: Sequence[int] | None = None,
             normalize_dim: int | None = None,
             dual_softmax_beta: float = DEFAULT_DUAL_SOFTMAX_BETA) -> dict[str, Any]:
    """Evaluate every mode in ``modes`` (default: each mode the models given configure) on the
    directed pairs ``pairs`` (default: all) at ``ks`` (default: the dataset's), and write the
    reports to ``WORKSPACE/reports/RUN/`` (one folder per mode when there are several, and a
    comparison). ``fuse``, ``weights`` and ``fusion_method`` configure ``fusion``; ``sweep``
    chooses its weights on a held-out half of the queries. ``normalize`` (names of
    `indexes.normalize.NORMALIZERS`) and ``rerank`` (names of `eval.rerank.RERANKERS`, ``csls``
    with neighbourhood ``csls_k``, ``dual-softmax`` with ``dual_softmax_beta``) each give one
    evaluation per name and mode, side by side in the comparison; the statistics are fitted on
    all the evaluated rows, without labels, after a shared PCA to ``normalize_dim`` dims (None:
    the default `cdir index build` uses, 0: none), so the figure is the one a normalised index
    serves.
    ``split`` evaluates only the manifest rows of that split (``dev``/``test`` categories of a
    gallery with a category split; default ``all``): queries and gallery alike. Stored vectors
    that do not cover the evaluated rows (images not embedded yet; unreadable ones do not count)
    are refused unless ``allow_missing``; then the missing counts go into the report's settings
    and titles.

    ``run`` names the report folder; by default the name covers every setting that changes the
    report (modes, models and the content hash of their weights, ks, pairs, fusion settings,
    examples), so runs with other settings or retrained weights never overwrite each other.
    Names and lists may be comma-separated text (as on the command line) or lists. Returns the
    report folder, the modes, ks, pairs, the ``settings``, each mode's result rows, the printed
    ``lines`` (notes and tables, in order) and the one-line ``summary``; ``echo`` gets each of
    those lines as soon as it is known, so a long evaluation shows each mode's table when that
    mode is done.

    ``seeds`` evaluates one trained model per seed: ``{seed}`` in a model spec (``encoder``,
    ``text_encoder``, ``clip``) is replaced by each seed in turn, each seed's report goes to
    ``RUN/seed_<seed>/``, and ``RUN/seeds.md`` / ``seeds.json`` give every figure as mean ± sample
    standard deviation over the seeds (:func:`evaluate_seeds`)."""
    if isinstance(examples, bool) or not isinstance(examples, int) or examples < 0:
        raise CdirError(f"examples must be a whole number of at least 0, got {examples!r}")
    if seeds:
        return evaluate_seeds(**dict(locals()))
    from eval.protocol import default_ks, evaluate_pairs
    from eval.report import format_table, write_report

    lines, say = _recorder(echo)

    ws = Workspace(workspace).require()
    split = split or "all"
    manifest = select_split(ws.manifest(), split)
    domains = sorted(manifest["domain"].astype(str).unique())
    if len(domains) < 2:
        raise CdirError(f"cross-domain evaluation needs at least two domains; {ws.root} has "
                        f"{len(domains)} ({', '.join(domains)})")
    ks = parse_ks(ks, note=say) or default_ks(ws.info().get("dataset", "folder"))
    pairs = parse_pairs(pairs, domains)
    fused = tuple(_names(fuse))
    for m in fused:
        if m not in SINGLE_MODES:
            raise CdirError(f"--fuse takes {', '.join(SINGLE_MODES)}, not {m!r}")
    cfg = ModeConfig(encoder=encoder, text_encoder=text_encoder, clip=clip,
                     captions=captions if (captions or text_encoder or clip) else None,
                     fusion=fused,
                     weights=dict(weights) if isinstance(weights, dict) else parse_weights(weights),
                     fusion_method=fusion_method)
    modes = _requested_modes(modes, cfg)
    norms = _choices(normalize, NORMALIZERS, "--normalize")
    reranks = _choices(rerank, RERANKERS, "--rerank")
    if isinstance(csls_k, bool) or not isinstance(csls_k, int) or csls_k < 1:
        raise CdirError(f"--csls-k must be a positive integer, got {csls_k!r}")
    if isinstance(dual_softmax_beta, bool) or not isinstance(dual_softmax_beta, (int, float)) \
            or not (math.isfinite(dual_softmax_beta) and dual_softmax_beta > 0):
        raise CdirError(f"--dual-softmax-beta must be a positive number, got "
                        f"{dual_softmax_beta!r}")
    if normalize_dim is not None and (isinstance(normalize_dim, bool)
                                      or not isinstance(normalize_dim, int) or normalize_dim < 0):
        raise CdirError(f"--normalize-dim must be a non-negative integer, got {normalize_dim!r}")
    variants = [(m, n, r) for m in modes for n in norms for r in reranks]
    settings = report_settings(modes, cfg, ks, pairs, sweep, examples, norms, reranks, csls_k,
                               split, dual_softmax_beta)
    settings.update(weights_settings(settings, ws))
    missing = _coverage(ws, manifest, modes, cfg, allow_missing)
    partial = "; ".join(cov.describe() for covs in missing.values() for cov in covs
                        if cov.n_missing)
    if partial:  # a partial evaluation says so, and never takes a whole one's report name
        settings["missing"] = partial
        say(f"evaluating without the images not embedded yet (--allow-missing): {partial}")
    if norms != ["none"]:
        if normalize_dim is not None:
            settings["normalize_dim"] = str(normalize_dim)
        elif any(NORMALIZERS[n].whiten for n in norms):
            settings["normalize_dim"] = f"default ({DEFAULT_PCA_DIM} where wider)"
            say(f"whitening after a shared PCA to {DEFAULT_PCA_DIM} dims where the vectors are "
                "wider (the default, as `cdir index build`; --normalize-dim 0 keeps them whole)")
    if split != "all":
        say(f"split {split}: {manifest['class_name'].nunique()} categories, "
            f"{len(manifest)} images")
    run_name = run or spec_key("|".join(f"{k}={v}" if k != "modes" else v
                                        for k, v in settings.items()))
    out_root = ws.reports_dir(run_name)
    t0 = time.perf_counter()
    tables: dict[str, list[dict]] = {}
    for mode, norm, rr in variants:
        key = variant_name(mode, norm, rr)
        scorer, ok = build_scorer(ws, manifest, mode, cfg, device=device, normalize=norm,
                                  rerank=rr, csls_k=csls_k, normalize_dim=normalize_dim,
                                  beta=dual_softmax_beta)
        sub = manifest[ok].reset_index(drop=True)
        if (~ok).any() and (norm, rr) == (norms[0], reranks[0]):  # once per mode
            gaps = min(int((~ok).sum()), max((c.n_missing for c in missing[mode]), default=0))
            why = [f"{n} {what}" for n, what in ((gaps, "not embedded yet"), (
                int((~ok).sum()) - gaps, "unreadable or uncaptioned")) if n]
            say(f"[{mode}] {int((~ok).sum())} of {len(manifest)} images have no vector and are "
                f"left out: {', '.join(why)}")
        if sweep and MODES[mode].fuses:
            from eval.fusion import sweep_weights

            scorer, chosen, sub_q = sweep_weights(scorer, sub, pairs, ks, mode_names=(
                list(cfg.fusion) or configured_modes(cfg)))
            say(f"[fusion] weights chosen on the held-out half: {chosen}")
        else:
            sub_q = None
        results = evaluate_pairs(scorer, sub, pairs=pairs, ks=ks, keep_examples=examples,
                                 progress=progress,
                                 **({"query_mask": sub_q} if sub_q is not None else {}))
        if (norm, rr) == (norms[0], reranks[0]):
            say(*_na_notes(mode, results, ks))
        title = f"{key}: " + ", ".join(mode_models(mode, cfg)) + f" [split {split}]"
        if RERANKERS[rr].uses_k:
            title += f" ({rr.upper()} k={csls_k})"
        elif RERANKERS[rr].uses_beta:
            title += f" ({rr}, beta {dual_softmax_beta:g})"
        if any(c.n_missing for c in missing[mode]):
            title += " — partial: " + "; ".join(c.describe() for c in missing[mode])
        if sub_q is not None:
            title += " (weights swept on one half of the queries; the other half reported)"
        out = out_root / key if len(variants) > 1 else out_root
        write_report(results, out, title, manifest=sub, settings=settings)
        tables[key] = results
        say(f"\n## {title}\n", format_table(results))
    if len(variants) > 1:
        comparison = compare_modes(tables, ks)
        from cdir.core.io import write_text

        write_text(out_root / "comparison.md", f"# Modes compared, split {split}\n\n{comparison}")
        say(f"## modes compared, split {split}\n", comparison)
    summary = (f"evaluated {len(variants)} mode(s) × {len(next(iter(tables.values()))) - 1} pairs "
               f"in {time.perf_counter() - t0:.1f}s; report in {Path(out_root)}")
    return {"report": str(out_root), "split": split, "modes": modes, "ks": ks, "pairs": pairs,
            "settings": settings, "results": tables, "lines": lines, "summary": summary}


def _na_notes(mode: str, results: list[dict], ks: tuple[int, ...]) -> list[str]:
    """Why a pair's row reads n/a: none of its queries has a relevant image in that gallery
    (within one domain the query itself is left out, so a class with one image per domain has
    none)."""
    import math

    out = []
    for r in results:
        if r["pair"] == "mean" or not all(
                isinstance(r.get(f"P@{k}"), float) and math.isnan(r[f"P@{k}"]) for k in ks):
            continue
        a, b = r["query_domain"], r["gallery_domain"]
        why = (f"no query of {a} has another image of its class in {a} (a query is never its "
               "own match)" if a == b else f"no query of {a} has an image of its class in {b}")
        out.append(f"[{mode}] {r['pair']}: n/a: {why}; the mean leaves the pair out")
    return out


def _coverage(ws: Workspace, manifest: pd.DataFrame, modes: list[str], cfg: ModeConfig,
              allow_missing: bool) -> dict[str, list[Coverage]]:
    """Per mode, the `Coverage` of the evaluated rows by each store it reads, checked before
    anything is computed: a partial store (an embed limited, killed, running, or a grown
    gallery) is refused in one line unless ``allow_missing``. Stores not written yet are left
    to the mode's own "run cdir embed first"."""
    from cdir.core.caption_store import resolve_source
    from cdir.core.workspace import caption_spec
    from cdir.stages.index import fill_commands

    found: dict[str, Coverage] = {}
    out: dict[str, list[Coverage]] = {}
    for mode in modes:
        out[mode] = []
        for m in [mode] if mode in SINGLE_MODES else (list(cfg.fusion) or configured_modes(cfg)):
            model = getattr(cfg, MODES[m].model)
            for kind in dict.fromkeys((MODES[m].query, MODES[m].gallery)):
                spec = model if kind == "image" else caption_spec(
                    model, resolve_source(ws, cfg.captions))
                if spec not in found:
                    if not ws.embeddings_dir(spec).joinpath("info.json").exists():
                        continue
                    found[spec] = coverage(ws, manifest, spec)
                    require_coverage(found[spec], " && ".join(fill_commands(ws, spec)),
                                     allow_missing)
                out[mode].append(found[spec])
    return out


def mean_pair_p1(vectors: Any, labels: Sequence, domains: Sequence[str],
                 normalize: str = "none", device: str | None = None) -> float:
    """The mean P@1 over every directed domain pair that :func:`evaluate` reports for unit image
    ``vectors`` (the evaluated rows in manifest order, with their ``labels`` and ``domains``):
    the same scorer (`vectors_scorer`: normalisation fitted on these rows) and the same protocol
    (`eval.protocol.evaluate_pairs`), for a caller that holds vectors, not a workspace (the
    training monitor)."""
    import numpy as np
    import pandas as pd

    from eval.protocol import evaluate_pairs

    rows = pd.DataFrame({"domain": np.asarray(domains).astype(str), "label": np.asarray(labels)})
    scorer = vectors_scorer(np.asarray(vectors, np.float32), None, rows["domain"].to_numpy(),
                            normalize, device=device)
    mean = evaluate_pairs(scorer, rows, ks=(1,), metrics=("ucdir_p",), progress=False)[-1]
    return float(mean["P@1"])


SEED_FIELD = "{seed}"
# the model specs {seed} may appear in: the ModeConfig fields of the single modes' models
SEEDED_MODELS = tuple(dict.fromkeys(MODES[m].model for m in SINGLE_MODES))


def evaluate_seeds(workspace: str | os.PathLike, seeds: Sequence[int],
                   run: str | None = None, echo: Callable[[str], None] | None = None,
                   **given: Any) -> dict[str, Any]:
    """:func:`evaluate` once per seed, with ``{seed}`` in the model specs replaced by the seed
    (e.g. ``ckpt:runs/distill/rrd/seed_{seed}/best.pt``, the folders `cdir distill --seeds`
    writes), then every metric as mean ± sample standard deviation over the seeds, as the
    distillation's seed table gives its top-1. Evaluation itself has no randomness: without
    ``{seed}`` in a spec there is nothing to vary, and that is refused. ``given`` takes the other
    arguments of :func:`evaluate`."""
    from cdir.core.io import write_json, write_text
    from eval.protocol import one_relevant
    from eval.report import (
        METRIC_NOTES,
        ONE_RELEVANT_NOTE,
        aggregate_seeds,
        format_seed_table,
        jsonable,
    )

    seeds = [int(x) for x in seeds]
    if len(set(seeds)) != len(seeds):
        raise CdirError(f"--seeds has repeats: {seeds}")
    if not any(SEED_FIELD in str(given.get(k) or "") for k in SEEDED_MODELS):
        raise CdirError("--seeds evaluates one trained model per seed: write {seed} in the model "
                        "spec, e.g. --encoder 'ckpt:runs/distill/rrd/seed_{seed}/best.pt' "
                        "(the evaluation itself has no randomness to vary)")
    if run is None:  # one folder for the seeds, named after every setting like a single run's
        named = {k: v for k, v in given.items()
                 if v not in (None, "", False) and k not in ("device", "progress")}
        for seed in seeds:  # and after each seed's weights: retrained ones get another folder
            named.update({f"{k}_{seed}": v for k, v in weights_settings(
                {k: str(given[k]).replace(SEED_FIELD, str(seed))
                 for k in SEEDED_MODELS if given.get(k)}, Workspace(workspace)).items()})
        run = spec_key("seeds=" + ",".join(map(str, seeds)) + "|"
                       + "|".join(f"{k}={v}" for k, v in sorted(named.items(), key=str)))
    lines, say = _recorder(echo)

    runs = []
    for seed in seeds:
        specs = {k: str(given[k]).replace(SEED_FIELD, str(seed))
                 for k in SEEDED_MODELS if given.get(k)}
        res = evaluate(workspace, **{**given, **specs}, run=f"{run}/seed_{seed}")
        say(f"seed {seed}: {res['summary']}")
        runs.append(res)
    out_root = Path(runs[0]["report"]).parent
    ks, split = runs[0]["ks"], runs[0]["split"]
    tables = {v: aggregate_seeds([r["results"][v] for r in runs]) for v in runs[0]["results"]}
    models = ", ".join(f"{k} {given[k]}" for k in SEEDED_MODELS if given.get(k))
    md = [f"Mean ± sample standard deviation over {len(seeds)} seeds "
          f"({', '.join(map(str, seeds))}) of {models}, split {split}; each seed's own report is "
          "in seed_<seed>/. The mean row: the mean and spread of the seeds' pair means.", ""]
    for key, rows in tables.items():
        one = one_relevant(rows)
        md += [f"## {key}", ""] + ([ONE_RELEVANT_NOTE, ""] if one else [])
        md += [format_seed_table(rows, comparison_columns(ks, one))]
    text = "\n".join(md) + "\n" + METRIC_NOTES
    write_text(out_root / "seeds.md", f"# Over seeds, split {split}\n\n{text}")
    write_json(out_root / "seeds.json", jsonable({
        "seeds": seeds, "models": {k: given[k] for k in SEEDED_MODELS if given.get(k)},
        "split": split, "ks": list(ks), "results": tables,
        "runs": {str(sd): r["report"] for sd, r in zip(seeds, runs, strict=True)}}))
    say(f"\n## over seeds, split {split}\n", text)
    summary = (f"evaluated {len(seeds)} seeds x {len(tables)} variant(s); mean ± std in "
               f"{out_root / 'seeds.md'}")
    return {"report": str(out_root), "split": split, "ks": ks, "seeds": seeds,
            "runs": runs, "results": tables, "lines": lines, "summary": summary}


def report_settings(modes: list[str], cfg: ModeConfig, ks: tuple[int, ...],
                    pairs: list[tuple[str, str]] | None, sweep: bool, examples: int,
                    normalize: Sequence[str] = ("none",), rerank: Sequence[str] = ("none",),
                    csls_k: int = DEFAULT_CSLS_K, split: str = "all",
                    dual_softmax_beta: float = DEFAULT_DUAL_SOFTMAX_BETA) -> dict[str, str]:
    """Every setting that changes a report, as text (in the report, and in its default name):
    the modes, their models, the split of the rows evaluated, ks, pairs, the fusion settings
    when fusion runs, the normalisation and rerank when not plain (so plain runs keep their
    names), the examples."""
    fused = any(MODES[m].fuses for m in modes)
    used = [m for m in modes if m in SINGLE_MODES]
    if fused:
        used += list(cfg.fusion) or configured_modes(cfg)
    out = {"modes": ",".join(modes)}
    for key in (MODES[m].model for m in SINGLE_MODES):  # the ModeConfig fields of the models
        if getattr(cfg, key) and any(MODES[m].model == key for m in used):
            out[key] = str(getattr(cfg, key))
    if cfg.captions and any(MODES[m].captions for m in used):
        out["captions"] = cfg.captions
    out["split"] = split
    out["ks"] = ",".join(map(str, ks))
    out["pairs"] = ",".join(f"{a}:{b}" for a, b in pairs) if pairs is not None else "all"
    if fused:
        out["fuse"] = ",".join(cfg.fusion) or "all"
        out["weights"] = ",".join(f"{m}={w}" for m, w in sorted(cfg.weights.items())) or "1"
        out["fusion_method"] = cfg.fusion_method
        out["sweep"] = "yes" if sweep else "no"
    if list(normalize) != ["none"]:
        out["normalize"] = ",".join(normalize)
    if list(rerank) != ["none"]:
        out["rerank"] = ",".join(rerank)
        if any(RERANKERS[r].uses_k for r in rerank):
            out["csls_k"] = str(csls_k)
        if any(RERANKERS[r].uses_beta for r in rerank):
            out["dual_softmax_beta"] = f"{dual_softmax_beta:g}"
    out["examples"] = str(examples)
    return out


def weights_settings(settings: dict[str, str], ws: Workspace | None = None) -> dict[str, str]:
    """``<model>_weights``: the content hash of the weights of each model ``settings`` names
    (where it has weights to hash): a checkpoint retrained at the same path is another model,
    so its report records another hash and, by default, goes to another folder. With ``ws``,
    the hash its embeddings recorded is reused while the file's size and mtime match it (no
    re-hashing of an unchanged checkpoint)."""
    from cdir.core.store import EmbeddingStore
    from encoders.hub import model_identity

    out = {}
    for key in (MODES[m].model for m in SINGLE_MODES):
        if key in settings:
            hints = None
            if ws is not None and ws.embeddings_dir(settings[key]).joinpath("info.json").exists():
                hints = EmbeddingStore(ws.embeddings_dir(settings[key])).info().get(
                    "weights_files")
            ident = model_identity(settings[key], hints=hints).id
            if ident is not None:
                out[f"{key}_weights"] = ident
    return out


def comparison_columns(ks: Sequence[int], one: bool) -> list[str]:
    """The metrics the comparison shows, one table each: P@k for every k and mAP@All; with one
    relevant item per query every P@k is prec@1 = mAP@R, so P@1, then recall@k for the other k
    (the columns that still tell the ranks apart), then mAP@All."""
    if one:
        return ["P@1"] + [f"recall@{k}" for k in ks if k != 1] + ["mAP@All"]
    return [f"P@{k}" for k in ks] + ["mAP@All"]


def compare_modes(tables: dict[str, list[dict]], ks: tuple[int, ...]) -> str:
    """Markdown, one table per metric of :func:`comparison_columns`: a row per directed pair (and
    the mean), a column per evaluated variant, so the width grows with the variants only; then
    the notes defining each metric."""
    from eval.protocol import one_relevant
    from eval.report import METRIC_NOTES, ONE_RELEVANT_NOTE, format_value

    modes = list(tables)
    one = all(one_relevant(rows) for rows in tables.values())
    pairs = [r["pair"] for r in tables[modes[0]]]
    by_mode = {m: {r["pair"]: r for r in rows} for m, rows in tables.items()}
    lines = [ONE_RELEVANT_NOTE, ""] if one else []
    for col in comparison_columns(ks, one):
        lines += [f"### {col}", "", "| pair | " + " | ".join(modes) + " |",
                  "|---|" + "---:|" * len(modes)]
        for pair in pairs:
            cells = [format_value(by_mode[m].get(pair, {}).get(col)) for m in modes]
            name = f"**{pair}**" if pair == "mean" else pair
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n" + METRIC_NOTES
