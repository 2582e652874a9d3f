"""Label-free distillation reads no labels: the same run on a workspace whose manifest labels
are permuted over the rows trains the same student, step for step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tests.helpers.cli import cdir
from tests.helpers.trees import permute_labels, write_shape_tree

torch.set_num_threads(1)

SETS = ["model.backbone_kwargs.width=0.125", "aug.size=32"]
# the speeds a metrics line holds besides the run's own figures (they differ run to run)
TIMING = ("img_per_s", "seconds")


@pytest.fixture(scope="module")
def galleries(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(workspace over 2 domains x 3 shapes x 2 images, the same images with their labels
    permuted over the rows)."""

    parent = tmp_path_factory.mktemp("label_free")
    root = write_shape_tree(parent / "gallery", domains=("a", "b"),
                            classes=("circle", "square", "triangle"), per_class=2, size=32,
                            ext=".png")
    ws, shuffled = parent / "ws", parent / "ws_permuted"
    for w in (ws, shuffled):
        assert cdir("data", "folder", root, "-w", w) == 0
    permute_labels(shuffled / "manifest.parquet")
    return ws, shuffled


def _run(ws: Path, method: str, out: Path) -> tuple[dict[str, torch.Tensor], list[dict]]:
    from cdir.stages.distill import distill_label_free_run

    distill_label_free_run(method, ws, "pixels", sets=SETS, out=out, epochs=2, batch_size=4,
                           workers=0, embed_dim=8, student="resnet18", progress=False,
                           teacher_normalize="domain-whiten")
    weights = torch.load(out / "student.pt", weights_only=True)["encoder"]
    logged = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    return weights, logged


def _figures(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMING}


@pytest.mark.parametrize("method", ["rrd", "dcd"])
def test_permuted_labels_give_the_same_student(galleries: tuple[Path, Path], tmp_path: Path,
                                               method: str) -> None:
    import pandas as pd

    ws, shuffled = galleries
    labels = [pd.read_parquet(w / "manifest.parquet")["label"].tolist() for w in galleries]
    assert labels[0] != labels[1] and sorted(labels[0]) == sorted(labels[1])
    base_w, base_log = _run(ws, method, tmp_path / "base")
    other_w, other_log = _run(shuffled, method, tmp_path / "other")
    losses = [r["loss"] for r in base_log]
    # two epochs trained, and their losses differ (so the comparison below compares figures)
    assert len(losses) == 2 and all(np.isfinite(losses)) and losses[0] != losses[1]
    assert [_figures(r) for r in base_log] == [_figures(r) for r in other_log]
    assert base_w.keys() == other_w.keys() and base_w
    for k in base_w:
        assert torch.equal(base_w[k], other_w[k]), k
