"""cdir.core.images.load_image on the files real galleries contain: corrupt, odd modes, huge."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdir.core.errors import CdirError
from cdir.core.images import BadImage, is_image_file, load_image
from tests.helpers.trees import CORRUPT_FILES, draw_shape, make_bomb_png


def _jpeg_bytes() -> bytes:
    buf = io.BytesIO()
    draw_shape("Triangle", "Real World", 0, 96).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def test_good_jpeg_loads_as_rgb(tmp_path: Path) -> None:
    p = tmp_path / "ok.jpg"
    p.write_bytes(_jpeg_bytes())
    img = load_image(p)
    assert img.mode == "RGB" and img.size == (96, 96)


def test_truncated_jpeg(tmp_path: Path) -> None:
    data = _jpeg_bytes()
    p = tmp_path / "cut.jpg"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImage, match=r"cut.jpg: cannot decode \(.*truncated"):
        load_image(p)


def test_zero_byte_file(tmp_path: Path) -> None:
    p = tmp_path / "empty.jpg"
    p.write_bytes(b"")
    with pytest.raises(BadImage, match=r"empty.jpg: not an image \(empty file\)"):
        load_image(p)


def test_text_file_named_jpg(tmp_path: Path) -> None:
    p = tmp_path / "page.jpg"
    p.write_text("<html>403 Forbidden</html>")
    with pytest.raises(BadImage) as e:
        load_image(p)
    assert str(e.value).endswith("page.jpg: not an image")
    assert isinstance(e.value, CdirError)  # the CLI turns it into one line


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(BadImage, match="file not found"):
        load_image(tmp_path / "gone.png")


def test_corrupt_dir_fixture_reasons(corrupt_dir: Path) -> None:
    for name, reason in CORRUPT_FILES.items():
        with pytest.raises(BadImage, match=reason):
            load_image(corrupt_dir / name)


def test_palette_png_with_transparency_on_white(tmp_path: Path) -> None:
    img = Image.new("P", (20, 20), 0)
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))  # index 0 black, 1 red
    img.paste(1, (0, 0, 10, 20))  # left half red, right half index 0
    img.info["transparency"] = 0  # ...and index 0 is transparent
    p = tmp_path / "pal.png"
    img.save(p, transparency=0)
    with Image.open(p) as check:
        assert check.mode == "P" and "transparency" in check.info
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((15, 10)) == (255, 255, 255)  # transparent -> white, not black
    assert out.getpixel((5, 10)) == (255, 0, 0)


def test_rgba_and_la_composited_on_white(tmp_path: Path) -> None:
    rgba = Image.new("RGBA", (8, 8), (0, 0, 255, 0))
    rgba.putpixel((0, 0), (0, 0, 255, 255))
    rgba.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.getpixel((4, 4)) == (255, 255, 255) and out.getpixel((0, 0)) == (0, 0, 255)
    Image.new("LA", (8, 8), (0, 0)).save(tmp_path / "la.png")
    assert load_image(tmp_path / "la.png").getpixel((3, 3)) == (255, 255, 255)


def test_cmyk_jpeg_colours(tmp_path: Path) -> None:
    img = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red
    img.paste((255, 0, 255, 0), (16, 0, 32, 32))  # right half green
    p = tmp_path / "cmyk.jpg"
    img.save(p, quality=95)
    with Image.open(p) as check:
        assert check.mode == "CMYK"
    out = load_image(p)
    assert out.mode == "RGB"
    r, g, b = out.getpixel((4, 16))
    assert r > 200 and g < 60 and b < 60
    r, g, b = out.getpixel((28, 16))
    assert g > 200 and r < 60 and b < 60


def test_decompression_bomb_header(tmp_path: Path) -> None:
    # 10^10 pixels: over 2x Pillow's limit, so Image.open raises DecompressionBombError
    p = make_bomb_png(tmp_path / "huge.png", 100_000, 100_000)
    assert p.stat().st_size < 200
    with pytest.raises(BadImage, match=r"huge.png: too large"):
        load_image(p)
    # 10^8 pixels: between the limit and 2x the limit, Pillow only warns; that must fail too
    p = make_bomb_png(tmp_path / "big.png", 10_000, 10_000)
    with pytest.raises(BadImage, match=r"big.png: too large"):
        load_image(p)


def test_decompression_bomb_with_lowered_limit(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "ok.png"
    draw_shape("Circle", "Clipart", 0, 64).save(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 64*64 = 4096 > 2*1000
    with pytest.raises(BadImage, match="too large"):
        load_image(p)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 3000)  # 4096 in (3000, 6000]: warning level
    with pytest.raises(BadImage, match="too large"):
        load_image(p)


def test_16bit_greyscale_png(tmp_path: Path) -> None:
    a = np.zeros((16, 16), dtype=np.uint16)
    a[:, 8:] = 65535
    a[:8, :8] = 32768
    p = tmp_path / "g16.png"
    Image.fromarray(a).save(p)
    with Image.open(p) as check:
        assert check.mode.startswith("I")
    out = load_image(p)
    assert out.mode == "RGB"
    assert out.getpixel((12, 4)) == (255, 255, 255)  # full scale -> white, not clipped garbage
    assert out.getpixel((2, 12)) == (0, 0, 0)
    assert out.getpixel((2, 2)) == (128, 128, 128)  # mid-grey stays mid-grey


def test_16bit_big_endian_tiff(tmp_path: Path) -> None:
    a = np.full((8, 8), 65535, dtype=">u2")
    p = tmp_path / "g16b.tif"
    Image.fromarray(a).save(p)
    with Image.open(p) as check:
        assert check.mode == "I;16B"
    assert load_image(p).getpixel((1, 1)) == (255, 255, 255)


def test_is_image_file() -> None:
    assert is_image_file("a/b.JPG") and is_image_file("x.webp") and is_image_file("y.tiff")
    assert not is_image_file("notes.txt") and not is_image_file("noext")
