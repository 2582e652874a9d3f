"""Fetching model files from the Hugging Face cache without hanging when there is no network.

Every hub file is looked up in the local cache first. Only when it is missing do we go online, and
only after a quick reachability check: huggingface_hub retries unreachable hosts for ~25 s per file,
which would turn "this model is not installed" into a long silent hang.
"""

from __future__ import annotations

import hashlib
import os
import socket
from functools import lru_cache
from pathlib import Path
from urllib.parse import urlparse

from cdir.core.errors import ModelUnavailable, first_line

# huggingface_hub's own reading of its boolean variables, so that we agree with it on "offline"
_TRUE = {"1", "ON", "YES", "TRUE"}


def offline() -> bool:
    """True when the user asked for offline mode: HF_HUB_OFFLINE (or, when that is unset,
    TRANSFORMERS_OFFLINE) is 1, ON, YES or TRUE, in any case. The one offline rule here."""
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")
    return value is not None and value.upper() in _TRUE


def hub_cache_dir() -> str:
    from huggingface_hub import constants

    return str(constants.HF_HUB_CACHE)


@lru_cache(maxsize=4)
def _reachable(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 3.0) -> bool:
    """Can we open a TCP connection to the hub endpoint? (Assumed yes behind an HTTP proxy, where a
    direct connection says nothing.)"""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _reachable(url.hostname or "huggingface.co", url.port or 443, timeout)


def download_blocked() -> str | None:
    """Why a file missing from the cache cannot be downloaded now, or None when it can."""
    if offline():
        return "HF_HUB_OFFLINE is set"
    if not hub_reachable():
        return "the hub is unreachable"
    return None


def cached_file(repo: str, filenames: list[str] | tuple[str, ...]) -> str | None:
    """The first of ``filenames`` present in the local hub cache for ``repo``, or None."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        path = try_to_load_from_cache(repo, name)
        if isinstance(path, str):  # otherwise None or the "known missing" sentinel
            return path
    return None


def hub_file(repo: str, filenames: list[str] | tuple[str, ...], model: str, how: str) -> str:
    """Local path of the first of ``filenames`` that ``repo`` has: from the cache, else downloaded.

    ``model`` names the model in errors; ``how`` says how to provide it without network.
    Raises ModelUnavailable (one line) when the file is neither cached nor downloadable.
    """
    path = cached_file(repo, filenames)
    if path:
        return path
    blocked = download_blocked()
    if blocked:
        raise ModelUnavailable(f"{model}: {repo} is not in the local Hugging Face cache "
                               f"({hub_cache_dir()}) and {blocked}; {how}")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    for name in filenames:
        try:
            return hf_hub_download(repo, name)
        except LocalEntryNotFoundError as e:  # network trouble after all
            raise ModelUnavailable(f"{model}: download of {repo} failed ({first_line(e)}); "
                                   f"{how}") from None
        except EntryNotFoundError:
            continue  # the repo lacks this file name: try the next candidate
        except Exception as e:  # noqa: BLE001 - gated/missing repo, HTTP errors: one clear line
            raise ModelUnavailable(f"{model}: download of {repo} failed ({first_line(e)}); "
                                   f"{how}") from None
    raise ModelUnavailable(f"{model}: {repo} has none of {', '.join(filenames)}; {how}")


def file_fingerprint(path: str | os.PathLike) -> str:
    """A cheap content fingerprint (size + first and last MiB): tells a retrained checkpoint at the
    same path from the one already embedded, without hashing hundreds of MB."""
    path = Path(path)
    size = path.stat().st_size
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]

