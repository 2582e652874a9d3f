"""The one config system of recipes and training runs: YAML mappings validated into dataclasses,
and ``--set key.sub=value`` overrides.

OmegaConf's structured configs were the first choice, but they refuse the union-typed fields these
configs need (``classes: str | list[str]``, ``pairs: "all" | [...]``), so this is a small parser:
unknown keys are errors that list the valid ones, values are YAML, list items are addressed by
index (one past the end appends) and a list item given as a spec string is widened to
``{spec: ...}`` when one of its fields is set.
"""

from __future__ import annotations

import copy
import dataclasses
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cdir.core.errors import CdirError

INTERNAL = {"internal": True}  # dataclass field metadata: set by a loader, not a config key


def config_keys(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if not f.metadata.get("internal")}


def build(cls: type, raw: Any, where: str,
          parsers: dict[str, Callable[[Any, str], Any]] | None = None) -> Any:
    """A dataclass from a mapping, refusing unknown keys with the list of valid ones. A key in
    ``parsers`` is converted by its parser (called with the value and its dotted place); null there
    means the default."""
    if not isinstance(raw, dict):
        raise CdirError(f"{where}: expected a mapping, got {raw!r}")
    known = config_keys(cls)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise CdirError(f"{where}: unknown key(s) {', '.join(map(str, unknown))}; valid: "
                        f"{', '.join(sorted(known))}")
    kwargs = dict(raw)
    for key, parse in (parsers or {}).items():
        if kwargs.get(key) is not None:
            kwargs[key] = parse(kwargs[key], f"{where}.{key}")
        else:
            kwargs.pop(key, None)  # null: the default
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise CdirError(f"{where}: {e}") from None


def to_dict(obj: Any) -> Any:
    """The config keys of a dataclass tree as plain YAML/JSON values (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if not f.metadata.get("internal")}
    if isinstance(obj, list | tuple):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def deep_merge(base: dict, over: dict, leaves: Iterable[str] = ()) -> dict:
    """``over`` merged into a copy of ``base``, section by section; keys in ``leaves`` are replaced
    whole even when both sides are mappings."""
    leaves = set(leaves)
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k not in leaves:
            out[k] = deep_merge(out[k], v, leaves)
        else:
            out[k] = copy.deepcopy(v)
    return out


def yaml_value(text: str) -> Any:
    """A --set value: YAML (numbers, null, true, [lists], {maps}); raw text if it is not YAML."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def split_set(item: str) -> tuple[str, Any]:
    """``key.sub=value`` -> (``key.sub``, the value parsed as YAML)."""
    if "=" not in item:
        raise CdirError(f"--set expects key=value, got {item!r}")
    key, text = item.split("=", 1)
    return key.strip(), yaml_value(text)


def set_value(d: dict[str, Any], key: str, value: Any) -> None:
    """Set the dotted ``key`` of ``d`` in place, creating sections on the way."""
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise CdirError(f"--set {key!r}: empty key")
    node: Any = d
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            try:
                idx = int(part)
            except ValueError:
                idx = -1
            if not 0 <= idx <= len(node):
                raise CdirError(f"--set {key}: {part!r} is not an index of a list of "
                                f"{len(node)} (0..{len(node)}; {len(node)} appends)")
            if idx == len(node):  # one past the end appends
                node.append({})
            if last:
                node[idx] = value
            else:
                if isinstance(node[idx], str):  # a spec string: address its fields
                    node[idx] = {"spec": node[idx]}
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise CdirError(f"--set {key}: {'.'.join(parts[:i])} is a value, not a section")


def apply_sets(d: dict[str, Any], items: Iterable[str] | None,
               rename: Callable[[str], str] | None = None) -> dict[str, Any]:
    """A copy of ``d`` with every ``key=value`` item applied in order; ``rename`` maps a key
    written by the user to its place in ``d``."""
    d = copy.deepcopy(d)
    for item in items or []:
        key, value = split_set(item)
        set_value(d, rename(key) if rename else key, value)
    return d


def load_yaml(path: str | os.PathLike, hint: str = "see configs/ for examples") -> dict[str, Any]:
    """A YAML file that holds a mapping; a missing file or bad YAML is one clear error."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise CdirError(f"no recipe at {p}; {hint}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        first = str(e).strip().splitlines()
        raise CdirError(f"{p}: not valid YAML ({' '.join(first[:2])})") from None
    if not isinstance(raw, dict):
        raise CdirError(f"{p}: a recipe must be a YAML mapping")
    return raw
