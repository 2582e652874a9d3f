"""What `cdir adapt` logs and chooses, held against what `cdir eval` scores, on a tiny gallery
with a tiny encoder (real code throughout):

- the label monitor's ``p1`` / ``p1_domain-whiten`` are `cdir eval`'s mean P@1 over directed
  domain pairs of the features the run names (``selected.spec``), on the same checkpoint;
- the label-free choice reads those same features (UCDIR: the momentum head of ``best.pt``);
- the monitor does not change a run (no worker processes: one global random stream);
- permuted labels change the monitor's figures and nothing else.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.helpers.cli import cdir
from tests.helpers.tiny_models import write_tiny_encoder
from tests.helpers.trees import permute_labels, write_shape_tree

torch.set_num_threads(1)

CLASSES = ("circle", "square", "triangle", "cross", "ring")
# the xdomain run reads grid-pooled maps of two layers, so the spec carries options
METHODS = {"xdomain": {"grid": 2, "layers": [3, 4]}, "ucdir": {}}
NORM = "domain-whiten"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(workspace over 3 domains x 5 shapes x 2 images, the same images with their labels
    permuted over the rows, tiny encoder file)."""

    parent = tmp_path_factory.mktemp("monitor")
    root = write_shape_tree(parent / "gallery", domains=("a", "b", "c"), classes=CLASSES,
                            per_class=2, size=32, ext=".png")
    ws, shuffled = parent / "ws", parent / "ws_permuted"
    for w in (ws, shuffled):
        assert cdir("data", "folder", root, "-w", w) == 0
    permute_labels(shuffled / "manifest.parquet")
    return ws, shuffled, write_tiny_encoder(parent / "enc.pt")


def _recipe(tmp: Path, method: str, epochs: int) -> Path:
    import yaml

    raw = {"data": {"workers": 0},
           "optim": {"epochs": epochs, "batch_size": 10, "lr": 0.05},
           "train": {"save_every": 0, "progress": False, "threads": 1, "amp": "none"},
           "methods": {"xdomain": {"dim": 16, "round_epochs": 2, "cycle": None,
                                   **METHODS["xdomain"]},
                       "ucdir": {"dim": 16, "round_epochs": 1, "num_cluster": 3,
                                 "warmup_epochs": 1, "cross_start": 2, "momentum": 0.9}}}
    path = tmp / f"{method}-{epochs}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _adapt(ws: Path, enc: Path, method: str, out: Path, epochs: int, monitor: bool
           ) -> dict[str, Any]:
    from cdir.stages.adapt import adapt_encoder

    return adapt_encoder(ws, f"ckpt:{enc}", method=method,
                         config=_recipe(out.parent, method, epochs), out=out, monitor=monitor,
                         normalize=NORM)


def _on(spec: str, path: Path) -> str:
    """``spec``'s options on another checkpoint file."""
    options = spec.partition("?")[2]
    return f"ckpt:{path}" + (f"?{options}" if options else "")


def _eval_p1(ws: Path, spec: str) -> dict[str, float]:
    """`cdir eval`'s mean P@1 of ``spec``, plain and normalised (the stages the command runs)."""
    from cdir.stages.embed import embed_images
    from cdir.stages.evaluate import evaluate

    embed_images(ws, spec, num_workers=0, progress=False)
    res = evaluate(ws, encoder=spec, normalize=f"none,{NORM}", ks="1", examples=0,
                   progress=False)
    return {"p1": res["results"]["visual"][-1]["P@1"],
            f"p1_{NORM}": res["results"][f"visual+{NORM}"][-1]["P@1"]}


@pytest.mark.parametrize("method", list(METHODS))
def test_monitor_logs_the_p1_cdir_eval_prints(tiny: tuple[Path, Path, Path], tmp_path: Path,
                                              method: str) -> None:
    ws, _, enc = tiny
    out = tmp_path / method
    res = _adapt(ws, enc, method, out, epochs=1, monitor=True)
    logged = res["monitor"][-1]
    assert logged["epoch"] == 1  # the monitor scored the model that latest.pt holds
    spec = res["selected"]["spec"]
    assert spec.partition("?")[2] == {"xdomain": "grid=2&layers=3,4",
                                      "ucdir": "features=head"}[method]
    want = _eval_p1(ws, _on(spec, out / "latest.pt"))
    assert {k: logged[k] for k in want} == pytest.approx(want, abs=1e-9)
    assert all(0.0 <= v <= 100.0 for v in want.values())
    # the other figures are named for what they are
    assert {"knn_top1", "knn_top5", "p1_any_other_domain"} <= set(logged)


@pytest.mark.parametrize("method", list(METHODS))
def test_selection_reads_the_features_cdir_eval_scores(tiny: tuple[Path, Path, Path],
                                                       tmp_path: Path, method: str) -> None:
    """The chosen encoder's logged criterion is the criterion of the vectors `cdir eval` reads
    for the spec the run names (UCDIR: the momentum head of ``best.pt``, not the backbone)."""
    from cdir.core.workspace import Workspace
    from cdir.stages.embed import embed_images
    from cdir.stages.modes import image_vectors
    from encoders.adapt.mining import mining_stats
    from indexes.normalize import fit_normalizer

    ws, _, enc = tiny
    out = tmp_path / method
    res = _adapt(ws, enc, method, out, epochs=2, monitor=False)
    spec = res["selected"]["spec"]
    assert Path(spec.removeprefix("ckpt:").partition("?")[0]).is_file()
    embed_images(ws, spec, num_workers=0, progress=False)
    w = Workspace(ws)
    manifest = w.manifest()
    x, ok = image_vectors(w, manifest, spec)
    dom = manifest["domain"].astype(str).to_numpy()[ok]
    x = fit_normalizer(x[ok], dom, NORM).transform(x[ok], dom)
    assert res["selected"]["value"] == pytest.approx(
        mining_stats(x, dom)["mutual_nn_rate"], abs=1e-9)
    if method == "ucdir":  # the head is what was chosen by: not the backbone's criterion
        backbone = f"ckpt:{out / 'encoder.pt'}"
        embed_images(ws, backbone, num_workers=0, progress=False)
        assert image_vectors(w, manifest, backbone)[0].shape[1] != x.shape[1]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    from encoders.engine.checkpoint import load_checkpoint

    return load_checkpoint(path)["model"]


def _same_run(a: dict[str, Any], b: dict[str, Any]) -> None:
    """Identical per-step losses, chosen epoch and criterion, and final weights (groups, bank
    and clusters included)."""
    assert a["losses"] == b["losses"] and all(math.isfinite(v) for v in a["losses"])
    assert (a["selected"]["epoch"], a["selected"]["value"]) == (
        b["selected"]["epoch"], b["selected"]["value"])
    wa, wb = _weights(Path(a["latest"])), _weights(Path(b["latest"]))
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


@pytest.mark.parametrize("method", list(METHODS))
@pytest.mark.parametrize("change", ["monitor off", "labels permuted"])
def test_neither_the_monitor_nor_the_labels_change_the_run(
        tiny: tuple[Path, Path, Path], tmp_path: Path, method: str, change: str) -> None:
    """A run without its monitor, or on a gallery whose labels are permuted over the rows, is
    the same run: only the report may differ."""
    ws, shuffled, enc = tiny
    base = _adapt(ws, enc, method, tmp_path / "base", epochs=2, monitor=True)
    if change == "monitor off":
        other = _adapt(ws, enc, method, tmp_path / "other", epochs=2, monitor=False)
        assert [m["epoch"] for m in base["monitor"]] == [1, 2] and other["monitor"] == []
    else:
        other = _adapt(shuffled, enc, method, tmp_path / "other", epochs=2, monitor=True)
        # the labels were read (the monitor's figures differ), so the equality below can fail
        assert base["monitor"] != other["monitor"]
    _same_run(base, other)


def test_train_monitor_on_a_folder_logs_the_p1_cdir_eval_prints(
        tiny: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """`cdir train --monitor FOLDER` (domain/class folders): the same P@1 as `cdir eval` of the
    encoder on a workspace of that folder."""
    from types import SimpleNamespace

    from cdir.stages.train import build_monitor
    from encoders.engine.checkpoint import encoder_preprocess, load_encoder
    from encoders.engine.config import MonitorConfig

    ws, _, enc = tiny
    pp = encoder_preprocess(enc)
    cfg = SimpleNamespace(aug=SimpleNamespace(**pp), train=SimpleNamespace(seed=0),
                          data=SimpleNamespace(workers=0),
                          monitor=MonitorConfig(path=str(ws.parent / "gallery")))
    logged = build_monitor(cfg)(load_encoder(enc)[0], torch.device("cpu"))
    assert set(logged) == {"knn_top1", "knn_top5", "p1", "p1_any_other_domain"}
    assert logged["p1"] == pytest.approx(_eval_p1(ws, f"ckpt:{enc}")["p1"], abs=1e-9)
