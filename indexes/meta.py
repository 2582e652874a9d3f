"""The files of an index and its JSON sidecar: what the index was built from, and the checks
that refuse an index that no longer matches its files, its gallery or its encoder.

One index = these files side by side (``<name>`` is the stem of ``Workspace.index_path``):

    <name>.faiss         the FAISS index, always written from its CPU copy
    <name>.rows.parquet  one row per vector in index order: ``id``, ``domain``
    <name>.json          ``IndexMeta``: encoder spec, kind, dim, metric, count, manifest
                         fingerprint, params, per-domain counts, versions, the sha256
                         of the two files above, and the encoder's weights identity and
                         vectors fingerprint
    <name>.normalize.npz only for a normalised index (``meta.normalize`` not "none"): the
                         per-domain statistics (`indexes.normalize`) its vectors were
                         transformed with; the sidecar records their fingerprint
"""

from __future__ import annotations

import json
import os
import platform
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from cdir.core.errors import CdirError
from cdir.core.io import sha256_file
from indexes.kinds import KINDS

if TYPE_CHECKING:
    from indexes.normalize import DomainNormalizer

FORMAT_VERSION = 1


@dataclass
class IndexMeta:
    """What an index was built from; written as the ``<name>.json`` sidecar."""

    encoder_spec: str
    kind: str
    dim: int
    count: int
    manifest_fingerprint: str = ""
    metric: str = "ip"  # inner product on L2-normalised vectors = cosine similarity
    params: dict[str, Any] = field(default_factory=dict)
    domain_counts: dict[str, int] = field(default_factory=dict)
    created: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> {sha256, bytes}
    format: int = FORMAT_VERSION
    # what the vectors are (absent in older sidecars): the encoder's weights identity and its
    # file-hash records (a query is refused when the encoder now has other weights), and a
    # fingerprint of the stored vectors of the rows (a rebuild is due when it changes)
    model_id: str | None = None
    model_files: dict[str, dict[str, Any]] = field(default_factory=dict)
    vectors_fingerprint: str = ""
    # search-time normalisation of the indexed vectors (a key of NORMALIZERS) and the fingerprint
    # of its statistics file; absent in older sidecars, which are plain
    normalize: str = "none"
    normalize_fingerprint: str = ""
    # the shared PCA dimension asked for before the per-domain statistics (0: none; absent in
    # older sidecars, whose statistics are at full size)
    normalize_dim: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> IndexMeta:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in d.items() if k in known})


def new_meta(kind: str, n: int, d: int, params: dict[str, Any], encoder_spec: str,
             manifest_fingerprint: str) -> IndexMeta:
    """The sidecar of an index just built: now, and the versions of what built it."""
    return IndexMeta(
        encoder_spec=encoder_spec, kind=kind, dim=d, count=n,
        manifest_fingerprint=manifest_fingerprint, params=params,
        created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        versions=versions())


def versions() -> dict[str, str]:
    """The versions recorded in a sidecar: faiss, numpy, cdir, python."""
    from importlib.metadata import PackageNotFoundError, version

    import faiss
    import numpy as np

    try:
        cdir_version = version("cdir")
    except PackageNotFoundError:
        cdir_version = "unknown"
    return {"faiss": faiss.__version__, "numpy": np.__version__, "cdir": cdir_version,
            "python": platform.python_version()}


# -------------------------------------------------------------------------------------------------
# the files
# -------------------------------------------------------------------------------------------------
class IndexFiles(NamedTuple):
    faiss: Path
    meta: Path
    rows: Path


def index_files(path: str | os.PathLike) -> IndexFiles:
    """The three files of the index at ``path``: ``<name>``, ``<name>.faiss`` or ``<name>.json``."""
    p = Path(path)
    if p.suffix in (".faiss", ".json"):
        p = p.with_suffix("")
    return IndexFiles(
        p.with_name(p.name + ".faiss"), p.with_name(p.name + ".json"),
        p.with_name(p.name + ".rows.parquet"))


def normalizer_file(path: str | os.PathLike) -> Path:
    """``<name>.normalize.npz``: the statistics of a normalised index at ``path``."""
    faiss_file = index_files(path).faiss
    return faiss_file.with_name(faiss_file.name.removesuffix(".faiss") + ".normalize.npz")


def fsync(path: Path) -> None:
    """Flush ``path`` to disk (before it is renamed into place)."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def checksums(written: dict[Path, Path]) -> dict[str, dict[str, Any]]:
    """The sidecar's ``files`` record: final name -> sha256 and size of the file written (still
    at its temporary path) for it."""
    return {final.name: {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size}
            for final, tmp in written.items()}


def write_meta(meta: IndexMeta, path: Path) -> None:
    """The sidecar as JSON at ``path`` (a temporary path: the caller renames it), on disk."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(meta.to_dict(), f, indent=2, sort_keys=True)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def verify_files(files: IndexFiles, meta: IndexMeta, verify: bool = True) -> None:
    """Refuse a missing index file or, with ``verify``, one whose sha256 is not the sidecar's
    (truncated, or a save interrupted between its renames)."""
    for f in (files.faiss, files.rows):
        if not f.exists():
            raise CdirError(f"index file {f} is missing: rebuild with `cdir index build`")
        want = meta.files.get(f.name)
        if verify and want and (f.stat().st_size != want.get("bytes")
                                or sha256_file(f) != want.get("sha256")):
            raise CdirError(
                f"index file {f} does not match its sidecar {files.meta.name} (a save was "
                "interrupted, or the file was changed): rebuild with `cdir index build`")


# -------------------------------------------------------------------------------------------------
# reading and checking
# -------------------------------------------------------------------------------------------------
def check_meta(
    meta: IndexMeta, expect_encoder: str | None, expect_fingerprint: str | None, where: str,
) -> None:
    """Refuse (CdirError) an index built with another encoder or for another gallery."""
    if expect_encoder is not None and meta.encoder_spec.strip() != expect_encoder.strip():
        raise CdirError(
            f"index {where} was built with encoder {meta.encoder_spec!r}, but {expect_encoder!r} "
            f"was asked for: rebuild it with `cdir index build --encoder {expect_encoder}` "
            f"(or search with --encoder {meta.encoder_spec})")
    if expect_fingerprint is not None and meta.manifest_fingerprint != expect_fingerprint:
        raise CdirError(
            f"index {where} was built for gallery fingerprint {meta.manifest_fingerprint!r}, but "
            f"the gallery is now {expect_fingerprint!r} (images added, removed or changed): "
            f"embed the new images with `cdir embed`, then update the index with "
            f"`cdir index build`")


def read_meta(path: str | os.PathLike) -> IndexMeta:
    """The sidecar of the index at ``path`` (cheap: reads only the JSON)."""
    files = index_files(path)
    if not files.meta.exists():
        raise CdirError(
            f"no index at {files.faiss.with_suffix('')} (missing {files.meta.name}): "
            "build one with `cdir index build`")
    try:
        with open(files.meta, encoding="utf-8") as f:
            raw = json.load(f)
        meta = IndexMeta.from_dict(raw)
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise CdirError(
            f"index sidecar {files.meta} is unreadable ({e}): rebuild with `cdir index build`"
        ) from None
    if meta.format > FORMAT_VERSION:
        raise CdirError(
            f"index {files.faiss} uses format {meta.format}, newer than this cdir understands "
            f"({FORMAT_VERSION}): upgrade cdir or rebuild the index")
    if meta.kind not in KINDS:
        raise CdirError(f"index sidecar {files.meta} names unknown type {meta.kind!r}: rebuild it")
    return meta


def load_normalizer(path: str | os.PathLike, meta: IndexMeta, hint: str | None = None
                    ) -> DomainNormalizer | None:
    """The normalisation statistics of the index at ``path`` (None for a plain index); refused
    when the file is missing, damaged, or not the one the sidecar ``meta`` names. ``hint``: the
    command that rebuilds the index, for the message."""
    from indexes.normalize import DomainNormalizer

    if meta.normalize == "none":
        return None
    f = normalizer_file(path)
    rebuild = f"rebuild with `{hint or f'cdir index build --normalize {meta.normalize}'}`"
    if not f.exists():
        raise CdirError(f"the {meta.normalize} statistics of index {index_files(path).faiss} "
                        f"are missing ({f.name}): {rebuild}")
    try:
        norm = DomainNormalizer.load(f)
    except CdirError as e:
        raise CdirError(f"{e} ({f}): {rebuild}") from None
    if (norm.method, norm.fingerprint) != (meta.normalize, meta.normalize_fingerprint):
        raise CdirError(f"the statistics {f.name} are not those index {index_files(path).faiss} "
                        f"was built with ({norm.method} {norm.fingerprint}, the sidecar says "
                        f"{meta.normalize} {meta.normalize_fingerprint}): {rebuild}")
    return norm


# -------------------------------------------------------------------------------------------------
# compatible query encoders
# -------------------------------------------------------------------------------------------------
# the key of a query encoder's checkpoint that names the index it was trained for
COMPATIBLE_KEY = "compatible"


def compatibility(meta: IndexMeta, path: str | os.PathLike) -> dict[str, Any]:
    """What a query encoder trained into the space of the index at ``path`` records of it:
    the encoder and normalisation that made its vectors, their size, and the sha256 of its
    FAISS file (so a rebuilt or regrown index, whose vectors may be others, is not taken for
    it)."""
    faiss_name = index_files(path).faiss.name
    return {"encoder_spec": meta.encoder_spec, "normalize": meta.normalize,
            "normalize_dim": int(meta.normalize_dim),
            "normalize_fingerprint": meta.normalize_fingerprint, "dim": int(meta.dim),
            "content_sha256": str((meta.files.get(faiss_name) or {}).get("sha256", ""))}


def check_compatible(record: dict[str, Any], meta: IndexMeta, path: str | os.PathLike,
                     query: str, name: str) -> None:
    """Refuse (one line) a query encoder ``query`` whose ``record`` is not this index's
    :func:`compatibility`."""
    now = compatibility(meta, path)
    differ = [k for k in now if record.get(k) != now[k]]
    if differ:
        raise CdirError(f"{query} is not compatible with index {name}: it was trained for an "
                        f"index of {record.get('encoder_spec')} ({record.get('normalize')}) "
                        f"whose {differ[0]} was {record.get(differ[0])!r}, this one has "
                        f"{now[differ[0]]!r}; distil it again with --compatible {name}")
