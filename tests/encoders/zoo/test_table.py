"""The zoo's one name -> model table: both kinds reachable by name, each builder refusing the
other kind's names, and the trunks keeping torchvision's keys."""

from __future__ import annotations

import pytest
import torch

from cdir.core.errors import CdirError
from encoders.zoo import BACKBONE, CLASSIFIER, MODELS, create_model, list_models
from encoders.zoo.backbones import build_backbone


def test_every_name_has_one_kind_and_one_builder() -> None:
    assert set(list_models(BACKBONE)) | set(list_models(CLASSIFIER)) == set(MODELS)
    assert set(list_models(BACKBONE)) == {
        "resnet18", "resnet34", "resnet50", "cifar_resnet18", "cifar_resnet34", "cifar_resnet50"}
    for name in list_models(BACKBONE):
        net, dim = build_backbone(name, width=0.125)
        assert net(torch.zeros(2, 3, 32, 32)).shape == (2, dim)
    out = create_model("resnet8", num_classes=7)(torch.zeros(2, 3, 32, 32))
    assert out.logits.shape == (2, 7) and out.feat.shape == (2, 64)


def test_each_builder_refuses_the_other_kind() -> None:
    with pytest.raises(CdirError, match=r"unknown backbone 'resnet8'; choose one of resnet18"):
        build_backbone("resnet8")
    with pytest.raises(CdirError, match=r"unknown model 'cifar_resnet18'; choose one of resnet8"):
        create_model("cifar_resnet18")
    with pytest.raises(CdirError, match="already has the CIFAR stem"):
        build_backbone("cifar_resnet18", small_stem=True)


def test_a_trunk_is_the_torchvision_classifier_without_its_head() -> None:
    trunk, dim = build_backbone("resnet18")
    classifier = create_model("resnet18_imagenet", num_classes=10)
    keys = [k for k in classifier.state_dict() if not k.startswith("fc.")]
    assert list(trunk.state_dict()) == keys and dim == classifier.feat_dim == 512
