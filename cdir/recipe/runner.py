"""Running a reproduction recipe: one YAML config runs a whole Caption-Matching evaluation and
writes our numbers next to the ones the literature reports.

    recipe = load_recipe("configs/cm_officehome.yaml", overrides=["device=cuda"], root="/data/OH")
    runner = Runner(recipe)
    checks = runner.preflight()  # what is present, what is missing and how to provide it
    runner.run()                 # data → caption → embed captions → embed images → eval → report

The stages call the library in-process (`describe_gallery`, `caption_workspace`,
`embed_captions`, `embed_images`, `build_scorer` + `evaluate_pairs`), in that order. Each stage is
skipped when its output is already complete, and the library functions underneath resume
interrupted work, so re-running a recipe continues where it stopped.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

from cdir.core.caption_store import CaptionStore, caption_embeddings_dir
from cdir.core.device import resolve_device
from cdir.core.errors import CdirError
from cdir.core.io import read_json, write_json
from cdir.core.manifest import fingerprint
from cdir.core.rows import print_summary
from cdir.core.store import EmbeddingStore
from cdir.core.workspace import Workspace, caption_spec
from cdir.galleries import KINDS, recorded_name
from cdir.recipe.config import Recipe
from cdir.recipe.methods import Method, build_methods
from cdir.recipe.plan import Stage
from cdir.recipe.preflight import Check, preflight, skipped_specs
from cdir.recipe.report import format_plan, format_preflight, write_reproduction
from cdir.stages.caption import caption_workspace
from cdir.stages.embed import embed_captions, embed_images
from cdir.stages.evaluate import parse_pairs
from cdir.stages.gallery import describe_gallery
from cdir.stages.modes import (
    ModeConfig,
    build_scorer,
    caption_vectors,
    image_vectors,
    vectors_fingerprint,
)
from encoders.captioners import resolve_captioner
from eval.metrics import metric_columns
from eval.protocol import default_ks, evaluate_pairs, split_examples
from eval.report import jsonable, write_report


class Runner:
    """Plans, checks and runs one recipe; see the module docstring."""

    def __init__(self, recipe: Recipe, progress: bool = True):
        self.r = recipe
        self.progress = progress
        self.ws_root = Path(os.path.abspath(os.path.expanduser(
            recipe.workspace or os.path.join("runs", recipe.name))))
        self.ws = Workspace(self.ws_root)
        self.report_dir = self.ws.reports_dir(recipe.name)
        self.ks = tuple(recipe.eval.ks) if recipe.eval.ks else default_ks(recipe.dataset.kind)
        self.device = recipe.device or None  # None: the library's choice (cuda when available)
        self.checks: list[Check] = []
        self.keys: dict[int, str] = {}  # captioner index -> caption source key
        self.results: dict[str, dict] = {}  # method id -> {"rows", "report_dir", "n_used", ...}

    # -- checks and plan ---------------------------------------------------------------------------
    def preflight(self) -> list[Check]:
        """Check the dataset and every model without downloading or loading anything."""
        self.checks = preflight(self.r)
        return self.checks

    def methods(self) -> list[Method]:
        """The methods to evaluate: all but those of optional models the preflight skipped."""
        return build_methods(self.r, skipped_specs(self.checks))

    def plan(self) -> list[Stage]:
        r = self.r
        methods = self.methods()
        stages = [Stage("data", self._data_label())]
        for i in sorted({m.captioner for m in methods if m.captioner is not None}):
            c = r.captioners[i]
            gen = (f"max_new_tokens {c.max_new_tokens}, "
                   + (f"beam {c.num_beams}" if c.num_beams > 1 else "greedy")
                   + (f", prompt {c.prompt!r}" if c.prompt else "")
                   + f", batch {c.batch_size or r.batch.caption}")
            stages.append(Stage("caption", f"{c.spec} ({gen})", captioner=i))
        text_jobs = dict.fromkeys((m.captioner, spec) for m in methods
                                  for spec in (m.text_encoder, m.clip)
                                  if spec and m.captioner is not None)
        for i, spec in text_jobs:
            stages.append(Stage("embed-captions",
                                f"captions of {r.captioners[i].display} with {spec}",
                                captioner=i, spec=spec))
        image_specs = dict.fromkeys(spec for m in methods for spec in (m.encoder, m.clip) if spec)
        for spec in image_specs:
            stages.append(Stage("embed-images", f"images with {spec} (batch {r.batch.image})",
                                spec=spec))
        pairs = "every directed pair" if r.eval.pairs == "all" else f"{len(r.eval.pairs)} pairs"
        for m in methods:
            stages.append(Stage("eval", f"{m.label} on {pairs}, P@{','.join(map(str, self.ks))}",
                                method=m))
        stages.append(Stage("report", str(self.report_dir / "reproduction.md")))
        return stages

    def _data_label(self) -> str:
        ds = self.r.dataset
        if KINDS[ds.kind].build is not None:  # rendered into the workspace
            return (f"{ds.kind} gallery ({ds.limit or 'all'} categories, {ds.size} px) in "
                    f"{self.ws_root / 'gallery'}")
        doms = ", ".join(ds.domains) if ds.domains else "all domains"
        classes = ds.classes if isinstance(ds.classes, str) else (
            f"{len(ds.classes)} classes" if ds.classes else "all classes")
        if ds.subset is not None and not ds.subset.verified:
            classes += " (UNVERIFIED class subset)"
        return f"{ds.kind} at {ds.root or '(root not set)'}: {doms}; {classes}; split {ds.split}"

    def device_line(self) -> str:
        try:
            dev = resolve_device(self.device, flag="--set device")
        except CdirError as e:  # shown in the plan; run() stops on it before any stage
            if str(self.device).startswith("cuda"):
                return f"{self.device} requested, but no CUDA GPU is visible"
            return f"{self.device}: {e}"
        if dev.type == "cuda":
            return f"{dev} ({torch.cuda.get_device_name(dev.index or 0)})"
        big = [c.spec for c in self.r.captioners
               if any(w in c.spec.lower() for w in ("blip2", "llava", "flan", "large"))]
        return "cpu" + (f" (no GPU visible: captioning with {', '.join(big)} will be very slow)"
                        if big else "")

    # -- running -----------------------------------------------------------------------------------
    def run(self, dry_run: bool = False) -> list[Stage]:
        """Preflight and print the plan; unless ``dry_run`` or something is missing, run every
        stage and write the report. Returns the stages with their status."""
        self.preflight()
        stages = self.plan()
        print(format_plan(self, stages))
        print(format_preflight(self.checks))
        missing = [c for c in self.checks if c.blocking]
        if missing:
            raise CdirError(f"preflight: {len(missing)} required item(s) missing (listed above); "
                            "no stage was run")
        if dry_run:
            print("dry run: nothing was run")
            return stages
        resolve_device(self.device, flag="--set device")  # a GPU asked for but absent: stop now
        handlers = {"data": self._data, "caption": self._caption,
                    "embed-captions": self._embed_captions, "embed-images": self._embed_images,
                    "eval": self._eval}
        for n, st in enumerate(stages, 1):
            t0 = time.perf_counter()
            print(f"\n[{n}/{len(stages)}] {st.kind}: {st.label}", flush=True)
            if st.kind == "report":
                st.status = "ran"  # the report lists itself
                write_reproduction(self, stages)
            else:
                st.status, st.detail = handlers[st.kind](st)
            st.seconds = round(time.perf_counter() - t0, 3)
            print(f"[{n}/{len(stages)}] {st.kind}: {st.status}"
                  + (f" ({st.detail})" if st.detail else ""), flush=True)
        print(f"\nwrote {self.report_dir / 'reproduction.md'} (+ reproduction.json)")
        return stages

    # Each stage returns (status, detail): "skipped" when its output is already complete.

    def _data(self, st: Stage) -> tuple[str, str]:
        ds, ws = self.r.dataset, self.ws
        domains = ",".join(ds.domains) if ds.domains else None
        classes = ",".join(ds.classes) if isinstance(ds.classes, list) else ds.classes
        rendered = KINDS[ds.kind].build is not None  # into the workspace, as describe_gallery does
        if rendered:
            want = {"limit": ds.limit, "size": ds.size}
        else:
            want = {"domains": domains, "classes": classes, "split": ds.split}
        info = ws.info()
        have = {k: (info.get("params") or {}).get(k) for k in want}
        same_root = rendered or _under(str(info.get("root", "")), ds.root)
        if ws.manifest_path.exists() and info.get("dataset") == recorded_name(ds.kind) \
                and have == want and same_root:
            n = sum((info.get("counts") or {}).values())
            return "skipped", f"already done: {n} images in {ws.manifest_path}; delete it to rescan"
        print(describe_gallery(self.ws_root, ds.kind, root=ds.root, domains=domains,
                               classes=classes, split=ds.split, limit=ds.limit, size=ds.size,
                               progress=self.progress)["summary"])
        return "ran", ""

    def _captions_key(self, i: int) -> str:
        """The caption source key of captioner ``i`` (its spec and generation settings)."""
        if i not in self.keys:
            c = self.r.captioners[i]
            self.keys[i] = resolve_captioner(
                c.spec, prompt=c.prompt, max_new_tokens=c.max_new_tokens,
                min_new_tokens=c.min_new_tokens, num_beams=c.num_beams,
                trust_remote_code=c.trust_remote_code).key
        return self.keys[i]

    def _caption(self, st: Stage) -> tuple[str, str]:
        c = self.r.captioners[st.captioner]
        store = CaptionStore(self.ws, self._captions_key(st.captioner))
        ids = set(self.ws.manifest()["id"].astype(str))
        done = store.done_ids() if store.exists() else set()
        failed = {f["id"] for f in store.meta().get("failed", [])} if store.exists() else set()
        if ids <= done | failed:
            extra = f", {len(ids & failed)} unreadable" if ids & failed else ""
            return "skipped", f"already done: {len(ids & done)} captions{extra}"
        summary = caption_workspace(
            self.ws, c.spec, batch_size=c.batch_size or self.r.batch.caption, prompt=c.prompt,
            max_new_tokens=c.max_new_tokens, min_new_tokens=c.min_new_tokens,
            num_beams=c.num_beams, device=self.device, dtype=c.dtype,
            trust_remote_code=c.trust_remote_code, progress=self.progress)
        if self.progress:
            print_summary(summary)
        gc.collect()  # the captioner is the largest model: release it before the rest
        torch.cuda.empty_cache()  # a no-op without CUDA
        return "ran", f"{summary['new']} new captions at {summary['images_per_s']} images/s"

    def _embed_captions(self, st: Stage) -> tuple[str, str]:
        key = self._captions_key(st.captioner)
        ids = set(self.ws.manifest()["id"].astype(str))
        captioned = CaptionStore(self.ws, key).done_ids() & ids
        store = EmbeddingStore(caption_embeddings_dir(self.ws, key, st.spec))
        if captioned and captioned <= store.done_ids() and _current(
                lambda: caption_vectors(self.ws, self.ws.manifest(), key, st.spec)):
            return "skipped", f"already done: {len(captioned)} caption embeddings"
        summary = embed_captions(self.ws, key, st.spec, batch_size=self.r.batch.text,
                                 device=self.device, progress=self.progress)
        print(summary["line"])  # also without progress: the log shows it
        return "ran", f"{summary['embedded']} new"

    def _embed_images(self, st: Stage) -> tuple[str, str]:
        ids = set(self.ws.manifest()["id"].astype(str))
        store = EmbeddingStore(self.ws.embeddings_dir(st.spec))
        failed = {f["id"] for f in store.failed()}
        if store.exists() and ids <= store.done_ids() | failed and _current(
                lambda: image_vectors(self.ws, self.ws.manifest(), st.spec)):
            extra = f", {len(ids & failed)} unreadable" if ids & failed else ""
            return "skipped", f"already done: {len(ids - failed)} image embeddings{extra}"
        summary = embed_images(self.ws, st.spec, batch_size=self.r.batch.image,
                               num_workers=self.r.batch.workers, device=self.device,
                               progress=self.progress)
        if self.progress:
            print_summary(summary)
        return "ran", f"{summary['new']} new at {summary['images_per_s']} images/s"

    def _eval(self, st: Stage) -> tuple[str, str]:
        m, ev, ws = st.method, self.r.eval, self.ws
        manifest = ws.manifest()
        pairs = None
        if ev.pairs != "all":
            domains = sorted(manifest["domain"].astype(str).unique())
            pairs = parse_pairs(",".join(ev.pairs), domains)
        key = self._captions_key(m.captioner) if m.captioner is not None else None
        out = self.report_dir / m.id
        # everything the numbers depend on: a re-run with the same signature reuses them
        specs = [s for s in (m.encoder, m.clip) if s]
        specs += [caption_spec(s, key) for s in (m.clip, m.text_encoder) if s]
        ids = manifest["id"].astype(str).tolist()
        signature = {
            "mode": m.mode, "encoder": m.encoder, "text_encoder": m.text_encoder, "clip": m.clip,
            "captions": key, "fusion": list(m.fusion), "weights": dict(ev.fusion.weights),
            "fusion_method": ev.fusion.method, "ks": list(self.ks),
            "columns": metric_columns(self.ks),  # a report without a newer metric is redone
            "pairs": [list(p) for p in pairs] if pairs else "all", "examples": ev.examples,
            "manifest": fingerprint(manifest),
            "vectors": {s: vectors_fingerprint(ws, s, ids)[0] for s in specs}}
        stage_file = out / "stage.json"
        if stage_file.exists() and (out / "results.json").exists():
            old = read_json(stage_file)
            if old.get("signature") == signature:
                self.results[m.id] = {"rows": read_json(out / "results.json")["results"],
                                      "report_dir": str(out), "n_used": old.get("n_used"),
                                      "n_total": old.get("n_total")}
                return "skipped", f"already done: {out / 'results.md'}"
        cfg = ModeConfig(encoder=m.encoder, text_encoder=m.text_encoder, clip=m.clip,
                         captions=key, fusion=m.fusion, weights=dict(ev.fusion.weights),
                         fusion_method=ev.fusion.method)
        scorer, ok = build_scorer(ws, manifest, m.mode, cfg, device=self.device)
        sub = manifest[ok].reset_index(drop=True)
        results = evaluate_pairs(scorer, sub, pairs=pairs, ks=self.ks,
                                 keep_examples=ev.examples, progress=self.progress)
        write_report(results, out, m.label, manifest=sub)
        rows, _ = split_examples(results)
        n_used, n_total = int(ok.sum()), len(manifest)
        write_json(stage_file, {"signature": signature, "n_used": n_used, "n_total": n_total})
        self.results[m.id] = {"rows": jsonable(rows), "report_dir": str(out),
                              "n_used": n_used, "n_total": n_total}
        k0 = self.ks[0]
        mean = rows[-1].get(f"P@{k0}", float("nan"))
        mean_all = rows[-1].get("mAP@All", float("nan"))
        return "ran", f"mean P@{k0} {mean:.2f}, mAP@All {mean_all:.2f}; {out / 'results.md'}"


def _under(path: str, root: str | None) -> bool:
    """Is ``path`` the folder ``root`` or inside it?"""
    if not path or not root:
        return False
    p = os.path.realpath(path)
    r = os.path.realpath(os.path.abspath(os.path.expanduser(root)))
    return p == r or p.startswith(r.rstrip(os.sep) + os.sep)


def _current(check: Callable[[], object]) -> bool:
    """True when the stored vectors are what the model and the gallery are now (the check
    refuses stale ones with a CdirError): a retrained model or a changed image re-runs embed."""
    try:
        check()
    except CdirError:
        return False
    return True
