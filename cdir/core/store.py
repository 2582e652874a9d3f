"""Resumable on-disk embedding store: shards of L2-normalised float32 vectors with their ids.

<dir>/info.json             spec, dim, kind, params
<dir>/shard_00000.npy       (n, dim) float32
<dir>/shard_00000.ids.json  the n ids of that shard, written after the vectors (its presence marks
                            the shard complete, so a killed run never leaves a half-counted shard)
<dir>/shard_00000.versions.json
                            what each row was computed from (facts such as the image file's
                            ``stat:SIZE:MTIME sha256:HASH``, or the caption text's hash), written
                            before the ids; absent in stores written before rows were versioned
                            (their rows count as current; see `same_version`)
<dir>/failed.json           images that could not be read: [{id, path, reason}]

Rows are keyed by manifest id, not position, so a changed gallery reuses what is still valid and an
interrupted run continues without duplicated or missing rows.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path, read_json, write_json

if TYPE_CHECKING:
    import pandas as pd

_SHARD = re.compile(r"shard_(\d{5})\.ids\.json$")
_SHARD_FILE = re.compile(r"shard_(\d{5})\.(ids\.json|versions\.json|npy|claim)$")


def same_version(stored: str | None, now: str | None) -> bool:
    """Was a vector recorded with version ``stored`` computed from what a row with version ``now``
    holds? Versions are space-separated facts; sharing one is enough (the same size and mtime,
    or the same content hash: a merely touched file keeps its vector). None: not recorded."""
    if stored is None or now is None:
        return True
    return stored == now or not set(stored.split()).isdisjoint(now.split())


class EmbeddingStore:
    def __init__(self, directory: str | Path):
        self.dir = Path(directory)

    # -- metadata ------------------------------------------------------------------------------
    @property
    def info_path(self) -> Path:
        return self.dir / "info.json"

    def info(self) -> dict:
        return read_json(self.info_path) if self.info_path.exists() else {}

    def exists(self) -> bool:
        return self.info_path.exists()

    def open(self, spec: str, dim: int, **params) -> None:
        """Start or continue a store for ``spec``; refuse to mix vectors from different settings."""
        info = self.info()
        want = {"spec": spec, "dim": int(dim), "params": params}
        if info and (info.get("spec"), info.get("dim"), info.get("params")) != (
                spec, int(dim), params):
            raise CdirError(
                f"{self.dir} holds embeddings of {info.get('spec')} (dim {info.get('dim')}, "
                f"{info.get('params')}), not {spec} (dim {dim}, {params}): delete it to re-embed")
        if not info:
            write_json(self.info_path, want)

    def update_info(self, **fields) -> None:
        """Add or replace top-level fields of info.json (e.g. the model's identity records)."""
        write_json(self.info_path, {**self.info(), **fields})

    def clear(self) -> None:
        """Remove every shard, the failure list and info.json (the model changed: start over)."""
        if not self.dir.exists():
            return
        for p in self.dir.iterdir():
            if _SHARD_FILE.match(p.name) or p.name in ("failed.json", "info.json"):
                p.unlink()

    # -- shards --------------------------------------------------------------------------------
    def _shards(self) -> list[int]:
        if not self.dir.exists():
            return []
        return sorted(int(m.group(1)) for p in self.dir.iterdir() if (m := _SHARD.match(p.name)))

    def done_ids(self) -> set[str]:
        done: set[str] = set()
        for i in self._shards():
            done.update(read_json(self.dir / f"shard_{i:05d}.ids.json"))
        return done

    def failed(self) -> list[dict]:
        path = self.dir / "failed.json"
        return read_json(path) if path.exists() else []

    def add_failed(self, records: list[dict]) -> None:
        if records:
            known = {r["id"]: r for r in self.failed()}
            known.update({r["id"]: r for r in records})
            self.set_failed(list(known.values()))

    def set_failed(self, records: list[dict]) -> None:
        """Replace the list of unreadable images (a retried image that now loads leaves it)."""
        if records or (self.dir / "failed.json").exists():
            write_json(self.dir / "failed.json", sorted(records, key=lambda r: r["id"]))

    def versions(self) -> dict[str, str | None]:
        """id -> what its stored vector was computed from (None: not recorded); a later shard
        wins, as in `load`."""
        out: dict[str, str | None] = {}
        for i in self._shards():
            ids = read_json(self.dir / f"shard_{i:05d}.ids.json")
            path = self.dir / f"shard_{i:05d}.versions.json"
            out.update(zip(ids, read_json(path) if path.exists() else [None] * len(ids),
                           strict=True))
        return out

    def adopt_versions(self, versions: dict[str, str | None]) -> None:
        """Record ``versions`` for stored rows that have none (written before rows were
        versioned), taking those vectors as current: from now on a change of their image is
        noticed."""
        for i in self._shards():
            path = self.dir / f"shard_{i:05d}.versions.json"
            ids = read_json(self.dir / f"shard_{i:05d}.ids.json")
            have = read_json(path) if path.exists() else [None] * len(ids)
            new = [v if v is not None else versions.get(id_) for id_, v in zip(ids, have,
                                                                                  strict=True)]
            if new != have:
                write_json(path, new)

    def append(self, ids: list[str], vectors: np.ndarray,
               versions: list[str | None] | None = None) -> None:
        """Write one shard. Vectors are L2-normalised here so every consumer can rely on it.
        ``versions``: what each row was computed from (see `versions`)."""
        if len(ids) == 0:
            return
        if versions is not None and len(versions) != len(ids):
            raise ValueError(f"{len(ids)} ids for {len(versions)} versions")
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape[0] != len(ids):
            raise ValueError(f"{len(ids)} ids for {vectors.shape[0]} vectors")
        if not np.isfinite(vectors).all():
            raise CdirError(f"non-finite embeddings produced for e.g. {ids[0]!r}")
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        n = self._claim()
        with atomic_path(self.dir / f"shard_{n:05d}.npy") as tmp:
            with open(tmp, "wb") as f:
                np.save(f, vectors)
        versions_path = self.dir / f"shard_{n:05d}.versions.json"
        if versions is not None:  # before the ids, which mark the shard complete
            write_json(versions_path, list(versions))
        elif versions_path.exists():  # left by a run killed before its ids landed
            versions_path.unlink()
        write_json(self.dir / f"shard_{n:05d}.ids.json", list(ids))
        (self.dir / f"shard_{n:05d}.claim").unlink(missing_ok=True)

    def _claim(self) -> int:
        """The next shard number, taken by creating its claim file exclusively: processes
        writing into one store at once (the ranks of a torchrun) never pick the same one. A
        claim left by a killed process only makes its number skipped."""
        self.dir.mkdir(parents=True, exist_ok=True)
        n = max((int(m.group(1)) for p in self.dir.iterdir()
                 if (m := _SHARD_FILE.match(p.name))), default=-1) + 1
        while True:
            try:
                os.close(os.open(self.dir / f"shard_{n:05d}.claim",
                                 os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
                return n
            except FileExistsError:
                n += 1

    # -- reading -------------------------------------------------------------------------------
    def load(self, manifest: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (vectors, valid): vectors in manifest row order (zeros where missing) and a
        boolean mask of rows that have a vector. Without a manifest, all rows in shard order."""
        shards = self._shards()
        if not shards:
            raise CdirError(f"no embeddings in {self.dir}: run `cdir embed` first")
        # shards are memory-mapped and copied straight to their rows: the output is the only
        # copy in memory (not the shards, then their concatenation, then the output)
        blocks = [(read_json(self.dir / f"shard_{i:05d}.ids.json"),
                   np.load(self.dir / f"shard_{i:05d}.npy", mmap_mode="r")) for i in shards]
        dim = blocks[0][1].shape[1]
        if manifest is None:
            out = np.empty((sum(len(ids) for ids, _ in blocks), dim), np.float32)
            at = 0
            for ids, vecs in blocks:
                out[at:at + len(ids)] = vecs
                at += len(ids)
            return out, np.ones(len(out), bool)
        row_of = {id_: j for j, id_ in enumerate(manifest["id"].tolist())}
        out = np.zeros((len(manifest), dim), np.float32)
        valid = np.zeros(len(manifest), bool)
        for ids, vecs in blocks:  # in shard order: a later shard wins if an id was re-embedded
            pairs = [(k, row_of[i]) for k, i in enumerate(ids) if i in row_of]
            if pairs:
                src, dst = map(np.asarray, zip(*pairs, strict=True))
                out[dst] = vecs[src]
                valid[dst] = True
        return out, valid
