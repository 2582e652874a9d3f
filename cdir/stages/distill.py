"""The distillation stage behind `cdir train teacher` and `cdir distill METHOD`.

Labelled runs (:func:`distill_run`): the testbed's recipe (``encoders.distill.trainer.TESTBED``),
then the recipe file, then ``--set`` items, then the flags; ``seeds`` runs the same config once
per seed into ``OUT/seed_<s>/`` and reports mean and standard deviation of the last and the best
top-1 (``OUT/seeds.json``, ``OUT/seeds.md``).

Label-free runs (:func:`distill_label_free_run`): a workspace gallery, a teacher encoder spec
and a student backbone. The teacher's embeddings come from the workspace's embedding store
(`cdir embed` writes them; they are computed here first when missing, so the teacher never runs
twice on an image), optionally per-domain whitened (label-free); the student is exported as
``OUT/student.pt`` and is used as ``ckpt:OUT/student.pt`` like any encoder.
"""

from __future__ import annotations

import json
import os
import statistics
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from cdir.core.errors import CdirError
from cdir.core.signals import graceful
from cdir.stages.train import run_summary
from encoders.specs import parse_spec, plain_checkpoint

# keyword argument -> the config key it sets
DIRECT = {"data": "data.path", "out": "train.out", "epochs": "optim.epochs",
          "batch_size": "optim.batch_size", "workers": "data.workers", "seed": "train.seed",
          "lr": "optim.lr", "student": "model.backbone", "teacher": "distill.teacher",
          "teacher_arch": "distill.teacher_arch", "teacher_sha256": "distill.teacher_sha256",
          "root": "distill.root", "download": "distill.download",
          "val_split": "distill.val_split", "gamma": "distill.gamma", "alpha": "distill.alpha",
          "beta": "distill.beta", "with_kd": "distill.with_kd"}


def _values(given: dict[str, Any]) -> dict[str, Any]:
    unknown = set(given) - set(DIRECT)
    if unknown:
        raise CdirError(f"unknown setting(s) {sorted(unknown)}")
    return {DIRECT[k]: (os.fspath(v) if isinstance(v, os.PathLike) else v)
            for k, v in given.items() if v is not None and v is not False}


def distill_config(method: str, config: str | os.PathLike | None, sets: Iterable[str],
                   values: dict[str, Any], resume: str | None = None):
    """(run config, checkpoint to resume or None) of a labelled run."""
    from encoders.distill.plugin import METHODS as DISTILL_METHODS
    from encoders.distill.trainer import SMALL_LR_MODELS, TESTBED
    from encoders.engine.config import Config, run_config, with_values

    if method not in DISTILL_METHODS:
        raise CdirError(f"unknown distillation method {method!r}; choose one of "
                        f"{', '.join(DISTILL_METHODS)}")
    sets = list(sets)
    cfg, ckpt = run_config(method, config, sets, values, resume, base=TESTBED)
    lr_given = "optim.lr" in values or any(s.strip().startswith("optim.lr=") for s in sets)
    if config:
        from cdir.core.config import load_yaml

        lr_given = lr_given or "lr" in (load_yaml(config).get("optim") or {})
    if ckpt is None and not lr_given and cfg.model.backbone in SMALL_LR_MODELS:
        # the testbed trains the mobile students at 0.01
        cfg = Config.from_dict(with_values(cfg.to_dict(), {"optim.lr": 0.01}))
    if ckpt is None and cfg.distill.with_kd and not cfg.train.out:
        # the "+KD" run of a recipe gets its own folder beside the plain one
        cfg = Config.from_dict(with_values(cfg.to_dict(), {
            "train.out": str(Path("runs") / f"{method}_kd-{cfg.recipe or 'run'}")}))
    if not cfg.data.path:
        raise CdirError("no data: pass --data cifar100|cifar10|digits or a folder with train/ "
                        "and test/")
    return cfg, ckpt


def read_scores(out: str | os.PathLike) -> dict[str, Any]:
    """Last and best top-1 of a finished or running labelled run, from its metrics.jsonl:
    ``last`` (the final epoch's test top-1), ``best`` (test top-1 at the epoch with the best
    validation top-1, or the best test top-1 when there is no validation split),
    ``best_epoch``, ``selected_on``."""
    path = Path(out) / "metrics.jsonl"
    if not path.exists():
        raise CdirError(f"no metrics.jsonl in {out}: the run has not finished an epoch")
    rows = [json.loads(ln) for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    rows = [r for r in rows if "test_top1" in r]
    if not rows:
        raise CdirError(f"{path} has no test accuracy")
    on = "val_top1" if "val_top1" in rows[-1] else "test_top1"
    best = max(rows, key=lambda r: (r[on], -r["epoch"]))
    return {"last": rows[-1]["test_top1"], "best": best["test_top1"],
            "best_epoch": best["epoch"], "epochs": rows[-1]["epoch"],
            "selected_on": on.removesuffix("_top1")}


@graceful()  # SIGTERM, like Ctrl-C, stops the epoch in flight; latest.pt keeps the last one
def distill_run(method: str, config: str | os.PathLike | None = None, sets: Iterable[str] = (),
                *, resume: str | None = None, stop_at: int | None = None, force: bool = False,
                seeds: Sequence[int] | None = None, **given: Any) -> dict[str, Any]:
    """Train a teacher (``method="teacher"``) or distil a student; ``given`` are the flags of
    :data:`DIRECT`. Returns the summary of :func:`cdir.stages.train.run_summary` plus
    ``scores`` (:func:`read_scores`), or with ``seeds`` one summary per seed and ``table``."""
    if seeds:
        return _seeds(method, config, sets, resume, stop_at, force, list(seeds), given)
    from encoders.distill.trainer import distill

    cfg, ckpt = distill_config(method, config, sets, _values(given), resume)
    res = distill(cfg, resume=ckpt, stop_at=stop_at, force=force)
    summary = run_summary(cfg, res)
    if res.rank == 0:
        summary["scores"] = read_scores(res.out)
        summary["best_file"] = str(Path(res.out) / "best.pt")
    return summary


def _seeds(method: str, config: Any, sets: Iterable[str], resume: str | None,
           stop_at: int | None, force: bool, seeds: list[int], given: dict) -> dict[str, Any]:
    """One run per seed (``OUT/seed_<s>``; a seed already finished is not run again), then the
    mean and standard deviation of last and best."""
    from cdir.core.io import write_json, write_text

    if "seed" in given and given["seed"] is not None:
        raise CdirError("give either --seed or --seeds, not both")
    if len(set(seeds)) != len(seeds):
        raise CdirError(f"--seeds has repeats: {seeds}")
    cfg, _ = distill_config(method, config, sets, _values(given), None)
    from encoders.engine.config import run_dir

    root = run_dir(cfg)
    runs = []
    for s in seeds:
        out = root / f"seed_{s}"
        finished = (out / "last.pt").exists()
        if not finished:
            again = "auto" if (resume or (out / "latest.pt").exists()) and not force else None
            distill_run(method, config, sets, resume=again, stop_at=stop_at, force=force,
                        **{**given, "seed": s, "out": out})
        runs.append({"seed": s, "out": str(out), **read_scores(out)})
    table = seeds_table(runs)
    if all(r["epochs"] == cfg.optim.epochs for r in runs):
        write_json(root / "seeds.json", {"method": method, "runs": runs, **table})
        write_text(root / "seeds.md", seeds_markdown(method, runs, table))
    return {"method": method, "rank": 0, "out": str(root), "runs": runs, **table}


def seeds_table(runs: list[dict[str, Any]]) -> dict[str, Any]:
    def ms(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0}

    return {"last": ms([r["last"] for r in runs]), "best": ms([r["best"] for r in runs]),
            "selected_on": runs[0]["selected_on"] if runs else None}


def seeds_markdown(method: str, runs: list[dict[str, Any]], table: dict[str, Any]) -> str:
    on = table["selected_on"]
    lines = [f"# {method}: {len(runs)} seed(s)", "",
             f"| seed | last top-1 | best top-1 (chosen on {on}) | best epoch |",
             "|---|---:|---:|---:|"]
    lines += [f"| {r['seed']} | {r['last']:.2f} | {r['best']:.2f} | {r['best_epoch']} |"
              for r in runs]
    last, best = table["last"], table["best"]
    lines.append(f"| mean ± std | {last['mean']:.2f} ± {last['std']:.2f} | "
                 f"{best['mean']:.2f} ± {best['std']:.2f} | |")
    return "\n".join(lines) + "\n"


def summary_line(s: dict[str, Any]) -> str:
    if "runs" in s:
        last, best = s["last"], s["best"]
        return (f"{s['method']}: {len(s['runs'])} seed(s) in {s['out']}: last top-1 "
                f"{last['mean']:.2f} ± {last['std']:.2f}, best {best['mean']:.2f} ± "
                f"{best['std']:.2f} (best chosen on {s['selected_on']}; seeds.md)")
    from cdir.stages.train import summary_line as train_line

    line = train_line(s)
    sc = s.get("scores")
    if sc and s.get("encoder"):
        line += (f"; test top-1 last {sc['last']:.2f}, best {sc['best']:.2f} (epoch "
                 f"{sc['best_epoch']}, chosen on {sc['selected_on']})")
    return line


# --- label-free -------------------------------------------------------------------------------

LABEL_FREE_DIRECT = {"out": "train.out", "epochs": "optim.epochs",
                     "batch_size": "optim.batch_size", "workers": "data.workers",
                     "seed": "train.seed", "lr": "optim.lr", "student": "model.backbone",
                     "embed_dim": "distill.embed_dim",
                     "teacher_normalize": "distill.teacher_normalize"}

# the student's defaults: a quarter-width ResNet-18 with the small stem (64-96 px images),
# AdamW (converges in the few epochs a CPU affords), mild augmentation of drawings
LABEL_FREE_BASE: dict[str, Any] = {
    "model": {"backbone": "resnet18", "backbone_kwargs": {"width": 0.25, "small_stem": True}},
    "optim": {"epochs": 30, "batch_size": 128, "optimizer": "adamw", "lr": 2e-3,
              "weight_decay": 1e-4, "schedule": "cosine", "warmup_epochs": 1.0,
              "per_step": True},
    "aug": {"weak": "emoji_weak"},
    "train": {"save_every": 0, "log_every": 10},
    "data": {"workers": 2},
}
TEACHER_NORMALIZE = ("none", "domain-whiten")
# the terms that need no labels and no logits
LABEL_FREE_METHODS = ("dcd", "rrd", "crd_fifo")


def _stored_rows(ws: Any, teacher: str, progress: bool) -> tuple[Any, Any]:
    """(manifest rows, their stored vectors of ``teacher``), embedding what is missing first;
    images the teacher could not read are left out."""
    from cdir.core.rows import print_summary
    from cdir.core.store import EmbeddingStore
    from cdir.stages.embed import embed_images

    embedded = embed_images(ws, teacher, progress=progress)
    if progress:  # a step of the run's progress, as the training's own log lines are
        print_summary(embedded)
    df = ws.manifest()
    x, valid = EmbeddingStore(ws.embeddings_dir(teacher)).load(df)
    return df[valid].reset_index(drop=True), x[valid]


def index_rows(ws: Any, name: str, progress: bool = True
               ) -> tuple[list[str], Any, str, dict[str, Any]]:
    """(image paths, the vectors index ``name`` holds for them, a key naming them, the index's
    compatibility record): the index encoder's stored vectors of the indexed rows, through the
    index's normalisation and L2-normalised, as the index was built from them."""
    import hashlib

    import numpy as np

    from cdir.core.workspace import split_caption_spec
    from cdir.stages.index import open_index
    from indexes.meta import compatibility

    index, name = open_index(ws, name, named=True)
    meta = index.meta
    if split_caption_spec(meta.encoder_spec):
        raise CdirError(f"index {name} holds caption embeddings ({meta.encoder_spec}): a "
                        "compatible query encoder is trained for an index of image embeddings")
    df, x = _stored_rows(ws, meta.encoder_spec, progress)
    keep = df["id"].astype(str).isin(set(map(str, index.ids))).to_numpy()
    df, x = df[keep].reset_index(drop=True), np.asarray(x[keep], dtype=np.float32)
    if not len(df):
        raise CdirError(f"index {name} holds none of the workspace's stored vectors of "
                        f"{meta.encoder_spec}")
    if index.normalizer is not None:
        x = index.normalizer.transform(x, df["domain"].astype(str).to_numpy())
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = np.ascontiguousarray(x, dtype=np.float32)
    record = {"index": name, **compatibility(meta, ws.index_path(name))}
    key = (f"index {name}|{record['content_sha256'][:16]}|"
           f"{hashlib.sha256(x.tobytes()).hexdigest()[:16]}")
    return df["path"].astype(str).tolist(), x, key, record


def teacher_rows(ws: Any, teacher: str, normalize: str, progress: bool = True
                 ) -> tuple[list[str], Any, str]:
    """(image paths, teacher embeddings per image, a key naming them) from the workspace's
    store, embedding what is missing first. Images the teacher could not read are left out."""
    import hashlib

    import numpy as np

    if normalize not in TEACHER_NORMALIZE:
        raise CdirError(f"teacher normalisation must be one of {', '.join(TEACHER_NORMALIZE)}, "
                        f"got {normalize!r}")
    df, x = _stored_rows(ws, teacher, progress)
    if normalize != "none":
        from indexes.normalize import fit_normalizer

        if "domain" not in df.columns or df["domain"].nunique() < 1:
            raise CdirError(f"{normalize} needs the domain of every image in the manifest")
        domains = df["domain"].astype(str).to_numpy()
        x = fit_normalizer(x, domains, normalize).transform(x, domains)
    x = np.ascontiguousarray(x, dtype=np.float32)
    key = f"{teacher}|{normalize}|{hashlib.sha256(x.tobytes()).hexdigest()[:16]}"
    return df["path"].astype(str).tolist(), x, key


def _teacher_input(teacher: str) -> dict[str, Any]:
    """The input settings (size, normalisation) of a ``ckpt:`` teacher, which the student
    inherits: the same images at the same size. Empty for other encoders (224 px ImageNet)."""
    path = parse_spec(teacher).checkpoint
    if path is None:
        return {}
    from encoders.engine.checkpoint import encoder_preprocess

    if not path.is_file():
        raise CdirError(f"{teacher}: no such checkpoint file {path}")
    pp = encoder_preprocess(path)
    return {"size": pp["size"], "mean": list(pp["mean"]), "std": list(pp["std"]),
            "eval_resize": pp["eval_resize"]}


@graceful()
def distill_label_free_run(method: str, workspace: str | os.PathLike, teacher: str | None,
                           config: str | os.PathLike | None = None, sets: Iterable[str] = (),
                           *, resume: str | None = None, stop_at: int | None = None,
                           force: bool = False, progress: bool = True,
                           compatible: str | None = None, **given: Any) -> dict[str, Any]:
    """Distil ``teacher`` (an encoder spec) into a small student on a workspace, no labels.

    ``compatible``: the name of a workspace index; the student is trained into that index's
    space (its encoder is the teacher, its normalisation applied, the student as wide as its
    vectors) and ``student.pt`` records the index, so `cdir search --query-encoder` can encode
    queries with it against that index."""
    from cdir.core.config import deep_merge, load_yaml
    from cdir.core.workspace import Workspace
    from encoders.distill.trainer import distill_label_free
    from encoders.engine.config import Config, resolve_config, with_values

    unknown = set(given) - set(LABEL_FREE_DIRECT)
    if unknown:
        raise CdirError(f"unknown setting(s) {sorted(unknown)} for label-free distillation")
    if method not in LABEL_FREE_METHODS:  # before the teacher embeds anything
        raise CdirError(f"label-free distillation uses an embedding term "
                        f"({', '.join(LABEL_FREE_METHODS)}), not {method}")
    ws = Workspace(workspace).require()
    target = None
    if compatible is not None:
        from indexes.meta import read_meta

        meta = read_meta(ws.index_path(compatible))
        if teacher is not None and teacher.strip() != meta.encoder_spec:
            raise CdirError(f"index {compatible} was built with {meta.encoder_spec}, not "
                            f"--teacher {teacher}: drop --teacher (the index's encoder is it)")
        if given.get("teacher_normalize") not in (None, "none"):
            raise CdirError(f"--compatible distils index {compatible}'s vectors with its own "
                            f"normalisation ({meta.normalize}): drop --teacher-normalize")
        if given.get("embed_dim") not in (None, meta.dim):
            raise CdirError(f"--compatible {compatible}: the student embeds into the index's "
                            f"{meta.dim} dims, not --embed-dim {given['embed_dim']}")
        teacher, given["embed_dim"] = meta.encoder_spec, meta.dim
        target = index_rows(ws, compatible, progress)
    if not teacher:
        raise CdirError("label-free distillation needs --teacher SPEC (or --compatible INDEX)")
    raw = deep_merge(LABEL_FREE_BASE, {"aug": _teacher_input(teacher)})
    stem = "label-free"
    if config:
        raw = deep_merge(raw, load_yaml(config), leaves=("backbone_kwargs",))
        stem = Path(config).stem
    raw = deep_merge(raw, {"data": {"path": str(ws.manifest_path)},
                           "distill": {"label_free": True, "teacher": teacher}})
    cfg = resolve_config(raw, method, stem, list(sets))
    values = {LABEL_FREE_DIRECT[k]: (os.fspath(v) if isinstance(v, os.PathLike) else v)
              for k, v in given.items() if v is not None}
    cfg = Config.from_dict(with_values(cfg.to_dict(), values))
    if cfg.distill.embed_dim < 1:
        raise CdirError("label-free distillation needs distill.embed_dim >= 1")
    if target is not None:
        from indexes.meta import COMPATIBLE_KEY

        if cfg.distill.embed_dim != given["embed_dim"]:  # a recipe's or a --set's
            raise CdirError(f"--compatible {compatible}: the student embeds into the index's "
                            f"{given['embed_dim']} dims, not distill.embed_dim "
                            f"{cfg.distill.embed_dim}")
        paths, feats, key, record = target
        extra = {COMPATIBLE_KEY: record}
    else:
        paths, feats, key = teacher_rows(ws, teacher, cfg.distill.teacher_normalize, progress)
        extra = None
    if resume == "auto":
        from encoders.engine.config import run_dir

        latest = run_dir(cfg) / "latest.pt"
        resume = str(latest) if latest.exists() else None
    res = distill_label_free(cfg, paths, feats, key, resume=resume, stop_at=stop_at,
                             force=force, export_extra=extra)
    summary = run_summary(cfg, res)
    summary["student"] = str(Path(res.out) / "student.pt") if res.encoder else None
    summary["teacher"] = teacher
    return summary


# --- transfer -----------------------------------------------------------------------------------

def transfer_eval(encoder: str | None, data: str | None, *, root: str | os.PathLike = "data",
                  download: bool = False, epochs: int = 120, cache_features: bool = False,
                  workers: int = 2, device: str | None = None, seed: int = 0,
                  progress: bool = True) -> dict[str, Any]:
    """The testbed's transfer probe: the frozen encoder (``ckpt:PATH``: a student of `cdir
    distill`, or any encoder file of this project), a new linear head trained on ``data``
    (stl10, tinyimagenet or a folder with train/ and test/) at 32 px with the target's
    normalisation; top-1 on its test split, last and best (best chosen on test: beside last)."""
    from cdir.core.device import resolve_device
    from encoders.distill.data import open_labelled, transforms_for
    from encoders.engine.checkpoint import load_encoder
    from eval.transfer import ProbeConfig, transfer_probe

    if not encoder or not data:
        raise CdirError("cdir eval transfer needs --encoder ckpt:PATH and --data "
                        "stl10|tinyimagenet|FOLDER")
    path = plain_checkpoint(encoder, f"cdir eval transfer takes a checkpoint file (ckpt:PATH), "
                                     f"not {encoder}")
    dev = resolve_device(device)
    model, dim = load_encoder(path, dev)
    target = open_labelled(data, root, download)
    size = 32  # the testbed resizes every target to the CIFAR input size
    train_tf, test_tf = transforms_for(target, size)
    train = target.train.labelled_images(test_tf if cache_features else train_tf, size)
    test = target.test.labelled_images(test_tf, size)
    cfg = ProbeConfig(epochs=int(epochs), workers=int(workers), seed=int(seed),
                      cache_features=bool(cache_features))
    res = transfer_probe(model, dim, train, test, target.num_classes, cfg, dev, progress)
    return {"encoder": encoder, "data": target.name, "classes": target.num_classes, **res}
