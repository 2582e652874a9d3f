"""The training loop of `cdir adapt`: the pretraining run (:class:`encoders.ssl.trainer.SSLRun`)
plus rounds of label-free cross-domain mining and label-free model selection.

Every ``round_epochs`` epochs (and before the first), on every rank:
  embed every image with the current backbone (eval transform; each rank a share, gathered) ->
  ``prepare`` (the caller's per-domain normalisation, e.g. whitening) -> mine cross-domain pairs
  (:func:`encoders.adapt.mining.mine`: matcher, cycle check, confidence) -> groups -> the
  method's tables and the dataset's partners.
The mining statistics of each round are the label-free selection criterion
(``selection_key``, default the mean mutual-NN rate), measured on the features the method is
scored with (its ``retrieval()``, e.g. UCDIR's momentum head): the encoder with the best value,
measured at each round's start and after the last epoch, is exported as ``encoder.pt``
(``encoder_last.pt`` is the last epoch's; ``best.pt`` the chosen full checkpoint when the scored
features include a head). The monitor scores those features too. Labels are read only by the
optional ``report`` callable and the monitor, whose figures go to the log, never into a choice.

Training data: a manifest (``data.path``, .parquet/.csv) with ``path`` and ``domain`` columns
(a workspace's manifest.parquet); ``model.init`` is the encoder to start from.
Outputs, checkpoints and resume: as for pretraining; a checkpoint also holds the groups (model
buffers) and the selection state, so a resumed run repeats the uninterrupted one's steps.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cdir.core.dist import all_gather_object
from cdir.core.errors import CdirError
from cdir.core.images import ImageList
from encoders.adapt.groups import PairedImages, components, group_stats
from encoders.adapt.mining import MATCHERS, Pairs, mine
from encoders.adapt.quality import estimate_precision
from encoders.engine.config import Config
from encoders.engine.run import Monitor, Run, TrainResult, train
from encoders.ssl.trainer import SSLRun

# prepare(features, domain names) -> rows to mine on (normalised, L2)
Prepare = Callable[[np.ndarray, np.ndarray], np.ndarray]
# report(pairs, groups) -> figures for the log (may read labels: reports only)
Report = Callable[[Pairs, np.ndarray], dict[str, float]]

SELECTION_KEYS = {"mutual_nn_rate": "higher", "cycle_rate": "higher", "hubness": "lower"}
DEFAULT_SELECTION = "mutual_nn_rate"
MIN_DOMAIN_IMAGES = 10
# one-to-one matchers assume domains of comparable size
MAX_ONE_TO_ONE_RATIO = 2.0


def adapt(
    cfg: Config,
    prepare: Prepare,
    resume: str | os.PathLike | dict | None = None,
    stop_at: int | None = None,
    monitor: Monitor | None = None,
    report: Report | None = None,
    force: bool = False,
    selection: str = DEFAULT_SELECTION,
) -> TrainResult:
    """Adapt (or resume adapting) an encoder; arguments as :func:`encoders.ssl.trainer.pretrain`,
    plus ``prepare``, ``report`` and ``selection`` (module docstring)."""
    if selection not in SELECTION_KEYS:
        raise CdirError(f"unknown selection criterion {selection!r}; choose one of "
                        f"{', '.join(SELECTION_KEYS)}")

    def make(cfg: Config, d: Any, resume: Any, monitor: Monitor | None) -> Run:
        return _AdaptRun(cfg, d, resume, monitor, prepare, report, selection)

    return train(cfg, resume=resume, stop_at=stop_at, monitor=monitor, force=force, run=make)


def read_domains(path: str | os.PathLike) -> tuple[list[str], np.ndarray, list[str]]:
    """(paths, domain code per image, domain names) of a manifest with a domain column;
    CdirError for data adaptation cannot use (one domain, a nearly empty one)."""
    from encoders.ssl.data import MANIFEST_SUFFIXES, read_manifest

    p = Path(path)
    if not (p.is_file() and p.suffix.lower() in MANIFEST_SUFFIXES):
        raise CdirError(f"adaptation needs a manifest with path and domain columns (a "
                        f"workspace's manifest.parquet), not {p}")
    df = read_manifest(p)
    if "domain" not in df.columns:
        raise CdirError(f"{p}: no 'domain' column; adaptation needs the domain of every image")
    names = sorted(set(df["domain"].astype(str)))
    if len(names) < 2:
        raise CdirError(f"{p}: one domain only ({names[0] if names else 'none'}); "
                        "cross-domain adaptation needs images of at least two domains")
    codes = np.searchsorted(names, df["domain"].astype(str).to_numpy())
    counts = np.bincount(codes, minlength=len(names))
    small = [f"{n} ({c})" for n, c in zip(names, counts, strict=True) if c < MIN_DOMAIN_IMAGES]
    if small:
        raise CdirError(f"{p}: domain(s) with fewer than {MIN_DOMAIN_IMAGES} images: "
                        f"{', '.join(small)}; drop them or add images")
    return list(df["path"]), codes.astype(np.int64), names


class _AdaptRun(SSLRun):
    def __init__(self, cfg: Config, d: Any, resume: Any, monitor: Monitor | None,
                 prepare: Prepare, report: Report | None, selection: str) -> None:
        self.prepare, self.report, self.selection = prepare, report, selection
        self.selection_state: dict[str, Any] = {"best": None, "best_epoch": None}
        self.round_record: dict[str, Any] = {}
        self.cache: tuple[torch.Tensor, np.ndarray] | None = None  # (eval-view maps, readable)
        super().__init__(cfg, d, resume, monitor)

    # setup ------------------------------------------------------------------------------------
    def make_model(self) -> nn.Module:
        model = super().make_model()
        if not getattr(model, "takes_index", False):
            raise CdirError(f"{self.cfg.method} is not an adaptation method")
        self.paths, codes, self.domain_names = read_domains(self.cfg.data.path)
        self.codes = codes
        counts = np.bincount(codes)
        ratio = counts.max() / counts.min()
        matcher = getattr(model.cfg, "matcher", None)  # methods that mine pairs (xdomain)
        if matcher is not None and matcher not in MATCHERS:
            raise CdirError(f"unknown matcher {matcher!r}; choose one of {', '.join(MATCHERS)}")
        if ratio > MAX_ONE_TO_ONE_RATIO and matcher not in (None, "mutual-nn"):
            raise CdirError(f"domain sizes differ {ratio:.1f}-fold ({self._sizes()}); the "
                            f"one-to-one matcher {matcher} needs comparable domains: use "
                            "--set method.matcher=mutual-nn")
        if ratio > 10 and self.d.main:
            print(f"note: domain sizes differ {ratio:.0f}-fold ({self._sizes()}); mutual "
                  "nearest neighbours still work, but the small domain bounds the pairs",
                  file=sys.stderr)
        model.set_domains(torch.from_numpy(codes), names=self.domain_names)
        return model

    def _sizes(self) -> str:
        counts = np.bincount(self.codes)
        return ", ".join(f"{n} {c}" for n, c in zip(self.domain_names, counts, strict=True))

    def make_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        from encoders.ssl.augment import build_view_transform

        transform = build_view_transform(self.cfg.aug.strong, self.cfg.aug)
        # methods without partners (UCDIR) get two views of the anchor
        return PairedImages(self.paths, self.codes, transform,
                            getattr(model.cfg, "partner_p", 0.0), getattr(model.cfg, "focus", 0.0))

    def fresh_start(self) -> None:
        if not self.cfg.model.init:
            raise CdirError("adaptation starts from an encoder: pass --encoder ckpt:PATH")
        super().fresh_start()

    def forward(self, views: list[torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net(views, idx)

    def bad_paths(self, idx: torch.Tensor, ok: torch.Tensor) -> list[str]:
        return [self.paths[j] for j in idx[~ok][:, 0].tolist()]

    def extra_state(self) -> dict[str, Any]:
        return {"selection": dict(self.selection_state), "scored": self.scored_spec()}

    def scored_spec(self) -> str:
        """The spec under which `cdir eval` scores the features the selection chose by: the
        chosen encoder with the method's options (``best.pt``, the chosen full checkpoint,
        when those features include a head)."""
        options = self.model.scored_options()
        name = "best.pt" if getattr(self.model, "keeps_heads", False) else "encoder.pt"
        return f"ckpt:{self.out / name}" + (f"?{options}" if options else "")

    def monitored(self) -> nn.Module:
        """The monitor scores the features that mining and the selection read."""
        return self.model.retrieval()

    def restore_extra(self, ckpt: dict) -> None:
        self.selection_state = dict(ckpt.get("selection") or self.selection_state)
        if hasattr(self.model, "group_of"):
            self.dataset.set_groups(self.model.group_of.cpu().numpy())

    # rounds -----------------------------------------------------------------------------------
    def before_epoch(self, epoch: int) -> None:
        self.round_record = {}
        if getattr(self.model, "split", None) is not None and self.cache is None:
            self._build_cache()
        if epoch % self.model.cfg.round_epochs == 0:
            feats = self._features()
            if hasattr(self.model, "set_groups"):
                self._mine(epoch, feats)
            else:
                self._select(epoch, feats)
        begin = getattr(self.model, "begin_epoch", None)
        if begin is not None:  # e.g. UCDIR: fill its memory bank, per-domain k-means
            logs = begin(epoch, self._embed_all) or {}
            self.round_record.update({f"method_{k}": v for k, v in logs.items()})

    def end_epoch(self, done: int, ep: torch.Tensor, elapsed: float) -> None:
        if done == self.cfg.optim.epochs:
            # the final encoder is a candidate too
            self._select(done, self._features())
        super().end_epoch(done, ep, elapsed)

    def epoch_record(self, done: int) -> dict[str, Any]:
        return dict(self.round_record)

    def _build_cache(self) -> None:
        """Maps of the frozen lower stages (encoders.adapt.cache); the dataset then serves them."""
        import time

        from encoders.adapt.cache import CachedPairs, build_cache
        from encoders.ssl.augment import build_eval_transform, build_view_transform

        cfg, kw = self.cfg, self.model.cfg
        t0 = time.perf_counter()
        aug, clean, ok = build_cache(
            self.model.split[0], self.paths, build_view_transform(cfg.aug.strong, cfg.aug),
            build_eval_transform(cfg.aug), kw.cache_views, cfg.aug.size, cfg.train.seed,
            cfg.data.workers, self.d.device, progress=cfg.train.progress and self.d.main)
        self.cache = (clean, ok)
        self.dataset = CachedPairs(aug, ok, self.codes, kw.partner_p, kw.focus)
        self.dataset.set_groups(self.model.group_of.cpu().numpy())
        if self.d.main:
            gb = (aug.numel() + clean.numel()) * 2 / 2**30
            print(f"{cfg.method}: cached {kw.cache_views} views of {len(ok)} images below "
                  f"{kw.freeze} ({gb:.2f} GB) in {time.perf_counter() - t0:.0f} s",
                  file=sys.stderr)

    def _features(self) -> np.ndarray:
        """Retrieval features of every image: the method's ``retrieval()`` at the eval transform
        (from the cached maps when the lower stages are frozen)."""
        if self.cache is None:
            return self._embed_all(self.model.retrieval())
        clean, ok = self.cache
        top = self.model.split[1]
        was = top.training
        top.eval()
        with torch.no_grad():
            feats = torch.cat([top(clean[s:s + 256].float().to(self.d.device)).float().cpu()
                               for s in range(0, len(clean), 256)]).numpy()
        top.train(was)
        feats[~ok] = np.nan
        return feats

    def _embed_all(self, module: nn.Module) -> np.ndarray:
        """``module``'s outputs for every image at the eval transform (rows in manifest order;
        NaN rows for unreadable images). Each rank embeds a share; every rank gets all rows."""
        from encoders.ssl.augment import build_eval_transform

        d = self.d
        transform = build_eval_transform(self.cfg.aug)
        rows = np.arange(d.rank, len(self.paths), d.world)
        size = self.cfg.aug.size
        loader = torch.utils.data.DataLoader(
            ImageList([self.paths[r] for r in rows], transform, (3, size, size), labels=rows),
            batch_size=256,
            num_workers=self.cfg.data.workers, generator=torch.Generator().manual_seed(0))
        was = module.training
        module.eval()
        parts, idxs = [], []
        with torch.no_grad():
            for x, row, ok in loader:
                z = module(x.to(d.device)).float().cpu().numpy()
                z[~ok.numpy()] = np.nan
                parts.append(z)
                idxs.append(row.numpy())
        module.train(was)
        mine_ = (np.concatenate(idxs), np.concatenate(parts))
        gathered = all_gather_object(mine_) if d.world > 1 else [mine_]
        feats = np.zeros((len(self.paths), gathered[0][1].shape[1]), np.float32)
        for r, z in gathered:
            feats[r] = z
        return feats

    def _mine(self, epoch: int, feats: np.ndarray) -> None:
        cfg = self.model.cfg
        good = ~np.isnan(feats).any(1)
        rows = np.flatnonzero(good)
        names = np.asarray(self.domain_names)[self.codes[rows]]
        x = self.prepare(feats[rows], names)
        res = mine(x, names, method=cfg.matcher, cycle=cfg.cycle, both_ways=cfg.both_ways,
                   quantile=cfg.quantile or None, min_confidence=cfg.min_confidence)
        pairs = res.pairs.remap(rows, rows)
        groups = components(len(self.paths), pairs.a, pairs.b)
        self.model.set_groups(torch.from_numpy(groups))
        self.dataset.set_groups(groups)
        if getattr(cfg, "soft_weight", 0):
            self._set_soft(feats, rows, x, names)
        rec = {f"mine_{k}": v for k, v in res.stats.items() if k != "per_pair"}
        # no pair kept: the estimate of the candidates the filters rejected still tells
        rec["mine_estimated_precision"] = estimate_precision(
            x, names, res.pairs if len(res.pairs) else None, res.maps)
        rec.update({f"mine_{k}": v for k, v in group_stats(groups, self.codes).items()})
        if self.report is not None and self.d.main:
            rec.update({f"report_{k}": v for k, v in self.report(pairs, groups).items()})
        self.round_record = rec
        self._select(epoch, feats)  # logs its value in this round's record
        if self.d.main:
            shown = " ".join(f"{k[5:]} {v:.4g}" for k, v in rec.items()
                             if isinstance(v, float | int) and k.startswith("mine_"))
            rep = " ".join(f"{k} {v:.4g}" for k, v in rec.items() if k.startswith("report_"))
            print(f"{self.cfg.method} round at epoch {epoch}: {shown}"
                  + (f" [labels, report only: {rep}]" if rep else ""), file=sys.stderr)
        self._guard(epoch, rec["mine_estimated_precision"])

    def _guard(self, epoch: int, estimate: float) -> None:
        """The pair-quality guard (``method.guard``): when this round's label-free precision
        estimate falls ``guard_drop`` below the best of the earlier rounds, or below
        ``guard_floor``, the run says so and, with ``stop``, trains no further: the next rounds
        would train on worse pairs. ``encoder.pt`` is then the best encoder so far by the
        selection criterion (the starting one is a candidate, so never a worse one)."""
        cfg = self.model.cfg
        guard = getattr(cfg, "guard", "off")
        st = self.selection_state
        best = st.get("estimate_best")
        if not math.isfinite(estimate):
            return
        if best is None or estimate > best:
            st["estimate_best"] = estimate
        fell = best is not None and estimate < best - cfg.guard_drop
        if not (fell or estimate < cfg.guard_floor):
            return
        why = (f"{cfg.guard_drop:g} below the best earlier round's {best:.3f}" if fell
               else f"below guard_floor {cfg.guard_floor:g}")
        if guard == "stop":
            self.stop_early = True
        if self.d.main:
            then = ("training stops here (method.guard=stop); encoder.pt: the best encoder "
                    f"so far by {self.selection}" if guard == "stop"
                    else "training goes on (method.guard=off)")
            print(f"{self.cfg.method}: the estimated precision of the mined pairs fell to "
                  f"{estimate:.3f} at epoch {epoch}, {why}: {then}", file=sys.stderr)

    def _set_soft(self, feats: np.ndarray, rows: np.ndarray, x: np.ndarray,
                  names: np.ndarray) -> None:
        """The round's neighbour targets (on the normalised rows ``x`` of the readable images
        ``rows``) and plain feature bank, for xdomain's soft loss."""
        from encoders.adapt.mining import soft_neighbours

        cfg = self.model.cfg
        near, w = soft_neighbours(x, names, cfg.soft_k, cfg.soft_teacher_t)
        idx = np.zeros((len(self.paths), near.shape[1]), np.int64)
        weight = np.zeros((len(self.paths), near.shape[1]), np.float32)
        idx[rows], weight[rows] = rows[near], w
        bank = np.zeros((len(self.paths), feats.shape[1]), np.float32)
        good = feats[rows]
        bank[rows] = good / np.maximum(np.linalg.norm(good, axis=1, keepdims=True), 1e-12)
        self.model.set_soft(torch.from_numpy(idx), torch.from_numpy(weight),
                            torch.from_numpy(bank).half())

    def _select(self, epoch: int, feats: np.ndarray) -> None:
        """Keep the encoder as ``best_encoder.pt`` when its criterion is the best so far. The
        value is logged in the record of the epoch it begins (``select_<criterion>``; the
        encoder after epoch e begins epoch e + 1), the final encoder's as
        ``select_final_<criterion>``. The criterion reads the rows as `cdir eval` scores them:
        unit vectors (as `cdir embed` stores them), then the run's normalisation (mining reads
        the raw rows, so its statistics may differ slightly)."""
        from encoders.adapt.mining import mining_stats
        from encoders.engine.checkpoint import export_encoder

        good = ~np.isnan(feats).any(1)
        names = np.asarray(self.domain_names)[self.codes[good]]
        unit = feats[good] / np.maximum(np.linalg.norm(feats[good], axis=1, keepdims=True),
                                        1e-12)
        value = float(mining_stats(self.prepare(unit, names), names)[self.selection])
        st = self.selection_state
        better = st["best"] is None or (
            value > st["best"] if SELECTION_KEYS[self.selection] == "higher"
            else value < st["best"])
        # each candidate logged under its own key: the final encoder's must not overwrite the
        # value of the round that began the last epoch
        final = epoch == self.cfg.optim.epochs
        self.round_record[f"select_{'final_' if final else ''}{self.selection}"] = value
        if not (math.isfinite(value) and better):
            return
        st.update(best=value, best_epoch=epoch)
        if self.d.main:
            ckpt = {"method": self.cfg.method, "config": self.cfg.to_dict(),
                    "encoder_arch": self.encoder_arch, "encoder_prefix": self.model.encoder_prefix,
                    "model": self.model.state_dict(), "epoch": epoch}
            export_encoder(ckpt, self.out / "best_encoder.pt")
            if getattr(self.model, "keeps_heads", False):
                from encoders.engine.checkpoint import save_checkpoint

                save_checkpoint(self.out / "best.pt", ckpt)

    def export(self, out_path: Path) -> Path:
        import shutil

        from cdir.core.io import atomic_path
        from encoders.engine.checkpoint import export_encoder

        last = export_encoder(self.latest, self.out / "encoder_last.pt")
        best = self.out / "best_encoder.pt"
        with atomic_path(out_path) as tmp:
            shutil.copyfile(best if best.exists() else last, tmp)
        st = self.selection_state
        print(f"{self.cfg.method}: encoder.pt is the encoder after epoch {st['best_epoch']} "
              f"(best {self.selection} {st['best']:.4g}, label-free); encoder_last.pt the last; "
              f"the features chosen by: {self.scored_spec()}", file=sys.stderr)
        return out_path
