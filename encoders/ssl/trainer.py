"""One training loop for MoCo v2, SynCo and ISD.

Runs as a single process on CPU or one GPU (no process group), or under ``torchrun`` with DDP across
GPUs and nodes (NCCL on GPUs, Gloo on CPUs). The method object does its own momentum update and
enqueue inside ``forward``, so the loop is generic: views -> loss -> SGD step.

- Config: YAML recipe -> :class:`Config` (dataclasses; unknown keys are errors, not silently
  dropped). A recipe holds shared sections (data, model, aug, optim, train, monitor) and one section
  per method under ``methods:``; a method section's keys are the method's hyperparameters, except
  ``name`` (the registry name, e.g. ``isd_plus``) and nested shared sections, which override the
  top-level ones for that method only.
- Reproducibility: model init from ``seed``; data order from a sampler keyed by (seed, epoch);
  augmentation from a per-epoch DataLoader generator (workers) or the restored global RNG (no
  workers). A run resumed from ``latest.pt`` replays the uninterrupted run's losses exactly on CPU.
- Outputs in ``train.out``: ``latest.pt`` (every epoch), ``checkpoint_XXXX.pt`` (every
  ``save_every`` epochs), ``encoder.pt`` (encoder only, at the end), ``config.yaml``,
  ``metrics.jsonl`` (one line per epoch), ``tb/`` (TensorBoard scalars), ``skipped.txt``
  (unreadable images).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from cdir.core.errors import CdirError
from cdir.core.io import write_text
from encoders.ssl.augment import AugConfig

METHODS = ("moco", "synco", "isd", "isd_plus")
SECTIONS = ("data", "model", "aug", "optim", "train", "monitor")


# --------------------------------------------------------------------------------------------
# configuration


@dataclass
class DataConfig:
    path: str | None = None  # image folder (recursive) or manifest (.parquet/.csv)
    workers: int = 4  # DataLoader workers per process


@dataclass
class ModelConfig:
    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    epochs: int = 200
    batch_size: int = 256  # global batch, split evenly across processes
    optimizer: str = "sgd"  # sgd (the papers) | adamw (converges in fewer steps: small CPU runs)
    lr: float = 0.03
    momentum: float = 0.9  # SGD momentum
    betas: tuple[float, float] = (0.9, 0.999)  # AdamW
    weight_decay: float = 1e-4
    schedule: str = "cosine"  # cosine | step | constant
    milestones: list[int] = field(default_factory=lambda: [120, 160])  # step schedule
    gamma: float = 0.1  # step schedule factor
    warmup_epochs: float = 0.0  # linear lr warm-up (per step), before the schedule
    per_step: bool = False  # False: the lr changes once per epoch (MoCo's --cos)


@dataclass
class RunConfig:
    out: str | None = None  # default runs/<method>-<recipe name>
    seed: int = 0
    amp: str = "auto"  # auto (bf16/fp16 on GPU, off on CPU) | bf16 | fp16 | none
    device: str = "auto"  # auto | cpu | cuda
    backend: str = "auto"  # process-group backend under torchrun: auto | nccl | gloo
    save_every: int = 10  # also keep checkpoint_XXXX.pt every N epochs (0: only latest.pt)
    keep_checkpoints: int = 0  # keep only the newest N periodic checkpoints (0: all)
    log_every: int = 10  # steps between TensorBoard points / progress-bar updates
    max_steps_per_epoch: int | None = None  # cap for smoke tests and timing runs
    channels_last: bool = False  # NHWC on GPU (faster convolutions on tensor cores)
    # torch CPU threads; None: on CPU, the cores left over by the data workers (oversubscribing
    # the cores with compute threads and augmentation workers halves the speed on small machines)
    threads: int | None = None
    progress: bool = True


@dataclass
class MonitorConfig:
    path: str | None = None  # labelled folder/manifest; None disables the monitor
    every: int = 1  # epochs between evaluations (the last epoch is always evaluated)
    k: int = 20
    temperature: float = 0.07
    max_images: int | None = None  # random fixed subset for speed
    batch_size: int = 256


@dataclass
class Config:
    method: str = "moco"  # the command: moco | synco | isd | isd_plus
    method_name: str = "moco"  # the registry name actually built
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    recipe: str = ""  # recipe file stem, for the default output folder
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: RunConfig = field(default_factory=RunConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return json.loads(json.dumps(d))  # tuples -> lists: plain YAML/JSON/weights-only values

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        d = dict(d)
        kinds = {"data": DataConfig, "model": ModelConfig, "aug": AugConfig,
                 "optim": OptimConfig, "train": RunConfig, "monitor": MonitorConfig}
        top = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - top
        if unknown:
            raise CdirError(f"unknown config key(s) {sorted(unknown)}; valid: {sorted(top)}")
        for name, kind in kinds.items():
            if name in d:
                d[name] = _build(kind, d[name] or {}, name)
        return cls(**d)


def _build(kind: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise CdirError(f"config section {where!r} must be a mapping, got {values!r}")
    names = {f.name for f in dataclasses.fields(kind)}
    unknown = set(values) - names
    if unknown:
        raise CdirError(
            f"unknown key(s) {sorted(unknown)} in config section {where!r}; valid: {sorted(names)}"
        )
    return kind(**values)


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict) and k != "backbone_kwargs":
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _parse_value(text: str) -> Any:
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _set_path(d: dict[str, Any], key: str, value: Any) -> None:
    parts = key.strip().split(".")
    if parts[0] == "method" and len(parts) > 1:
        parts = ["method_kwargs", *parts[1:]]
    node = d
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            if node.get(p) is not None:
                raise CdirError(f"cannot set {key}: {p!r} is not a section")
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def apply_overrides(d: dict[str, Any], sets: list[str] | None) -> dict[str, Any]:
    """Apply ``key.sub=value`` strings (values parsed as YAML) to a config dict.

    ``method.X`` addresses the method's hyperparameters (``method_kwargs``)."""
    d = copy.deepcopy(d)
    for item in sets or []:
        if "=" not in item:
            raise CdirError(f"--set expects key=value, got {item!r}")
        key, text = item.split("=", 1)
        _set_path(d, key, _parse_value(text))
    return d


def apply_values(d: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """Set dotted keys to values as given (no parsing), e.g. ``{"data.path": "/x"}``."""
    d = copy.deepcopy(d)
    for key, value in values.items():
        _set_path(d, key, value)
    return d


def resolve_config(
    raw: dict[str, Any], method: str, recipe: str = "", overrides: list[str] | None = None
) -> Config:
    """The run config for ``method`` from a recipe dict (see the module docstring)."""
    if method not in METHODS:
        raise CdirError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    raw = dict(raw or {})
    sections = raw.pop("methods", None) or {}
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise CdirError(
            f"unknown top-level recipe key(s) {sorted(unknown)}; valid: {[*SECTIONS, 'methods']}"
        )
    if sections and method not in sections:
        raise CdirError(
            f"the recipe has no section for {method!r} under 'methods' "
            f"(it has {', '.join(sections)}); add one or pick another method"
        )
    msec = dict(sections.get(method) or {})
    name = msec.pop("name", method)
    if name not in METHODS:
        raise CdirError(f"methods.{method}.name must be one of {', '.join(METHODS)}, got {name!r}")
    base = {k: raw.get(k) or {} for k in SECTIONS}
    for k in SECTIONS:
        if k in msec:
            base[k] = _deep_merge(base[k], msec.pop(k) or {})
    d = {"method": method, "method_name": name, "method_kwargs": msec, "recipe": recipe, **base}
    d = apply_overrides(d, overrides or [])
    return Config.from_dict(d)


def load_recipe(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise CdirError(f"no recipe at {path}; see configs/ for examples")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f) or {}
    if not isinstance(raw, dict):
        raise CdirError(f"{path}: a recipe must be a YAML mapping")
    return raw


# --------------------------------------------------------------------------------------------
# distributed / device / precision


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this trainer created the process group (and destroys it)

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(cfg: RunConfig) -> Dist:
    """Join the torchrun process group if launched by torchrun with >1 process; pick the device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    want_cuda = cfg.device in ("auto", "cuda") and torch.cuda.is_available()
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise CdirError("train.device is cuda but no GPU is visible; use --set train.device=cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if want_cuda else torch.device("cpu")
    if want_cuda:
        torch.cuda.set_device(device)
    if world <= 1:
        return Dist(device=device)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=False)
    backend = cfg.backend if cfg.backend != "auto" else ("nccl" if want_cuda else "gloo")
    dist.init_process_group(backend=backend)
    return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device, owns_group=True)


def amp_setup(amp: str, device: torch.device) -> tuple[bool, torch.dtype]:
    """(autocast enabled, dtype). fp16 only on GPU (it needs the gradient scaler)."""
    if amp == "auto":
        if device.type != "cuda":
            return False, torch.float32
        return True, torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "none":
        return False, torch.float32
    if amp == "bf16":
        return True, torch.bfloat16
    if amp == "fp16":
        if device.type != "cuda":
            raise CdirError("train.amp=fp16 needs a GPU; on CPU use bf16 or none")
        return True, torch.float16
    raise CdirError(f"train.amp must be auto, bf16, fp16 or none, got {amp!r}")


def seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_optimizer(params: list[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum,
                               weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas),
                                 weight_decay=cfg.weight_decay)
    raise CdirError(f"optim.optimizer must be sgd or adamw, got {cfg.optimizer!r}")


def lr_factor(step: int, steps_per_epoch: int, cfg: OptimConfig) -> float:
    """Multiplier of the base lr at optimizer step ``step`` (0-based)."""
    epoch_f = step / steps_per_epoch
    warm = cfg.warmup_epochs
    if warm > 0 and epoch_f < warm:
        return (step + 1) / (warm * steps_per_epoch)
    e = epoch_f if cfg.per_step else float(step // steps_per_epoch)
    if cfg.schedule == "cosine":
        span = max(cfg.epochs - warm, 1e-8)
        return 0.5 * (1.0 + math.cos(math.pi * min(max(e - warm, 0.0), span) / span))
    if cfg.schedule == "step":
        return cfg.gamma ** sum(1 for m in cfg.milestones if e >= m)
    if cfg.schedule == "constant":
        return 1.0
    raise CdirError(f"optim.schedule must be cosine, step or constant, got {cfg.schedule!r}")


@functools.lru_cache(maxsize=1)
def _git_sha() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------------------------
# the loop


@dataclass
class TrainResult:
    out: Path
    epochs_done: int
    steps: int
    losses: list[float]  # per-step losses of the epochs run by this call
    epoch_losses: list[float]
    latest: Path
    encoder: Path | None
    monitor: list[dict[str, Any]]
    images_per_s: float
    skipped: list[str]


def default_out(cfg: Config) -> Path:
    stem = cfg.recipe or "run"
    return Path("runs") / f"{cfg.method}-{stem}"


def build_model(cfg: Config) -> nn.Module:
    from encoders.ssl.registry import build_method

    return build_method(
        cfg.method_name, cfg.model.backbone, dict(cfg.model.backbone_kwargs), **cfg.method_kwargs
    )


def _encoder_of(model: nn.Module) -> nn.Module:
    return model.get_submodule(model.encoder_prefix.rstrip("."))


class _Monitor:
    """kNN accuracy and retrieval P@1 of the current encoder on a labelled set."""

    def __init__(self, cfg: Config, workers: int) -> None:
        from encoders.ssl.data import labelled_set

        self.cfg = cfg.monitor
        data = labelled_set(cfg.monitor.path)
        if cfg.monitor.max_images and len(data) > cfg.monitor.max_images:
            g = torch.Generator().manual_seed(cfg.train.seed)
            rows = sorted(torch.randperm(len(data), generator=g)[: cfg.monitor.max_images].tolist())
            data = data.subset(rows)
        self.data = data
        self.preprocess = {"size": cfg.aug.size, "mean": cfg.aug.mean, "std": cfg.aug.std,
                           "eval_resize": cfg.aug.eval_resize}
        self.workers = workers

    def __call__(self, encoder: nn.Module, device: torch.device) -> dict[str, float]:
        from eval.ssl import extract_features, knn_classify, retrieval_p1

        feats, ok = extract_features(
            encoder, self.data, self.preprocess, batch_size=self.cfg.batch_size, device=device,
            workers=self.workers, progress=False,
        )
        keep = ok.nonzero().flatten()
        feats = feats[keep]
        labels = torch.tensor(self.data.labels)[keep]
        domains = None
        if self.data.domains is not None and len(set(self.data.domains)) > 1:
            domains = [self.data.domains[i] for i in keep.tolist()]
        res = knn_classify(feats, labels, k=self.cfg.k, temperature=self.cfg.temperature,
                           num_classes=len(self.data.class_names))
        return {"knn_top1": res["top1"], "knn_top5": res["top5"],
                "p1": retrieval_p1(feats, labels, domains)}


def _state_rng(d: Dist) -> dict[str, Any]:
    from encoders.ssl.checkpoint import rng_state

    state = rng_state()
    if d.world > 1:
        ranks: list[Any] = [None] * d.world
        dist.all_gather_object(ranks, state)
        state = {**state, "ranks": ranks}
    return state


def _restore_rng(state: dict[str, Any], d: Dist) -> None:
    from encoders.ssl.checkpoint import set_rng_state

    ranks = state.get("ranks")
    if d.world > 1:
        if ranks and len(ranks) == d.world:
            set_rng_state(ranks[d.rank])
            return
        print(
            "warning: resumed with a different number of processes; the data order is the same "
            "but augmentation draws are not",
            file=sys.stderr,
        )
        return
    if ranks and len(ranks) != 1:
        print("warning: resumed a multi-process run in one process; augmentation draws differ",
              file=sys.stderr)
    set_rng_state(state)


def _scalar_logs(out: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in out.items()
            if k != "loss" and isinstance(v, torch.Tensor) and v.numel() == 1}


def train(
    cfg: Config,
    resume: str | os.PathLike | dict | None = None,
    stop_at: int | None = None,
) -> TrainResult:
    """Run pretraining, or resume it from a checkpoint (path or loaded dict).

    ``stop_at`` ends the call after that many epochs in total, as an interruption would (for
    chunked jobs and for the resume test)."""
    d = setup_distributed(cfg.train)
    _set_threads(cfg, d)
    try:
        return _train(cfg, d, resume, stop_at)
    finally:
        if d.owns_group and dist.is_initialized():
            dist.destroy_process_group()


def _train(
    cfg: Config, d: Dist, resume: str | os.PathLike | dict | None, stop_at: int | None
) -> TrainResult:
    from encoders.ssl.augment import build_multiview
    from encoders.ssl.checkpoint import export_encoder, load_checkpoint, save_checkpoint
    from encoders.ssl.data import SeededSampler, UnlabelledImages, list_images

    o, t = cfg.optim, cfg.train
    if not cfg.data.path:
        raise CdirError("no training data: pass --data DIR (or set data.path in the recipe)")
    if o.batch_size % d.world:
        raise CdirError(f"batch size {o.batch_size} is not divisible by {d.world} processes")
    per_rank = o.batch_size // d.world
    out = Path(t.out) if t.out else default_out(cfg)

    ckpt = resume if isinstance(resume, dict) or resume is None else load_checkpoint(resume)
    if ckpt is not None and ckpt.get("method") != cfg.method:
        raise CdirError(
            f"{resume} was trained with {ckpt.get('method')!r}, not {cfg.method!r}: "
            f"use `cdir train {ckpt.get('method')} --resume ...`"
        )

    # identical initial weights on every rank (DDP also broadcasts rank 0's at wrap time)
    seed_all(t.seed)
    model = build_model(cfg).to(d.device)
    if t.channels_last and d.device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
    encoder_arch = dict(getattr(model, "encoder_arch", None) or {
        "name": cfg.model.backbone, "kwargs": dict(cfg.model.backbone_kwargs)})
    seed_all(t.seed + d.rank)  # different augmentation draws per rank

    # data: the order depends only on (seed, epoch)
    paths = list_images(cfg.data.path)
    dataset = UnlabelledImages(paths, build_multiview(model.views, cfg.aug))
    if d.world > 1:
        sampler = torch.utils.data.DistributedSampler(
            dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=t.seed, drop_last=True
        )
    else:
        sampler = SeededSampler(len(dataset), seed=t.seed)
    steps_per_epoch = (len(dataset) // d.world) // per_rank
    if t.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, t.max_steps_per_epoch)
    if steps_per_epoch < 1:
        raise CdirError(
            f"{len(dataset)} images is less than one batch of {o.batch_size}; lower --batch-size"
        )

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, o)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps_per_epoch, o)
    )
    amp_on, amp_dtype = amp_setup(t.amp, d.device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_on and amp_dtype == torch.float16)

    start_epoch, step = 0, 0
    if ckpt is not None:
        saved_opt = (ckpt.get("config") or {}).get("optim", {}).get("optimizer", "sgd")
        if saved_opt != o.optimizer:
            raise CdirError(f"the checkpoint was trained with {saved_opt}, the config says "
                            f"{o.optimizer}; the optimizer cannot change on resume")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, step = int(ckpt["epoch"]), int(ckpt["step"])
        # the loaded states carry the old hyperparameters; the config wins (a no-op when it is
        # unchanged, so the exact-resume property holds)
        scheduler.base_lrs = [o.lr for _ in optimizer.param_groups]
        for group in optimizer.param_groups:
            group["initial_lr"] = o.lr
            group["lr"] = o.lr * lr_factor(step, steps_per_epoch, o)
            group["weight_decay"] = o.weight_decay
            if o.optimizer == "sgd":
                group["momentum"] = o.momentum
            else:
                group["betas"] = tuple(o.betas)
        _restore_rng(ckpt["rng"], d)
        saved_spe = ckpt.get("steps_per_epoch")
        if saved_spe and saved_spe != steps_per_epoch:
            print(f"warning: {steps_per_epoch} steps per epoch now, {saved_spe} in the "
                  "checkpoint (different data or batch size); the schedule shifts",
                  file=sys.stderr)
        del ckpt

    net: nn.Module = model
    if d.world > 1:
        # Buffers are synced once at wrap time (same queue and BN statistics everywhere), not on
        # every forward: each rank enqueues the same all-gathered keys, so the queues stay equal
        # without shipping 65536 x 128 floats per step.
        net = nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
            **_no_forward_buffer_sync(),
        )

    monitor = _Monitor(cfg, cfg.data.workers) if (cfg.monitor.path and d.main) else None
    writer = None
    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        import yaml

        write_text(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out / "tb"), purge_step=step if step else None)
        if start_epoch:
            _truncate_metrics(out / "metrics.jsonl", start_epoch)

    end_epoch = o.epochs if stop_at is None else min(o.epochs, stop_at)
    losses: list[float] = []
    epoch_losses: list[float] = []
    monitor_hist: list[dict[str, Any]] = []
    skipped: set[str] = set()
    rates: list[float] = []
    latest = out / "latest.pt"
    pin = d.device.type == "cuda"

    for epoch in range(start_epoch, end_epoch):
        model.train()
        model.set_epoch(epoch)
        sampler.set_epoch(epoch)
        gen = torch.Generator()
        gen.manual_seed((t.seed * 1_000_003 + epoch) * 1_009 + d.rank)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=per_rank, sampler=sampler, num_workers=cfg.data.workers,
            drop_last=True, pin_memory=pin, generator=gen,
            persistent_workers=False,
        )
        bar = None
        if d.main and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=steps_per_epoch * o.batch_size, unit="img", file=sys.stderr,
                       desc=f"{cfg.method} {epoch + 1}/{o.epochs}", leave=False)
        ep_losses: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []
        t0 = time.perf_counter()
        for i, (views, idx, ok) in enumerate(loader):
            if i >= steps_per_epoch:
                break
            if not bool(ok.all()):
                skipped.update(paths[j] for j in idx[~ok].tolist())
            views = [v.to(d.device, non_blocking=True) for v in views]
            if t.channels_last and d.device.type == "cuda":
                views = [v.contiguous(memory_format=torch.channels_last) for v in views]
            with torch.autocast(d.device.type, dtype=amp_dtype, enabled=amp_on):
                res = net(views)
            loss = res["loss"]
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            step += 1
            ep_losses.append(loss.detach())
            pending.append(loss.detach())
            if bar is not None:
                bar.update(o.batch_size)
            if step % t.log_every == 0 or i == steps_per_epoch - 1:
                mean = float(torch.stack(pending).float().mean())
                pending = []
                if not math.isfinite(mean):
                    raise CdirError(
                        f"the loss became {mean} at epoch {epoch + 1}, step {step}; lower "
                        f"optim.lr (now {o.lr}) or use --set train.amp=none; resume from "
                        f"{latest} if it exists"
                    )
                if writer is not None:
                    writer.add_scalar("train/loss", mean, step)
                    writer.add_scalar("train/lr", optimizer.param_groups[0]["lr"], step)
                    for k, v in _scalar_logs(res).items():
                        writer.add_scalar(f"train/{k}", float(v), step)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean:.4f}", lr=f"{optimizer.param_groups[0]['lr']:.4g}")
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        ep = torch.stack(ep_losses).float().cpu()
        losses += ep.tolist()
        ep_mean = float(ep.mean())
        if d.world > 1:
            m = torch.tensor([ep_mean], device=d.device)
            dist.all_reduce(m)
            ep_mean = float(m) / d.world
            bad: list[Any] = [None] * d.world
            dist.all_gather_object(bad, sorted(skipped))
            skipped = set().union(*map(set, bad))
        epoch_losses.append(ep_mean)
        rate = len(ep) * o.batch_size / max(elapsed, 1e-9)
        rates.append(rate)

        done = epoch + 1
        record: dict[str, Any] = {"epoch": done, "step": step, "loss": ep_mean,
                                  "lr": optimizer.param_groups[0]["lr"], "img_per_s": rate,
                                  "seconds": elapsed}
        if monitor is not None and (done % max(cfg.monitor.every, 1) == 0 or done == o.epochs):
            mres = monitor(_encoder_of(model), d.device)
            record.update({f"monitor_{k}": v for k, v in mres.items()})
            monitor_hist.append({"epoch": done, **mres})
            for k, v in mres.items():
                writer.add_scalar(f"monitor/{k}", v, done)
        rng = _state_rng(d)  # collective under DDP: every rank takes part
        if d.main:
            writer.add_scalar("epoch/loss", ep_mean, done)
            writer.add_scalar("epoch/img_per_s", rate, done)
            state = {
                "version": 1, "method": cfg.method, "config": cfg.to_dict(),
                "encoder_arch": encoder_arch, "encoder_prefix": model.encoder_prefix,
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler.is_enabled() else None,
                "epoch": done, "step": step, "steps_per_epoch": steps_per_epoch, "rng": rng,
                "meta": {"git_sha": _git_sha(), "torch": str(torch.__version__),
                         "world_size": d.world, "time": time.time()},
            }
            save_checkpoint(latest, state)
            if t.save_every and done % t.save_every == 0:
                save_checkpoint(out / f"checkpoint_{done:04d}.pt", state)
                _prune(out, t.keep_checkpoints)
            del state
            with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if skipped:
                write_text(out / "skipped.txt", "\n".join(sorted(skipped)) + "\n")
            mon = "".join(f" {k[8:]} {v:.4g}" for k, v in record.items()
                          if k.startswith("monitor_"))
            print(f"{cfg.method} epoch {done}/{o.epochs}: loss {ep_mean:.4f} lr "
                  f"{record['lr']:.4g} {rate:.0f} img/s{mon}", file=sys.stderr)
        if d.world > 1:
            dist.barrier()

    encoder_path = None
    if d.main:
        if writer is not None:
            writer.close()
        done_all = end_epoch >= o.epochs
        if done_all and latest.exists():
            encoder_path = export_encoder(latest, out / "encoder.pt")
        n_ep = end_epoch - start_epoch
        what = f"{encoder_path} and {latest}" if encoder_path else f"{latest}"
        print(f"trained {cfg.method} for {n_ep} epoch(s) (now {end_epoch}/{o.epochs}), "
              f"{sum(rates) / max(len(rates), 1):.0f} img/s; wrote {what}"
              + (f"; skipped {len(skipped)} unreadable image(s), see skipped.txt"
                 if skipped else ""), file=sys.stderr)
    return TrainResult(
        out=out, epochs_done=end_epoch, steps=step, losses=losses, epoch_losses=epoch_losses,
        latest=latest, encoder=encoder_path, monitor=monitor_hist,
        images_per_s=sum(rates) / max(len(rates), 1), skipped=sorted(skipped),
    )


def _no_forward_buffer_sync() -> dict[str, bool]:
    """DDP keyword for "sync buffers at init only"; renamed in recent torch releases, where
    ``broadcast_buffers=False`` is deprecated and also skips the sync at init."""
    import inspect

    params = inspect.signature(nn.parallel.DistributedDataParallel).parameters
    if "forward_sync_buffers" in params:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


def _truncate_metrics(path: Path, epochs_done: int) -> None:
    """Drop the lines of epochs after the checkpoint being resumed (they will be re-run)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text(encoding="utf-8").splitlines()
            if ln.strip() and json.loads(ln).get("epoch", 0) <= epochs_done]
    write_text(path, "".join(ln + "\n" for ln in keep))


def _set_threads(cfg: Config, d: Dist) -> None:
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    elif d.device.type == "cpu":
        try:
            cores = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            cores = os.cpu_count() or 1
        per_process = max(1, cores // d.world)
        torch.set_num_threads(max(1, per_process - cfg.data.workers))


def _prune(out: Path, keep: int) -> None:
    if keep <= 0:
        return
    ckpts = sorted(out.glob("checkpoint_*.pt"))
    for p in ckpts[:-keep]:
        p.unlink(missing_ok=True)
