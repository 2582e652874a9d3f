"""The caption store: captions per (image, captioner, prompt, generation parameters) in a workspace.

One *source* per key: a captioner key (``hf:<model>|max_new_tokens=30,...``, see
`encoders.captioners.captioner_key`) or the name of an imported file. On disk, for
``path = ws.captions_path(key)`` = ``<ws>/captions/<stem>.parquet``:

    <stem>.parquet        compacted rows: id, caption, model, prompt, params (JSON text), and
                          version: what the image held when it was captioned (its `row_versions`
                          facts, see `cdir.core.store.same_version`; null for imported captions
                          and for rows of stores written before images were versioned)
    <stem>.parts/part-NNNNNN.parquet
                          one file per captioned batch since the last compaction, each written
                          atomically (temp file + rename): a run killed with SIGKILL loses at most
                          the batch in flight, and the next run reads the parts it left
    <stem>.json           the source's description: key, kind (model|import), model, family,
                          prompt, params, counts, unreadable images ("failed")
    <stem>.lock           held while a run writes (`cdir.core.lock`: a dead holder's lock is
                          taken over)

Reading merges the compacted file and the parts; a later row wins for an id. A run compacts at its
start (leftovers of a killed run) and at its end. Rows are keyed by manifest id, so a changed
gallery keeps the captions that are still valid and a re-run captions only what is missing, and
the images whose content changed since they were captioned (the new caption replaces the old).

A source's embeddings by a text encoder live in `caption_embeddings_dir`, each row recorded with
the hash of its caption (`caption_versions`), so a rewritten caption is embedded again.
"""

from __future__ import annotations

import json
import os
import re
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path, read_json, write_json
from cdir.core.lock import exclusive
from cdir.core.workspace import Workspace, caption_spec

if TYPE_CHECKING:
    import pandas as pd

COLUMNS = ["id", "caption", "model", "prompt", "params"]
VERSION = "version"  # stored beside COLUMNS; absent in older stores (read as null)
_PART = re.compile(r"^part-(\d{6,})(?:-r\d+)?\.parquet$")  # -rN: written by rank N of a torchrun


def _params_text(params: dict | str | None) -> str:
    if isinstance(params, str):
        return params
    return json.dumps(params or {}, sort_keys=True, ensure_ascii=False)


class CaptionStore:
    """Captions of one source (a captioner key or an import name) in a workspace."""

    def __init__(self, ws: Workspace | str | os.PathLike, key: str):
        self.ws = ws if isinstance(ws, Workspace) else Workspace(ws)
        self.key = key
        self.path = self.ws.captions_path(key)
        self.parts_dir = self.path.with_suffix(".parts")
        self.meta_path = self.path.with_suffix(".json")
        self.lock_path = self.path.with_suffix(".lock")

    # -- description -----------------------------------------------------------------------------
    def exists(self) -> bool:
        return self.meta_path.exists() or self.path.exists() or bool(self._parts())

    def meta(self) -> dict:
        return read_json(self.meta_path) if self.meta_path.exists() else {}

    def write_meta(self, **fields: Any) -> dict:
        meta = self.meta()
        meta.update(fields)
        meta["key"] = self.key
        meta["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(self.meta_path, meta)
        return meta

    # -- rows ------------------------------------------------------------------------------------
    def _parts(self) -> list[Path]:
        if not self.parts_dir.is_dir():
            return []
        return sorted(p for p in self.parts_dir.iterdir() if _PART.match(p.name))

    def _read_all(self) -> pd.DataFrame:
        """Every row with its image version (None where not recorded), one per id, the latest
        row winning."""
        import pandas as pd

        frames = [pd.read_parquet(self.path)] if self.path.exists() else []
        frames += [pd.read_parquet(p) for p in self._parts()]
        if not frames:
            return pd.DataFrame({c: pd.Series(dtype=object) for c in [*COLUMNS, VERSION]})
        for f in frames:
            if VERSION not in f.columns:
                f[VERSION] = None
            f[VERSION] = f[VERSION].astype(object)
        df = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
        df = df.drop_duplicates("id", keep="last").reset_index(drop=True)[[*COLUMNS, VERSION]]
        df[VERSION] = [v if isinstance(v, str) and v else None for v in df[VERSION]]
        return df

    def read(self) -> pd.DataFrame:
        """All rows (compacted file + parts), one per id, the latest row winning."""
        return self._read_all()[COLUMNS]

    def done_ids(self) -> set[str]:
        return set(self.read()["id"].astype(str))

    def versions(self) -> dict[str, str | None]:
        """id -> the image version its caption was made from (None: not recorded, i.e. imported
        or captioned before images were versioned; such a caption counts as current)."""
        df = self._read_all()
        return dict(zip(df["id"].astype(str), df[VERSION], strict=True))

    def append(self, ids: list[str], captions: list[str], model: str, prompt: str | None,
               params: dict | str, versions: list[str | None] | None = None) -> Path | None:
        """Write one part file (atomically): these rows survive a kill from now on. ``versions``:
        what each image held when captioned (`cdir.core.manifest.row_versions` facts)."""
        import pandas as pd

        if len(ids) != len(captions):
            raise ValueError(f"{len(ids)} ids for {len(captions)} captions")
        if versions is not None and len(versions) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(versions)} versions")
        if not ids:
            return None
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        last = self._parts()
        n = int(_PART.match(last[-1].name).group(1)) + 1 if last else 1  # type: ignore[union-attr]
        df = pd.DataFrame({"id": [str(i) for i in ids], "caption": [str(c) for c in captions],
                           "model": model, "prompt": prompt, "params": _params_text(params)})
        df["prompt"] = df["prompt"].astype(object)
        df[VERSION] = pd.Series(list(versions) if versions is not None else [None] * len(ids),
                                dtype=object)
        from cdir.core.dist import rank_world

        rank, world = rank_world()  # ranks writing at once: their names never collide
        target = self.parts_dir / (f"part-{n:06d}-r{rank}.parquet" if world > 1
                                   else f"part-{n:06d}.parquet")
        with atomic_path(target) as tmp:
            df.to_parquet(tmp, index=False)
        return target

    def write_rows(self, df: pd.DataFrame) -> None:
        """Replace the whole source with ``df`` (atomically), then drop the parts it includes."""
        parts = self._parts()
        with atomic_path(self.path) as tmp:
            df[COLUMNS].to_parquet(tmp, index=False)
        self._remove_parts(parts)

    def compact(self, adopt: dict[str, str | None] | None = None) -> pd.DataFrame:
        """Merge the parts into the compacted file. A kill in between leaves both, which read()
        deduplicates, so nothing is lost or doubled. ``adopt`` (id -> image version now): rows
        without a recorded version get that one, so a later change of the image is noticed."""
        parts = self._parts()
        df = self._read_all()
        adopted = False
        if adopt:
            fill = [adopt.get(i) if v is None else v
                    for i, v in zip(df["id"].astype(str), df[VERSION], strict=True)]
            adopted = fill != df[VERSION].tolist()
            df[VERSION] = fill
        if parts or adopted:
            with atomic_path(self.path) as tmp:
                df.to_parquet(tmp, index=False)
            self._remove_parts(parts)
        return df[COLUMNS]

    def _remove_parts(self, parts: list[Path]) -> None:
        for p in parts:
            p.unlink(missing_ok=True)
        if self.parts_dir.is_dir():
            for p in self.parts_dir.glob(".part-*.tmp"):  # temp files of a killed writer
                p.unlink(missing_ok=True)
            try:
                self.parts_dir.rmdir()
            except OSError:
                pass  # not empty: a part written meanwhile stays for the next read

    def aligned(self, manifest: pd.DataFrame) -> pd.Series:
        """Captions in manifest row order (None where an image has no caption)."""
        import pandas as pd

        df = self.read()
        lookup = dict(zip(df["id"].astype(str), df["caption"], strict=True))
        return pd.Series([lookup.get(i) for i in manifest["id"].astype(str)], index=manifest.index,
                         name="caption", dtype=object)

    def lock(self) -> AbstractContextManager[None]:
        """One writer per source: a second run on the same source stops with a clear message."""
        return exclusive(self.lock_path, f"writing captions {self.key!r}")


# -- listing and resolving sources ---------------------------------------------------------------

def caption_embeddings_dir(ws: Workspace, key: str, text_spec: str) -> Path:
    """Where the embeddings of caption source ``key`` by the text encoder ``text_spec`` live."""
    return ws.embeddings_dir(caption_spec(text_spec, key))


def caption_versions(texts: pd.Series) -> list[str | None]:
    """What each caption embedding is computed from: a hash of the caption text (None: no
    caption), so a rewritten caption is embedded again."""
    import hashlib

    return [None if t is None or t != t else
            "text:" + hashlib.sha256(str(t).encode("utf-8", "surrogateescape")).hexdigest()[:16]
            for t in texts.tolist()]


def list_sources(ws: Workspace | str | os.PathLike) -> list[dict]:
    """Every caption source of the workspace: key, kind, model, prompt, params, count, empty,
    failed (count), path; sorted by key."""
    ws = ws if isinstance(ws, Workspace) else Workspace(ws)
    folder = ws.root / "captions"
    out = []
    if folder.is_dir():
        for meta_path in sorted(folder.glob("*.json")):
            try:
                meta = read_json(meta_path)
            except (OSError, ValueError):
                continue
            if "key" not in meta:
                continue
            out.append({"key": meta["key"], "kind": meta.get("kind", "model"),
                        "model": meta.get("model"), "prompt": meta.get("prompt"),
                        "params": meta.get("params", {}), "count": meta.get("count", 0),
                        "empty": meta.get("empty", 0), "failed": len(meta.get("failed", [])),
                        "path": str(meta_path.with_suffix(".parquet"))})
    return sorted(out, key=lambda s: s["key"])


def resolve_source(ws: Workspace | str | os.PathLike, ref: str | None) -> str:
    """The key of a caption source from ``ref``: its exact key, an import name, the file stem,
    or a piece of the key that matches one source only. No ref: the only source, if just one."""
    sources = list_sources(ws)
    keys = [s["key"] for s in sources]
    if not keys:
        raise CdirError("this workspace has no captions yet: run `cdir caption -w WS "
                        "--captioner hf:...` or import a file with --from-file")
    listing = "; ".join(keys)
    if not ref:
        if len(keys) == 1:
            return keys[0]
        raise CdirError(f"several caption sources; pick one with --source: {listing}")
    if ref in keys:
        return ref
    stems = {Path(s["path"]).stem: s["key"] for s in sources}
    if ref in stems:
        return stems[ref]
    hits = [k for k in keys if ref in k]
    if len(hits) == 1:
        return hits[0]
    if hits:
        raise CdirError(f"{ref!r} matches several caption sources: {'; '.join(hits)}")
    raise CdirError(f"no caption source {ref!r} in this workspace; there are: {listing}")


def captioner_of_source(ws: Workspace | str | os.PathLike, key: str
                        ) -> tuple[str, dict] | None:
    """(captioner spec, generation params) that wrote a source, to caption new queries the same
    way; None for imported captions."""
    meta = CaptionStore(ws, key).meta()
    if meta.get("kind") != "model" or not meta.get("model"):
        return None
    gen = ("prompt", "max_new_tokens", "min_new_tokens", "num_beams")
    return meta["model"], {k: v for k, v in (meta.get("params") or {}).items() if k in gen}


def load_captions(ws: Workspace | str | os.PathLike, ref: str | None = None) -> pd.DataFrame:
    """The rows of a caption source (id, caption, model, prompt, params)."""
    return CaptionStore(ws, resolve_source(ws, ref)).read()
