"""The one training loop of the project: :class:`Run`, driven by :func:`train`.

Every trainer is a subclass of :class:`Run` that fills in its hooks (the model, the data, what
more a checkpoint holds, what happens around an epoch): pretraining (``encoders.ssl``),
adaptation (``encoders.adapt``) and distillation (``encoders.distill``); the engine imports none
of them. The model does its own momentum update and enqueue inside ``forward``, so the loop is
generic: views -> loss -> optimizer step.

Runs as a single process on CPU or one GPU (no process group), or under ``torchrun`` with DDP across
GPUs and nodes (NCCL on GPUs, Gloo on CPUs).

- Config: :mod:`encoders.engine.config`; optimiser and lr schedule: :mod:`encoders.engine.optim`;
  checkpoints: :mod:`encoders.engine.checkpoint`.
- Monitor: an optional callable ``monitor(encoder, device) -> {metric: value}`` handed in by the
  caller (``eval.ssl.make_monitor``), run on the main process every ``monitor.every`` epochs on
  the module :meth:`Run.monitored` names, with the random generators put back afterwards: a
  monitor never changes a run.
- Reproducibility: model init from ``seed``; data order from a sampler keyed by (seed, epoch);
  augmentation from a per-epoch DataLoader generator (workers) or the restored global RNG (no
  workers). A run resumed from ``latest.pt`` replays the uninterrupted run's losses exactly on CPU.
- Outputs in ``train.out``: ``latest.pt`` (every epoch), ``checkpoint_XXXX.pt`` (every
  ``save_every`` epochs), ``encoder.pt`` (encoder only, at the end), ``config.yaml``,
  ``metrics.jsonl`` (one line per epoch), ``tb/`` (TensorBoard scalars), ``skipped.txt``
  (unreadable images), and ``train.lock`` while a run writes there (`cdir.core.lock`).
- A folder that holds a run is only continued (``resume``) or, with ``force``, started over
  after its files are moved aside: a fresh start would overwrite ``latest.pt`` and repeat the
  epochs of ``metrics.jsonl``.
- Interruptions (Ctrl-C, SIGTERM under `cdir.core.signals.graceful`) stop the epoch in flight;
  ``latest.pt`` and ``metrics.jsonl`` stay at the last finished epoch (each epoch's files are
  written together, never half), which ``resume`` continues from.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cdir.core.dist import (
    Dist,
    all_gather_object,
    barrier,
    launch_rank,
    mean_over_ranks,
    setup_distributed,
    teardown,
)
from cdir.core.errors import CdirError
from cdir.core.io import write_text
from cdir.core.lock import exclusive
from cdir.core.signals import loader_worker, shielded
from encoders.engine.config import Config, run_dir
from encoders.engine.optim import apply_config, build_optimizer, build_scheduler

# monitor(encoder, device) -> metrics, e.g. {"knn_top1": ..., "p1": ...}
Monitor = Callable[[nn.Module, torch.device], dict[str, float]]


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
    rank: int = 0  # this process's rank (0: the one that wrote the files)
    state: dict[str, Any] = field(default_factory=dict)  # a subclass's extra checkpoint state


def train(
    cfg: Config,
    resume: str | os.PathLike | dict | None = None,
    stop_at: int | None = None,
    monitor: Monitor | None = None,
    force: bool = False,
    *,
    run: Callable[..., Run],
) -> TrainResult:
    """Train with the run ``run`` builds, or resume it from a checkpoint (path or loaded dict).

    ``stop_at`` ends the call after that many epochs in total, as an interruption would (for
    chunked jobs and for the resume test). ``monitor`` (see the module docstring) is only called
    on the main process. Without ``resume``, an output folder that holds a run is refused, or
    with ``force`` its files are moved aside first. ``run(cfg, dist, resume, monitor)`` builds
    the run object: a :class:`Run` subclass (its class, or a function that adds more state)."""
    out = run_dir(cfg)
    if force and resume is not None:
        raise CdirError("--force starts the run over; it does not go with --resume")
    with exclusive(out / "train.lock", f"training into {out}"):  # rank 0 for all ranks
        if resume is None and launch_rank() == 0:
            _claim(out, force)
        d = setup_distributed(cfg.train.device, cfg.train.backend, flag="--set train.device")
        _set_threads(cfg, d)
        try:
            return run(cfg, d, resume, monitor).run(stop_at)
        finally:
            teardown(d)


# what a run writes into its folder (train.lock aside); RUN_MARKS: "a run is here"
RUN_MARKS = ("latest.pt", "checkpoint_*.pt", "encoder.pt", "metrics.jsonl")
RUN_FILES = (*RUN_MARKS, "config.yaml", "skipped.txt", "tb")


def _claim(out: Path, force: bool) -> None:
    """Make ``out`` ready for a fresh run: refuse one that holds a run, unless ``force``, which
    moves the run's files into ``out/replaced-<time>/`` (and says so)."""
    found = sorted({p for pattern in RUN_FILES for p in out.glob(pattern)})
    if not any(p.match(pattern) for p in found for pattern in RUN_MARKS):
        return  # nothing to keep (at most what a run killed in its first epoch wrote)
    if not force:
        latest = out / "latest.pt"
        ckpts = sorted(out.glob("checkpoint_*.pt"))
        how = ("--resume auto" if latest.exists()
               else f"--resume {ckpts[-1]}" if ckpts else None)
        cont = f"continue it with {how}, or " if how else ""
        raise CdirError(f"{out} already holds a training run ({_describe(out)}): {cont}start "
                        "over with --force (which moves its files aside)")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    dest = out / f"replaced-{stamp}"
    n = 1
    while dest.exists():
        n += 1
        dest = out / f"replaced-{stamp}-{n}"
    dest.mkdir()
    for p in found:
        p.rename(dest / p.name)
    print(f"--force: moved the previous run's files ({', '.join(p.name for p in found)}) to "
          f"{dest}; delete that folder when it is no longer needed", file=sys.stderr)


def _describe(out: Path) -> str:
    """What a run folder holds, in a few words: its files and its last epoch."""
    names = [n for n in ("latest.pt", "encoder.pt") if (out / n).exists()]
    ckpts = len(list(out.glob("checkpoint_*.pt")))
    if ckpts:
        names.append(f"{ckpts} checkpoint_*.pt")
    metrics = out / "metrics.jsonl"
    if metrics.exists():
        lines = [ln for ln in metrics.read_text(encoding="utf-8").splitlines() if ln.strip()]
        try:
            names.append(f"metrics.jsonl up to epoch {json.loads(lines[-1])['epoch']}"
                         if lines else "metrics.jsonl")
        except (ValueError, KeyError, TypeError):
            names.append("metrics.jsonl")
    return ", ".join(names)


class Run:
    """The state of one training call: model, data, optimiser, outputs; :meth:`run` is the loop.

    A trainer subclasses it and fills in the hooks (public methods with no underscore):
    :meth:`make_model` and :meth:`make_dataset` (required), then as needed
    :meth:`fresh_start`, :meth:`before_epoch`, :meth:`forward`, :meth:`bad_paths`,
    :meth:`epoch_record`, :meth:`end_epoch`, :meth:`extra_state` / :meth:`restore_extra` and
    :meth:`export`. A subclass with more state sets it before calling ``super().__init__``,
    which builds everything (the hooks run from there).

    The model (``make_model``) has ``encoder_prefix`` (the ``state_dict`` prefix of the weights
    that are exported), ``set_epoch(epoch)``, and ``forward`` returning a dict with a
    differentiable scalar ``"loss"`` and detached scalar logs; ``encoder_arch``
    (``{"name", "kwargs"}`` of its backbone) when it has one.
    """

    def __init__(self, cfg: Config, d: Dist, resume: str | os.PathLike | dict | None,
                 monitor: Monitor | None) -> None:
        from encoders.engine.checkpoint import load_checkpoint

        self.cfg, self.d = cfg, d
        o = cfg.optim
        if not cfg.data.path:
            raise CdirError("no training data: pass --data DIR (or set data.path in the recipe)")
        if o.batch_size % d.world:
            raise CdirError(f"batch size {o.batch_size} is not divisible by {d.world} processes")
        self.per_rank = o.batch_size // d.world
        self.stop_early = False  # set by a before_epoch hook: no more epochs
        self.out = run_dir(cfg)
        self.latest = self.out / "latest.pt"
        self.monitor = monitor if d.main else None

        ckpt = resume if isinstance(resume, dict) or resume is None else load_checkpoint(resume)
        if ckpt is not None and ckpt.get("method") != cfg.method:
            raise CdirError(
                f"{resume} was trained with {ckpt.get('method')!r}, not {cfg.method!r}: "
                f"use `cdir train {ckpt.get('method')} --resume ...`"
            )
        self._build(ckpt)

    def _build(self, ckpt: dict | None) -> None:
        cfg, d, o, t = self.cfg, self.d, self.cfg.optim, self.cfg.train
        # identical initial weights on every rank (DDP also broadcasts rank 0's at wrap time)
        _seed_all(t.seed)
        model = self.make_model().to(d.device)
        if t.channels_last and d.device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        self.encoder_arch = dict(getattr(model, "encoder_arch", None) or {
            "name": cfg.model.backbone, "kwargs": dict(cfg.model.backbone_kwargs)})
        _seed_all(t.seed + d.rank)  # different augmentation draws per rank

        # data: the order depends only on (seed, epoch)
        self.dataset = self.make_dataset(model)
        # one process too: its order is randperm(n) seeded by seed + epoch, so a run resumed at
        # epoch e replays the order the uninterrupted run used
        self.sampler: Any = torch.utils.data.DistributedSampler(
            self.dataset, num_replicas=d.world, rank=d.rank, shuffle=True, seed=t.seed,
            drop_last=True,
        )
        spe = (len(self.dataset) // d.world) // self.per_rank
        if t.max_steps_per_epoch:
            spe = min(spe, t.max_steps_per_epoch)
        if spe < 1:
            raise CdirError(f"{len(self.dataset)} images is less than one batch of "
                            f"{o.batch_size}; lower --batch-size")
        self.steps_per_epoch = spe

        self.optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], o)
        self.scheduler = build_scheduler(self.optimizer, spe, o)
        self.amp_on, self.amp_dtype = _amp_setup(t.amp, d.device)
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_on and self.amp_dtype == torch.float16)
        self.model = model
        self.start_epoch, self.step = 0, 0
        if ckpt is not None:
            self._restore(ckpt)
        else:
            self.fresh_start()

        self.net: nn.Module = model
        if d.world > 1:
            # Buffers are synced once at wrap time (same queue and BN statistics everywhere), not
            # on every forward: each rank enqueues the same all-gathered keys, so the queues stay
            # equal without shipping 65536 x 128 floats per step.
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
                **_no_forward_buffer_sync(),
            )

    # hooks ---------------------------------------------------------------------------------
    def make_model(self) -> nn.Module:
        """The module to train (see the class docstring for what the loop asks of it); built
        once, on every rank, after the seed is set."""
        raise NotImplementedError(f"{type(self).__name__} builds no model")

    def make_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        """The training set: items ``(views, index, ok)``, ``ok`` False for an unreadable
        image. Sets ``self.paths`` when the default :meth:`bad_paths` is to name them."""
        raise NotImplementedError(f"{type(self).__name__} has no training data")

    def fresh_start(self) -> None:
        """Called after the model and optimiser are built when no checkpoint is resumed; by
        default loads ``model.init`` into the model's backbones (:func:`load_init`)."""
        from encoders.engine.checkpoint import load_init

        if self.cfg.model.init:
            load_init(self.model, self.cfg.model.init)

    def before_epoch(self, epoch: int) -> None:
        """Called on every rank before the data of ``epoch`` (0-based) is loaded. Setting
        ``self.stop_early = True`` here (on every rank alike) ends training before that epoch;
        the run then exports as if it had finished."""

    def forward(self, views: list[torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model on one batch (under autocast): ``{"loss": ..., other scalar logs}``;
        ``idx`` holds the batch's dataset indices (for models that look rows up)."""
        return self.net(views)

    def bad_paths(self, idx: torch.Tensor, ok: torch.Tensor) -> list[str]:
        """The names of the unreadable images of a batch (``ok`` False), for ``skipped.txt``."""
        return [self.paths[j] for j in idx[~ok].tolist()]

    def epoch_record(self, done: int) -> dict[str, Any]:
        """More entries for the metrics line of epoch ``done`` (1-based); runs on every rank."""
        return {}

    def extra_state(self) -> dict[str, Any]:
        """More entries for the training checkpoint (restored by :meth:`restore_extra`)."""
        return {}

    def restore_extra(self, ckpt: dict) -> None:
        """Restore what :meth:`extra_state` saved, from a resumed checkpoint."""

    def export(self, out_path: Path) -> Path:
        """After the last epoch, on the main process: write the run's product (by default the
        encoder-only file of ``latest.pt`` at ``out_path``) and return its path."""
        from encoders.engine.checkpoint import export_encoder

        return export_encoder(self.latest, out_path)

    def _restore(self, ckpt: dict) -> None:
        from encoders.engine.checkpoint import restore_run_rng_state

        o = self.cfg.optim
        saved_opt = (ckpt.get("config") or {}).get("optim", {}).get("optimizer", "sgd")
        if saved_opt != o.optimizer:
            raise CdirError(f"the checkpoint was trained with {saved_opt}, the config says "
                            f"{o.optimizer}; the optimizer cannot change on resume")
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if ckpt.get("scaler"):
            self.scaler.load_state_dict(ckpt["scaler"])
        self.start_epoch, self.step = int(ckpt["epoch"]), int(ckpt["step"])
        apply_config(self.optimizer, self.scheduler, self.step, self.steps_per_epoch, o)
        restore_run_rng_state(ckpt["rng"])
        self.restore_extra(ckpt)
        saved_spe = ckpt.get("steps_per_epoch")
        if saved_spe and saved_spe != self.steps_per_epoch:
            print(f"warning: {self.steps_per_epoch} steps per epoch now, {saved_spe} in the "
                  "checkpoint (different data or batch size); the schedule shifts",
                  file=sys.stderr)

    # the loop ---------------------------------------------------------------------------------
    def run(self, stop_at: int | None) -> TrainResult:
        cfg, d, o = self.cfg, self.d, self.cfg.optim
        self.writer = None
        if d.main:
            import yaml

            self.out.mkdir(parents=True, exist_ok=True)
            write_text(self.out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: TensorBoard drops the events at or after it that an interrupted
            # attempt left (also at step 0: a run killed in its first epoch)
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.step)
            if self.start_epoch:
                _truncate_metrics(self.out / "metrics.jsonl", self.start_epoch)

        end_epoch = o.epochs if stop_at is None else min(o.epochs, stop_at)
        self.losses: list[float] = []
        self.epoch_losses: list[float] = []
        self.monitor_hist: list[dict[str, Any]] = []
        self.skipped: set[str] = set()
        self.rates: list[float] = []
        self.saved = 0  # the epoch this call last wrote to latest.pt (0: none yet)
        try:
            for epoch in range(self.start_epoch, end_epoch):
                done = self._epoch(epoch)
                if done is None:  # a hook ended training before this epoch
                    end_epoch = epoch
                    break
                self.end_epoch(epoch + 1, *done)
                barrier()
        except KeyboardInterrupt:
            if d.main:
                if self.saved:
                    kept = f"{self.latest} holds epoch {self.saved}: continue with --resume auto"
                elif self.latest.exists():
                    kept = f"{self.latest} is as it was"
                else:
                    kept = "no epoch had finished, so there is nothing to resume"
                print(f"{cfg.method}: interrupted in epoch {(self.saved or self.start_epoch) + 1}"
                      f"; {kept}", file=sys.stderr)
            raise
        finally:
            if self.writer is not None:
                self.writer.close()

        encoder_path = None
        if d.main:
            if (end_epoch >= o.epochs or self.stop_early) and self.latest.exists():
                encoder_path = self.export(self.out / "encoder.pt")
        return TrainResult(
            out=self.out, epochs_done=end_epoch, steps=self.step, losses=self.losses,
            epoch_losses=self.epoch_losses, latest=self.latest, encoder=encoder_path,
            monitor=self.monitor_hist, images_per_s=sum(self.rates) / max(len(self.rates), 1),
            skipped=sorted(self.skipped), rank=d.rank, state=self.extra_state(),
        )

    def _epoch(self, epoch: int) -> tuple[torch.Tensor, float] | None:
        """One epoch of optimizer steps: (per-step losses on CPU, seconds); None when
        ``before_epoch`` ended training."""
        cfg, d, o, t = self.cfg, self.d, self.cfg.optim, self.cfg.train
        self.model.set_epoch(epoch)
        self.before_epoch(epoch)
        if self.stop_early:
            return None
        self.model.train()
        self.sampler.set_epoch(epoch)
        gen = torch.Generator()
        gen.manual_seed((t.seed * 1_000_003 + epoch) * 1_009 + d.rank)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.per_rank, sampler=self.sampler,
            num_workers=cfg.data.workers, drop_last=True, pin_memory=d.device.type == "cuda",
            generator=gen, persistent_workers=False,
            worker_init_fn=loader_worker,  # SIGTERM to the whole job: the main process stops
        )
        bar = None
        if d.main and t.progress:
            from tqdm import tqdm

            bar = tqdm(total=self.steps_per_epoch * o.batch_size, unit="img", file=sys.stderr,
                       desc=f"{cfg.method} {epoch + 1}/{o.epochs}", leave=False)
        ep_losses: list[torch.Tensor] = []
        pending: list[torch.Tensor] = []
        t0 = time.perf_counter()
        for i, (views, idx, ok) in enumerate(loader):
            if i >= self.steps_per_epoch:
                break
            if not bool(ok.all()):
                self.skipped.update(self.bad_paths(idx, ok))
            res = self._step(views, idx)
            loss = res["loss"].detach()
            ep_losses.append(loss)
            pending.append(loss)
            if bar is not None:
                bar.update(o.batch_size)
            if self.step % t.log_every == 0 or i == self.steps_per_epoch - 1:
                self._log(torch.stack(pending), res, epoch, bar)
                pending = []
        elapsed = time.perf_counter() - t0
        if bar is not None:
            bar.close()
        return torch.stack(ep_losses).float().cpu(), elapsed

    def _step(self, views: list[torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        d = self.d
        views = [v.to(d.device, non_blocking=True) for v in views]
        if self.cfg.train.channels_last and d.device.type == "cuda":
            views = [v.contiguous(memory_format=torch.channels_last) for v in views]
        with torch.autocast(d.device.type, dtype=self.amp_dtype, enabled=self.amp_on):
            res = self.forward(views, idx)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(res["loss"]).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return res

    def _log(self, pending: torch.Tensor, res: dict[str, torch.Tensor], epoch: int,
             bar: Any) -> None:
        mean = float(pending.float().mean())
        lr = self.optimizer.param_groups[0]["lr"]
        if not math.isfinite(mean):
            raise CdirError(
                f"the loss became {mean} at epoch {epoch + 1}, step {self.step}; lower "
                f"optim.lr (now {self.cfg.optim.lr}) or use --set train.amp=none; resume from "
                f"{self.latest} if it exists"
            )
        if self.writer is not None:
            self.writer.add_scalar("train/loss", mean, self.step)
            self.writer.add_scalar("train/lr", lr, self.step)
            for k, v in res.items():
                if k != "loss" and isinstance(v, torch.Tensor) and v.numel() == 1:
                    self.writer.add_scalar(f"train/{k}", float(v.detach()), self.step)
        if bar is not None:
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{lr:.4g}")

    def end_epoch(self, done: int, ep: torch.Tensor, elapsed: float) -> None:
        """After epoch ``done`` (1-based), on every rank: statistics over all ranks, the
        monitor, the checkpoints and the metrics line. A hook too: a subclass may do more first
        (and then call this)."""
        from encoders.engine.checkpoint import run_rng_state, save_checkpoint

        cfg, d, o, t = self.cfg, self.d, self.cfg.optim, self.cfg.train
        self.losses += ep.tolist()
        ep_mean = mean_over_ranks(float(ep.mean()), d.device)
        if d.world > 1:
            self.skipped = set().union(*map(set, all_gather_object(sorted(self.skipped))))
        self.epoch_losses.append(ep_mean)
        rate = len(ep) * o.batch_size / max(elapsed, 1e-9)
        self.rates.append(rate)
        lr = self.optimizer.param_groups[0]["lr"]
        record: dict[str, Any] = {"epoch": done, "step": self.step, "loss": ep_mean, "lr": lr,
                                  "img_per_s": rate, "seconds": elapsed}
        record.update(self.epoch_record(done))
        if self.monitor is not None and (done % max(cfg.monitor.every, 1) == 0
                                         or done == o.epochs):
            mres = self.run_monitor()
            record.update({f"monitor_{k}": v for k, v in mres.items()})
            self.monitor_hist.append({"epoch": done, **mres})
            for k, v in mres.items():
                self.writer.add_scalar(f"monitor/{k}", v, done)
        rng = run_rng_state()  # collective under DDP: every rank takes part
        if not d.main:
            return
        with shielded():  # latest.pt and its metrics line land together, or neither
            self.writer.add_scalar("epoch/loss", ep_mean, done)
            self.writer.add_scalar("epoch/img_per_s", rate, done)
            state = {
                "version": 1, "method": cfg.method, "config": cfg.to_dict(),
                "encoder_arch": self.encoder_arch, "encoder_prefix": self.model.encoder_prefix,
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(),
                "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                "epoch": done, "step": self.step, "steps_per_epoch": self.steps_per_epoch,
                "rng": rng, **self.extra_state(),
                "meta": {"git_sha": _git_sha(), "torch": str(torch.__version__),
                         "world_size": d.world, "time": time.time()},
            }
            save_checkpoint(self.latest, state)
            if t.save_every and done % t.save_every == 0:
                save_checkpoint(self.out / f"checkpoint_{done:04d}.pt", state)
                _prune(self.out, t.keep_checkpoints)
            del state
            with open(self.out / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.skipped:
                write_text(self.out / "skipped.txt", "\n".join(sorted(self.skipped)) + "\n")
            self.saved = done
        mon = "".join(f" {k[8:]} {v:.4g}" for k, v in record.items() if k.startswith("monitor_"))
        print(f"{cfg.method} epoch {done}/{o.epochs}: loss {ep_mean:.4f} lr {lr:.4g} "
              f"{rate:.0f} img/s{mon}", file=sys.stderr)


    def monitored(self) -> nn.Module:
        """The module the monitor scores (a hook): the encoder that is exported."""
        return _encoder_of(self.model)

    def run_monitor(self) -> dict[str, float]:
        """The monitor's figures for :meth:`monitored`, drawn on a random stream of its own: the
        generators are put back as they were, so a run with the monitor draws what one without
        it draws (e.g. a DataLoader takes its base seed from the global stream)."""
        from encoders.engine.checkpoint import rng_state, set_rng_state

        before = rng_state()
        try:
            return self.monitor(self.monitored(), self.d.device)
        finally:
            set_rng_state(before)


# --------------------------------------------------------------------------------------------
# helpers of the loop


def _encoder_of(model: nn.Module) -> nn.Module:
    return model.get_submodule(model.encoder_prefix.rstrip("."))


def _amp_setup(amp: str, device: torch.device) -> tuple[bool, torch.dtype]:
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


def _seed_all(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


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
