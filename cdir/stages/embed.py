"""The embed stage: image embeddings of the gallery, and text embeddings of a caption source, as
L2-normalised vectors in an EmbeddingStore keyed by manifest id.

Images are resumable and deterministic: rows already in the store are skipped; the rest are
embedded in manifest order and written in shards of ``shard_rows`` (each shard lands atomically
with its ids), so an interrupted run loses at most the shard in flight and the next run continues
with exactly the missing rows. Unreadable images are skipped, recorded in ``failed.json`` and
listed at the end; they never abort the run, and they are retried on the next run (a fixed file
then gets embedded). Captions go the same way, one shard per chunk of ``chunk_rows`` captions,
into the folder of their `caption_spec` (``<text encoder>@captions:<source>``).

Each row is stored with what it was computed from (the image's `row_versions` entry, the caption
text's hash): a row whose image or caption changed since is embedded again, and only those. Each
image file is stat'ed first: one whose size or mtime differ from the manifest's record is hashed
again and the manifest's record refreshed (`cdir.stages.gallery.restamp`), so an image changed in
place is found without re-running `cdir data`. The
store also records the model's identity (`encoders.hub.model_identity`); when the spec now names
other weights (a retrained checkpoint at the same path), every row is embedded again.

An encoder spec with ``?bn=domain`` (AdaBN) is embedded domain by domain, each with BatchNorm
statistics estimated on that domain's images and stored beside the vectors
(`cdir.stages.domain_bn`); a domain whose images changed gets new statistics and all its rows
embedded again, the other domains keep theirs.
"""

from __future__ import annotations

import functools
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from cdir.core.caption_store import (
    CaptionStore,
    caption_embeddings_dir,
    caption_versions,
    resolve_source,
)
from cdir.core.dist import barrier, launch_rank
from cdir.core.errors import CdirError
from cdir.core.images import failure_reason, failure_report, load_image_hashed
from cdir.core.lock import beside, exclusive
from cdir.core.manifest import row_versions
from cdir.core.rows import RowJob, plan
from cdir.core.signals import graceful, loader_worker, shielded
from cdir.core.store import EmbeddingStore
from cdir.core.workspace import Workspace, caption_spec
from cdir.stages.gallery import restamp
from cdir.stages.modes import current_rows

if TYPE_CHECKING:
    import pandas as pd

    from encoders.hub import ModelId


class ImageRows(Dataset):
    """Item i -> (i, tensor, None, content hash) or (i, None, reason, ""): a bad file is data, not
    an exception. The hash (of the bytes the worker decoded: cheap beside decoding) is recorded
    with the vector, so a later `cdir data` that finds the file merely touched keeps the vector."""

    def __init__(self, paths: list[str], transform: Callable):
        self.paths = paths
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, str]:
        path = self.paths[i]
        try:
            img, digest = load_image_hashed(path)
            return i, self.transform(img), None, digest
        except Exception as e:  # noqa: BLE001 - corrupt files must never stop the run
            return i, None, failure_reason(path, e), ""


def collate_rows(items: list) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[int, str]],
                                       list[str]]:
    """(positions of the good items, their stacked tensors or None, [(position, reason)], the
    good items' content hashes)."""
    good = [(i, x, h) for i, x, err, h in items if err is None]
    bad = [(i, err) for i, _, err, _ in items if err is not None]
    idx = torch.tensor([i for i, _, _ in good], dtype=torch.long)
    return (idx, (torch.stack([x for _, x, _ in good]) if good else None), bad,
            [h for _, _, h in good])


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)


def cpu_loader_worker(worker_id: int) -> None:
    """``worker_init_fn`` of a loader beside a model on the same CPU cores: the worker runs at the
    lowest priority, so it decodes while the model's threads wait, rather than take a core from
    one of them mid-operation (every operation then waits for that thread, and the others spin).
    On 2 cores the bare loader-and-model loop reached 0.80 of the model-only images/s with it,
    0.77 without (bench/README.md)."""
    loader_worker(worker_id)
    if hasattr(os, "nice"):  # not on Windows
        os.nice(19)


def _one_writer(output: Callable[..., str]) -> Callable[[Callable], Callable]:
    """Run the stage holding the lock of the embeddings folder it writes, ``output(ws, *args,
    **kwargs)`` giving its spec: two runs at once would embed the same rows twice."""
    def wrap(stage: Callable) -> Callable:
        @functools.wraps(stage)
        def locked(ws: Workspace | str | os.PathLike, *args: Any, **kwargs: Any) -> dict:
            ws = (ws if isinstance(ws, Workspace) else Workspace(ws)).require()
            spec = output(ws, *args, **kwargs)
            folder = ws.embeddings_dir(spec)
            with exclusive(beside(folder), f"writing the embeddings of {spec}"):
                for tmp in folder.glob(".*.tmp"):  # a killed writer's; none is writing now
                    tmp.unlink(missing_ok=True)
                return stage(ws, *args, **kwargs)
        return locked
    return wrap


@graceful()  # SIGTERM, like Ctrl-C, writes the rows already embedded before the run ends
@_one_writer(lambda ws, spec, *a, **k: spec.strip())
def embed_images(ws: Workspace | str | os.PathLike, spec: str, batch_size: int = 64,
                 num_workers: int | None = None, device: str | None = None,
                 shard_rows: int = 4096, limit: int | None = None, progress: bool = True,
                 encoder: Any = None,
                 callback: Callable[[int, int], None] | None = None) -> dict:
    """Embed the workspace's images with ``spec`` into ``ws.embeddings_dir(spec)``.

    Only rows whose id is not yet stored are embedded (at most ``limit`` of them), in manifest
    order. ``encoder`` reuses an already loaded ImageEncoder of the same spec; ``callback(done,
    total)`` runs after every batch; ``progress`` shows a bar. Returns a summary dict:
    ``messages`` (for stderr) and ``line`` say what was written.
    """
    from encoders.image import load_image_encoder

    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    if batch_size < 1 or shard_rows < 1:
        raise CdirError(f"batch size and shard rows must be positive ({batch_size}, {shard_rows})")
    # an image changed in place since `cdir data` (its size or mtime differ) is hashed again
    # here: it is embedded again, a merely touched one keeps its vector
    df, _ = restamp(ws, ws.manifest(), save=launch_rank() == 0)
    spec = spec.strip()
    store = EmbeddingStore(ws.embeddings_dir(spec))
    current = _same_model_or_restart(store, spec, "image")
    enc = encoder if encoder is not None else load_image_encoder(spec, device)
    store.open(spec, enc.dim, **enc.params)
    _record_model(store, current)

    ids = df["id"].astype(str).tolist()
    paths = df["path"].astype(str).tolist()
    versions = row_versions(df)
    done, changed = current_rows(store, ids, versions)  # changed images are embedded again
    workers = default_workers() if num_workers is None else max(0, int(num_workers))
    loader = _image_batches(enc, paths, batch_size, workers)
    earlier = store.failed()  # earlier failures are retried
    job = RowJob(ids, paths, earlier, counts=("new",))
    estimated: list[str] = []
    # parts of the run: (BN statistics to embed with, or None: the model's own; their tag; rows)
    parts: list[tuple[dict | None, str | None, list[int]]]
    if enc.domain_bn:
        if job.world > 1:
            raise CdirError(f"{spec} estimates per-domain BatchNorm statistics: embed it in one "
                            "process, not under torchrun")
        parts, already = _domain_parts(enc, store, df, done, limit, loader, estimated, progress)
    else:
        todo = plan(ids, done, limit, job.rank, job.world)
        parts, already = [(None, None, todo.rows)], todo.already
    barrier()  # every rank has read the store before any of them writes to it
    out = _Shards(job, store, shard_rows, dict(zip(ids, versions, strict=True)))
    try:
        with job.progress(sum(len(rows) for _, _, rows in parts), f"embed {spec}", progress,
                          callback):
            for stats, tag, rows in parts:
                if rows:
                    _embed_part(enc, job, out, loader(rows), stats, tag, rows)
    finally:
        out.flush(final=True)  # also on Ctrl-C / errors: finished vectors are complete, keep them
    job.gather()
    if job.world > 1:  # rank 0 writes every rank's failures
        if job.rank == 0:
            store.set_failed(job.ledger())
        barrier()

    summary = {"spec": spec, "dim": enc.dim, "dir": str(store.dir), "device": str(enc.device),
               **job.summary(already, rate_of="rows"), "changed": len(changed),
               "failed_total": len(store.failed())}
    if enc.domain_bn:
        summary["bn_estimated"] = estimated
    summary["messages"] = [failure_report(summary["failures"], store.dir / "failed.json")] \
        if summary["failures"] else []
    summary["line"] = summary_line(summary)
    return summary


def _image_batches(enc: Any, paths: list[str], batch_size: int, workers: int
                   ) -> Callable[[list[int]], Iterator[tuple]]:
    """rows -> their batches of (positions in ``rows``, their tensors or None, failures, content
    hashes): the workers decode each image to its uint8 tensor, the batch is made float where
    the model runs."""
    from encoders.image import split_transform

    per_image, finish = split_transform(enc.transform)

    def loader(rows: list[int]) -> Iterator[tuple]:
        batches = DataLoader(
            ImageRows([paths[j] for j in rows], per_image), batch_size=batch_size,
            shuffle=False, num_workers=workers, collate_fn=collate_rows,
            pin_memory=enc.device.type == "cuda",
            prefetch_factor=4 if workers else None,
            # a job-wide SIGTERM is the main process's; beside a CPU model they yield to it
            worker_init_fn=cpu_loader_worker if enc.device.type == "cpu" else loader_worker)
        for idx, x, bad, hashes in batches:
            if x is not None and finish is not None:
                x = finish(x.to(enc.device, non_blocking=True))
            yield idx, x, bad, hashes

    return loader


def _embed_part(enc: Any, job: RowJob, out: _Shards, batches: Iterator[tuple],
                stats: dict | None, tag: str | None, rows: list[int]) -> None:
    """Embed ``rows`` (their ``batches``), with the BatchNorm statistics ``stats`` (tagged
    ``tag``) when given; each batch's vectors go to ``out``, its failures to ``job``."""
    if stats is not None:
        enc.use_bn_stats(stats)
        out.bn_tags.update((job.ids[j], tag) for j in rows)
    for idx, x, bad, hashes in batches:
        hash_at = dict(zip(idx.tolist(), hashes, strict=True))
        if x is not None and enc.domain_bn and stats is None:
            # its domain had no readable image when the statistics were estimated
            bad = bad + [(i, "no BatchNorm statistics for its domain (re-run to "
                             "estimate them)") for i in idx.tolist()]
            idx, x = idx[:0], None
        if x is not None:
            vecs = enc.encode(x).numpy().astype(np.float32, copy=False)
            finite = np.isfinite(vecs).all(axis=1)
            if not finite.all():  # e.g. an fp16 overflow: that row, not the run
                bad = bad + [(i, "non-finite embedding")
                             for i, ok in zip(idx.tolist(), finite, strict=True) if not ok]
                idx, vecs = idx[torch.from_numpy(finite)], vecs[finite]
            out.add([job.ids[rows[i]] for i in idx.tolist()], vecs,
                    [hash_at[i] for i in idx.tolist()])
        for i, reason in bad:
            job.fail(rows[i], reason)
        out.flush(final=False)
        job.advance(len(idx) + len(bad))


class _Shards:
    """The vectors embedded and not yet stored, written ``shard_rows`` at a time (each shard lands
    atomically with its ids: a kill loses at most the shard in flight), the failure ledger with
    them (under torchrun rank 0 writes it at the end)."""

    def __init__(self, job: RowJob, store: EmbeddingStore, shard_rows: int,
                 version_of: dict[str, str | None]) -> None:
        self.job, self.store, self.shard_rows, self.version_of = job, store, shard_rows, version_of
        self.ids: list[str] = []
        self.vecs: list[np.ndarray] = []
        self.content: dict[str, str] = {}  # id -> hash of the bytes embedded
        self.bn_tags: dict[str, str] = {}  # id -> the `bn:KEY` of its BatchNorm statistics

    def add(self, ids: list[str], vecs: np.ndarray, hashes: list[str]) -> None:
        self.content.update(zip(ids, hashes, strict=True))
        self.vecs.append(vecs)
        self.ids.extend(ids)
        self.job.finish(ids)  # they leave failed.json

    def stored_version(self, id_: str) -> str | None:
        """The manifest's size/mtime fact for the row, the hash of the bytes embedded and, with
        per-domain statistics, their tag."""
        version = self.version_of[id_]
        facts = [] if version is None else [version.split()[0], self.content.get(id_)]
        return " ".join(filter(None, [*facts, self.bn_tags.get(id_)])) or None

    def flush(self, final: bool) -> None:
        """Write full shards (all pending rows when final) and the failure ledger."""
        wrote = False
        while self.ids and (final or len(self.ids) >= self.shard_rows):
            vecs = np.concatenate(self.vecs) if len(self.vecs) > 1 else self.vecs[0]
            n = min(self.shard_rows, len(self.ids))
            with shielded():  # a shard and its removal from the pending rows: both or none
                self.store.append(self.ids[:n], vecs[:n],
                                  [self.stored_version(i) for i in self.ids[:n]])
                del self.ids[:n]
                self.vecs[:] = [vecs[n:]] if len(vecs) > n else []
                self.job.counts["new"] += n
            wrote = True
        # failures go out with the shards (unwritten ones are simply retried after a kill)
        if (wrote or final) and self.job.world == 1:
            self.store.set_failed(self.job.ledger())


def _domain_parts(enc: Any, store: EmbeddingStore, df: pd.DataFrame, done: set[str],
                  limit: int | None, loader: Callable[[list[int]], Iterator[tuple]],
                  estimated: list[str], progress: bool
                  ) -> tuple[list[tuple[dict | None, str | None, list[int]]], int]:
    """``?bn=domain``: (per domain, its statistics, their tag and the rows to embed with them;
    how many rows are already done). A domain whose images changed since its statistics were
    estimated (or that has none) gets them estimated again on all its readable images, saved
    before any row is embedded with them (its name goes to ``estimated``); a stored row counts
    as done only when it is current and was embedded with the domain's stored statistics, so
    new statistics re-embed the whole domain and a run killed half-way leaves no row behind.
    ``limit`` caps the rows to embed; domains past it are left as they are."""
    from cdir.stages.domain_bn import (
        domain_fingerprints,
        load_stats,
        row_tag,
        save_stats,
        stats_tag,
    )

    ids = df["id"].astype(str).tolist()
    by_domain: dict[str, list[int]] = {}
    for j, d in enumerate(df["domain"].astype(str)):
        by_domain.setdefault(d, []).append(j)
    kept = {d: e for d, e in load_stats(store.dir).items() if d in by_domain}
    fps = domain_fingerprints(df, (store.info().get("params") or {}).get("weights"))
    have = store.versions()
    budget = None if limit is None else max(0, int(limit))
    parts, already = [], 0
    for d, rows in by_domain.items():
        entry = kept.get(d)
        if (entry is None or entry["fingerprint"] != fps[d]) and budget != 0:
            stats = _estimate(enc, loader(rows), len(rows), f"BN statistics {d}", progress)
            entry = None
            if stats is not None:  # None: no readable image (its rows are listed as failed)
                entry = kept[d] = {"fingerprint": fps[d], "stats": stats}
                save_stats(store.dir, kept)  # before any row is embedded with them
                estimated.append(d)
        fresh = entry is not None and entry["fingerprint"] == fps[d]
        tag = stats_tag(entry["stats"]) if fresh else None
        todo = [j for j in rows
                if not (tag and ids[j] in done and row_tag(have.get(ids[j])) == tag)]
        already += len(rows) - len(todo)
        take = todo if budget is None else todo[:budget]
        if budget is not None:
            budget -= len(take)
        parts.append((entry["stats"] if fresh else None, tag, take))
    return parts, already


def _estimate(enc: Any, batches: Iterator[tuple], n: int, desc: str, progress: bool) -> dict | None:
    """The encoder's BN statistics over the readable images of ``batches``; None when none is
    readable (unreadable ones are listed by the embedding pass that follows)."""
    from tqdm.auto import tqdm

    seen = []

    def readable():
        with tqdm(total=n, unit="img", desc=desc, disable=not progress, dynamic_ncols=True,
                  file=sys.stderr) as bar:
            for idx, x, bad, _ in batches:
                bar.update(len(idx) + len(bad))
                if x is not None:
                    seen.append(len(x))
                    yield x

    try:
        return enc.estimate_bn_stats(readable())
    except CdirError:
        if seen:
            raise
        return None


def _same_model_or_restart(store: EmbeddingStore, spec: str, what: str) -> ModelId:
    """The model's identity now; the store is emptied (with a note) when its vectors were made by
    other weights of ``spec``: they must never be mixed with, or served as, the new ones."""
    from cdir.stages.modes import model_check

    same, recorded, current = model_check(store, spec)
    if not same:
        print(f"note: {spec} now names other weights ({current.id}) than the {what} embeddings "
              f"in {store.dir} were made with ({recorded}): embedding every {what} again",
              file=sys.stderr)
        store.clear()
    return current


def _record_model(store: EmbeddingStore, current: ModelId) -> None:
    """Keep the hash records of the model's files with the store: the next check of the same
    files only stats them."""
    if current.files and store.info().get("weights_files") != current.files:
        store.update_info(weights_files=current.files)


def summary_line(s: dict) -> str:
    left = f", {s['remaining']} left" if s["remaining"] > 0 else ""
    if s.get("changed"):
        left += f", {s['changed']} changed since embedded"
    if s.get("bn_estimated"):
        left += f", BatchNorm statistics of {', '.join(s['bn_estimated'])} estimated"
    speed = f" at {s['images_per_s']:.1f} images/s" if s["images_per_s"] else ""
    return (f"embedded {s['new']} new, {s['already_done']} already done, {s['failed']} failed"
            f"{left} ({s['dim']}-d {s['spec']} on {s['device']}{speed}) -> {s['dir']}")


# -- captions ------------------------------------------------------------------------------------

@graceful()
@_one_writer(lambda ws, captions, text_spec, *a, **k:
             caption_spec(text_spec, resolve_source(ws, captions)))
def embed_captions(ws: Workspace | str | os.PathLike, captions: str | None, text_spec: str,
                   batch_size: int = 256, device: str | None = None, chunk_rows: int = 4096,
                   progress: bool = True) -> dict:
    """Embed the captions of one source (``captions``: any reference `resolve_source` accepts;
    None: the only source) that are not embedded yet. Returns a summary whose ``line`` says what
    was written."""
    from tqdm.auto import tqdm

    from encoders.text import load_text_encoder

    ws = (ws if isinstance(ws, Workspace) else Workspace(ws)).require()
    key = resolve_source(ws, captions)
    manifest = ws.manifest()
    texts = CaptionStore(ws, key).aligned(manifest)
    missing = int(texts.isna().sum())
    if missing == len(manifest):
        raise CdirError(f"the caption source {key!r} has no caption for any image of this "
                        "gallery: caption it first with `cdir caption`")
    empty = int((texts.fillna("x").str.strip() == "").sum())
    out = caption_embeddings_dir(ws, key, text_spec)
    store = EmbeddingStore(out)
    current = _same_model_or_restart(store, text_spec, "caption")
    ids = manifest["id"].astype(str).tolist()
    versions = caption_versions(texts)
    done, _ = current_rows(store, ids, versions)  # a rewritten caption is embedded again
    todo = [(i, t, v) for i, t, v in zip(ids, texts, versions, strict=True)
            if v is not None and i not in done]
    t0 = time.perf_counter()
    dim = store.info().get("dim")
    if todo:
        encoder = load_text_encoder(text_spec, device=device)
        store.open(text_spec, encoder.dim, captions=key, **encoder.params)
        _record_model(store, current)
        dim = encoder.dim
        bar = tqdm(total=len(todo), unit="caption", desc="embed captions", disable=not progress)
        for start in range(0, len(todo), chunk_rows):
            chunk = todo[start:start + chunk_rows]
            vecs = encoder.encode([t for _, t, _ in chunk], batch_size=batch_size)
            # one shard per chunk: a kill loses one
            store.append([i for i, _, _ in chunk], vecs, [v for _, _, v in chunk])
            bar.update(len(chunk))
        bar.close()
    summary = {"source": key, "text_encoder": text_spec, "embedded": len(todo),
               "already_done": len(done), "missing_captions": missing, "empty_captions": empty,
               "dim": dim, "dir": str(out), "seconds": time.perf_counter() - t0}
    notes = []
    if missing:
        notes.append(f"{missing} images have no caption and are left out of the cm-* modes")
    if empty:
        notes.append(f"{empty} captions are empty")
    summary["line"] = (f"embedded {len(todo)} captions of {key} with {text_spec} ({len(done)} "
                       f"already done, dim {dim}) in {summary['seconds']:.1f}s → {out}"
                       + ("; " + "; ".join(notes) if notes else ""))
    return summary
