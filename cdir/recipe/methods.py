"""Methods: one (mode, captioner, models) combination of a recipe = one row of the report tables."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from cdir.core.workspace import spec_key
from cdir.recipe.config import Recipe, fusion_parts


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
    texts, clips, encs = usable(r.text_encoders), usable(r.clip), usable(r.image_encoders)
    out: list[Method] = []

    def add(mode: str, parts: list[tuple[str, bool]], head: str | None = None,
            **models: object) -> None:
        """``parts``: (name, shown in the short label: only when that role has a choice)."""
        head = head or mode
        out.append(Method(mode=mode, label=" · ".join([head] + [p for p, _ in parts]),
                          short=" · ".join([head] + [p for p, shown in parts if shown]),
                          **models))

    for mode in r.eval.modes:
        if mode == "visual":
            for e in encs:
                add(mode, [(e.display, len(encs) > 1)], encoder=e.spec)
        elif mode == "cm-text":
            for i, c in caps:
                for t in texts:
                    add(mode, [(c.display, len(caps) > 1), (t.display, len(texts) > 1)],
                        captioner=i, text_encoder=t.spec)
        elif mode == "cm-image":
            for i, c in caps:
                for p in clips:
                    add(mode, [(c.display, len(caps) > 1), (p.display, len(clips) > 1)],
                        captioner=i, clip=p.spec)
    if "fusion" in r.eval.modes:
        # the first usable model of each fused mode, with every captioner when captions are fused
        parts = tuple(fusion_parts(r))
        first = {"visual": encs[:1], "cm-text": texts[:1], "cm-image": clips[:1]}
        chosen = {m: first[m][0] for m in parts if first[m]}
        if len(chosen) == len(parts):
            enc, text, clip = (chosen.get(m) for m in ("visual", "cm-text", "cm-image"))
            models = [(name, False) for name in dict.fromkeys(
                x.display for x in (enc, text, clip) if x)]
            needs_caps = "cm-text" in parts or "cm-image" in parts
            for i, c in caps if needs_caps else [(None, None)]:
                cap = [(c.display, len(caps) > 1)] if c else []
                add("fusion", cap + models, head=f"fusion[{'+'.join(parts)}]", captioner=i,
                    encoder=enc.spec if enc else None, text_encoder=text.spec if text else None,
                    clip=clip.spec if clip else None, fusion=parts)
    # e.g. one captioner listed twice with different prompts and no names: keep ids apart
    seen: dict[str, int] = {}
    for m in out:
        n = seen[m.label] = seen.get(m.label, 0) + 1
        if n > 1:
            m.label, m.short = f"{m.label} ({n})", f"{m.short} ({n})"
    return out
