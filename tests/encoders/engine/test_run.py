"""The engine's loop driven through its public hooks by a run that belongs to no family: the
hooks are called where the loop promises, and a run stopped after an epoch resumes exactly."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from encoders.engine.checkpoint import load_checkpoint
from encoders.engine.config import Config
from encoders.engine.run import Run, train

N = 24


class _Toy(nn.Module):
    encoder_prefix = "net."

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Linear(4, 2)
        self.epochs: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def forward(self, views: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"loss": self.net(views[0]).pow(2).mean()}


class _Items(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int, bool]:
        x = torch.randn(4)  # drawn from the generator the loop seeds per epoch
        return [x], i, i != 5  # item 5 stands for an unreadable image


class ToyRun(Run):
    def __init__(self, *args: Any) -> None:
        self.calls: list[str] = []
        self.rounds = 0
        super().__init__(*args)

    def make_model(self) -> nn.Module:
        self.calls.append("make_model")
        return _Toy()

    def make_dataset(self, model: nn.Module) -> torch.utils.data.Dataset:
        self.calls.append("make_dataset")
        self.paths = [f"img{i}" for i in range(N)]
        return _Items()

    def fresh_start(self) -> None:
        self.calls.append("fresh_start")

    def before_epoch(self, epoch: int) -> None:
        self.calls.append(f"before_epoch {epoch}")
        self.rounds += 1

    def forward(self, views: list[torch.Tensor], idx: torch.Tensor) -> dict[str, torch.Tensor]:
        assert idx.shape == (views[0].shape[0],)
        return super().forward(views, idx)

    def epoch_record(self, done: int) -> dict[str, Any]:
        return {"rounds": self.rounds}

    def extra_state(self) -> dict[str, Any]:
        return {"toy": {"rounds": self.rounds}}

    def restore_extra(self, ckpt: dict) -> None:
        self.calls.append("restore_extra")
        self.rounds = ckpt["toy"]["rounds"]

    def export(self, out_path: Path) -> Path:
        path = self.out / "toy.txt"
        path.write_text(str(self.rounds))
        return path


def _cfg(out: Path) -> Config:
    return Config.from_dict({
        "method": "toy", "data": {"path": str(out), "workers": 0},
        "optim": {"epochs": 3, "batch_size": 8, "optimizer": "sgd", "lr": 0.1},
        "train": {"out": str(out), "device": "cpu", "amp": "none", "progress": False,
                  "save_every": 0, "log_every": 1, "threads": 1},
    })


def test_the_loop_calls_the_hooks_and_resumes(tmp_path: Path) -> None:
    runs: list[ToyRun] = []

    def make(*args: Any) -> ToyRun:
        runs.append(ToyRun(*args))
        return runs[-1]

    full = train(_cfg(tmp_path / "a"), run=make)
    assert runs[0].calls == ["make_model", "make_dataset", "fresh_start", "before_epoch 0",
                             "before_epoch 1", "before_epoch 2"]
    assert full.encoder == tmp_path / "a" / "toy.txt" and full.encoder.read_text() == "3"
    assert full.skipped == ["img5"] and full.state == {"toy": {"rounds": 3}}
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(ln)["rounds"] for ln in lines] == [1, 2, 3]
    assert load_checkpoint(tmp_path / "a" / "latest.pt")["toy"] == {"rounds": 3}

    part = train(_cfg(tmp_path / "b"), stop_at=1, run=make)
    assert part.epochs_done == 1 and part.encoder is None
    rest = train(_cfg(tmp_path / "b"), resume=tmp_path / "b" / "latest.pt", run=make)
    assert runs[2].calls[:3] == ["make_model", "make_dataset", "restore_extra"]
    assert "fresh_start" not in runs[2].calls and rest.state == {"toy": {"rounds": 3}}
    assert part.losses + rest.losses == full.losses  # the uninterrupted run's steps, exactly
