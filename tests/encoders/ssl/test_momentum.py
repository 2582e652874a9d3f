"""The momentum encoder and its projection head read back from a checkpoint
(``ckpt:PATH?features=head``): of a run of this project (any family's backbone method) and of a
reference MoCo checkpoint; an exported encoder is refused."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cdir.core.errors import CdirError
from encoders.engine.checkpoint import export_encoder, save_checkpoint
from encoders.ssl.momentum import load_momentum_head
from encoders.ssl.plugin import build_method

ARCH = {"name": "cifar_resnet18", "kwargs": {"width": 0.125}}


@pytest.mark.parametrize(("method", "kw", "head"), [
    ("moco", {"queue_size": 16, "dim": 8}, "head_k"),
    ("ucdir", {"dim": 8, "num_cluster": 3}, "head_k"),
])
def test_a_run_checkpoint_gives_its_momentum_head(tmp_path: Path, method: str, kw: dict,
                                                 head: str) -> None:
    torch.manual_seed(0)
    model = build_method(method, ARCH["name"], dict(ARCH["kwargs"]), **kw)
    with torch.no_grad():  # the momentum side differs from the online side
        for p in model.encoder_k.parameters():
            p.add_(0.5)
    path = save_checkpoint(tmp_path / "latest.pt", {
        "version": 1, "method": method, "encoder_arch": ARCH, "encoder_prefix": "encoder_q.",
        "config": {"method_kwargs": kw, "aug": {"size": 32}}, "model": model.state_dict()})
    net, dim = load_momentum_head(path)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        want = getattr(model, head)(model.encoder_k(x))
        assert dim == 8 and torch.allclose(net(x), want, atol=1e-5)

    with pytest.raises(CdirError, match="exported encoder"):
        load_momentum_head(export_encoder(path, tmp_path / "encoder.pt"))


def test_a_reference_moco_checkpoint_gives_its_momentum_head(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_method("moco", ARCH["name"], dict(ARCH["kwargs"]), queue_size=16, dim=8)
    sd = {f"module.encoder_k.{k}": v for k, v in model.encoder_k.state_dict().items()}
    sd.update({f"module.encoder_k.fc.{k}": v for k, v in model.head_k.state_dict().items()})
    path = tmp_path / "ref.pth.tar"
    torch.save({"state_dict": sd, "arch": "resnet18"}, path)
    net, dim = load_momentum_head(path)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        assert dim == 8 and torch.allclose(net(x), model.head_k(model.encoder_k(x)), atol=1e-5)
