"""The ``distill`` section of a run config: what `cdir train teacher` and `cdir distill` read
(registered with the engine by :mod:`encoders.distill.plugin`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistillConfig:
    """What `cdir train teacher` and `cdir distill` read (pretraining and adaptation ignore it).

    ``data.path`` names the labelled set (cifar10, cifar100, digits, or a folder with train/
    and test/), or for ``label_free`` the workspace; ``model.backbone`` is the student's zoo
    name (label-free: a backbone of ``encoders.zoo``)."""

    root: str = "data"  # where named datasets live (CIFAR archives, STL-10, Tiny-ImageNet)
    download: bool = False  # fetch a named dataset with torchvision when it is missing
    # hold out this fraction of the training set (stratified) to choose "best" on; 0: best is
    # chosen on the test set, as the reference code does (reported beside last, never alone)
    val_split: float = 0.0
    eval_every: int = 1  # epochs between test evaluations (the last epoch always is one)
    # input side; None: the dataset's (32 for CIFAR); >= 96 uses the ImageNet augmentation
    image_size: int | None = None
    teacher: str | None = None  # labelled: a teacher checkpoint; label-free: an encoder spec
    teacher_arch: str | None = None  # zoo name; default: the checkpoint's, or its folder name
    teacher_sha256: str | None = None  # the teacher file must hash to this (mirrored teachers)
    # loss weights of gamma * CE + alpha * KD + beta * method; None: the method's recipe
    gamma: float | None = None
    alpha: float | None = None
    beta: float | None = None
    with_kd: bool = False  # the recipe's "+KD" weights (when alpha is None)
    kd_temperature: float = 4.0
    label_free: bool = False  # distil on a workspace gallery with the method term alone
    # label-free: the student's embedding size (a linear head after its pooled features)
    embed_dim: int = 256
    # label-free: the teacher vectors distilled, from the workspace's embedding store:
    # none | domain-whiten (per-domain whitening, label-free, as retrieval uses it)
    teacher_normalize: str = "none"
