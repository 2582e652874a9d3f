"""The distillation model zoo: names, shapes, feature dims, testbed key names, load_teacher."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from cdir.core.errors import CdirError
from encoders.zoo import (
    canonical_name,
    create_model,
    list_models,
    load_teacher,
    teacher_name_from_path,
)
from encoders.zoo.common import NetOutput

torch.set_num_threads(1)

# Feature dims: the spec's (resnet8x4/32x4 256, wrn_x_2 128, vgg 512, ShuffleV1 960, ShuffleV2
# 1024, MobileNetV2 1280, ResNet50 2048) and the narrow ones (64) and torchvision's.
FEAT_DIMS = {
    **{f"resnet{d}": 64 for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": 256, "resnet32x4": 256, "ResNet50": 2048,
    "wrn_16_1": 64, "wrn_40_1": 64, "wrn_16_2": 128, "wrn_40_2": 128,
    **{f"vgg{d}": 512 for d in (8, 11, 13, 16, 19)},
    "MobileNetV2": 1280, "ShuffleV1": 960, "ShuffleV2": 1024,
    "resnet18_imagenet": 512, "resnet34_imagenet": 512, "resnet50_imagenet": 2048,
}
# Parameter counts at 100 classes, measured on RepDistiller's own models (commit b84f547):
# a guard on every layer's shape.
PARAMS_100 = {
    "resnet8": 83892, "resnet14": 181108, "resnet20": 278324, "resnet32": 472756,
    "resnet44": 667188, "resnet56": 861620, "resnet110": 1736564, "resnet8x4": 1233540,
    "resnet32x4": 7433860, "ResNet50": 23705252, "wrn_16_1": 180916, "wrn_16_2": 703284,
    "wrn_40_1": 569780, "wrn_40_2": 2255156, "vgg8": 3965028, "vgg11": 9277284,
    "vgg13": 9462180, "vgg16": 14774436, "vgg19": 20086692, "MobileNetV2": 812836,
    "ShuffleV1": 949258, "ShuffleV2": 1355528,
}
# A few state-dict keys per family, as the testbed's teacher checkpoints spell them.
KEYS = {
    "resnet8x4": ["conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight",
                  "layer3.0.bn2.num_batches_tracked", "fc.weight"],
    "ResNet50": ["layer1.0.shortcut.0.weight", "layer4.2.bn3.weight", "linear.bias"],
    "wrn_40_2": ["conv1.weight", "block1.layer.0.convShortcut.weight",
                 "block3.layer.5.conv2.weight", "bn1.running_var", "fc.weight"],
    "vgg13": ["block0.0.weight", "block0.0.bias", "block0.4.running_mean", "block4.3.weight",
              "classifier.weight"],
    "MobileNetV2": ["conv1.0.weight", "conv1.1.weight", "blocks.0.0.conv.0.weight",
                    "blocks.6.0.conv.7.running_var", "conv2.0.weight", "classifier.0.weight"],
    "ShuffleV1": ["conv1.weight", "layer1.0.conv1.weight", "layer3.3.bn3.bias",
                  "linear.weight"],
    "ShuffleV2": ["layer1.0.conv5.weight", "layer1.3.conv3.weight", "conv2.weight",
                  "bn2.weight", "linear.weight"],
}


def test_list_models_is_the_testbed_zoo() -> None:
    assert set(list_models()) == set(FEAT_DIMS)
    assert canonical_name("mobile_half") == "MobileNetV2"  # RepDistiller's older name


@pytest.mark.parametrize("name", list(FEAT_DIMS))
def test_every_model_builds_and_returns_feat_and_logits(name: str) -> None:
    model = create_model(name, num_classes=10).eval()
    px = 64 if name.endswith("_imagenet") else 32
    with torch.no_grad():
        out = model(torch.randn(2, 3, px, px))
    assert isinstance(out, NetOutput)
    feat, logits = out
    assert model.feat_dim == FEAT_DIMS[name]
    assert feat.shape == (2, FEAT_DIMS[name]) and logits.shape == (2, 10)
    assert torch.isfinite(feat).all() and torch.isfinite(logits).all()


@pytest.mark.parametrize("name", list(PARAMS_100))
def test_parameter_counts_match_the_testbed(name: str) -> None:
    model = create_model(name)
    assert sum(p.numel() for p in model.parameters()) == PARAMS_100[name]


@pytest.mark.parametrize("name", list(KEYS))
def test_state_dict_keys_follow_the_testbed(name: str) -> None:
    keys = set(create_model(name).state_dict())
    assert set(KEYS[name]) <= keys


def test_wrn_shortcut_only_where_width_changes() -> None:
    keys = set(create_model("wrn_16_1").state_dict())
    assert not any(k.startswith("block1.") and "convShortcut" in k for k in keys)  # 16 -> 16
    assert "block2.layer.0.convShortcut.weight" in keys
    assert "block2.layer.1.convShortcut.weight" not in keys


def test_imagenet_models_keep_torchvision_keys() -> None:
    import torchvision

    ref = torchvision.models.resnet18(weights=None, num_classes=7).state_dict()
    mine = create_model("resnet18_imagenet", num_classes=7).state_dict()
    assert {k: v.shape for k, v in mine.items()} == {k: v.shape for k, v in ref.items()}


def test_vgg_64px_pools_once_more() -> None:
    model = create_model("vgg8", num_classes=5).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).feat.shape == (1, 512)


def test_unknown_model_lists_the_known_ones() -> None:
    with pytest.raises(CdirError, match="unknown model 'resnet9'.*resnet8x4.*ShuffleV2"):
        create_model("resnet9")
    with pytest.raises(CdirError, match="num_classes"):
        create_model("resnet8", num_classes=0)


# --------------------------------------------------------------------------------------------
# load_teacher


def _trained(name: str, num_classes: int = 10) -> torch.nn.Module:
    """A model whose BN statistics and weights are not the init's, so a load is visible."""
    torch.manual_seed(0)
    model = create_model(name, num_classes)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if v.is_floating_point():
                v.add_(0.05 * torch.randn_like(v))
                if "running_var" in k:
                    v.abs_()
    return model


def _save(obj: object, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(obj, path)
    return path


def test_load_teacher_round_trip(tmp_path: Path) -> None:
    src = _trained("resnet8")
    sd = src.state_dict()
    path = _save({"epoch": 240, "model": sd, "accuracy": torch.tensor(70.1)},
                 tmp_path / "resnet8_vanilla" / "ckpt_epoch_240.pth")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    teacher = load_teacher(path, "resnet8", 10, sha256=digest.upper())
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, sd[k]), k
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(teacher(x).logits, src.eval()(x).logits)
    # a bare state dict, and one saved from a DataParallel wrapper, load too
    bare = load_teacher(_save(sd, tmp_path / "bare.pth"), "resnet8", 10)
    prefixed = load_teacher(_save({"model": {f"module.{k}": v for k, v in sd.items()}},
                                  tmp_path / "dp.pth"), "resnet8", 10)
    for m in (bare, prefixed):
        assert torch.equal(m.state_dict()["fc.weight"], sd["fc.weight"])


def test_load_teacher_key_errors_are_one_line(tmp_path: Path) -> None:
    sd = create_model("resnet8", 10).state_dict()
    sd.pop("fc.bias")
    sd["fc.extra"] = torch.zeros(1)
    with pytest.raises(CdirError) as e:
        load_teacher(_save({"model": sd}, tmp_path / "a.pth"), "resnet8", 10)
    msg = str(e.value)
    assert "\n" not in msg
    assert "1 missing key(s) (fc.bias)" in msg and "1 unexpected (fc.extra)" in msg
    # many differences: counts and the first few names only
    with pytest.raises(CdirError) as e:
        load_teacher(_save({"model": create_model("resnet14", 10).state_dict()},
                           tmp_path / "b.pth"), "resnet8", 10)
    msg = str(e.value)
    assert "0 missing" in msg and "36 unexpected" in msg
    assert msg.split("unexpected")[1].count("layer") == 3
    assert "\n" not in msg


def test_load_teacher_shape_and_format_errors(tmp_path: Path) -> None:
    path = _save({"model": create_model("resnet8", 100).state_dict()}, tmp_path / "c.pth")
    with pytest.raises(CdirError, match=r"with 10 classes.*fc\.weight \(100, 64\) vs \(10, 64\)"):
        load_teacher(path, "resnet8", 10)
    with pytest.raises(CdirError, match="no state dict"):
        load_teacher(_save({"epoch": 3}, tmp_path / "d.pth"), "resnet8", 10)
    with pytest.raises(CdirError, match="no teacher checkpoint"):
        load_teacher(tmp_path / "missing.pth", "resnet8", 10)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(CdirError, match="junk.pth is not a teacher checkpoint"):
        load_teacher(tmp_path / "junk.pth", "resnet8", 10)


def test_load_teacher_sha256_mismatch_names_both(tmp_path: Path) -> None:
    path = _save({"model": create_model("resnet8", 10).state_dict()}, tmp_path / "e.pth")
    actual = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(CdirError) as e:
        load_teacher(path, "resnet8", 10, sha256="0" * 64)
    assert actual in str(e.value) and "0" * 64 in str(e.value) and "\n" not in str(e.value)


def test_load_teacher_without_bn_counters(tmp_path: Path) -> None:
    """Checkpoints from before PyTorch 0.4.1 have no num_batches_tracked."""
    sd = {k: v for k, v in create_model("wrn_16_1", 10).state_dict().items()
          if not k.endswith("num_batches_tracked")}
    load_teacher(_save(sd, tmp_path / "old.pth"), "wrn_16_1", 10)


def test_teacher_name_from_folder() -> None:
    assert teacher_name_from_path("save/wrn_40_2_vanilla/ckpt_epoch_240.pth") == "wrn_40_2"
    assert teacher_name_from_path("resnet32x4_vanilla/ckpt_epoch_240.pth") == "resnet32x4"
    assert teacher_name_from_path("ResNet50_vanilla/x.pth") == "ResNet50"
    assert teacher_name_from_path("mobile_half_vanilla/x.pth") == "MobileNetV2"
    with pytest.raises(CdirError, match="cannot tell the teacher model"):
        teacher_name_from_path("teachers/best.pth")
