"""Caption embeddings: a caption source of the workspace through a text encoder, into the same
resumable embedding store as image embeddings (keyed by manifest id)."""

from __future__ import annotations

import time
from pathlib import Path

from cdir.core.errors import CdirError
from cdir.core.workspace import Workspace


def resolve_caption_source(ws: Workspace, ref: str | None) -> str:
    from cdir.stages.caption import resolve_source

    return resolve_source(ws, ref)


def caption_embeddings_dir(ws: Workspace, key: str, text_spec: str) -> Path:
    return ws.embeddings_dir(f"{text_spec}@captions:{key}")


def embed_captions(ws: Workspace, captions: str | None, text_spec: str, batch_size: int = 256,
                   device: str | None = None, chunk_rows: int = 4096, progress: bool = True
                   ) -> dict:
    """Embed the captions of one source that are not embedded yet; returns a summary."""
    from tqdm.auto import tqdm

    from cdir.core.store import EmbeddingStore
    from cdir.stages.caption import CaptionStore
    from encoders.text import load_text_encoder

    ws.require()
    key = resolve_caption_source(ws, captions)
    manifest = ws.manifest()
    texts = CaptionStore(ws, key).aligned(manifest)
    missing = int(texts.isna().sum())
    if missing == len(manifest):
        raise CdirError(f"the caption source {key!r} has no caption for any image of this "
                        "gallery: caption it first with `cdir caption`")
    empty = int((texts.fillna("x").str.strip() == "").sum())
    out = caption_embeddings_dir(ws, key, text_spec)
    store = EmbeddingStore(out)
    done = store.done_ids()
    todo = [(i, t) for i, t in zip(manifest["id"].astype(str), texts, strict=True)
            if t is not None and i not in done]
    t0 = time.perf_counter()
    dim = store.info().get("dim")
    if todo:
        encoder = load_text_encoder(text_spec, device=device)
        store.open(text_spec, encoder.dim, captions=key, **encoder.params)
        dim = encoder.dim
        bar = tqdm(total=len(todo), unit="caption", desc="embed captions", disable=not progress)
        for start in range(0, len(todo), chunk_rows):
            chunk = todo[start:start + chunk_rows]
            vecs = encoder.encode([t for _, t in chunk], batch_size=batch_size)
            store.append([i for i, _ in chunk], vecs)  # one shard per chunk: a kill loses one
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
    print(f"embedded {len(todo)} captions of {key} with {text_spec} ({len(done)} already done, "
          f"dim {dim}) in {summary['seconds']:.1f}s → {out}"
          + ("; " + "; ".join(notes) if notes else ""))
    return summary
