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
_CHUNK = 65536  # rows copied at a time out of the memory-mapped shards
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
    def rows(self, manifest: pd.DataFrame | None = None) -> tuple[StoredRows, np.ndarray]:
        """(view, valid): the stored vectors of the manifest rows that have one, in manifest
        order, as a `StoredRows` view read from the memory-mapped shards on demand, and the
        boolean mask of those rows. Without a manifest, all rows in shard order."""
        shards = self._shards()
        if not shards:
            raise CdirError(f"no embeddings in {self.dir}: run `cdir embed` first")
        mmaps = [np.load(self.dir / f"shard_{i:05d}.npy", mmap_mode="r") for i in shards]
        ids = [read_json(self.dir / f"shard_{i:05d}.ids.json") for i in shards]
        if manifest is None:
            shard = np.concatenate([np.full(len(b), s, np.int32) for s, b in enumerate(ids)])
            row = np.concatenate([np.arange(len(b), dtype=np.int64) for b in ids])
            return StoredRows(mmaps, shard, row), np.ones(len(shard), bool)
        row_of = {id_: j for j, id_ in enumerate(manifest["id"].tolist())}
        shard = np.full(len(manifest), -1, np.int32)
        row = np.zeros(len(manifest), np.int64)
        for s, block in enumerate(ids):  # in shard order: a later shard wins if re-embedded
            pairs = [(k, row_of[i]) for k, i in enumerate(block) if i in row_of]
            if pairs:
                src, dst = map(np.asarray, zip(*pairs, strict=True))
                shard[dst] = s
                row[dst] = src
        valid = shard >= 0
        return StoredRows(mmaps, shard[valid], row[valid]), valid

    def load(self, manifest: pd.DataFrame | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Return (vectors, valid): vectors in manifest row order (zeros where missing) and a
        boolean mask of rows that have a vector. Without a manifest, all rows in shard order."""
        view, valid = self.rows(manifest)
        out = np.zeros((len(valid), view.shape[1]), np.float32)
        dst = valid.nonzero()[0]
        for a in range(0, len(dst), _CHUNK):  # from the maps a chunk at a time: one copy in all
            out[dst[a:a + _CHUNK]] = view[a:a + _CHUNK]
        return out, valid


class RowView:
    """A read-only matrix whose rows are produced when read: ``view[a:b]``, ``view[positions]``
    and ``view[mask]`` give float32 rows, ``np.asarray(view)`` all of them. Subclasses say how
    to read chosen positions (`_read`)."""

    def __init__(self, n: int, dim: int):
        self.shape = (n, dim)
        self.ndim = 2
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def _read(self, pos: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def __getitem__(self, key: slice | np.ndarray | list[int]) -> np.ndarray:
        pos = np.arange(len(self))[key] if isinstance(key, slice) else np.asarray(key)
        if pos.dtype == bool:
            pos = pos.nonzero()[0]
        if pos.ndim != 1:
            raise TypeError("rows are chosen by a slice, positions or a mask")
        return self._read(pos)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype, copy=False)


class StoredRows(RowView):
    """Chosen rows of an embedding store, read from its memory-mapped shards only when indexed:
    never whole in memory (an index of a gallery larger than memory is built from it chunk by
    chunk)."""

    def __init__(self, mmaps: list[np.ndarray], shard: np.ndarray, row: np.ndarray):
        super().__init__(len(shard), mmaps[0].shape[1])
        self._mmaps, self._shard, self._row = mmaps, shard, row

    def _read(self, pos: np.ndarray) -> np.ndarray:
        out = np.empty((len(pos), self.shape[1]), np.float32)
        shard, row = self._shard[pos], self._row[pos]
        for s in np.unique(shard):  # one gather per shard file
            sel = shard == s
            out[sel] = self._mmaps[s][row[sel]]
        return out
