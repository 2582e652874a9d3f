"""``ckpt:PATH?features=head``: the momentum encoder and its projection head as features (what
UCDIR and ProtoOT evaluate)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from cdir.core.errors import CdirError

torch.set_num_threads(1)

ARCH = {"name": "cifar_resnet18", "kwargs": {"width": 0.25}}
METHOD_KWARGS = {"moco": {"queue_size": 32, "dim": 16}, "isd_plus": {"queue_size": 32}}


def _images() -> list[Image.Image]:
    return [Image.new("RGB", (40, 36), c) for c in ((200, 30, 30), (30, 30, 200), (90, 160, 40))]


def _train_checkpoint(tmp_path: Path, method_name: str) -> tuple[Path, torch.nn.Module]:
    """A full `cdir train`-style checkpoint whose momentum branch differs from the query one."""
    from encoders.engine.checkpoint import save_checkpoint
    from encoders.ssl.plugin import build_method

    torch.manual_seed(0)
    kw = METHOD_KWARGS[method_name]
    method = build_method(method_name, ARCH["name"], dict(ARCH["kwargs"]), **kw)
    head = method.head_k if hasattr(method, "head_k") else method.proj_k
    with torch.no_grad():  # so that using the query branch by mistake would show
        for p in [*method.encoder_k.parameters(), *head.parameters()]:
            p.add_(0.05 * torch.randn_like(p))
    ckpt = {"version": 1, "method": method_name, "encoder_arch": ARCH,
            "encoder_prefix": method.encoder_prefix,
            "config": {"method_kwargs": kw, "aug": {"size": 32, "eval_resize": 1.0}},
            "model": method.state_dict(), "epoch": 1}
    path = save_checkpoint(tmp_path / method_name / "latest.pt", ckpt)
    return path, method.eval()


@pytest.mark.parametrize(("method_name", "dim"), [("moco", 16), ("isd_plus", 32)])
def test_features_head_is_the_momentum_encoder_and_its_head(tmp_path: Path, method_name: str,
                                                            dim: int) -> None:
    from encoders.image import load_image_encoder

    path, method = _train_checkpoint(tmp_path, method_name)
    enc = load_image_encoder(f"ckpt:{path}?features=head", device="cpu")
    assert enc.dim == dim  # the head's output, not the 128-wide backbone
    batch = torch.stack([enc.transform(im) for im in _images()])
    got = enc.encode(batch)
    head = method.head_k if hasattr(method, "head_k") else method.proj_k
    with torch.no_grad():
        want = torch.nn.functional.normalize(head(method.encoder_k(batch)), dim=1)
    assert got.shape == (3, dim)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(3))
    # the default is still the backbone, and the two specs differ (caches keyed apart)
    plain = load_image_encoder(f"ckpt:{path}", device="cpu")
    assert plain.dim == 128 and plain.spec != enc.spec


def test_features_head_needs_a_full_checkpoint(tmp_path: Path) -> None:
    from encoders.engine.checkpoint import export_encoder
    from encoders.image import load_image_encoder

    path, _ = _train_checkpoint(tmp_path, "moco")
    exported = export_encoder(path, tmp_path / "encoder.pt")
    with pytest.raises(CdirError, match="exported encoder.*full training checkpoint") as e:
        load_image_encoder(f"ckpt:{exported}?features=head", device="cpu")
    assert "\n" not in str(e.value)
    with pytest.raises(CdirError, match="features must be backbone or head"):
        load_image_encoder(f"ckpt:{path}?features=proj", device="cpu")


def test_features_head_of_a_reference_moco_checkpoint(tmp_path: Path) -> None:
    """A reference MoCo v2 checkpoint: ``module.encoder_k.*`` with the MLP ``fc`` head."""
    import torchvision

    from encoders.image import load_image_encoder

    torch.manual_seed(0)
    k = torchvision.models.resnet18(weights=None, num_classes=24)
    k.fc = torch.nn.Sequential(torch.nn.Linear(512, 512), torch.nn.ReLU(), k.fc)
    k.eval()
    sd = {f"module.encoder_k.{n}": v for n, v in k.state_dict().items()}
    sd.update({f"module.encoder_q.{n}": v + 1 for n, v in k.state_dict().items()})
    torch.save({"arch": "resnet18", "state_dict": sd}, tmp_path / "moco.pth.tar")
    enc = load_image_encoder(f"ckpt:{tmp_path / 'moco.pth.tar'}?features=head&size=64",
                             device="cpu")
    assert enc.dim == 24
    batch = torch.stack([enc.transform(im) for im in _images()])
    with torch.no_grad():
        want = torch.nn.functional.normalize(k(batch), dim=1)
    torch.testing.assert_close(enc.encode(batch), want, rtol=1e-4, atol=1e-5)
