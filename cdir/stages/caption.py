"""The caption stage: caption a workspace's images with a captioning model, and import / export
caption files. The captions live in the caption store (`cdir.core.caption_store`): one source per
captioner key (``hf:<model>|max_new_tokens=30,...``) or imported file name."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.caption_store import COLUMNS, CaptionStore, resolve_source
from cdir.core.dist import barrier, rank_world
from cdir.core.errors import CdirError, first_line
from cdir.core.io import atomic_path
from cdir.core.rows import RowJob, plan, prefetched
from cdir.core.signals import graceful
from cdir.core.store import same_version
from cdir.core.workspace import Workspace

if TYPE_CHECKING:
    import pandas as pd

DEFAULT_CAPTIONER = "hf:Salesforce/blip-image-captioning-base"
SHOW = 5  # examples shown in messages
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+@ -]{0,99}$")


def _examples(items: list[str]) -> str:
    shown = ", ".join(repr(x) for x in items[:SHOW])
    return shown + (f", ... ({len(items) - SHOW} more)" if len(items) > SHOW else "")


# -- captioning a workspace ----------------------------------------------------------------------

def _load_batch(paths: list[str]) -> list[tuple[Any, str | None, str]]:
    """(image, None, content hash) or (None, reason, "") per path: a corrupt file is data, not an
    exception. The hash (of the bytes decoded) is stored with the caption, so a later `cdir data`
    that finds the file merely touched keeps the caption."""
    from cdir.core.images import failure_reason, load_image_hashed

    out: list[tuple[Any, str | None, str]] = []
    for p in paths:
        try:
            img, digest = load_image_hashed(p)
            out.append((img, None, digest))
        except Exception as e:  # noqa: BLE001 - a bad file must never stop the run
            out.append((None, failure_reason(p, e), ""))
    return out


@graceful()  # SIGTERM, like Ctrl-C, ends the run with its finished batches stored
def caption_workspace(
    ws: Workspace | str | os.PathLike, spec: str = DEFAULT_CAPTIONER, batch_size: int = 32, *,
    prompt: str | None = None, max_new_tokens: int = 30, min_new_tokens: int = 0,
    num_beams: int = 1, device: str | None = None, dtype: str | None = None,
    trust_remote_code: bool = False, limit: int | None = None, progress: bool = True,
    captioner: Any = None, callback: Callable[[int, int], None] | None = None,
) -> dict:
    """Caption the workspace's images that have no caption yet under this captioner's key, and
    again those whose image changed since they were captioned (`row_versions`; the new caption
    replaces the old one).

    Images are read in manifest order, ``batch_size`` at a time; each batch is stored as it
    finishes. On out-of-memory the batch is halved (for the rest of the run) and retried.
    Unreadable images are skipped and listed; empty captions are stored and counted. ``captioner``
    reuses a loaded Captioner (then ``spec`` and the generation arguments are not used);
    ``limit`` captions at most that many of the missing images; ``progress`` shows a bar.
    Returns a summary dict: ``messages`` (for stderr) and ``line`` say what was written.
    """
    from cdir.core.manifest import row_versions
    from encoders.captioners import resolve_captioner

    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    if batch_size < 1:
        raise CdirError(f"batch size must be >= 1, not {batch_size}")
    df = ws.manifest()
    resolved = None if captioner is not None else resolve_captioner(
        spec, prompt=prompt, max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens,
        num_beams=num_beams, trust_remote_code=trust_remote_code)
    source = captioner if captioner is not None else resolved
    key, model, family, params = source.key, source.spec, source.family, dict(source.params)
    store = CaptionStore(ws, key)
    ids = df["id"].astype(str).tolist()
    version_of = dict(zip(ids, row_versions(df), strict=True))
    rank, world = rank_world()
    with store.lock():
        if rank == 0:
            _open_source(store, model, family, params, version_of)
        barrier()  # torchrun: the other ranks read the store once rank 0 has folded it
        have = store.versions()
        changed = {i for i in ids if i in have and not same_version(have[i], version_of[i])}
        todo = plan(ids, set(have) - changed, limit, rank, world)  # changed: captioned again
        earlier = store.meta().get("failed", [])  # earlier failures are retried
        barrier()  # every rank has read the store before any of them writes to it
        job = RowJob(ids, df["path"].astype(str).tolist(), earlier,
                     counts=("new", "empty", "changed"))
        run = _Captioning(job, store, captioner, resolved, device, dtype, batch_size, model,
                          params, version_of, changed)
        batches = [todo.rows[i: i + batch_size] for i in range(0, len(todo.rows), batch_size)]
        # the next batch's files decode while the model works on this one
        loads = prefetched([[job.paths[j] for j in rows] for rows in batches], _load_batch)
        try:
            with job.progress(len(todo.rows), f"caption {model}", progress, callback), \
                    closing(loads):
                for rows, (_, images) in zip(batches, loads, strict=True):
                    run.batch(rows, images)
        finally:
            if world == 1:  # under torchrun rank 0 writes every rank's at the end
                if job.ledger_changed():
                    store.write_meta(failed=job.ledger())
                _fold(store)
        job.gather()
        if world > 1:
            if rank == 0:
                _fold(store, failed=job.ledger())
            barrier()

    summary = {"key": key, "model": model, "family": family, "params": params,
               "path": str(store.path), "device": job.device, **job.summary(todo.already),
               "changed": job.counts["changed"], "empty": job.counts["empty"],
               "batch_size": run.halver.batch_size if run.halver else batch_size}
    summary["messages"] = _messages(summary, store.meta_path)
    summary["line"] = _summary_line(summary)
    return summary


def _open_source(store: CaptionStore, model: str, family: str, params: dict,
                 version_of: dict[str, str | None]) -> None:
    """Create the caption source of a model, or check that it is one; fold in what a killed run
    left. Captions stored before images were versioned count as current and get the present
    versions, so a later change is noticed."""
    meta = store.meta()
    if not meta:
        store.write_meta(kind="model", model=model, family=family, prompt=params.get("prompt"),
                         params=params, count=0, empty=0, failed=[])
    elif meta.get("kind") != "model":
        raise CdirError(f"caption source {store.key!r} holds imported captions, not a model's")
    store.compact(adopt=version_of)


def _fold(store: CaptionStore, **meta: Any) -> None:
    """Fold the run's parts into the source and count its captions (and the empty ones)."""
    rows = store.compact()
    n_empty = int((rows["caption"].astype(str).str.strip() == "").sum())
    store.write_meta(count=len(rows), empty=n_empty, **meta)


@dataclass
class _Captioning:
    """One run's captioner and where its captions go. The model is loaded on the first readable
    batch: a re-run that only retries unreadable files never loads it."""

    job: RowJob
    store: CaptionStore
    captioner: Any  # a loaded Captioner, or None until a batch needs it
    resolved: Any  # what loads it
    device: str | None
    dtype: str | None
    batch_size: int
    model: str
    params: dict
    version_of: dict[str, str | None]
    changed: set[str]
    halver: Any = None  # encoders.captioners.BatchHalver, made with the model

    def batch(self, rows: list[int], loaded: list[tuple[Any, str | None, str]]) -> None:
        """Caption and store one batch (rows and their `_load_batch` results)."""
        job, ids = self.job, self.job.ids
        good = [(j, img, h) for j, (img, _, h) in zip(rows, loaded, strict=True) if img is not None]
        failed = [(j, reason) for j, (_, reason, _) in zip(rows, loaded, strict=True)
                  if reason is not None]
        for j, reason in failed:
            job.fail(j, reason)
        if good:
            texts = self._halver().run(self.captioner.caption, [img for _, img, _ in good])
            good_ids = [ids[j] for j, _, _ in good]
            self.store.append(good_ids, texts, self.model, self.params.get("prompt"), self.params,
                              [self._version(ids[j], h) for j, _, h in good])
            job.finish(good_ids)
            job.counts["new"] += len(good)
            job.counts["changed"] += len(self.changed.intersection(good_ids))
            job.counts["empty"] += sum(1 for t in texts if not t.strip())
        if failed and job.world == 1:
            self.store.write_meta(failed=job.ledger())
        job.advance(len(rows), empty=job.counts["empty"])

    def _halver(self) -> Any:
        from encoders.captioners import BatchHalver

        if self.captioner is None:
            self.captioner = self.resolved.load(self.device, self.dtype)
        if self.halver is None:
            self.job.device = str(getattr(self.captioner, "device", "-"))
            self.halver = BatchHalver(self.batch_size, where=f" on {self.job.device}",
                                      on_shrink=lambda bs: self.job.note(
                                          f"out of memory: batch size halved to {bs}"))
        return self.halver

    def _version(self, id_: str, digest: str) -> str | None:
        """The manifest's size/mtime fact for the row, and the hash of the bytes captioned."""
        version = self.version_of[id_]
        if version is None:  # a manifest without file facts: nothing to record
            return None
        return " ".join(filter(None, (version.split()[0], digest)))


def _messages(s: dict, ledger: Path) -> list[str]:
    """What a run has to say besides its line: the images skipped, the empty captions."""
    from cdir.core.images import failure_report

    out = [failure_report(s["failures"], ledger)] if s["failures"] else []
    if s["empty"]:
        out.append(f"{s['empty']} caption(s) came out empty (stored as empty strings)")
    return out


def _summary_line(s: dict) -> str:
    left = f", {s['remaining']} left" if s["remaining"] > 0 else ""
    empty = f", {s['empty']} empty" if s["empty"] else ""
    if s.get("changed"):
        empty += f", {s['changed']} changed since captioned"
    speed = f" at {s['images_per_s']:.2f} images/s" if s["images_per_s"] else ""
    return (f"captioned {s['new']} new, {s['already_done']} already done, {s['failed']} failed"
            f"{empty}{left} ({s['key']} on {s['device']}{speed}) -> {s['path']}")


# -- import / export -----------------------------------------------------------------------------

_ID_COLUMNS = ("id",)
_PATH_COLUMNS = ("path", "image", "file", "filename", "filepath", "image_path")
_CAPTION_COLUMNS = ("caption", "text", "captions")


def _read_table(file: Path) -> pd.DataFrame:
    """A CSV/TSV (all values as text, nothing turned into NaN) or JSON Lines file."""
    import pandas as pd

    if not file.is_file():
        raise CdirError(f"no caption file at {file}")
    suffix = file.suffix.lower()
    if suffix in (".csv", ".tsv"):
        try:
            return pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8-sig",
                               sep="\t" if suffix == ".tsv" else ",")
        except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as e:
            raise CdirError(f"cannot read {file} as CSV: {first_line(e)}") from None
    if suffix in (".jsonl", ".ndjson", ".json"):
        text = file.read_text(encoding="utf-8-sig")
        if suffix == ".json" or text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except ValueError as e:
                raise CdirError(f"cannot read {file} as JSON: {first_line(e)}") from None
            if not isinstance(records, list):
                raise CdirError(f"{file}: expected a list of objects with id and caption")
        else:
            records = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except ValueError as e:
                    raise CdirError(f"{file}, line {n}: not valid JSON ({first_line(e)})") \
                        from None
        bad = [i for i, r in enumerate(records, 1) if not isinstance(r, dict)]
        if bad:
            raise CdirError(f"{file}: record {bad[0]} is not an object with id and caption")
        df = pd.DataFrame(records)
        for col in df.columns:
            df[col] = [_text(v, nested=col == "params") for v in df[col]]
        return df
    raise CdirError(f"{file}: unknown caption file type {suffix!r}: use .csv, .tsv or .jsonl")


def _text(v: Any, nested: bool = False) -> str | None:
    if v is None or (isinstance(v, float) and v != v):
        return None
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, ensure_ascii=False) if nested else json.dumps(v)
    return str(v)


def import_captions(ws: Workspace | str | os.PathLike, file: str | os.PathLike,
                    name: str | None = None) -> dict:
    """Import captions from CSV/TSV/JSONL as the caption source ``name`` (default: the file
    name). Columns: ``id`` (manifest id) or ``path`` (image path), and ``caption`` (or ``text``);
    optional ``model``, ``prompt``, ``params`` are kept (an exported file imports back
    unchanged). Unknown ids are skipped, images without a caption and empty captions are
    reported; an existing source of that name is updated (its other rows are kept). The file is
    checked in full before anything is written. Returns a summary with ``messages`` and ``line``.
    """
    import pandas as pd

    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    file = Path(file)
    name = (name if name is not None else file.stem).strip()
    if not _NAME.match(name) or name.lower().startswith("hf"):
        if name.lower().startswith("hf"):
            raise CdirError(f"import name {name!r} must not start with 'hf' (kept for model "
                            "captions): pick another --name")
        raise CdirError(f"import name {name!r}: use letters, digits and . _ - + @ or spaces "
                        "(at most 100 characters), e.g. --name my_captions")
    manifest = ws.manifest()
    table = _read_table(file)
    cols = {c.lower().strip(): c for c in table.columns}
    cap_col = next((cols[c] for c in _CAPTION_COLUMNS if c in cols), None)
    id_col = next((cols[c] for c in _ID_COLUMNS if c in cols), None)
    path_col = next((cols[c] for c in _PATH_COLUMNS if c in cols), None)
    if cap_col is None or (id_col is None and path_col is None):
        raise CdirError(f"{file} needs an 'id' (or 'path') column and a 'caption' column; it has "
                        f"{', '.join(map(str, table.columns)) or 'no columns'}")
    if len(table) == 0:
        raise CdirError(f"{file} holds no captions")

    known = manifest["id"].astype(str).tolist()
    known_set = set(known)
    if id_col is not None:
        raw_ids = [("" if v is None else str(v)).strip() for v in table[id_col]]
        ids = [i if i in known_set else None for i in raw_ids]
    else:
        by_path = {}
        for i, p in zip(known, manifest["path"].astype(str), strict=True):
            by_path[os.path.normpath(p)] = i
        raw_ids = [("" if v is None else str(v)).strip() for v in table[path_col]]
        ids = []
        for v in raw_ids:
            hit = by_path.get(os.path.normpath(os.path.abspath(os.path.expanduser(v)))) \
                if v else None
            ids.append(hit if hit else (v if v in known_set else None))
    unknown = [r for r, i in zip(raw_ids, ids, strict=True) if i is None]
    if len(unknown) == len(ids):
        what = "ids" if id_col is not None else "paths"
        raise CdirError(f"none of the {len(ids)} {what} in {file} is in the gallery (e.g. "
                        f"{_examples(unknown)}); the {what} must be those of the workspace "
                        f"manifest (e.g. {known[0]!r}); nothing was imported")

    def column(label: str) -> list[str | None]:
        col = cols.get(label)
        return list(table[col]) if col is not None else [None] * len(table)

    captions = [("" if v is None else str(v)) for v in table[cap_col]]
    models, prompts, params = column("model"), column("prompt"), column("params")
    rows: dict[str, tuple] = {}
    conflicts: list[str] = []
    for k, i in enumerate(ids):
        if i is None:
            continue
        row = (captions[k], models[k] or f"file:{file.name}", prompts[k] or None,
               params[k] or "{}")
        if i in rows and rows[i][0] != row[0]:
            conflicts.append(i)
        rows[i] = row
    if conflicts:
        raise CdirError(f"{file} gives different captions for the same image: "
                        f"{_examples(sorted(set(conflicts)))}; keep one row per image; "
                        "nothing was imported")
    new = pd.DataFrame([(i, *r) for i, r in rows.items()], columns=COLUMNS)
    new["prompt"] = new["prompt"].astype(object)

    store = CaptionStore(ws, name)
    messages: list[str] = []
    if unknown:
        messages.append(f"{len(unknown)} row(s) of {file.name} name images that are not in the "
                        f"gallery and were skipped: {_examples(unknown)}")
    empty = [i for i, r in rows.items() if not r[0].strip()]
    if empty:
        messages.append(f"{len(empty)} caption(s) are empty (stored as empty strings): "
                        f"{_examples(empty)}")
    with store.lock():
        meta = store.meta()
        if meta and meta.get("kind") != "import":
            raise CdirError(f"caption source {name!r} holds a model's captions: pick another "
                            "--name")
        old = store.read()
        kept = old[~old["id"].astype(str).isin(rows.keys())]
        updated = len(old) - len(kept)
        merged = pd.concat([kept, new], ignore_index=True) if len(kept) else new
        # manifest order, stale ids (no longer in the gallery) last
        order = {i: n for n, i in enumerate(known)}
        merged = merged.assign(_o=[order.get(i, len(order)) for i in merged["id"]]) \
            .sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)
        store.write_rows(merged)
        n_empty = int((merged["caption"].astype(str).str.strip() == "").sum())
        store.write_meta(kind="import", model=f"file:{file.name}", family="import",
                         source=str(file.resolve()), prompt=None, params={},
                         count=len(merged), empty=n_empty, failed=[])
    missing = len(known_set - set(merged["id"].astype(str)))
    if missing:
        messages.append(f"{missing} gallery image(s) have no caption in source {name!r}")
    if len(kept):
        messages.append(f"source {name!r} already had captions: {updated} replaced, "
                        f"{len(kept)} kept")
    line = (f"imported {len(rows)} caption(s) from {file} as {name!r} ({len(merged)} stored, "
            f"{len(unknown)} skipped, {missing} gallery images without caption) -> {store.path}")
    return {"key": name, "path": str(store.path), "imported": len(rows),
            "skipped": len(unknown), "empty": len(empty), "missing": missing,
            "stored": len(merged), "messages": messages, "line": line}


def export_captions(ws: Workspace | str | os.PathLike, key: str | None,
                    out: str | os.PathLike) -> dict:
    """Write a caption source to CSV (``.csv``/``.tsv``) or JSON Lines (``.jsonl``), in manifest
    order: columns id, caption, model, prompt, params. ``key`` may be any reference that
    `resolve_source` accepts. Returns a summary with ``line``."""
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    key = resolve_source(ws, key)
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".csv", ".tsv", ".jsonl", ".ndjson"):
        raise CdirError(f"{out}: export to .csv, .tsv or .jsonl")
    df = CaptionStore(ws, key).read()
    if ws.manifest_path.exists():
        order = {i: n for n, i in enumerate(ws.manifest()["id"].astype(str))}
        df = df.assign(_o=[order.get(i, len(order)) for i in df["id"].astype(str)]) \
            .sort_values("_o", kind="stable").drop(columns="_o").reset_index(drop=True)
    with atomic_path(out) as tmp:
        if suffix in (".csv", ".tsv"):
            df.to_csv(tmp, index=False, sep="\t" if suffix == ".tsv" else ",",
                      encoding="utf-8")
        else:
            with open(tmp, "w", encoding="utf-8") as f:
                for r in df.itertuples(index=False):
                    try:
                        params: Any = json.loads(r.params) if r.params else {}
                    except ValueError:
                        params = r.params
                    f.write(json.dumps({"id": r.id, "caption": r.caption, "model": r.model,
                                        "prompt": r.prompt, "params": params},
                                       ensure_ascii=False) + "\n")
    return {"key": key, "rows": len(df), "out": str(out),
            "line": f"exported {len(df)} caption(s) of {key!r} -> {out}"}
