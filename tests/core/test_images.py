"""The one image-list dataset (cdir/core/images.py `ImageList`): readable images through the
transform, unreadable ones as zeros flagged False, through a DataLoader with worker processes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cdir.core.errors import CdirError
from cdir.core.images import DECODE_ERRORS, BadImage, ImageList, load_image


def _to_tensor(img: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img, np.float32)).permute(2, 0, 1) / 255


def _files(tmp_path: Path) -> list[str]:
    Image.new("RGB", (4, 4), (255, 0, 0)).save(tmp_path / "red.png")
    (tmp_path / "empty.png").write_bytes(b"")
    Image.new("RGB", (4, 4), (0, 0, 255)).save(tmp_path / "blue.png")
    return [str(tmp_path / n) for n in ("red.png", "empty.png", "blue.png", "gone.png")]


def test_unreadable_images_are_zeros_flagged_false(tmp_path: Path, capsys) -> None:
    paths = _files(tmp_path)
    data = ImageList(paths, _to_tensor, (3, 4, 4), labels=[7, 8, 9, 10], say=True)
    assert len(data) == 4
    items = [data[i] for i in range(4)]
    assert [ok for _, _, ok in items] == [True, False, True, False]
    assert [label for _, label, _ in items] == [7, 8, 9, 10]
    assert items[0][0][0].eq(1).all() and items[2][0][2].eq(1).all()  # red, blue
    assert not items[1][0].any() and items[1][0].shape == (3, 4, 4)
    err = capsys.readouterr().err
    assert "skipping unreadable image" in err and "empty.png" in err and "gone.png" in err


def test_rows_are_the_default_labels_and_a_loader_batches_them(tmp_path: Path) -> None:
    paths = _files(tmp_path)
    loader = torch.utils.data.DataLoader(ImageList(paths, _to_tensor, (3, 4, 4)), batch_size=4,
                                         num_workers=1)
    (x, rows, ok), = list(loader)
    assert x.shape == (4, 3, 4, 4) and rows.tolist() == [0, 1, 2, 3]
    assert ok.tolist() == [True, False, True, False]


def test_any_reader_and_a_failing_transform(tmp_path: Path) -> None:
    arrays = [np.full((2, 2, 3), v, np.uint8) for v in (0, 255)]
    data = ImageList(range(2), _to_tensor, (3, 2, 2), read=lambda i: Image.fromarray(arrays[i]))
    assert data[1][0].eq(1).all() and data[1][2]

    def broken(img: Image.Image) -> torch.Tensor:
        raise ValueError("cannot transform")

    x, label, ok = ImageList(_files(tmp_path)[:1], broken, (2,))[0]
    assert not ok and label == 0 and x.shape == (2,)
    with pytest.raises(CdirError, match="2 images but 1 labels"):
        ImageList(["a", "b"], _to_tensor, (3,), labels=[0])


def test_decode_errors_hold_what_load_image_raises(tmp_path: Path) -> None:
    with pytest.raises(DECODE_ERRORS) as e:
        load_image(_files(tmp_path)[1])
    assert isinstance(e.value, BadImage)
