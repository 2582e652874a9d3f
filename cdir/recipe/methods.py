"""Methods: one (mode, captioner, models) combination of a recipe = one row of the report tables."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from cdir.core.workspace import spec_key
from cdir.recipe.config import Recipe, fusion_parts, mode_entries
from cdir.stages.modes import MODES, SINGLE_MODES


@dataclass
class Method:
    mode: str
    label: str  # every part: mode · captioner · models
    short: str  # the parts that tell this row from the others of its table
    captioner: int | None = None  # index into recipe.captioners
    encoder: str | None = None
    text_encoder: str | None = None
    clip: str | None = None
    fusion: tuple[str, ...] = ()

    @property
    def id(self) -> str:
        return spec_key(self.label)


def build_methods(r: Recipe, skipped: Collection[str] = ()) -> list[Method]:
    """Every method of the recipe, leaving out those that need a model spec in ``skipped``."""
    def usable(entries: list) -> list:
        return [e for e in entries if e.spec not in skipped]

    caps = [(i, c) for i, c in enumerate(r.captioners) if c.spec not in skipped]
    out: list[Method] = []

    def add(mode: str, parts: list[tuple[str, bool]], head: str | None = None,
            **models: object) -> None:
        """``parts``: (name, shown in the short label: only when that role has a choice)."""
        head = head or mode
        out.append(Method(mode=mode, label=" · ".join([head] + [p for p, _ in parts]),
                          short=" · ".join([head] + [p for p, shown in parts if shown]),
                          **models))

    for mode in r.eval.modes:
        if mode not in SINGLE_MODES:
            continue  # fusion: below, once the single modes are known
        spec = MODES[mode]
        entries = usable(mode_entries(r, mode))
        for i, c in caps if spec.captions else [(None, None)]:
            cap = [(c.display, len(caps) > 1)] if c else []
            for e in entries:
                add(mode, cap + [(e.display, len(entries) > 1)], captioner=i,
                    **{spec.model: e.spec})
    if any(MODES[m].fuses for m in r.eval.modes):
        # the first usable model of each fused mode, with every captioner when captions are fused
        parts = tuple(fusion_parts(r))
        first = {m: usable(mode_entries(r, m))[:1] for m in parts}
        chosen = {m: first[m][0] for m in parts if first[m]}
        if len(chosen) == len(parts):
            picked = [chosen[m] for m in SINGLE_MODES if m in chosen]  # in the order of MODES
            models = [(name, False) for name in dict.fromkeys(x.display for x in picked)]
            needs_caps = any(MODES[m].captions for m in parts)
            for i, c in caps if needs_caps else [(None, None)]:
                cap = [(c.display, len(caps) > 1)] if c else []
                add("fusion", cap + models, head=f"fusion[{'+'.join(parts)}]", captioner=i,
                    fusion=parts, **{MODES[m].model: e.spec for m, e in chosen.items()})
    # e.g. one captioner listed twice with different prompts and no names: keep ids apart
    seen: dict[str, int] = {}
    for m in out:
        n = seen[m.label] = seen.get(m.label, 0) + 1
        if n > 1:
            m.label, m.short = f"{m.label} ({n})", f"{m.short} ({n})"
    return out
