"""The distillation datasets: the CIFAR pickles (folder and .tar.gz), digits, STL-10's binary
files, Tiny-ImageNet and plain folders, all read from real files written here; the stratified
validation split; transforms and the torch datasets' ok flag."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdir.core.errors import CdirError
from encoders.distill.data import (
    CIFAR10_STATS,
    CIFAR100_STATS,
    DATASETS,
    DIGITS_TRAIN_PER_CLASS,
    LabelledData,
    Source,
    TrainImages,
    open_labelled,
    split_validation,
    train_transform,
)
from encoders.distill.data import (
    test_transform as eval_transform,
)

torch.set_num_threads(1)

# a pixel that would land elsewhere if CHW -> HWC (or STL-10's column-major planes) were wrong
ROW, COL, VALUE = 1, 5, 251


def _images(n: int, seed: int, side: int = 32) -> np.ndarray:
    """Random HWC uint8 images; image 0 has VALUE in the red channel at (ROW, COL)."""
    rng = np.random.default_rng(seed)
    out = rng.integers(0, 200, size=(n, side, side, 3), dtype=np.uint8)
    out[0, ROW, COL, 0] = VALUE
    return out


def _pickle(path: Path, obj: dict) -> None:
    path.write_bytes(pickle.dumps(obj))


def _cifar_batch(images: np.ndarray, labels: list[int], key: bytes) -> dict:
    # the archive's layout: each row is the red plane, then green, then blue (CHW)
    data = images.transpose(0, 3, 1, 2).reshape(len(images), 3072)
    return {b"data": data, key: labels, b"batch_label": b"fake"}


def write_cifar100(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    folder.mkdir(parents=True)
    train, test = _images(4, 0), _images(2, 1)
    _pickle(folder / "train", _cifar_batch(train, [0, 2, 1, 2], b"fine_labels"))
    _pickle(folder / "test", _cifar_batch(test, [1, 0], b"fine_labels"))
    _pickle(folder / "meta", {b"fine_label_names": [b"apple", b"bear", b"cat"],
                              b"coarse_label_names": [b"x"]})
    return train, test


def _check_cifar100(d: LabelledData, train: np.ndarray, test: np.ndarray) -> None:
    assert d.name == "cifar100" and (d.mean, d.std) == CIFAR100_STATS and d.size == 32
    assert d.train.classes == ["apple", "bear", "cat"] and d.num_classes == 3
    np.testing.assert_array_equal(d.train.images, train)
    np.testing.assert_array_equal(d.test.images, test)
    assert d.train.labels.dtype == np.int64
    assert d.train.labels.tolist() == [0, 2, 1, 2] and d.test.labels.tolist() == [1, 0]
    img = d.train.image(0)
    assert img.mode == "RGB" and img.size == (32, 32)
    assert img.getpixel((COL, ROW))[0] == VALUE  # PIL is (x, y)


def test_cifar100_folder_round_trip(tmp_path: Path) -> None:
    train, test = write_cifar100(tmp_path / "cifar-100-python")
    _check_cifar100(open_labelled("cifar100", root=tmp_path), train, test)
    # the folder itself, or a folder containing it, as the spec
    _check_cifar100(open_labelled(str(tmp_path / "cifar-100-python")), train, test)
    _check_cifar100(open_labelled(str(tmp_path)), train, test)


def test_cifar100_from_archive(tmp_path: Path) -> None:
    stage = tmp_path / "stage"
    train, test = write_cifar100(stage / "cifar-100-python")
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        tar.add(stage / "cifar-100-python", arcname="cifar-100-python")
    _check_cifar100(open_labelled("cifar100", root=root), train, test)
    assert (root / "cifar-100-python" / "meta").is_file()  # extracted into root


def test_archive_with_parent_paths_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    with tarfile.open(root / "cifar-100-python.tar.gz", "w:gz") as tar:
        info = tarfile.TarInfo("../evil.txt")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(CdirError, match="refusing"):
        open_labelled("cifar100", root=root)
    assert not (tmp_path / "evil.txt").exists()


def test_cifar10_layout(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    train = _images(5, 2)
    for i in range(5):
        _pickle(folder / f"data_batch_{i + 1}", _cifar_batch(train[i:i + 1], [i], b"labels"))
    test = _images(3, 3)
    _pickle(folder / "test_batch", _cifar_batch(test, [9, 0, 4], b"labels"))
    names = [f"c{i}".encode() for i in range(10)]
    _pickle(folder / "batches.meta", {b"label_names": names, b"num_vis": 3072})
    d = open_labelled("cifar10", root=tmp_path)
    assert d.name == "cifar10" and (d.mean, d.std) == CIFAR10_STATS
    assert d.train.classes == [f"c{i}" for i in range(10)]
    np.testing.assert_array_equal(d.train.images, train)
    np.testing.assert_array_equal(d.test.images, test)
    assert d.train.labels.tolist() == [0, 1, 2, 3, 4] and d.test.labels.tolist() == [9, 0, 4]
    assert np.asarray(d.train.image(0))[ROW, COL, 0] == VALUE


def test_missing_cifar_says_where_and_how(tmp_path: Path) -> None:
    with pytest.raises(CdirError) as e:
        open_labelled("cifar100", root=tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and "--download" in msg
    assert str(tmp_path / "cifar-100-python") in msg and "cifar-100-python.tar.gz" in msg
    with pytest.raises(CdirError, match="cifar-10-batches-py"):
        open_labelled("cifar10", root=tmp_path)


def test_corrupt_cifar_batch_is_one_line(tmp_path: Path) -> None:
    write_cifar100(tmp_path / "cifar-100-python")
    (tmp_path / "cifar-100-python" / "train").write_bytes(b"not a pickle")
    with pytest.raises(CdirError, match="cannot read"):
        open_labelled("cifar100", root=tmp_path)


@pytest.fixture(scope="module")
def digits() -> LabelledData:
    return open_labelled("digits")


def test_digits_split(digits: LabelledData) -> None:
    assert digits.name == "digits" and digits.num_classes == 10
    assert digits.train.classes == [str(i) for i in range(10)]
    assert len(digits.train) == 300 and len(digits.test) == 1497
    assert digits.train.images.shape == (300, 32, 32, 3)
    assert digits.test.images.dtype == np.uint8
    assert np.bincount(digits.train.labels).tolist() == [DIGITS_TRAIN_PER_CLASS] * 10
    img = np.asarray(digits.test.image(0))
    assert img.shape == (32, 32, 3) and (img[..., 0] == img[..., 2]).all() and img.max() > 200
    assert all(0 < m < 1 for m in digits.mean) and all(0 < s < 1 for s in digits.std)
    again = DATASETS["digits"]("unused", False)  # fixed seed: every run shares the split
    np.testing.assert_array_equal(again.train.images, digits.train.images)
    np.testing.assert_array_equal(again.test.labels, digits.test.labels)


def test_split_validation() -> None:
    labels = np.repeat(np.arange(4), [10, 20, 5, 1])
    train, val = split_validation(labels, 0.2, seed=3)
    assert train.dtype == np.int64 and (np.diff(train) > 0).all() and (np.diff(val) > 0).all()
    assert not set(train) & set(val) and len(train) + len(val) == len(labels)
    assert np.bincount(labels[val], minlength=4).tolist() == [2, 4, 1, 0]  # stratified
    assert (np.bincount(labels[train], minlength=4) >= 1).all()
    again = split_validation(labels.copy(), 0.2, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip((train, val), again, strict=True))
    other = split_validation(labels, 0.2, seed=4)
    assert not np.array_equal(val, other[1])
    # even a fraction near 1 leaves every class a training row
    train, _ = split_validation(labels, 0.99)
    assert set(labels[train]) == {0, 1, 2, 3}
    for bad in (0, 1, -0.1, 1.5, float("nan")):
        with pytest.raises(CdirError, match="fraction"):
            split_validation(labels, bad)


def _png(path: Path, color: tuple[int, int, int], size: tuple[int, int] = (40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_folder_dataset_and_corrupt_files(tmp_path: Path) -> None:
    root = tmp_path / "shapes"
    for split in ("train", "test"):
        for cls, color in (("b", (0, 0, 255)), ("a", (255, 0, 0))):
            for i in range(2):
                _png(root / split / cls / f"{i}.png", color)
    (root / "test" / "a" / "2.png").write_bytes(b"\x89PNG broken")
    (root / "train" / "b" / "9.png").write_bytes(b"")
    d = open_labelled(str(root))
    assert d.name == str(root) and d.train.classes == ["a", "b"] and d.num_classes == 2
    assert d.train.images is None and len(d.train) == 5 and len(d.test) == 5
    assert d.mean == (0.485, 0.456, 0.406)

    evaluate = d.test.labelled_images(eval_transform(d.mean, d.std))
    results = [evaluate[i] for i in range(len(evaluate))]
    bad = [i for i, (_, _, ok) in enumerate(results) if not ok]
    assert [d.test.paths[i] for i in bad] == [str(root / "test" / "a" / "2.png")]
    x, label, ok = results[bad[0]]
    assert label == 0 and x.shape == (3, 32, 32) and not x.any()
    x, label, ok = results[0]
    assert ok and x.shape == (3, 32, 32) and label == 0

    train = TrainImages(d.train, train_transform(d.mean, d.std))
    flags = {i: train[i][2] for i in range(len(train))}
    assert [d.train.paths[i] for i, ok in flags.items() if not ok] == [
        str(root / "train" / "b" / "9.png")]
    views, index, ok = train[4]
    assert index == 4 and not ok and len(views) == 1 and views[0].shape == (3, 32, 32)
    # the unreadable image is replaced by a readable one of its class, not a blank
    assert views[0].abs().sum() > 0 and d.train.labels[4] == d.train.labels[3]
    with pytest.raises(CdirError):  # the Source itself reports the unreadable file
        d.train.image(4)


def test_folder_val_and_unknown_test_class(tmp_path: Path) -> None:
    root = tmp_path / "set"
    _png(root / "train" / "cat" / "0.png", (1, 2, 3))
    _png(root / "val" / "cat" / "0.png", (1, 2, 3))
    d = open_labelled(str(root))
    assert d.test.paths == [str(root / "val" / "cat" / "0.png")]
    _png(root / "val" / "dog" / "0.png", (1, 2, 3))
    with pytest.raises(CdirError, match="dog"):
        open_labelled(str(root))


def test_unknown_name_lists_the_datasets(tmp_path: Path) -> None:
    with pytest.raises(CdirError) as e:
        open_labelled("cifar1000", root=tmp_path)
    assert all(name in str(e.value) for name in DATASETS)


def test_stl10_binary_orientation(tmp_path: Path) -> None:
    folder = tmp_path / "stl10_binary"
    folder.mkdir()
    # write bytes where the format puts them: per image, per channel, column-major (x * 96 + y)
    row, col = 10, 70
    for split, n in (("train", 2), ("test", 1)):
        raw = np.zeros(n * 3 * 96 * 96, dtype=np.uint8)
        raw[1 * 96 * 96 + col * 96 + row] = VALUE  # image 0, green, (row, col)
        raw.tofile(folder / f"{split}_X.bin")
        np.array([3, 10][:n], dtype=np.uint8).tofile(folder / f"{split}_y.bin")
    (folder / "class_names.txt").write_text("\n".join(f"n{i}" for i in range(10)) + "\n")
    d = open_labelled("stl10", root=tmp_path)
    assert d.name == "stl10" and d.num_classes == 10 and d.train.classes[0] == "n0"
    assert d.train.images.shape == (2, 96, 96, 3) and d.train.labels.tolist() == [2, 9]
    assert d.train.images[0, row, col, 1] == VALUE and d.train.images.sum() == VALUE
    assert d.train.image(0).getpixel((col, row)) == (0, VALUE, 0)
    assert len(open_labelled(str(folder)).test) == 1  # the folder itself as the spec
    with pytest.raises(CdirError, match="stl10_binary"):
        open_labelled("stl10", root=tmp_path / "empty")


def test_tinyimagenet_tree(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    root.mkdir()
    (root / "wnids.txt").write_text("n02\nn01\n")  # not sorted: labels follow sorted wnids
    for wnid in ("n01", "n02"):
        for i in range(2):
            _png(root / "train" / wnid / "images" / f"{wnid}_{i}.JPEG", (9, 9, 9), (64, 64))
        (root / "train" / wnid / f"{wnid}_boxes.txt").write_text("")
    _png(root / "val" / "images" / "val_0.JPEG", (9, 9, 9), (64, 64))
    _png(root / "val" / "images" / "val_1.JPEG", (9, 9, 9), (64, 64))
    (root / "val" / "val_annotations.txt").write_text(
        "val_0.JPEG\tn02\t0\t0\t10\t10\nval_1.JPEG\tn01\t1\t1\t5\t5\n")
    d = open_labelled("tinyimagenet", root=tmp_path)
    assert d.name == "tinyimagenet" and d.train.classes == ["n01", "n02"]
    assert d.train.labels.tolist() == [0, 0, 1, 1] and len(d.train.paths) == 4
    assert d.test.labels.tolist() == [1, 0]
    assert d.test.paths[0] == str(root / "val" / "images" / "val_0.JPEG")
    assert d.test.image(0).size == (64, 64)
    assert open_labelled(str(root)).test.labels.tolist() == [1, 0]
    with pytest.raises(CdirError, match="tiny-imagenet-200.zip"):
        open_labelled("tinyimagenet", root=tmp_path / "nothing")


def test_transforms_resize_and_normalise() -> None:
    img = Image.new("RGB", (96, 96), (128, 64, 32))
    mean, std = (0.5, 0.25, 0.125), (0.5, 0.5, 0.5)
    x = train_transform(mean, std)(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    y = eval_transform(mean, std)(img)
    assert y.shape == (3, 32, 32)
    expected = torch.tensor([(128 / 255 - 0.5) / 0.5, (64 / 255 - 0.25) / 0.5,
                             (32 / 255 - 0.125) / 0.5])
    assert torch.allclose(y[:, 16, 16], expected, atol=1e-5)
    assert train_transform(mean, std, size=16, pad=0)(img).shape == (3, 16, 16)


def test_source_in_memory_and_subset() -> None:
    images = _images(4, 5)
    s = Source(np.array([1, 0, 1, 0]), ["x", "y"], images=images)
    part = s.subset([3, 1])
    assert len(part) == 2 and part.labels.tolist() == [0, 0]
    np.testing.assert_array_equal(part.images, images[[3, 1]])
    views, index, ok = TrainImages(s, train_transform((0.5,) * 3, (0.5,) * 3))[2]
    assert ok and index == 2 and views[0].shape == (3, 32, 32)
    x, label, ok = s.labelled_images(eval_transform((0.5,) * 3, (0.5,) * 3))[0]
    assert ok and label == 1 and x.shape == (3, 32, 32)
    with pytest.raises(CdirError, match="exactly one"):
        Source(np.zeros(1), ["x"], images=images[:1], paths=["a.png"])
    with pytest.raises(CdirError, match="labels"):
        Source(np.zeros(3), ["x"], images=images)
