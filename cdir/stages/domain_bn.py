"""The per-domain BatchNorm statistics of an image encoder spec with ``?bn=domain`` (AdaBN), as
the embed stage stores them and search and index builds check them.

``<embeddings folder>/bn_stats.pt``: ``{domain: {"fingerprint", "stats"}}``, where
``fingerprint`` names what the statistics were estimated on (the model's identity and the
domain's sorted ``(id, row version)``) and ``stats`` is `encoders.adabn.get_bn_stats`'s dict.
Each stored row records the statistics it was embedded with as a ``bn:KEY`` fact in its version
(KEY: `encoders.adabn.stats_key`), so a row computed with statistics that are not the stored
ones (a run killed after new statistics landed, a store edited by hand) is never taken as
current.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

from cdir.core.errors import CdirError
from cdir.core.io import atomic_path
from encoders.specs import parse_spec

if TYPE_CHECKING:
    import pandas as pd

    from cdir.core.store import EmbeddingStore

BN_FILE = "bn_stats.pt"
TAG = "bn:"


def wants_domain_bn(spec: str) -> bool:
    """Does the image encoder ``spec`` ask for per-domain statistics (``?bn=``)? (The encoder
    loader validates the value.)"""
    return parse_spec(spec).has("bn")


def domain_fingerprints(manifest: pd.DataFrame, weights: str | None) -> dict[str, str]:
    """domain -> a hash of the model identity and the domain's sorted (id, row version): it
    changes when an image of the domain is added, removed or changed, or the weights change."""
    from cdir.core.manifest import row_versions

    rows: dict[str, list[tuple[str, str]]] = {}
    for i, d, v in zip(manifest["id"].astype(str), manifest["domain"].astype(str),
                       row_versions(manifest), strict=True):
        rows.setdefault(d, []).append((i, str(v)))
    out = {}
    for d, members in rows.items():
        h = hashlib.sha256(f"{weights}".encode())
        for i, v in sorted(members):
            h.update(f"\x1e{i}\x1f{v}".encode("utf-8", "surrogateescape"))
        out[d] = h.hexdigest()[:16]
    return out


def load_stats(folder: Path) -> dict[str, dict]:
    """The stored statistics of every domain ({} when none were estimated yet)."""
    import torch

    path = Path(folder) / BN_FILE
    if not path.exists():
        return {}
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged file is one line, not a traceback
        raise CdirError(f"cannot read the BatchNorm statistics {path} ({type(e).__name__}): "
                        "delete it and re-run `cdir embed`") from None


def save_stats(folder: Path, data: dict[str, dict]) -> None:
    """Replace the stored statistics atomically (a kill leaves the old or the new file)."""
    import torch

    with atomic_path(Path(folder) / BN_FILE) as tmp:
        torch.save(data, tmp)


def stats_tag(stats: dict) -> str:
    """The ``bn:KEY`` fact a row embedded with ``stats`` records."""
    from encoders.adabn import stats_key

    return TAG + stats_key(stats)


def row_tag(version: str | None) -> str | None:
    """The ``bn:KEY`` fact of a stored row's version (None: embedded without one)."""
    return next((f for f in (version or "").split() if f.startswith(TAG)), None)


def check_domain_stats(store: EmbeddingStore, manifest: pd.DataFrame, rerun: str,
                       current: bool = True) -> None:
    """Refuse, in one line saying what to re-run, stored rows embedded with other statistics
    than those stored for their domain, and (``current``) statistics estimated on other images
    than the domain holds now."""
    data = load_stats(store.dir)
    tags = {d: stats_tag(e["stats"]) for d, e in data.items()}
    versions = store.versions()
    ids = manifest["id"].astype(str).tolist()
    domains = manifest["domain"].astype(str).tolist()
    off = [i for i, d in zip(ids, domains, strict=True)
           if i in versions and row_tag(versions[i]) != tags.get(d)]
    if off:
        raise CdirError(f"{len(off)} stored row(s) in {store.dir} were embedded with other "
                        f"BatchNorm statistics than those stored for their domain (e.g. "
                        f"{off[0]!r}): re-run `{rerun}`")
    if not current:
        return
    fps = domain_fingerprints(manifest, (store.info().get("params") or {}).get("weights"))
    failed = {str(r["id"]) for r in store.failed()}
    waiting = {d for i, d in zip(ids, domains, strict=True) if i not in failed}
    stale = sorted(d for d, fp in fps.items()
                   if (d in data and data[d]["fingerprint"] != fp)
                   or (d not in data and d in waiting))
    if stale:
        raise CdirError(f"the BatchNorm statistics of domain(s) {', '.join(stale)} in "
                        f"{store.dir} are stale or missing (images added, removed or changed "
                        f"since they were estimated): re-run `{rerun}`")
