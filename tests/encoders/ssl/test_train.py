"""The self-supervised trainer: tiny CPU runs of every method, exact resume, checkpoints, encoder
loading (project and reference MoCo-style checkpoints), config handling, recipes, CLI."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdir.core.errors import CdirError
from tests.helpers.cli import sigterm_when, torchrun, two_rank_checkpoint

torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[3]

TINY_METHODS = {
    "moco": {"queue_size": 32, "dim": 16},
    "synco": {"queue_size": 32, "dim": 16, "n_hard": 8, "n1": 4, "n2": 4, "n3": 4,
              "n4": 2, "n5": 2, "n6": 2, "warmup_epochs": 1},
    "isd": {"queue_size": 32},
}


@pytest.fixture(scope="module")
def tiny_images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """48 images of 32 px in 4 class folders (a colour per class plus noise), one unreadable."""
    root = tmp_path_factory.mktemp("tiny")
    rng = np.random.default_rng(0)
    colours = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (230, 230, 40)]
    for c, col in enumerate(colours):
        (root / f"c{c}").mkdir()
        for i in range(12):
            a = np.clip(rng.normal(col, 40, (32, 32, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(a).save(root / f"c{c}" / f"{i:02d}.png")
    return root


def _raw(data: Path, out: Path, method: str, epochs: int = 2, workers: int = 0) -> dict:
    return {
        "data": {"path": str(data), "workers": workers},
        "model": {"backbone": "cifar_resnet18", "backbone_kwargs": {"width": 0.25}},
        "aug": {"size": 32, "blur_p": 0.0, "eval_resize": 1.0},
        "optim": {"epochs": epochs, "batch_size": 16, "lr": 0.03},
        "train": {"out": str(out), "save_every": 1, "progress": False, "threads": 1},
        "methods": {m: dict(kw) for m, kw in TINY_METHODS.items()},
    }


def _cfg(data: Path, out: Path, method: str, **kw):  # noqa: ANN202
    from encoders.engine.config import resolve_config

    return resolve_config(_raw(data, out, method, **kw), method, recipe="tiny")


def _add_bad_image(root: Path) -> Path:
    bad = root / "c0" / "zz_broken.png"
    bad.write_bytes(b"not a png")
    return bad


@pytest.mark.parametrize("method", ["moco", "synco", "isd"])
def test_tiny_run_writes_checkpoints_and_encoder(
    method: str, tiny_images: Path, tmp_path: Path
) -> None:
    from encoders.engine.checkpoint import load_checkpoint, load_encoder
    from encoders.ssl.trainer import pretrain

    out = tmp_path / "run"
    res = pretrain(_cfg(tiny_images, out, method))
    assert res.epochs_done == 2 and res.steps == 2 * 3  # 48 images // 16
    assert len(res.losses) == 6 and all(math.isfinite(v) for v in res.losses)
    for name in ("latest.pt", "checkpoint_0001.pt", "checkpoint_0002.pt", "encoder.pt",
                 "config.yaml", "metrics.jsonl"):
        assert (out / name).is_file(), name
    assert list((out / "tb").glob("events.out.tfevents.*"))
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2

    ckpt = load_checkpoint(out / "latest.pt")
    assert {"version", "method", "config", "encoder_arch", "encoder_prefix", "model",
            "optimizer", "scheduler", "scaler", "epoch", "step", "rng"} <= set(ckpt)
    assert ckpt["method"] == method and ckpt["epoch"] == 2 and ckpt["step"] == 6
    assert ckpt["encoder_arch"] == {"name": "cifar_resnet18", "kwargs": {"width": 0.25}}
    assert ckpt["config"]["method_kwargs"] == TINY_METHODS[method]
    assert {"python", "numpy", "torch", "cuda"} <= set(ckpt["rng"])
    assert any(k.startswith("queue.") for k in ckpt["model"])  # the queue is checkpointed

    # the exported encoder and the full checkpoint give the same backbone
    x = torch.randn(2, 3, 32, 32)
    enc_a, dim_a = load_encoder(out / "encoder.pt")
    enc_b, dim_b = load_encoder(out / "latest.pt")
    assert dim_a == dim_b == 128  # 512 * 0.25
    with torch.no_grad():
        assert torch.equal(enc_a(x), enc_b(x))
    assert (out / "encoder.pt").stat().st_size < (out / "latest.pt").stat().st_size / 2


@pytest.mark.parametrize(("method", "workers"), [("synco", 0), ("isd", 1)])
def test_resume_reproduces_the_loss_curve(
    method: str, workers: int, tiny_images: Path, tmp_path: Path
) -> None:
    """Interrupt after epoch 1, resume from latest.pt: the losses equal an uninterrupted run's
    (data order, augmentations, queue, SynCo's warm-up and random draws all restored)."""
    from encoders.ssl.trainer import pretrain

    full = pretrain(_cfg(tiny_images, tmp_path / "a", method, epochs=3, workers=workers))
    part1 = pretrain(_cfg(tiny_images, tmp_path / "b", method, epochs=3, workers=workers),
                     stop_at=1)
    assert part1.epochs_done == 1 and not (tmp_path / "b" / "encoder.pt").exists()
    part2 = pretrain(_cfg(tiny_images, tmp_path / "b", method, epochs=3, workers=workers),
                  resume=tmp_path / "b" / "latest.pt")
    assert len(full.losses) == 9
    np.testing.assert_allclose(part1.losses + part2.losses, full.losses, rtol=1e-6, atol=1e-7)
    # a different seed gives a different curve (the comparison above can fail)
    cfg = _cfg(tiny_images, tmp_path / "c", method, epochs=1, workers=workers)
    cfg.train.seed = 1
    other = pretrain(cfg)
    assert other.losses != full.losses[:3]


def test_unreadable_images_are_skipped_and_listed(tmp_path: Path, tiny_images: Path) -> None:
    import shutil

    from encoders.ssl.trainer import pretrain

    data = tmp_path / "data"
    shutil.copytree(tiny_images, data)
    bad = _add_bad_image(data)
    cfg = _cfg(data, tmp_path / "run", "moco", epochs=1)
    cfg.optim.batch_size = 49  # one batch of all 49 files, so the bad one is always drawn
    res = pretrain(cfg)
    assert res.skipped == [str(bad)]
    assert (tmp_path / "run" / "skipped.txt").read_text().strip() == str(bad)


def test_rng_state_roundtrip_and_weights_only(tmp_path: Path) -> None:
    import random

    from encoders.engine.checkpoint import (
        load_checkpoint,
        rng_state,
        save_checkpoint,
        set_rng_state,
    )

    state = rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    save_checkpoint(tmp_path / "c.pt", {"version": 1, "model": {}, "rng": state})
    loaded = torch.load(tmp_path / "c.pt", weights_only=True)  # no pickled objects inside
    set_rng_state(loaded["rng"])
    again = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == again[0] and first[1] == again[1] and torch.equal(first[2], again[2])
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file
    save_checkpoint(tmp_path / "v.pt", {"version": 99, "model": {}})
    with pytest.raises(CdirError, match="version"):
        load_checkpoint(tmp_path / "v.pt")
    torch.save({"state_dict": {}}, tmp_path / "r.pt")
    with pytest.raises(CdirError, match="not a training checkpoint"):
        load_checkpoint(tmp_path / "r.pt")


def _torchvision_features(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    fc = model.fc
    model.fc = torch.nn.Identity()
    try:
        with torch.no_grad():
            return model(x)
    finally:
        model.fc = fc


def test_load_encoder_reads_reference_moco_checkpoint(tmp_path: Path) -> None:
    """A reference MoCo/SynCo checkpoint: torchvision ResNet-50 with an MLP fc, saved from DDP
    (``module.encoder_q.*``, ``module.encoder_k.*``, queue)."""
    import torchvision

    from encoders.engine.checkpoint import load_encoder

    torch.manual_seed(0)
    q = torchvision.models.resnet50(weights=None, num_classes=128)
    q.fc = torch.nn.Sequential(torch.nn.Linear(2048, 2048), torch.nn.ReLU(), q.fc)
    q.eval()
    sd = {f"module.encoder_q.{k}": v for k, v in q.state_dict().items()}
    sd.update({f"module.encoder_k.{k}": v.clone() + 1 for k, v in q.state_dict().items()})
    sd["module.queue"] = torch.randn(128, 65536 // 64)
    sd["module.queue_ptr"] = torch.zeros(1, dtype=torch.long)
    torch.save({"epoch": 200, "arch": "resnet50", "state_dict": sd, "optimizer": {}},
               tmp_path / "checkpoint_0199.pth.tar")

    enc, dim = load_encoder(tmp_path / "checkpoint_0199.pth.tar")
    assert dim == 2048 and not enc.training
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), _torchvision_features(q, x))

    # ISD layout (encoder_q.module.*) and no "arch": the depth is read from the blocks
    r18 = torchvision.models.resnet18(weights=None).eval()
    isd = {f"encoder_q.module.{k}": v for k, v in r18.state_dict().items() if
           not k.startswith("fc.")}
    torch.save({"state_dict": isd, "epoch": 1}, tmp_path / "isd.pth")
    enc18, dim18 = load_encoder(tmp_path / "isd.pth")
    assert dim18 == 512
    with torch.no_grad():
        torch.testing.assert_close(enc18(x), _torchvision_features(r18, x))

    # a missing key fails loudly instead of leaving random weights
    del isd["encoder_q.module.layer4.1.bn2.weight"]
    torch.save({"state_dict": isd}, tmp_path / "broken.pth")
    with pytest.raises(CdirError, match="missing"):
        load_encoder(tmp_path / "broken.pth")


def test_config_resolution_and_overrides() -> None:
    from cdir.core.config import apply_sets
    from encoders.engine.config import resolve_config

    raw = {
        "optim": {"lr": 0.03, "epochs": 10},
        "aug": {"strong": "moco_v2"},
        "methods": {
            "moco": {"queue_size": 1024},
            "isd": {"name": "isd_plus", "temp_t": 0.02, "optim": {"lr": 0.05},
                    "aug": {"weak": "emoji_weak"}},
        },
    }
    moco = resolve_config(raw, "moco", overrides=["optim.lr=0.1", "method.momentum=0.99"])
    assert moco.optim.lr == 0.1 and moco.optim.epochs == 10
    assert moco.method_kwargs == {"queue_size": 1024, "momentum": 0.99}
    isd = resolve_config(raw, "isd")
    assert isd.method_name == "isd_plus" and isd.optim.lr == 0.05 and isd.optim.epochs == 10
    assert isd.aug.weak == "emoji_weak" and isd.aug.strong == "moco_v2"
    assert isd.method_kwargs == {"temp_t": 0.02}
    with pytest.raises(CdirError, match="no section for 'synco'"):
        resolve_config(raw, "synco")
    with pytest.raises(CdirError, match="unknown key"):
        resolve_config({"optim": {"learning_rate": 1}}, "moco")
    with pytest.raises(CdirError, match="recipe"):
        resolve_config({"aug": {"strong": "nope"}}, "moco")
    d = apply_sets(moco.to_dict(), ["model.backbone_kwargs={width: 0.5}", "train.amp=bf16"])
    assert d["model"]["backbone_kwargs"] == {"width": 0.5} and d["train"]["amp"] == "bf16"


def test_lr_schedule() -> None:
    from encoders.engine.config import OptimConfig
    from encoders.engine.optim import lr_factor

    cos = OptimConfig(epochs=10, schedule="cosine")
    assert lr_factor(0, 5, cos) == 1.0 and lr_factor(4, 5, cos) == 1.0  # per epoch, like --cos
    assert lr_factor(25, 5, cos) == pytest.approx(0.5)
    assert lr_factor(49, 5, cos) == pytest.approx(0.5 * (1 + math.cos(math.pi * 0.9)))
    warm = OptimConfig(epochs=10, warmup_epochs=2, per_step=True)
    assert lr_factor(0, 5, warm) == pytest.approx(0.1) and lr_factor(9, 5, warm) == 1.0
    step = OptimConfig(epochs=200, schedule="step", milestones=[140, 180], gamma=0.2)
    assert lr_factor(139, 1, step) == 1.0 and lr_factor(150, 1, step) == pytest.approx(0.2)
    assert lr_factor(199, 1, step) == pytest.approx(0.04)


def test_recipes_resolve_for_every_method() -> None:
    from cdir.core.config import load_yaml
    from encoders.engine.config import resolve_config
    from encoders.ssl.plugin import method_options

    names = ("emoji_small", "cifar10", "cifar100", "imagenet_r18_200ep", "imagenet_r50_200ep",
             "imagenet_r50_800ep")
    for path in (REPO / "configs" / f"{n}.yaml" for n in names):
        raw = load_yaml(path)
        for method in raw["methods"]:
            cfg = resolve_config(raw, method, path.stem)
            assert set(cfg.method_kwargs) <= set(method_options(cfg.method_name)), path
    emoji = resolve_config(load_yaml(REPO / "configs/emoji_small.yaml"), "moco")
    assert emoji.aug.strong == "emoji" and emoji.model.backbone_kwargs.get("small_stem")


@pytest.mark.parametrize("method", ["moco", "synco", "isd"])
def test_emoji_recipe_builds_and_steps(method: str, tmp_path: Path) -> None:
    """The CPU emoji recipe as written (backbone, heads, queue, augmentations) takes a step."""
    from cdir.core.config import load_yaml
    from encoders.engine.config import resolve_config
    from encoders.ssl.augment import build_multiview
    from encoders.ssl.trainer import build_model

    cfg = resolve_config(load_yaml(REPO / "configs/emoji_small.yaml"), method)
    model = build_model(cfg)
    mv = build_multiview(model.views, cfg.aug)
    img = Image.new("RGB", (128, 128), "white")
    img.paste((230, 120, 20), (30, 30, 100, 100))
    views = [torch.stack([v for _ in range(8)]) for v in mv(img)]
    assert views[0].shape == (8, 3, cfg.aug.size, cfg.aug.size)
    out = model(views)
    out["loss"].backward()
    assert math.isfinite(float(out["loss"].detach()))


def _write_recipe(tmp_path: Path, data: Path, epochs: int = 1) -> Path:
    import yaml

    raw = _raw(data, tmp_path / "unused", "moco", epochs=epochs)
    del raw["train"]["out"]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_cli_train_resume_export(tmp_path: Path, tiny_images: Path) -> None:
    from cdir.cli import main
    from encoders.engine.checkpoint import load_checkpoint, load_encoder

    recipe = _write_recipe(tmp_path, tiny_images, epochs=2)
    out = tmp_path / "out"
    args = ["train", "moco", "--config", str(recipe), "--out", str(out), "--batch-size", "24",
            "--set", "method.queue_size=48"]
    assert main([*args, "--stop-at", "1"]) == 0
    assert load_checkpoint(out / "latest.pt")["epoch"] == 1
    assert main([*args, "--resume", "auto"]) == 0
    ckpt = load_checkpoint(out / "latest.pt")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4
    assert ckpt["config"]["optim"]["batch_size"] == 24
    assert ckpt["config"]["method_kwargs"]["queue_size"] == 48
    assert main(["train", "export", str(out / "latest.pt"), str(tmp_path / "e.pt"), "--half"]) == 0
    enc, dim = load_encoder(tmp_path / "e.pt")
    assert dim == 128 and next(enc.parameters()).dtype == torch.float32
    # resuming with only the checkpoint (no recipe) and a longer schedule
    assert main(["train", "moco", "--resume", str(out / "latest.pt"), "--epochs", "3",
                 "--set", "optim.lr=0.5"]) == 0
    ckpt = load_checkpoint(out / "latest.pt")
    assert ckpt["epoch"] == 3 and ckpt["optimizer"]["param_groups"][0]["initial_lr"] == 0.5
    # resuming from an older checkpoint re-runs later epochs without duplicating their metrics
    first = str(out / "checkpoint_0001.pt")
    assert main(["train", "moco", "--resume", first, "--epochs", "3", "--set", "optim.lr=0.5"]) == 0
    epochs = [json.loads(ln)["epoch"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert epochs == [1, 2, 3]
    # wrong method for the checkpoint, unknown key: one clear error, exit code 2
    assert main(["train", "isd", "--resume", str(out / "latest.pt")]) == 2
    assert main(["train", "moco", "--config", str(recipe), "--set", "optim.nope=1"]) == 2
    assert main(["train", "moco", "--config", str(recipe), "--out", str(tmp_path / "x"),
                 "--data", str(tmp_path / "missing")]) == 2


@pytest.mark.slow
def test_torchrun_ddp_gloo_two_processes(tmp_path: Path, tiny_images: Path) -> None:
    """``torchrun --nproc_per_node 2 -m cdir train synco`` on CPU with Gloo: shuffle-BN across
    ranks, all-gathered queue, one checkpoint with both ranks' RNG states."""

    recipe = _write_recipe(tmp_path, tiny_images, epochs=2)
    out = tmp_path / "ddp"
    proc = torchrun(2, "train", "synco", "--config", recipe, "--out", out, "--workers", "0")
    assert proc.returncode == 0, proc.stderr[-3000:]
    two_rank_checkpoint(out, epochs=2, steps=2 * 3)  # global batch 16 = 2 x 8


def _metric_epochs(out: Path) -> list[int]:
    return [json.loads(ln)["epoch"] for ln in (out / "metrics.jsonl").read_text().splitlines()]


def test_rerun_without_resume_is_refused_and_force_starts_over(
        tmp_path: Path, tiny_images: Path, capsys: pytest.CaptureFixture) -> None:
    """A second `cdir train` into a folder that holds a run would restart at epoch 0, overwrite
    latest.pt and repeat the epochs of metrics.jsonl: it is refused with one line naming the two
    ways on; --force moves the old run's files aside (and says where) and starts over."""
    from cdir.cli import main

    recipe = _write_recipe(tmp_path, tiny_images, epochs=2)
    out = tmp_path / "out"
    args = ["train", "moco", "--config", str(recipe), "--out", str(out), "--batch-size", "24",
            "--set", "method.queue_size=48"]
    assert main(args) == 0
    latest, metrics = (out / "latest.pt").read_bytes(), (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"cdir train: error: {out} already holds a training run (latest.pt, encoder.pt,"
                   " 2 checkpoint_*.pt, metrics.jsonl up to epoch 2): continue it with --resume "
                   "auto, or start over with --force (which moves its files aside)"]
    assert (out / "latest.pt").read_bytes() == latest
    assert (out / "metrics.jsonl").read_text() == metrics

    assert main([*args, "--force"]) == 0
    err = capsys.readouterr().err
    (old,) = out.glob("replaced-*")
    assert (f"--force: moved the previous run's files (checkpoint_0001.pt, checkpoint_0002.pt, "
            f"config.yaml, encoder.pt, latest.pt, metrics.jsonl, tb) to {old}") in err
    assert (old / "latest.pt").read_bytes() == latest
    assert (old / "metrics.jsonl").read_text() == metrics
    assert _metric_epochs(out) == [1, 2]  # the new run's epochs, once
    assert not (out / "train.lock").exists()

    assert main([*args, "--force", "--resume", "auto"]) == 2
    assert "--force starts the run over; it does not go with --resume" in capsys.readouterr().err


_LOCK_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from cdir.core.lock import exclusive
with exclusive({path!r}, "training into {out}"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_training_run_into_one_folder_is_refused(
        tmp_path: Path, tiny_images: Path, capsys: pytest.CaptureFixture) -> None:
    from cdir.cli import main

    recipe = _write_recipe(tmp_path, tiny_images, epochs=1)
    out = tmp_path / "out"
    code = _LOCK_HOLDER.format(repo=str(REPO), path=str(out / "train.lock"), out=out)
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", "moco", "--config", str(recipe), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"cdir train: error: another run (pid {holder.pid}), started ")
        assert f"is training into {out}: wait for it to finish" in err
        assert not (out / "latest.pt").exists()
    finally:
        holder.kill()
        holder.wait()


def test_sigterm_stops_training_at_a_resumable_epoch(tmp_path: Path, tiny_images: Path) -> None:
    """`cdir train` gets SIGTERM mid-run (what a scheduler sends at the time limit): exit 143,
    latest.pt and metrics.jsonl at the same finished epoch, the lock released; --resume auto
    continues from there without repeating an epoch."""
    from cdir.cli import main
    from encoders.engine.checkpoint import load_checkpoint

    recipe = _write_recipe(tmp_path, tiny_images, epochs=200)
    out = tmp_path / "out"
    args = ["train", "moco", "--config", str(recipe), "--out", str(out), "--batch-size", "24",
            "--set", "method.queue_size=48", "--set", "train.save_every=0"]
    text = sigterm_when(args, tmp_path / "train.log", lambda log: "moco epoch 2/200" in log,
                        timeout=240, wait=120)
    done = load_checkpoint(out / "latest.pt")["epoch"]
    assert done >= 2 and _metric_epochs(out) == list(range(1, done + 1))
    assert (f"moco: interrupted in epoch {done + 1}; {out / 'latest.pt'} holds epoch {done}: "
            "continue with --resume auto") in text
    # the command to go on with, ready to paste: a plain re-run would be refused
    assert ("cdir train: interrupted; finished work is kept, continue with "
            f"`{shlex.join(['cdir', *args, '--resume', 'auto'])}`") in text
    assert "Traceback" not in text
    assert not (out / "train.lock").exists() and not list(out.glob(".*.tmp"))

    assert main([*args, "--resume", "auto", "--stop-at", str(done + 1)]) == 0
    assert _metric_epochs(out) == list(range(1, done + 2))


def test_several_data_sources_are_joined(tmp_path: Path, tiny_images: Path) -> None:
    """`--data` repeated: folders, a workspace (the images of its manifest, not its reports) and
    a manifest file, each image once."""
    import shutil

    from cdir.cli import main
    from encoders.engine.checkpoint import load_checkpoint
    from encoders.ssl.data import gather_images

    a, b = tmp_path / "a", tmp_path / "b"
    shutil.copytree(tiny_images / "c0", a / "c0")
    shutil.copytree(tiny_images / "c1", b / "c1")
    gallery, ws = tmp_path / "gallery", tmp_path / "ws"
    for domain, c in (("d1", "c2"), ("d2", "c3")):
        shutil.copytree(tiny_images / c, gallery / domain / c)
    assert main(["data", "folder", str(gallery), "-w", str(ws), "--no-progress"]) == 0
    (ws / "reports").mkdir()
    Image.new("RGB", (8, 8)).save(ws / "reports" / "plot.png")  # not a training image
    joined = gather_images([a, b, a / "c0", ws])
    assert len(joined) == 12 + 12 + 24 and len(set(joined)) == len(joined)
    assert not any("reports" in p for p in joined)
    assert gather_images(str(a)) == gather_images([a])

    recipe = _write_recipe(tmp_path, tiny_images, epochs=1)
    runs = {}
    for name, data in {"one": [a], "two": [a, b]}.items():
        out = tmp_path / name
        args = ["train", "moco", "--config", str(recipe), "--out", str(out), "--batch-size", "8"]
        for d in data:
            args += ["--data", str(d)]
        assert main(args) == 0
        runs[name] = load_checkpoint(out / "latest.pt")
    assert runs["one"]["config"]["data"]["path"] == str(a)
    assert runs["two"]["config"]["data"]["path"] == [str(a), str(b)]
    assert (runs["one"]["step"], runs["two"]["step"]) == (12 // 8, 24 // 8)  # full batches


def test_labels_cannot_influence_training(tmp_path: Path, tiny_images: Path) -> None:
    """`cdir train` on a workspace whose labels are permuted over the rows, monitored on that
    manifest: the same losses, weights and checkpoint as with the true labels; only the
    monitor's label-based figures differ (so the comparison can fail)."""
    import shutil

    from cdir.cli import main
    from encoders.engine.checkpoint import load_checkpoint
    from tests.helpers.trees import permute_labels

    gallery = tmp_path / "gallery"
    for domain, classes in (("d1", ("c0", "c1")), ("d2", ("c2", "c3"))):
        for k, c in enumerate(classes):
            shutil.copytree(tiny_images / c, gallery / domain / f"k{k}")
    runs = {}
    for name in ("true", "permuted"):
        ws = tmp_path / f"ws-{name}"
        assert main(["data", "folder", str(gallery), "-w", str(ws), "--no-progress"]) == 0
        manifest = ws / "manifest.parquet"
        if name == "permuted":
            permute_labels(manifest)
        (tmp_path / name).mkdir()
        recipe = _write_recipe(tmp_path / name, tiny_images, epochs=2)
        out = tmp_path / f"run-{name}"
        assert main(["train", "moco", "--config", str(recipe), "--out", str(out),
                     "--data", str(ws), "--monitor", str(manifest), "--batch-size", "8",
                     "--set", "monitor.every=1"]) == 0
        runs[name] = (load_checkpoint(out / "latest.pt"),
                      [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()])
    (a, log_a), (b, log_b) = runs["true"], runs["permuted"]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert a["model"].keys() == b["model"].keys()
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    monitor = [{k: v for k, v in r.items() if k.startswith("monitor_")} for r in log_a]
    assert any(monitor) and monitor != [{k: v for k, v in r.items() if k.startswith("monitor_")}
                                        for r in log_b]
