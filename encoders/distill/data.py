"""The labelled datasets of the distillation testbed (the CRD/RepDistiller protocol).

- CIFAR-10 / CIFAR-100 (``"cifar10"``, ``"cifar100"``): teachers and students are trained on
  them. The standard pickled archive is read here (``cifar-10-batches-py`` /
  ``cifar-100-python`` under ``root``, extracted from the ``.tar.gz`` when only that is there);
  torchvision is used only to download it, since it writes exactly that folder.
- ``"digits"``: scikit-learn's bundled handwritten digits, a real labelled set that needs no
  download, so the whole pipeline runs offline (and in tests).
- STL-10 (``"stl10"``) and Tiny-ImageNet (``"tinyimagenet"``): the transfer linear probe of the
  CRD paper; their images are resized to 32 px by the transforms, as the protocol says.
- Any other folder ``DIR/train/<class>/<image>`` with ``DIR/test/...`` (or ``DIR/val/...``).

Every split is a :class:`Source`: labels plus either in-memory uint8 HWC images (CIFAR, digits,
STL-10) or file paths (Tiny-ImageNet, folders), read with ``cdir.core.images.load_image``. The
datasets the training loop consumes, :class:`TrainImages` and :meth:`Source.labelled_images`, flag
an unreadable file with ``ok=False`` (and another image of its class, or a zero tensor) instead of
failing the run, as the SSL trainer's datasets do (``encoders.ssl.data``).

Nothing is cached besides what the official archives unpack to.
"""

from __future__ import annotations

import os
import pickle
import tarfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from cdir.core.errors import CdirError, first_line
from cdir.core.images import DECODE_ERRORS, ImageList, load_image
from cdir.core.tree import list_images

Stats = tuple[float, float, float]

# The per-channel statistics the testbed normalises with (train-set statistics, except ImageNet's
# for arbitrary folders, where nothing better is known).
CIFAR10_STATS: tuple[Stats, Stats] = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS: tuple[Stats, Stats] = ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761))
STL10_STATS: tuple[Stats, Stats] = ((0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2712))
TINYIMAGENET_STATS: tuple[Stats, Stats] = ((0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821))
IMAGENET_STATS: tuple[Stats, Stats] = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))

# The digits training split: 30 images per class (300 of 1797). Small on purpose: with the full
# set a student is already near its ceiling and distillation has nothing left to add; with 300
# images the teacher's soft targets carry information the labels do not.
DIGITS_TRAIN_PER_CLASS = 30
# The digits split is fixed, not drawn from the training seed, so every run (teacher, student,
# any seed) trains and tests on the same images.
DIGITS_SPLIT_SEED = 0

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
STL10_URL = "https://cs.stanford.edu/~acoates/stl10/"
TINYIMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"

@dataclass
class Source:
    """One labelled split: ``labels`` (N,) int64 indexing ``classes``, and exactly one of
    ``images`` (N, H, W, 3) uint8 in memory or ``paths`` (N image files)."""

    labels: np.ndarray
    classes: list[str]
    images: np.ndarray | None = None
    paths: list[str] | None = None

    def __post_init__(self) -> None:
        self.labels = np.asarray(self.labels, dtype=np.int64).reshape(-1)
        if (self.images is None) == (self.paths is None):
            raise CdirError("a Source needs exactly one of images (an array) or paths (files)")
        n = len(self.labels)
        if self.images is not None:
            if self.images.dtype != np.uint8 or self.images.ndim != 4 or self.images.shape[3] != 3:
                raise CdirError(f"Source images must be uint8 (N, H, W, 3), got "
                                f"{self.images.dtype} {tuple(self.images.shape)}")
            count = len(self.images)
        else:
            self.paths = [str(p) for p in self.paths]
            count = len(self.paths)
        if count != n:
            raise CdirError(f"a Source has {count} images but {n} labels")
        if n and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise CdirError(f"labels range {self.labels.min()}..{self.labels.max()} does not fit "
                            f"the {len(self.classes)} classes")

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> Image.Image:
        """Image ``i`` as RGB; a file that cannot be read raises BadImage (or OSError)."""
        if self.images is not None:
            return Image.fromarray(self.images[i])
        return load_image(self.paths[i])

    def labelled_images(self, transform: Callable, size: int = 32) -> ImageList:
        """Items ``(tensor, label, ok)`` for evaluation; an unreadable file yields zeros and
        ``ok=False`` so that evaluation drops that row rather than score a blank image."""
        return ImageList(range(len(self)), transform, (3, size, size), labels=self.labels,
                         read=self.image)

    def subset(self, rows: Sequence[int] | np.ndarray) -> Source:
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        if self.images is not None:
            return Source(self.labels[rows], self.classes, images=self.images[rows])
        return Source(self.labels[rows], self.classes, paths=[self.paths[i] for i in rows])


@dataclass
class LabelledData:
    """A dataset's train and test splits, its normalisation statistics and the input side the
    testbed feeds the networks (32 px for every dataset, as in CRD's transfer experiments)."""

    name: str
    train: Source
    test: Source
    mean: Stats
    std: Stats
    size: int = 32

    def __post_init__(self) -> None:
        if list(self.train.classes) != list(self.test.classes):
            raise CdirError(f"{self.name}: the train and test splits have different classes")

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)


# --------------------------------------------------------------------------- splits


def split_validation(labels: np.ndarray, fraction: float,
                     seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Stratified ``(train_rows, val_rows)``, each sorted: about ``fraction`` of every class goes
    to validation, but every class keeps at least one training row. The result depends only on
    (labels, fraction, seed)."""
    if not 0.0 < float(fraction) < 1.0:
        raise CdirError(f"the validation fraction must be between 0 and 1 (exclusive), "
                        f"got {fraction}")
    labels = np.asarray(labels).reshape(-1)
    rng = np.random.default_rng(seed)
    train: list[np.ndarray] = []
    val: list[np.ndarray] = []
    for c in np.unique(labels):  # sorted, so the rng is consumed in the same order every time
        rows = rng.permutation(np.flatnonzero(labels == c))
        n_val = min(int(round(fraction * len(rows))), len(rows) - 1)
        val.append(rows[:n_val])
        train.append(rows[n_val:])
    empty = np.zeros(0, dtype=np.int64)
    return (np.sort(np.concatenate(train or [empty])).astype(np.int64),
            np.sort(np.concatenate(val or [empty])).astype(np.int64))


# --------------------------------------------------------------------------- transforms


class _ResizeTo:
    """Resize to ``size`` x ``size`` unless the image already is (a class, not a lambda, so the
    transform pickles into DataLoader workers)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        if img.size == (self.size, self.size):
            return img
        return img.resize((self.size, self.size), Image.BILINEAR)


def train_transform(mean: Sequence[float], std: Sequence[float], size: int = 32,
                    pad: int = 4) -> Callable[[Image.Image], torch.Tensor]:
    """The testbed's training augmentation: (resize to size x size,) random crop with ``pad``
    pixels of zero padding, horizontal flip, then normalise."""
    from torchvision import transforms as T

    return T.Compose([_ResizeTo(size), T.RandomCrop(size, padding=pad),
                      T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(tuple(mean), tuple(std))])


def test_transform(mean: Sequence[float], std: Sequence[float],
                   size: int = 32) -> Callable[[Image.Image], torch.Tensor]:
    """Evaluation: (resize to size x size,) then normalise."""
    from torchvision import transforms as T

    return T.Compose([_ResizeTo(size), T.ToTensor(), T.Normalize(tuple(mean), tuple(std))])


# its name starts with "test": stop pytest collecting it from test modules that import it
test_transform.__test__ = False  # type: ignore[attr-defined]

# inputs at least this large get the ImageNet recipe (random resized crops, resize + centre crop)
IMAGENET_STYLE_MIN = 96


def transforms_for(data: LabelledData, size: int | None = None
                   ) -> tuple[Callable[[Image.Image], torch.Tensor],
                              Callable[[Image.Image], torch.Tensor]]:
    """(train, test) transforms of a run at ``size`` (default the dataset's): the testbed's
    CIFAR recipe at small sizes; at ``IMAGENET_STYLE_MIN`` px and more the ImageNet one
    (RandomResizedCrop + flip; resize the short side to size * 256/224, centre crop)."""
    from torchvision import transforms as T

    size = int(size or data.size)
    if size < IMAGENET_STYLE_MIN:
        return train_transform(data.mean, data.std, size), test_transform(data.mean, data.std,
                                                                           size)
    norm = T.Normalize(tuple(data.mean), tuple(data.std))
    train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    test = T.Compose([T.Resize(int(round(size * 256 / 224))), T.CenterCrop(size),
                      T.ToTensor(), norm])
    return train, test


# --------------------------------------------------------------------------- torch datasets


class TrainImages(Dataset):
    """Items ``([transform(image)], index, ok)``: the index lets contrastive losses (CRD) address
    their memory bank, and the label is ``source.labels[index]``. An unreadable file gives
    ``ok=False`` (the training loop lists it) and the image of the next readable row of the same
    class, so the batch never trains a blank image under that label."""

    def __init__(self, source: Source, transform: Callable, size: int = 32) -> None:
        self.source = source
        self.transform = transform
        self.size = size

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int) -> tuple[list[torch.Tensor], int, bool]:
        labels = self.source.labels
        same = np.flatnonzero(labels == labels[i])
        start = int(np.searchsorted(same, i))
        for step, j in enumerate(np.roll(same, -start)):
            try:
                return [self.transform(self.source.image(int(j)))], i, step == 0
            except DECODE_ERRORS:
                continue
        raise CdirError(f"no readable training image of class "
                        f"{self.source.classes[labels[i]]!r}; check the data folder")


# --------------------------------------------------------------------------- archives


def _extract_safely(archive: Path, into: Path) -> None:
    """Extract a .tar.gz into ``into``, refusing absolute paths, '..' and links (a tampered
    archive must not write outside ``into``)."""
    try:
        with tarfile.open(archive, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                name = m.name.replace("\\", "/")
                if name.startswith("/") or os.path.isabs(m.name) or \
                        ".." in PurePosixPath(name).parts:
                    raise CdirError(f"{archive}: refusing to extract {m.name!r} (an absolute path "
                                    "or '..'): get the official archive again")
                if not (m.isfile() or m.isdir()):
                    raise CdirError(f"{archive}: refusing to extract {m.name!r} (a link or "
                                    "special file): get the official archive again")
            tar.extractall(into, members=members, filter="data")
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise CdirError(f"{archive}: cannot extract ({first_line(e)}): "
                        "delete it and get it again") from None


def _complete(folder: Path, files: Sequence[str]) -> bool:
    return folder.is_dir() and all((folder / f).is_file() for f in files)


# --------------------------------------------------------------------------- CIFAR


@dataclass(frozen=True)
class _Cifar:
    name: str  # "cifar100"
    title: str  # "CIFAR-100", for messages
    folder: str  # what the archive unpacks to
    archive: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: bytes
    names_key: bytes
    stats: tuple[Stats, Stats]
    torchvision_class: str

    @property
    def files(self) -> tuple[str, ...]:
        return (*self.train_files, *self.test_files, self.meta_file)


_CIFAR10 = _Cifar("cifar10", "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
                  tuple(f"data_batch_{i}" for i in range(1, 6)), ("test_batch",),
                  "batches.meta", b"labels", b"label_names", CIFAR10_STATS, "CIFAR10")
_CIFAR100 = _Cifar("cifar100", "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
                   ("train",), ("test",), "meta", b"fine_labels", b"fine_label_names",
                   CIFAR100_STATS, "CIFAR100")


def _unpickle(path: Path) -> dict:
    # The official archive is a Python pickle (as torchvision reads it too); read only files
    # from the official archive.
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError) as e:
        raise CdirError(f"{path}: cannot read ({first_line(e)}): "
                        "delete the folder and extract the archive again") from None
    if not isinstance(entry, dict):
        raise CdirError(f"{path}: not a CIFAR batch (expected a dict): extract the archive again")
    return entry


def _read_cifar_split(folder: Path, files: Sequence[str],
                      label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    images, labels = [], []
    for name in files:
        path = folder / name
        entry = _unpickle(path)
        if b"data" not in entry or label_key not in entry:
            raise CdirError(f"{path}: missing the {b'data'!r} or {label_key!r} entry: "
                            "is this the right CIFAR version?")
        data = np.asarray(entry[b"data"], dtype=np.uint8)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(entry[label_key]):
            raise CdirError(f"{path}: expected (N, 3072) images and N labels, got "
                            f"{tuple(data.shape)} and {len(entry[label_key])}")
        # rows are CHW planes (1024 red, 1024 green, 1024 blue): to HWC for PIL
        images.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(entry[label_key], dtype=np.int64))
    return np.ascontiguousarray(np.concatenate(images)), np.concatenate(labels)


def _read_cifar(folder: Path, spec: _Cifar) -> LabelledData:
    meta = _unpickle(folder / spec.meta_file)
    if spec.names_key not in meta:
        raise CdirError(f"{folder / spec.meta_file}: no {spec.names_key!r} entry: "
                        "is this the right CIFAR version?")
    classes = [n.decode() if isinstance(n, bytes) else str(n) for n in meta[spec.names_key]]
    splits = []
    for files in (spec.train_files, spec.test_files):
        images, labels = _read_cifar_split(folder, files, spec.label_key)
        splits.append(Source(labels, classes, images=images))
    train, test = splits
    return LabelledData(spec.name, train, test, *spec.stats)


def _open_cifar(spec: _Cifar, root: str | os.PathLike, download: bool) -> LabelledData:
    root = Path(root)
    folder, archive = root / spec.folder, root / spec.archive
    if not _complete(folder, spec.files) and archive.is_file():
        _extract_safely(archive, root)
    if not _complete(folder, spec.files) and download:
        try:
            import torchvision.datasets as tvd

            getattr(tvd, spec.torchvision_class)(str(root), train=True, download=True)
        except (OSError, RuntimeError, ValueError) as e:  # URLError is an OSError
            raise CdirError(f"could not download {spec.title} into {root} ({first_line(e)}): "
                            f"check the connection, or put the archive from {CIFAR_URL} "
                            "there") from None
    if not _complete(folder, spec.files):
        raise CdirError(f"{spec.title} not found under {root} (looked for {folder} and "
                        f"{archive}): pass --download (needs internet), or put the archive "
                        f"from {CIFAR_URL} there")
    return _read_cifar(folder, spec)


def load_cifar10(root: str | os.PathLike = "data", download: bool = False) -> LabelledData:
    return _open_cifar(_CIFAR10, root, download)


def load_cifar100(root: str | os.PathLike = "data", download: bool = False) -> LabelledData:
    return _open_cifar(_CIFAR100, root, download)


# --------------------------------------------------------------------------- digits


def load_digits(root: str | os.PathLike = "data", download: bool = False) -> LabelledData:
    """scikit-learn's 1797 8x8 digits as 32x32 RGB (bilinear upsampling, three equal channels),
    split with a fixed seed into 30 training images per class and the rest (1497) for test.

    ``root`` and ``download`` are unused (the data ships with scikit-learn). The normalisation
    statistics are computed from the training split, as CIFAR's are from its training set."""
    del root, download
    try:
        from sklearn.datasets import load_digits as sk_load_digits
    except ImportError:
        raise CdirError("the digits dataset needs scikit-learn: pip install scikit-learn") from None
    bunch = sk_load_digits()
    labels = np.asarray(bunch.target, dtype=np.int64)
    grey = np.round(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    big = np.stack([np.asarray(Image.fromarray(g).resize((32, 32), Image.BILINEAR))
                    for g in grey])
    images = np.ascontiguousarray(np.repeat(big[..., None], 3, axis=3))

    rng = np.random.default_rng(DIGITS_SPLIT_SEED)
    train_rows = np.sort(np.concatenate([
        rng.permutation(np.flatnonzero(labels == c))[:DIGITS_TRAIN_PER_CLASS]
        for c in range(10)
    ]))
    test_rows = np.setdiff1d(np.arange(len(labels)), train_rows)
    classes = [str(c) for c in range(10)]
    full = Source(labels, classes, images=images)
    train, test = full.subset(train_rows), full.subset(test_rows)

    pixels = train.images.reshape(-1, 3).astype(np.float64) / 255.0
    mean = tuple(round(float(v), 4) for v in pixels.mean(axis=0))
    std = tuple(round(float(v), 4) for v in pixels.std(axis=0))
    return LabelledData("digits", train, test, mean, std)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- STL-10

_STL10_FOLDER = "stl10_binary"
_STL10_FILES = ("train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "class_names.txt")


def _read_stl10_split(folder: Path, split: str, classes: list[str]) -> Source:
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    raw = np.fromfile(x_path, dtype=np.uint8)
    side = 3 * 96 * 96
    if raw.size % side:
        raise CdirError(f"{x_path}: {raw.size} bytes is not a whole number of 96x96 RGB images: "
                        "the file is truncated, get it again")
    # torchvision: reshape(-1, 3, 96, 96) then swap the last two axes (each plane is stored
    # column-major) to get CHW; one transpose straight to HWC is the same thing
    images = np.ascontiguousarray(raw.reshape(-1, 3, 96, 96).transpose(0, 3, 2, 1))
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64) - 1  # stored as 1..10
    if len(labels) != len(images):
        raise CdirError(f"{folder}: {split} has {len(images)} images but {len(labels)} labels")
    return Source(labels, classes, images=images)


def _read_stl10(folder: Path) -> LabelledData:
    classes = [line.strip() for line in (folder / "class_names.txt").read_text().splitlines()
               if line.strip()]
    train = _read_stl10_split(folder, "train", classes)
    test = _read_stl10_split(folder, "test", classes)
    return LabelledData("stl10", train, test, *STL10_STATS)


def load_stl10(root: str | os.PathLike = "data", download: bool = False) -> LabelledData:
    """STL-10's labelled train (5000) and test (8000) splits, 96 px, from the binary folder
    torchvision writes (``root/stl10_binary``); the unlabelled split is not used."""
    root = Path(root)
    folder = root / _STL10_FOLDER
    if not _complete(folder, _STL10_FILES) and download:
        try:
            import torchvision.datasets as tvd

            tvd.STL10(str(root), split="train", download=True)
        except (OSError, RuntimeError, ValueError) as e:
            raise CdirError(f"could not download STL-10 into {root} ({first_line(e)}): check "
                            f"the connection, or unpack the binary archive from {STL10_URL} "
                            "there") from None
    if not _complete(folder, _STL10_FILES):
        raise CdirError(f"STL-10 not found under {root} (looked for {folder} with "
                        f"{', '.join(_STL10_FILES)}): pass --download (needs internet), or "
                        f"unpack the binary archive from {STL10_URL} there")
    return _read_stl10(folder)


# --------------------------------------------------------------------------- Tiny-ImageNet

_TINY_FOLDER = "tiny-imagenet-200"


def _is_tiny(folder: Path) -> bool:
    return (folder / "wnids.txt").is_file() and (folder / "train").is_dir()


def _read_tinyimagenet(folder: Path) -> LabelledData:
    """Train from ``train/<wnid>/images``, test from ``val`` (the official test split has no
    labels). Classes are the wnids, byte-sorted (ImageFolder's order, which CRD's transfer code
    used), so labels do not depend on the order of wnids.txt."""
    wnids = sorted({w.strip() for w in (folder / "wnids.txt").read_text().splitlines()
                    if w.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    train_dir = folder / "train"
    paths, labels = [], []
    for p in list_images(train_dir):
        wnid = Path(p).relative_to(train_dir).parts[0]
        if wnid not in index:
            raise CdirError(f"{train_dir / wnid}: class {wnid} is not in {folder / 'wnids.txt'}")
        paths.append(p)
        labels.append(index[wnid])
    train = Source(np.asarray(labels, dtype=np.int64), wnids, paths=paths)

    notes = folder / "val" / "val_annotations.txt"
    if not notes.is_file():
        raise CdirError(f"{notes} not found: the Tiny-ImageNet folder is incomplete, unzip "
                        f"{TINYIMAGENET_URL} again")
    paths, labels = [], []
    for n, line in enumerate(notes.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2 or fields[1] not in index:
            raise CdirError(f"{notes}:{n}: expected 'file<TAB>wnid...' with a wnid from "
                            f"wnids.txt, got {line[:80]!r}")
        paths.append(str(folder / "val" / "images" / fields[0]))
        labels.append(index[fields[1]])
    test = Source(np.asarray(labels, dtype=np.int64), wnids, paths=paths)
    return LabelledData("tinyimagenet", train, test, *TINYIMAGENET_STATS)


def load_tinyimagenet(root: str | os.PathLike = "data", download: bool = False) -> LabelledData:
    """Tiny-ImageNet (200 classes, 64 px) from ``root/tiny-imagenet-200`` as image paths.
    There is no download: the zip must be unpacked by hand."""
    folder = Path(root) / _TINY_FOLDER
    if not _is_tiny(folder):
        hint = " (--download does not fetch it)" if download else ""
        raise CdirError(f"Tiny-ImageNet not found under {root} (looked for {folder}){hint}: "
                        f"unzip {TINYIMAGENET_URL} there")
    return _read_tinyimagenet(folder)


# --------------------------------------------------------------------------- folders


def _read_folder(folder: Path) -> LabelledData:
    """``folder/train/<class>/...`` and ``folder/test/<class>/...`` (``val`` when there is no
    ``test``); class names byte-sorted from train, ImageNet statistics."""
    layout = f"expected {folder}/train/<class>/<image> and {folder}/test/<class>/<image> (or val)"
    train_dir = folder / "train"
    test_dir = next((folder / s for s in ("test", "val") if (folder / s).is_dir()), None)
    if not train_dir.is_dir() or test_dir is None:
        raise CdirError(f"{folder}: not a labelled dataset folder: {layout}")

    def scan(split: Path) -> tuple[list[str], list[str]]:
        paths, names = [], []
        for p in list_images(split):
            parts = Path(p).relative_to(split).parts
            if len(parts) < 2:
                raise CdirError(f"{p}: an image directly in {split}: {layout}")
            paths.append(p)
            names.append(parts[0])
        return paths, names

    train_paths, train_names = scan(train_dir)
    classes = sorted(set(train_names))
    index = {c: i for i, c in enumerate(classes)}
    test_paths, test_names = scan(test_dir)
    unknown = sorted(set(test_names) - set(classes))
    if unknown:
        raise CdirError(f"{test_dir}: classes {unknown[:5]} have no training images in "
                        f"{train_dir}: every test class needs a train folder")
    train = Source(np.asarray([index[c] for c in train_names], dtype=np.int64), classes,
                   paths=train_paths)
    test = Source(np.asarray([index[c] for c in test_names], dtype=np.int64), classes,
                  paths=test_paths)
    return LabelledData(str(folder), train, test, *IMAGENET_STATS)


# --------------------------------------------------------------------------- entry point

DATASETS: dict[str, Callable[..., LabelledData]] = {
    "cifar10": load_cifar10,
    "cifar100": load_cifar100,
    "digits": load_digits,
    "stl10": load_stl10,
    "tinyimagenet": load_tinyimagenet,
}


def _open_known_folder(path: Path) -> LabelledData | None:
    """A folder in one of the known layouts: the unpacked dataset folder itself, or a folder
    that holds it (or, for CIFAR, its archive). None for anything else."""
    for spec in (_CIFAR100, _CIFAR10):
        if _complete(path, spec.files):
            return _read_cifar(path, spec)
        if _complete(path / spec.folder, spec.files) or (path / spec.archive).is_file():
            return _open_cifar(spec, path, download=False)
    if _complete(path, _STL10_FILES):
        return _read_stl10(path)
    if _complete(path / _STL10_FOLDER, _STL10_FILES):
        return _read_stl10(path / _STL10_FOLDER)
    if _is_tiny(path):
        return _read_tinyimagenet(path)
    if _is_tiny(path / _TINY_FOLDER):
        return _read_tinyimagenet(path / _TINY_FOLDER)
    return None


def open_labelled(spec: str, root: str | os.PathLike = "data",
                  download: bool = False) -> LabelledData:
    """The dataset ``spec``: a name in :data:`DATASETS` (looked for under ``root``; fetched when
    ``download`` and the loader can), or a path to a folder: an unpacked CIFAR / STL-10 /
    Tiny-ImageNet folder (or one that contains it), else ``DIR/train/<class>/<image>`` with
    ``DIR/test`` or ``DIR/val``."""
    if spec in DATASETS:
        return DATASETS[spec](root, download)
    path = Path(spec)
    if not path.is_dir():
        raise CdirError(f"unknown dataset {spec!r}: pass one of {', '.join(DATASETS)} or a "
                        "folder with train/<class>/<image> and test/<class>/<image>")
    known = _open_known_folder(path)
    return known if known is not None else _read_folder(path)
