"""The training loops of `cdir train teacher` and `cdir distill`: the training engine
(:mod:`encoders.engine.run`: checkpoints, exact resume, torchrun, AMP, TensorBoard, progress,
``--stop-at``) running a :mod:`encoders.distill.student` module.

Labelled runs (:func:`distill`): ``data.path`` names the labelled set
(:func:`encoders.distill.data.open_labelled`), ``model.backbone`` the student (zoo name),
``distill.teacher`` the teacher checkpoint (absent for ``teacher``). After every epoch the
student is evaluated on the test set (and on the held-out part of the training set when
``distill.val_split`` > 0); the metrics line holds ``test_top1`` (and ``val_top1``). Files, on
top of the engine's ``latest.pt`` / ``metrics.jsonl`` / ``tb/``:

- ``last.pt``: the student after the last epoch (what the testbed's tables report);
- ``best.pt``: the student of the best epoch, chosen on ``val_top1`` with a validation split,
  otherwise on ``test_top1`` as the reference code does (its figure is reported beside last,
  marked, never alone); both in the format of :mod:`encoders.distill.export`.

Label-free runs (:func:`distill_label_free`): images and their teacher embeddings are handed
in (the stage reads them from a workspace); the student is a backbone with an embedding head,
exported as ``student.pt``, an ordinary ``ckpt:`` encoder. Nothing reads labels.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cdir.core.errors import CdirError
from encoders.distill.plugin import distils
from encoders.engine.config import Config
from encoders.engine.run import Run, TrainResult, train

# the testbed's lr for the small mobile students (0.05 for every other model)
SMALL_LR_MODELS = ("MobileNetV2", "mobile_half", "ShuffleV1", "ShuffleV2")

# the RepDistiller CIFAR recipe, under any recipe or flag (batch 64, 240 epochs, x0.1 at 150,
# 180 and 210, SGD 0.05 with weight decay 5e-4)
TESTBED: dict[str, Any] = {
    "data": {"workers": 2},
    "optim": {"epochs": 240, "batch_size": 64, "optimizer": "sgd", "lr": 0.05, "momentum": 0.9,
              "weight_decay": 5e-4, "schedule": "step", "milestones": [150, 180, 210],
              "gamma": 0.1, "warmup_epochs": 0.0, "per_step": False},
    "train": {"save_every": 40, "log_every": 50},
    "model": {"backbone": "resnet8x4"},
}


def distill(cfg: Config, resume: str | os.PathLike | dict | None = None,
            stop_at: int | None = None, force: bool = False) -> TrainResult:
    """Train a teacher (``cfg.method == "teacher"``) or distil a student on labelled data."""
    return train(cfg, resume=resume, stop_at=stop_at, force=force, run=_DistillRun)


def distill_label_free(cfg: Config, paths: list[str], teacher_feats: np.ndarray,
                       teacher_key: str, resume: str | os.PathLike | dict | None = None,
                       stop_at: int | None = None, force: bool = False,
                       export_extra: dict[str, Any] | None = None) -> TrainResult:
    """Distil ``teacher_feats`` (one row per image of ``paths``) into a student embedding
    network with the method term alone. ``teacher_key`` names what the rows are (the teacher
    spec, its store key and normalisation): a resumed run must be given the same.
    ``export_extra``: entries written into ``student.pt`` beside the weights (the record of
    the index whose vectors ``teacher_feats`` are, for a compatible query encoder)."""
    if len(paths) != len(teacher_feats):
        raise CdirError(f"{len(paths)} images but {len(teacher_feats)} teacher embeddings")

    def make(cfg: Config, d: Any, resume: Any, monitor: Any) -> Run:
        return _LabelFreeRun(cfg, d, resume, monitor, paths, teacher_feats, teacher_key,
                             export_extra)

    return train(cfg, resume=resume, stop_at=stop_at, force=force, run=make)


def objective_of(cfg: Config) -> Any:
    """The (gamma, alpha, beta) objective of a labelled run: the recipe's weights of the method
    (``distill.with_kd`` for its "+KD" row), each overridden by a given value."""
    from encoders.distill.losses.objective import StudentObjective

    dc = cfg.distill
    if not distils(cfg.method):
        return StudentObjective(alpha=0.0, beta=0.0, gamma=1.0)
    base = StudentObjective.recipe(cfg.method, dc.with_kd, dc.kd_temperature)
    pick = {k: getattr(base, k) if getattr(dc, k) is None else float(getattr(dc, k))
            for k in ("gamma", "alpha", "beta")}
    return StudentObjective(kd_temperature=dc.kd_temperature, **pick)


def resolve_teacher(spec: str, arch: str | None) -> tuple[Path, str]:
    """(file, zoo name) of a teacher given as ``ckpt:PATH`` or ``PATH``: the name recorded in a
    file of this project, else ``arch``, else the testbed's folder name (``<name>_vanilla``)."""
    from encoders.specs import plain_checkpoint
    from encoders.zoo import canonical_name, teacher_name_from_path
    from encoders.zoo.files import ZOO_KEY

    path = plain_checkpoint(spec, f"a teacher is a checkpoint file (ckpt:PATH or PATH), not "
                                  f"{spec}")
    if not path.is_file():
        raise CdirError(f"no teacher checkpoint at {path}: train one with `cdir train teacher "
                        "--arch NAME --data DATA --out DIR` (then --teacher DIR/best.pt)")
    if arch:
        return path, canonical_name(arch)
    import argparse

    try:  # the name a file of this project records; any other file: its folder name
        with torch.serialization.safe_globals([argparse.Namespace]):
            head = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:  # noqa: BLE001 - load_teacher reports an unreadable file in one line
        head = None
    if isinstance(head, dict) and head.get(ZOO_KEY):
        return path, canonical_name(head[ZOO_KEY])
    return path, teacher_name_from_path(path)


class _StudentRun(Run):
    def forward(self, views: list[torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(views, idx)  # the batch's dataset rows: labels, teacher rows, CRD


class _DistillRun(_StudentRun):
    """A labelled run: the data, the models and the per-epoch evaluation."""

    def make_model(self) -> nn.Module:
        from cdir.core.io import sha256_file
        from encoders.distill.data import open_labelled, split_validation
        from encoders.distill.losses import build_loss
        from encoders.distill.student import Distiller
        from encoders.zoo import create_model, load_teacher

        cfg, dc = self.cfg, self.cfg.distill
        data = open_labelled(cfg.data.path, dc.root, dc.download)
        self.data = data
        train_src, self.val_src = data.train, None
        if dc.val_split:
            rows, val = split_validation(data.train.labels, dc.val_split, seed=0)
            train_src, self.val_src = data.train.subset(rows), data.train.subset(val)
        self.train_src = train_src
        self.student_name = cfg.model.backbone
        student = create_model(cfg.model.backbone, data.num_classes)
        teacher = loss = None
        self.teacher_sha = None
        if distils(cfg.method):
            if not dc.teacher:
                raise CdirError(f"`cdir distill {cfg.method}` needs --teacher CKPT (a teacher "
                                "of `cdir train teacher`, or a testbed checkpoint)")
            path, name = resolve_teacher(dc.teacher, dc.teacher_arch)
            teacher = load_teacher(path, name, data.num_classes, dc.teacher_sha256)
            self.teacher_sha = dc.teacher_sha256 or sha256_file(path)
            self.teacher_name = name
            loss = build_loss(cfg.method, student.feat_dim, teacher.feat_dim,
                              len(train_src), **cfg.method_kwargs)
        elif cfg.method_kwargs:
            raise CdirError(f"a teacher run takes no method options, got "
                            f"{sorted(cfg.method_kwargs)}")
        labels = torch.as_tensor(train_src.labels, dtype=torch.long)
        model = Distiller(student, labels, objective_of(cfg), teacher, loss)
        model.encoder_arch = {"name": cfg.model.backbone, "kwargs": {}, "zoo": True}
        self.best = {"top1": -1.0, "epoch": 0}
        return model

    def make_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        from encoders.distill.data import TrainImages, transforms_for

        self.size = int(self.cfg.distill.image_size or self.data.size)
        train_tf, self.test_tf = transforms_for(self.data, self.size)
        return TrainImages(self.train_src, train_tf, self.size)

    def bad_paths(self, idx: torch.Tensor, ok: torch.Tensor) -> list[str]:
        src = self.train_src
        return [src.paths[j] if src.paths else f"train image {j}" for j in idx[~ok].tolist()]

    def fresh_start(self) -> None:
        if self.cfg.model.init:
            raise CdirError("model.init is not used by distillation runs (students start from "
                            "scratch, as in the testbed)")

    def extra_state(self) -> dict[str, Any]:
        return {"distill": {"best": dict(self.best), "teacher_sha256": self.teacher_sha}}

    def restore_extra(self, ckpt: dict) -> None:
        state = ckpt.get("distill") or {}
        if state.get("teacher_sha256") != self.teacher_sha:
            raise CdirError("the teacher file is not the one this run was started with "
                            f"(sha256 {self.teacher_sha} now, {state.get('teacher_sha256')} "
                            "in the checkpoint)")
        self.best = dict(state.get("best") or self.best)

    def _preprocess(self) -> dict[str, Any]:
        from encoders.distill.data import IMAGENET_STYLE_MIN

        d = self.data
        resize = 256 / 224 if self.size >= IMAGENET_STYLE_MIN else 1.0
        return {"size": self.size, "mean": list(d.mean), "std": list(d.std),
                "eval_resize": resize}

    def _save_student(self, path: Path, epoch: int, top1: float, selected_on: str) -> Path:
        from encoders.distill.export import save_zoo_model

        return save_zoo_model(
            path, self.model.student, self.student_name, self.data.num_classes,
            self._preprocess(), epoch=epoch, accuracy=top1, selected_on=selected_on,
            classes=list(self.data.train.classes), dataset=self.data.name,
            method=self.cfg.method)

    def epoch_record(self, done: int) -> dict[str, Any]:
        every = max(1, int(self.cfg.distill.eval_every))
        if not self.d.main or (done % every and done != self.cfg.optim.epochs):
            return {}
        record = {"test_top1": self.evaluate(self.data.test)}
        if self.val_src is not None:
            record["val_top1"] = self.evaluate(self.val_src)
        chosen = record.get("val_top1", record["test_top1"])
        if chosen > self.best["top1"]:
            self.best = {"top1": chosen, "epoch": done, "test_top1": record["test_top1"]}
            self._save_student(self.out / "best.pt", done, record["test_top1"],
                               "val" if self.val_src is not None else "test")
        record["best_epoch"] = self.best["epoch"]
        if self.writer is not None:
            for k in ("test_top1", "val_top1"):
                if k in record:
                    self.writer.add_scalar(f"eval/{k}", record[k], done)
        print(f"{self.cfg.method} epoch {done}: test top-1 {record['test_top1']:.2f}"
              + (f", val top-1 {record['val_top1']:.2f}" if "val_top1" in record else "")
              + f" (best epoch {self.best['epoch']})", file=sys.stderr)
        return record

    @torch.no_grad()
    def evaluate(self, source: Any) -> float:
        """Top-1 (%) of the student on a labelled source (unreadable images left out)."""
        ds = source.labelled_images(self.test_tf, self.size)
        loader = torch.utils.data.DataLoader(ds, batch_size=256, shuffle=False,
                                             num_workers=self.cfg.data.workers,
                                             generator=torch.Generator().manual_seed(0))
        student = self.model.student
        was = student.training
        student.eval()
        right = total = 0
        try:
            for x, y, ok in loader:
                x, y = x[ok].to(self.d.device), y[ok].to(self.d.device)
                if not len(y):
                    continue
                with torch.autocast(self.d.device.type, dtype=self.amp_dtype,
                                    enabled=self.amp_on):
                    logits = student(x).logits
                right += int((logits.argmax(1) == y).sum())
                total += len(y)
        finally:
            student.train(was)
        return 100.0 * right / max(total, 1)

    def export(self, out_path: Path) -> Path:
        """``last.pt`` (and ``best.pt`` is already there); returns last.pt."""
        import json

        lines = (self.out / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
        final = json.loads(lines[-1])
        last = self._save_student(self.out / "last.pt", int(final["epoch"]),
                                  float(final.get("test_top1", float("nan"))), "last")
        self.summary = {"last_top1": final.get("test_top1"), "best_epoch": self.best["epoch"],
                        "best_top1": self.best.get("test_top1"),
                        "selected_on": "val" if self.val_src is not None else "test"}
        return last


class _LabelFreeRun(_StudentRun):
    """A label-free run: workspace images, stored teacher embeddings, a student embedder."""

    def __init__(self, cfg: Config, d: Any, resume: Any, monitor: Any, paths: list[str],
                 teacher_feats: np.ndarray, teacher_key: str,
                 export_extra: dict[str, Any] | None = None) -> None:
        self.paths_in, self.teacher_key = list(paths), teacher_key
        self.export_extra = export_extra
        self.feats_in = torch.from_numpy(np.ascontiguousarray(teacher_feats, dtype=np.float32))
        super().__init__(cfg, d, resume, monitor)

    def make_model(self) -> nn.Module:
        from encoders.distill.losses import build_loss
        from encoders.distill.student import LabelFreeDistiller
        from encoders.zoo.backbones import build_backbone

        cfg = self.cfg
        kwargs = {**cfg.model.backbone_kwargs, "embed_dim": cfg.distill.embed_dim}
        student, dim = build_backbone(cfg.model.backbone, **kwargs)
        options = {"feat_dim": dim, **cfg.method_kwargs}
        if options.get("freeze_teacher_proj") is False:
            raise CdirError("label-free distillation maps the teacher's vectors with a fixed "
                            "bias-free projection: method.freeze_teacher_proj=false is for "
                            "labelled runs only")
        if options["feat_dim"] != dim:
            raise CdirError(f"method.feat_dim ({options['feat_dim']}) must equal "
                            f"distill.embed_dim ({dim}) in label-free distillation")
        loss = build_loss(cfg.method, dim, self.feats_in.shape[1], len(self.paths_in),
                          **options)
        model = LabelFreeDistiller(student, self.feats_in, loss)
        model.encoder_arch = {"name": cfg.model.backbone, "kwargs": kwargs}
        return model

    def make_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        from encoders.ssl.augment import build_multiview
        from encoders.ssl.data import UnlabelledImages

        self.paths = self.paths_in
        return UnlabelledImages(self.paths, build_multiview(model.views, self.cfg.aug))

    def fresh_start(self) -> None:
        if self.cfg.model.init:
            from encoders.engine.checkpoint import load_encoder

            src, _ = load_encoder(self.cfg.model.init)
            student = self.model.student
            # a shallower student (backbone depths) starts from the first blocks of each stage
            blocks = {".".join(k.split(".")[:2]) for k in student.state_dict()
                      if k.startswith("layer")}
            sd = {k: v for k, v in src.state_dict().items()
                  if not k.startswith(("embed.", "cell."))
                  and (not k.startswith("layer") or ".".join(k.split(".")[:2]) in blocks)}
            got = student.load_state_dict(sd, strict=False)
            if got.unexpected_keys or [k for k in got.missing_keys
                                       if not k.startswith(("embed.", "cell."))]:
                raise CdirError(f"{self.cfg.model.init} does not fit the student "
                                f"{self.cfg.model.backbone}: missing {got.missing_keys[:4]}, "
                                f"unexpected {got.unexpected_keys[:4]}")

    def extra_state(self) -> dict[str, Any]:
        return {"distill": {"teacher_key": self.teacher_key}}

    def restore_extra(self, ckpt: dict) -> None:
        key = (ckpt.get("distill") or {}).get("teacher_key")
        if key != self.teacher_key:
            raise CdirError(f"the teacher embeddings are not those this run was started with "
                            f"({self.teacher_key} now, {key} in the checkpoint)")

    def export(self, out_path: Path) -> Path:
        from encoders.engine.checkpoint import export_encoder

        return export_encoder(self.latest, self.out / "student.pt",
                              extra=self.export_extra)
