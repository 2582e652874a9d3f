"""Distillation end to end through the CLI on CPU: a teacher, then a student with every loss,
resume equal to an uninterrupted run, last and best, the seeds runner, a two-process Gloo run
with the gathered queue, label-free distillation on a workspace, and the one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from encoders.distill.losses import LOSSES
from tests.helpers.cli import REPO, cdir, torchrun

FAST = ["--workers", "0", "--no-progress", "--batch-size", "8"]


@pytest.fixture(scope="module")
def colours(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A labelled folder: train/ 4 colour classes x 12 images, test/ 4 x 4, 32 px."""
    root = tmp_path_factory.mktemp("colours")
    rng = np.random.default_rng(0)
    palette = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 230, 40)]
    for split, n in (("train", 12), ("test", 4)):
        for c, col in enumerate(palette):
            (root / split / f"c{c}").mkdir(parents=True)
            for i in range(n):
                a = np.clip(rng.normal(col, 50, (32, 32, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(a).save(root / split / f"c{c}" / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def teacher(colours: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("teacher") / "resnet14_vanilla"
    assert cdir("train", "teacher", "--arch", "resnet14", "--data", colours, "--epochs", 2,
                "--out", out, *FAST) == 0
    return out


def _metrics(out: Path) -> list[dict]:
    return [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_teacher_run_writes_last_and_best_in_the_testbed_format(teacher: Path) -> None:
    from encoders.image import load_image_encoder
    from encoders.zoo import load_teacher

    rows = _metrics(teacher)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert all(0 <= r["test_top1"] <= 100 for r in rows)
    last = torch.load(teacher / "last.pt", weights_only=True)
    best = torch.load(teacher / "best.pt", weights_only=True)
    assert last["epoch"] == 2 and last["accuracy"] == rows[-1]["test_top1"]
    chosen = max(rows, key=lambda r: (r["test_top1"], -r["epoch"]))
    assert best["epoch"] == chosen["epoch"] and best["selected_on"] == "test"
    # the testbed's {'model': state_dict} loads strictly as a teacher, and as an image encoder
    model = load_teacher(teacher / "best.pt", "resnet14", num_classes=4)
    assert model.feat_dim == 64
    enc = load_image_encoder(f"ckpt:{teacher / 'last.pt'}", "cpu")
    img = Image.new("RGB", (32, 32), (200, 30, 30))
    assert enc.encode_images([img]).shape == (1, 64)


@pytest.mark.parametrize("method", list(LOSSES))
def test_every_loss_distils_from_the_teacher(method: str, teacher: Path, colours: Path,
                                             tmp_path: Path) -> None:
    out = tmp_path / method
    assert cdir("distill", method, "--teacher", f"ckpt:{teacher / 'best.pt'}", "--student",
                "resnet8", "--data", colours, "--epochs", 1, "--out", out,
                "--set", "method.queue_size=16" if method in ("rrd", "crd_fifo") else
                "train.seed=0", *(["--set", "method.nce_k=8"] if method == "crd" else []),
                *FAST) == 0
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    assert ckpt["method"] == method and ckpt["epoch"] == 1
    # the teacher is not in the checkpoint; the student and the loss's state are
    assert not any(k.startswith("teacher") for k in ckpt["model"])
    assert any(k.startswith("student.") for k in ckpt["model"])
    assert ckpt["distill"]["teacher_sha256"]
    rec = _metrics(out)[0]
    assert np.isfinite(rec["loss"]) and "test_top1" in rec
    assert (out / "last.pt").is_file() and (out / "best.pt").is_file()


def test_dcd_scale_is_optimised_and_resume_equals_an_uninterrupted_run(
        teacher: Path, colours: Path, tmp_path: Path) -> None:
    args = ["distill", "dcd", "--teacher", teacher / "last.pt", "--student", "resnet8",
            "--data", colours, "--epochs", 2, *FAST]
    assert cdir(*args, "--out", tmp_path / "full") == 0
    assert cdir(*args, "--out", tmp_path / "part", "--stop-at", 1) == 0
    assert not (tmp_path / "part" / "last.pt").exists()
    assert cdir(*args, "--out", tmp_path / "part", "--resume", "auto") == 0
    full, part = _metrics(tmp_path / "full"), _metrics(tmp_path / "part")
    assert [r["loss"] for r in full] == [r["loss"] for r in part]
    assert [r["test_top1"] for r in full] == [r["test_top1"] for r in part]
    a = torch.load(tmp_path / "full" / "latest.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "part" / "latest.pt", weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # DCD's learnable scale is in the optimiser: it moved from its initial value 1
    assert float(a["loss.log_tau"]) != 1.0


def test_validation_split_chooses_best_and_seeds_report_mean_and_std(
        teacher: Path, colours: Path, tmp_path: Path) -> None:
    out = tmp_path / "seeds"
    assert cdir("distill", "kd", "--teacher", teacher / "best.pt", "--student", "resnet8",
                "--data", colours, "--epochs", 2, "--val-split", 0.25, "--out", out,
                "--seeds", 0, 1, *FAST) == 0
    table = json.loads((out / "seeds.json").read_text())
    assert [r["seed"] for r in table["runs"]] == [0, 1]
    assert table["selected_on"] == "val"
    for r in table["runs"]:
        rows = _metrics(Path(r["out"]))
        assert all("val_top1" in x for x in rows)
        chosen = max(rows, key=lambda x: (x["val_top1"], -x["epoch"]))
        assert r["best"] == chosen["test_top1"] and r["last"] == rows[-1]["test_top1"]
    lasts = [r["last"] for r in table["runs"]]
    assert table["last"]["mean"] == pytest.approx(np.mean(lasts))
    assert table["last"]["std"] == pytest.approx(np.std(lasts, ddof=1))
    assert "mean ± std" in (out / "seeds.md").read_text()
    # a second call finds both seeds finished and runs nothing again
    before = (out / "seed_0" / "metrics.jsonl").stat().st_mtime_ns
    assert cdir("distill", "kd", "--teacher", teacher / "best.pt", "--student", "resnet8",
                "--data", colours, "--epochs", 2, "--val-split", 0.25, "--out", out,
                "--seeds", 0, 1, *FAST) == 0
    assert (out / "seed_0" / "metrics.jsonl").stat().st_mtime_ns == before


def test_bad_distillation_input_is_one_line(teacher: Path, colours: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    base = ["--student", "resnet8", "--data", colours, "--epochs", 1, *FAST]
    cases = [
        (["distill", "dcd", *base, "--out", tmp_path / "a"], "needs --teacher"),
        (["distill", "dcd", "--teacher", tmp_path / "nope.pt", *base, "--out", tmp_path / "b"],
         "no teacher checkpoint"),
        (["distill", "dcd", "--teacher", teacher / "best.pt", "--teacher-arch", "resnet20",
          *base, "--out", tmp_path / "c"], "does not fit resnet20"),
        (["distill", "dcd", "--teacher", teacher / "best.pt", "--teacher-sha256", "0" * 64,
          *base, "--out", tmp_path / "d"], "sha256"),
        (["train", "teacher", "--data", "cifar100", "--root", tmp_path, "--out", tmp_path / "e"],
         "--download"),
        (["distill", "kd", "--label-free", "-w", tmp_path, "--teacher", "pixels"],
         "uses an embedding term"),
        (["distill", "rrd", "--label-free", "--data", colours, "-w", tmp_path, "--teacher",
          "pixels"], "do not apply to --label-free"),
        (["distill", "dcd", "--teacher", teacher / "best.pt", *base, "--out", tmp_path / "f",
          "--set", "method.nope=1"], "unknown option"),
    ]
    for args, needle in cases:
        assert cdir(*args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and needle in err[0], (args, err)


def test_two_process_gloo_rrd_gathers_the_queue(teacher: Path, colours: Path,
                                                tmp_path: Path) -> None:
    """``torchrun --nproc_per_node 2 -m cdir distill rrd``: each step enqueues the keys of the
    global batch (both ranks'), so after S steps the queue pointer is at S x global batch."""
    out = tmp_path / "ddp"
    proc = torchrun(2, "distill", "rrd", "--teacher", teacher / "best.pt", "--student",
                    "resnet8", "--data", colours, "--epochs", "1", "--out", out,
                    "--set", "method.queue_size=64", *FAST)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ckpt = torch.load(out / "latest.pt", weights_only=True)
    steps = ckpt["step"]
    assert ckpt["meta"]["world_size"] == 2 and steps == 48 // 8  # global batch 8 = 2 x 4
    queue_ptr = [v for k, v in ckpt["model"].items() if k.startswith("loss.queue") and
                 k.endswith("ptr")]
    assert queue_ptr and int(queue_ptr[0]) == (steps * 8) % 64
    assert (out / "last.pt").is_file()


def test_label_free_distillation_exports_an_index_encoder(tmp_path: Path) -> None:
    """A workspace gallery, the teacher's embeddings from its store, no labels read: the
    student is an ordinary ckpt: encoder with its embedding head."""
    from tests.helpers.cli import pixels_workspace

    _, ws = pixels_workspace(tmp_path)
    out = tmp_path / "small"
    args = ["distill", "dcd", "--label-free", "-w", ws, "--teacher", "pixels", "--student",
            "resnet18", "--set", "model.backbone_kwargs.width=0.125", "--set", "aug.size=32",
            "--embed-dim", 16, "--epochs", 2, "--batch-size", 4, "--workers", 0,
            "--no-progress", "--out", out]
    assert cdir(*args) == 0
    ckpt = torch.load(out / "student.pt", weights_only=True)
    assert ckpt["encoder_arch"]["kwargs"]["embed_dim"] == 16
    assert cdir("embed", "-w", ws, "--encoder", f"ckpt:{out / 'student.pt'}", "--workers",
                0) == 0
    from cdir.core.store import EmbeddingStore
    from cdir.core.workspace import Workspace

    w = Workspace(ws)
    x, valid = EmbeddingStore(w.embeddings_dir(f"ckpt:{out / 'student.pt'}")).load(w.manifest())
    assert valid.all() and x.shape == (8, 16)
    # resumed with the same teacher rows: fine; the run is finished, nothing more to do
    assert cdir(*args, "--resume", "auto") == 0


def test_backbone_embedding_head_and_grid_refusal() -> None:
    from cdir.core.errors import CdirError
    from encoders.zoo.backbones import GridPooled, build_backbone

    net, dim = build_backbone("resnet18", width=0.125, small_stem=True, embed_dim=24)
    assert dim == 24 and net(torch.zeros(2, 3, 32, 32)).shape == (2, 24)
    assert "embed.weight" in net.state_dict()
    with pytest.raises(CdirError, match="embedding head"):
        GridPooled(net, 2)
    plain, d = build_backbone("resnet18", width=0.125, small_stem=True)
    assert d == 64 and "embed.weight" not in plain.state_dict()
    # embed_grid: the last map pooled to 2x2 cells before the head, so the layout survives
    cells, d = build_backbone("resnet18", width=0.125, small_stem=True, embed_dim=24,
                              embed_grid=2)
    assert d == 24 and cells.embed.in_features == 64 * 4
    x = torch.randn(2, 3, 32, 32)
    flipped = torch.flip(x, dims=[3])
    cells.eval()
    pooled = torch.nn.functional.adaptive_avg_pool2d(cells.feature_map(x), 2).flatten(1)
    assert torch.allclose(cells(x), cells.embed(pooled), atol=1e-5)
    assert not torch.allclose(cells(x), cells(flipped), atol=1e-3)  # left and right differ
    with pytest.raises(CdirError, match="embed_grid"):
        build_backbone("resnet18", width=0.125, embed_grid=2)


def test_a_shallower_student_with_a_cell_head() -> None:
    """depths: fewer blocks per stage than the named model; cell_dim: a shared 1x1 convolution
    on every cell before the linear embedding (far fewer head parameters)."""
    from cdir.core.errors import CdirError
    from encoders.zoo.backbones import build_backbone

    full, _ = build_backbone("resnet18", width=0.25, small_stem=True, embed_dim=32,
                             embed_grid=2)
    small, dim = build_backbone("resnet18", width=0.25, small_stem=True, depths=[2, 2, 2, 1],
                                embed_dim=32, embed_grid=2, cell_dim=8)
    assert dim == 32 and len(small.layer4) == 1 and len(full.layer4) == 2
    assert small.cell.weight.shape == (8, 128, 1, 1) and small.embed.in_features == 8 * 4
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(small) < count(full) - count(full.layer4[1])
    small.eval()
    x = torch.randn(2, 3, 32, 32)
    cells = small.cell(torch.nn.functional.adaptive_avg_pool2d(small.feature_map(x), 2))
    assert torch.allclose(small(x), small.embed(cells.flatten(1)), atol=1e-5)
    for bad in ([2, 2, 2, 3], [2, 2, 2], [0, 2, 2, 2], "two"):
        with pytest.raises(CdirError, match="depths"):
            build_backbone("resnet18", depths=bad)
    with pytest.raises(CdirError, match="cell_dim"):
        build_backbone("resnet18", cell_dim=8)


def test_a_shallower_student_starts_from_the_first_blocks_of_its_init(tmp_path: Path) -> None:
    """model.init into a student with fewer blocks: each stage's first blocks are copied, the
    rest of the checkpoint left out, the head new (lr 0: nothing moves but BatchNorm's
    running statistics)."""
    from encoders.engine.checkpoint import load_encoder
    from tests.helpers.cli import pixels_workspace

    _, ws = pixels_workspace(tmp_path)
    init = Path(__file__).parents[3] / "encoders" / "weights" / "emoji_adapted.pt"
    out = tmp_path / "shallow"
    assert cdir("distill", "rrd", "--label-free", "-w", ws, "--teacher", "pixels", "--student",
                "resnet18", "--set", "model.backbone_kwargs.width=0.5", "--set",
                "model.backbone_kwargs.small_stem=true", "--set",
                "model.backbone_kwargs.depths=[2,2,2,1]", "--set",
                "model.backbone_kwargs.embed_grid=2", "--set",
                "model.backbone_kwargs.cell_dim=8", "--set", f"model.init={init}",
                "--set", "aug.size=32", "--set", "optim.lr=0", "--set", "optim.weight_decay=0",
                "--set", "method.queue_size=8",
                "--embed-dim", 16, "--epochs", 1, "--batch-size", 4, "--workers", 0,
                "--no-progress", "--out", out) == 0
    src = load_encoder(init)[0].state_dict()
    weights = load_encoder(out / "student.pt")[0].state_dict()
    convs = [k for k in src if k.endswith("conv1.weight") or k.endswith("conv2.weight")]
    assert all(torch.equal(weights[k].float(), src[k].float())
               for k in convs if not k.startswith("layer4.1."))
    assert not any(k.startswith("layer4.1.") for k in weights)
    assert weights["cell.weight"].shape == (8, 256, 1, 1)


def test_every_distillation_recipe_resolves(tmp_path: Path) -> None:
    """configs/distill/: each CIFAR-100 pair for every method, with the testbed's schedule and
    the small lr of the mobile students; the ImageNet recipe for its methods and its teacher."""
    from cdir.stages.distill import distill_config

    recipes = sorted((REPO / "configs" / "distill").glob("cifar100_*.yaml"))
    assert len(recipes) == 13
    for path in recipes:
        for method in LOSSES:
            cfg, _ = distill_config(method, path, [], {})
            assert cfg.optim.epochs == 240 and cfg.optim.milestones == [150, 180, 210]
            assert cfg.optim.batch_size == 64 and cfg.data.path == "cifar100"
            small = cfg.model.backbone in ("MobileNetV2", "ShuffleV1", "ShuffleV2")
            assert cfg.optim.lr == (0.01 if small else 0.05), path
            assert cfg.distill.teacher.endswith("_vanilla/last.pt")
        kd, _ = distill_config("rrd", path, [], {"distill.with_kd": True})
        assert kd.train.out.startswith("runs/rrd_kd-")
    imagenet = REPO / "configs" / "distill" / "imagenet_resnet34_resnet18.yaml"
    for method in ("teacher", *LOSSES):
        cfg, _ = distill_config(method, imagenet, [], {})
        assert cfg.distill.image_size == 224 and cfg.optim.batch_size == 256
    lf = REPO / "configs" / "distill" / "emoji_label_free.yaml"
    from cdir.core.config import load_yaml

    assert load_yaml(lf)["distill"]["teacher_normalize"] == "domain-whiten"
    # the smaller student: fewer parameters than the teacher's trunk, fewer FLOPs at one size
    from torch.utils.flop_counter import FlopCounterMode

    from encoders.engine.checkpoint import load_encoder
    from encoders.zoo.backbones import build_backbone

    small = load_yaml(REPO / "configs" / "distill" / "emoji_small_student.yaml")
    net, _ = build_backbone(small["model"]["backbone"], **small["model"]["backbone_kwargs"],
                            embed_dim=small["distill"]["embed_dim"])
    teacher = load_encoder(REPO / small["model"]["init"])[0]
    flops = []
    for m in (net, teacher):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            m.eval()(torch.zeros(1, 3, 64, 64))
        flops.append(counter.get_total_flops())
    assert sum(p.numel() for p in net.parameters()) < 0.8 * sum(
        p.numel() for p in teacher.parameters())
    assert flops[0] < 0.9 * flops[1]


def test_transfer_probe_of_a_student_from_the_cli(teacher: Path, colours: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    """`cdir eval transfer`: the frozen student, a new head on the target's 4 classes."""
    out = tmp_path / "transfer.json"
    assert cdir("eval", "transfer", "--encoder", f"ckpt:{teacher / 'last.pt'}", "--data",
                colours, "--epochs", 2, "--workers", 0, "--no-progress", "--json", out) == 0
    res = json.loads(out.read_text())
    assert res["classes"] == 4 and res["epochs"] == 2 and len(res["history"]) == 2
    assert res["train_images"] == 48 and res["test_images"] == 16
    assert 0 <= res["last"] <= 100 and res["best"] >= res["last"]
    capsys.readouterr()
    assert cdir("eval", "transfer", "--encoder", "clip:ViT-B-32/openai", "--data", colours) == 2


def test_eval_every_tests_only_those_epochs_and_the_last(colours: Path, tmp_path: Path) -> None:
    from cdir.stages.distill import read_scores

    out = tmp_path / "t"
    assert cdir("train", "teacher", "--arch", "resnet8", "--data", colours, "--epochs", 3,
                "--out", out, "--set", "distill.eval_every=2", *FAST) == 0
    rows = _metrics(out)
    assert [("test_top1" in r) for r in rows] == [False, True, True]
    scores = read_scores(out)
    assert scores["last"] == rows[2]["test_top1"] and scores["best_epoch"] in (2, 3)
