"""`cdir adapt`: groups from mined pairs, the xdomain loss masks, tiny end-to-end runs (outputs,
label-free selection, exact resume, bad input) and a two-process Gloo run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from cdir.core.errors import CdirError
from tests.helpers.cli import cdir, torchrun, two_rank_checkpoint
from tests.helpers.tiny_models import TINY_RESNET, write_tiny_encoder
from tests.helpers.trees import write_shape_tree

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[3]
CLASSES = ("circle", "square", "triangle", "cross", "ring")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(workspace over 3 domains x 5 shapes x 2 images, tiny encoder file)."""
    parent = tmp_path_factory.mktemp("adapt")
    root = write_shape_tree(parent / "gallery", domains=("a", "b", "c"), classes=CLASSES,
                            per_class=2, size=32, ext=".png")
    ws = parent / "ws"
    assert cdir("data", "folder", root, "-w", ws) == 0
    return ws, write_tiny_encoder(parent / "enc.pt")


def _recipe(tmp: Path, epochs: int = 3, **method) -> Path:
    import yaml

    raw = {"data": {"workers": 0},
           "optim": {"epochs": epochs, "batch_size": 10, "lr": 0.05},
           "train": {"save_every": 0, "progress": False, "threads": 1, "amp": "none"},
           "methods": {"xdomain": {"dim": 16, "round_epochs": 2, "cycle": None, **method},
                       "ucdir": {"dim": 16, "round_epochs": 2, "num_cluster": 3,
                                 "warmup_epochs": 1, "cross_start": 2, "momentum": 0.9}}}
    path = tmp / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


# -- groups and the loss -------------------------------------------------------------------------


def test_components_and_partners() -> None:
    from encoders.adapt.groups import Partners, components, group_stats

    groups = components(7, np.array([0, 1, 5]), np.array([3, 4, 3]))
    assert groups.tolist() == [0, 1, 2, 0, 1, 0, 6]
    domains = np.array([0, 0, 0, 1, 1, 2, 2])
    partners = Partners(groups, domains)
    assert sorted(partners.of(0).tolist()) == [3, 5]
    assert partners.of(3).tolist() == [0, 5]
    assert partners.of(2).tolist() == [] and partners.of(6).tolist() == []
    stats = group_stats(groups, domains)
    assert stats == {"grouped": 5 / 7, "groups": 2, "largest_group": 3}


def test_paired_images_draw_partners_from_other_domains(tiny: tuple[Path, Path]) -> None:
    from encoders.adapt.groups import PairedImages, components
    from encoders.adapt.trainer import read_domains
    from encoders.ssl.augment import AugConfig, build_view_transform

    ws, _ = tiny
    paths, codes, names = read_domains(ws / "manifest.parquet")
    assert names == ["a", "b", "c"] and len(paths) == 30
    cfg = AugConfig(size=32, blur_p=0.0)
    ds = PairedImages(paths, codes, build_view_transform("moco_v2", cfg), partner_p=1.0)
    first_b = int(np.flatnonzero(codes == 1)[0])
    ds.set_groups(components(len(paths), np.array([0]), np.array([first_b])))
    views, idx, ok = ds[0]
    assert idx.tolist() == [0, first_b] and ok and views[0].shape == (3, 32, 32)
    assert ds[1][1].tolist() == [1, 1]  # no partner: the anchor is its own positive


def test_domain_negatives_ignore_other_domains() -> None:
    """With negatives=domain, row i's loss depends only on positives in its positive's domain,
    and members of its own group are never negatives."""
    from encoders.adapt.xdomain import pair_losses

    g = torch.Generator().manual_seed(0)
    q = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    k = torch.nn.functional.normalize(torch.randn(6, 8, generator=g), dim=1)
    dom_a = torch.tensor([0, 0, 1, 1, 2, 2])
    dom_p = torch.tensor([1, 1, 0, 0, 1, 2])
    group = torch.tensor([0, 1, 2, 3, 4, 5])
    base, _, _ = pair_losses(q, k, dom_a, dom_p, group, 0.1, "domain")
    k2 = k.clone()
    k2[[2, 3, 5]] = torch.nn.functional.normalize(torch.randn(3, 8, generator=g), dim=1)
    moved, _, _ = pair_losses(q, k2, dom_a, dom_p, group, 0.1, "domain")
    assert torch.allclose(base[[0, 1, 4]], moved[[0, 1, 4]])  # their negatives: k[0, 1, 4]
    everything, _, _ = pair_losses(q, k2, dom_a, dom_p, group, 0.1, "batch")
    assert not torch.allclose(everything[0], base[0])
    grouped, _, _ = pair_losses(q, k, dom_a, dom_p, torch.tensor([0, 0, 2, 3, 4, 5]), 0.1)
    assert grouped[0] < base[0] and grouped[1] < base[1]  # 0 and 1 no longer push apart


# -- end-to-end --------------------------------------------------------------------------------


def _adapt(ws: Path, enc: Path, recipe: Path, out: Path, **kw):
    from cdir.stages.adapt import adapt_encoder

    return adapt_encoder(ws, f"ckpt:{enc}", config=recipe, out=out, monitor=False, **kw)


def test_adapt_writes_the_selected_encoder_and_resumes_exactly(
    tiny: tuple[Path, Path], tmp_path: Path
) -> None:
    from encoders.engine.checkpoint import load_checkpoint, read_file

    ws, enc = tiny
    recipe = _recipe(tmp_path, epochs=3)
    full = _adapt(ws, enc, recipe, tmp_path / "full")
    assert full["epochs_done"] == 3 and len(full["losses"]) == 9  # 30 images // 10
    assert all(math.isfinite(v) for v in full["losses"])
    out = tmp_path / "full"
    for name in ("latest.pt", "encoder.pt", "encoder_last.pt", "best_encoder.pt",
                 "metrics.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    # mining before epochs 1 and 3 (round_epochs 2), the criterion also after the last one
    assert [("mine_pairs" in r) for r in lines] == [True, False, True]
    assert not any(k.startswith(("report_", "monitor_")) for r in lines for k in r)
    ckpt = load_checkpoint(out / "latest.pt")
    assert ckpt["method"] == "xdomain" and ckpt["selection"]["best_epoch"] in (0, 2, 3)
    assert full["selected"] == {"epoch": ckpt["selection"]["best_epoch"],
                                "criterion": "mutual_nn_rate",
                                "value": ckpt["selection"]["best"],
                                "spec": f"ckpt:{out / 'encoder.pt'}"}
    # the chosen epoch has the best logged criterion of every candidate (epochs 0 and 2, which
    # begin epochs 1 and 3, and the final encoder), the first of equals
    logged = {0: lines[0]["select_mutual_nn_rate"], 2: lines[2]["select_mutual_nn_rate"],
              3: lines[2]["select_final_mutual_nn_rate"]}
    assert "select_mutual_nn_rate" not in lines[1]
    best = max(logged.values())
    assert full["selected"]["epoch"] == min(e for e, v in logged.items() if v == best)
    assert full["selected"]["value"] == best
    # encoder.pt holds the chosen epoch's weights
    assert read_file(out / "encoder.pt")["epoch"] == full["selected"]["epoch"]
    assert ckpt["model"]["group_of"].shape == (30,)
    assert ckpt["config"]["model"]["init"] == str(enc)
    # encoder.pt is a loadable encoder of the same architecture
    assert cdir("embed", "-w", ws, "--encoder", f"ckpt:{out / 'encoder.pt'}", "--workers",
                "0", "--no-progress") == 0

    part1 = _adapt(ws, enc, recipe, tmp_path / "part", stop_at=1)
    assert part1["epochs_done"] == 1 and part1["encoder"] is None
    part2 = _adapt(ws, enc, recipe, tmp_path / "part", resume="auto")
    np.testing.assert_allclose(part1["losses"] + part2["losses"], full["losses"],
                               rtol=1e-6, atol=1e-7)
    other = _adapt(ws, enc, recipe, tmp_path / "seed1", seed=1, epochs=1)
    assert other["losses"] != full["losses"][:3]  # the comparison above can fail


def test_ucdir_runs_through_the_same_loop(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """The UCDIR baseline behind `cdir adapt --method ucdir`: warm-up, then k-means and the
    cross-domain terms; bank and clusters are checkpointed; encoder.pt chosen label-free."""
    from encoders.engine.checkpoint import load_checkpoint

    ws, enc = tiny
    recipe = _recipe(tmp_path, epochs=3)
    out = tmp_path / "ucdir"
    assert cdir("adapt", "-w", ws, "--encoder", f"ckpt:{enc}", "--method", "ucdir",
                "--config", recipe, "--out", out, "--no-monitor", "--no-progress") == 0
    lines = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 3 and all(math.isfinite(r["loss"]) for r in lines)
    assert "select_mutual_nn_rate" in lines[0] and "select_mutual_nn_rate" in lines[2]
    ckpt = load_checkpoint(out / "latest.pt")
    assert ckpt["method"] == "ucdir" and int(ckpt["model"]["kmeans_ready"]) == 1
    assert ckpt["model"]["bank"].shape == (30, 16) and (out / "encoder.pt").is_file()
    # what UCDIR evaluates: the momentum encoder and its head
    from encoders.image import load_image_encoder

    head = load_image_encoder(f"ckpt:{out / 'latest.pt'}?features=head", "cpu")
    assert head.dim == 16


def test_bad_input_gets_one_line(tiny: tuple[Path, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    from cdir.stages.adapt import encoder_file

    ws, enc = tiny
    recipe = _recipe(tmp_path)
    with pytest.raises(CdirError, match="cannot be adapted"):
        encoder_file("clip:ViT-B-32/openai")
    with pytest.raises(CdirError, match="cannot be adapted"):
        encoder_file(f"ckpt:{enc}?features=head")
    def refusal(gallery: Path, *extra: object) -> str:
        """The one line `cdir adapt` refuses the gallery with (exit status 2)."""
        ws = tmp_path / f"ws-{gallery.name}"
        assert cdir("data", "folder", gallery, "-w", ws) == 0
        capsys.readouterr()
        assert cdir("adapt", "-w", ws, "--encoder", f"ckpt:{enc}", "--config", recipe,
                    "--out", tmp_path / f"out-{gallery.name}", *extra) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    # one domain only
    one = write_shape_tree(tmp_path / "one", domains=("a",), classes=CLASSES, per_class=2,
                           size=32, ext=".png")
    assert "one domain only" in refusal(one)
    # a nearly empty domain
    small = write_shape_tree(tmp_path / "small", domains=("a", "b"), classes=CLASSES,
                             per_class=2, size=32, ext=".png")
    for f in sorted((small / "b").rglob("*.png"))[3:]:
        f.unlink()
    assert "fewer than 10 images: b (3)" in refusal(small)
    # a one-to-one matcher on domains of very different sizes
    big = write_shape_tree(tmp_path / "big", domains=("a", "b"), classes=CLASSES,
                           per_class=6, size=32, ext=".png")
    for f in sorted((big / "b").rglob("*.png"))[12:]:
        f.unlink()
    assert "differ 2.5-fold" in refusal(big, "--set", "method.matcher=sinkhorn")
    # not a workspace; a wrong --rounds
    assert cdir("adapt", "-w", tmp_path / "nowhere", "--encoder", f"ckpt:{enc}") == 2
    with pytest.raises(SystemExit):
        cdir("adapt", "-w", ws, "--encoder", f"ckpt:{enc}", "--rounds", "0")


@pytest.mark.slow
def test_torchrun_gloo_two_processes(tiny: tuple[Path, Path], tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m cdir adapt``: each rank embeds half the images for the
    mining, both mine the same groups, one checkpoint with both ranks' RNG states."""

    ws, enc = tiny
    recipe = _recipe(tmp_path, epochs=2)
    out = tmp_path / "ddp"
    proc = torchrun(2, "adapt", "-w", ws, "--encoder", f"ckpt:{enc}", "--config", recipe,
                    "--out", out, "--no-monitor", "--batch-size", "10")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_rank_checkpoint(out, epochs=2, steps=2 * 3)  # global batch 10 = 2 x 5
    assert proc.stderr.count("round at epoch 0") == 1  # reported once, by rank 0


def test_frozen_lower_stages_train_on_cached_maps(tiny: tuple[Path, Path], tmp_path: Path
                                                  ) -> None:
    """freeze=layer3: the stem and layers 1-3 keep the starting weights, layer 4 and the head
    train on cached maps; the run still resumes exactly."""
    from encoders.engine.checkpoint import load_encoder

    ws, enc = tiny
    recipe = _recipe(tmp_path, epochs=2, freeze="layer3", cache_views=2, focus=0.5)
    full = _adapt(ws, enc, recipe, tmp_path / "full")
    start, _ = load_encoder(enc)
    end, _ = load_encoder(tmp_path / "full" / "encoder_last.pt")
    s0, s1 = start.state_dict(), end.state_dict()
    assert all(torch.equal(s0[k], s1[k]) for k in s0 if k.startswith(("conv1", "layer3")))
    assert not all(torch.equal(s0[k], s1[k]) for k in s0 if k.startswith("layer4"))
    part1 = _adapt(ws, enc, recipe, tmp_path / "part", stop_at=1)
    part2 = _adapt(ws, enc, recipe, tmp_path / "part", resume="auto")
    np.testing.assert_allclose(part1["losses"] + part2["losses"], full["losses"],
                               rtol=1e-6, atol=1e-7)


def test_grid_pooled_encoder_keeps_the_layout(tiny: tuple[Path, Path]) -> None:
    from encoders.image import load_image_encoder

    _, enc = tiny
    plain = load_image_encoder(f"ckpt:{enc}", "cpu")
    grid = load_image_encoder(f"ckpt:{enc}?grid=2", "cpu")
    assert grid.dim == 4 * plain.dim
    x = torch.randn(2, 3, 32, 32)
    g = grid.model(x).view(2, plain.dim, 4)
    # the mean of the four cells is the global average of the same map
    torch.testing.assert_close(g.mean(2), plain.model(x), rtol=1e-5, atol=1e-6)
    for bad in ("0", "two"):
        with pytest.raises(CdirError, match="grid must be a positive integer"):
            load_image_encoder(f"ckpt:{enc}?grid={bad}", "cpu")
    with pytest.raises(CdirError, match="grid=N needs the backbone"):
        load_image_encoder(f"ckpt:{enc}?features=head&grid=2", "cpu")
    # layers=3,4: layer 3's cells, then layer 4's, each block of unit norm
    both = load_image_encoder(f"ckpt:{enc}?grid=2&layers=3,4", "cpu")
    d3 = grid.model.trunk.layer_dims[2] * 4
    assert both.dim == d3 + grid.dim
    z = both.model(x)
    torch.testing.assert_close(z[:, d3:], torch.nn.functional.normalize(grid.model(x), dim=1))
    torch.testing.assert_close(z[:, :d3].norm(dim=1), torch.ones(2))
    for bad, why in (("grid=2&layers=5", "layers must list"), ("layers=3,4", "goes with grid")):
        with pytest.raises(CdirError, match=why):
            load_image_encoder(f"ckpt:{enc}?{bad}", "cpu")


def test_grid_training_mines_and_trains_the_grid_features(tiny: tuple[Path, Path],
                                                          tmp_path: Path) -> None:
    """grid=2 (and layers 3 and 4): the loss reads the 2x2-pooled map(s) (the head's input is
    4x the backbone dim),
    mining reads the same features, and the exported encoder is the plain backbone."""
    from encoders.adapt.xdomain import XDomain, XDomainConfig
    from encoders.engine.checkpoint import load_encoder
    from encoders.zoo.backbones import build_backbone

    net, dim = build_backbone(TINY_RESNET["name"], **TINY_RESNET["kwargs"])
    model = XDomain(net, dim, XDomainConfig(dim=8, grid=2))
    assert model.head_q[0].in_features == 4 * dim
    assert model.retrieval()(torch.randn(2, 3, 32, 32)).shape == (2, 4 * dim)
    multi = XDomain(net, dim, XDomainConfig(dim=8, grid=2, layers=(3, 4)))
    assert multi.head_q[0].in_features == 4 * (net.layer_dims[2] + dim)
    assert not any("_grid" in k for k in model.state_dict())
    with pytest.raises(CdirError, match="grid needs freeze=none"):
        XDomainConfig(grid=2, freeze="layer3").validate()
    ws, enc = tiny
    out = _adapt(ws, enc, _recipe(tmp_path, epochs=2, grid=2, layers=[3, 4]), tmp_path / "grid")
    assert all(math.isfinite(x) for x in out["losses"])
    trained, _ = load_encoder(tmp_path / "grid" / "encoder_last.pt")
    start, _ = load_encoder(enc)
    assert trained.state_dict().keys() == start.state_dict().keys()


@pytest.mark.parametrize("recipe", ["adapt_emoji.yaml", "ucdir_officehome.yaml",
                                    "ucdir_domainnet.yaml"])
def test_adapt_recipes_resolve(recipe: str) -> None:
    from cdir.core.config import load_yaml
    from encoders.engine.config import resolve_config

    raw = load_yaml(REPO / "configs" / recipe)
    method = next(iter(raw["methods"]))
    cfg = resolve_config(raw, method, recipe)
    assert cfg.method_name in ("xdomain", "ucdir") and cfg.optim.epochs > 0
    from encoders.ssl.plugin import build_method

    build_method(cfg.method_name, "resnet18", {"width": 0.125}, **cfg.method_kwargs)
