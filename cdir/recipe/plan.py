"""A recipe's plan: the stages a run goes through, in order, each with its outcome once run (the
runner makes and runs them; the report lists them)."""

from __future__ import annotations

from dataclasses import dataclass

from cdir.recipe.methods import Method


@dataclass
class Stage:
    kind: str  # data | caption | embed-captions | embed-images | eval | report
    label: str
    captioner: int | None = None  # caption, embed-captions: index into recipe.captioners
    spec: str | None = None  # embed-captions, embed-images: the encoder
    method: Method | None = None  # eval
    status: str = "pending"  # ran | skipped | pending
    detail: str = ""
    seconds: float = 0.0
