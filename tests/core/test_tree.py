"""The one folder scan (cdir/core/tree.py) on trees written here: order, what is skipped, link
loops, names that are not UTF-8, and the labelled ``<class>/<image>`` layout."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from cdir.core.errors import CdirError
from cdir.core.tree import images_under, list_images, listdir, scan_labelled


def _touch(root: Path, *names: str) -> None:
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).write_bytes(b"")


def test_list_images_is_depth_first_byte_sorted_and_skips_what_is_not_an_image(
        tmp_path: Path) -> None:
    _touch(tmp_path, "b.png", "B.JPG", "notes.txt", "noext", ".hidden.png", ".cache/x.png",
           "__MACOSX/._a.png", "__MACOSX/a.png", "a/z.webp", "a/deep/y.png", "a/c.tiff",
           "Z/x.gif")
    got = [os.path.relpath(p, tmp_path) for p in list_images(tmp_path)]
    # a folder's own images first, then its sub-folders in byte order ("Z" before "a")
    assert got == ["B.JPG", "b.png", "Z/x.gif", "a/c.tiff", "a/z.webp", "a/deep/y.png"]
    assert all(p.startswith(str(tmp_path)) for p in list_images(tmp_path))
    assert images_under(str(tmp_path / "a"), "top") == ["top/c.tiff", "top/z.webp",
                                                         "top/deep/y.png"]


def test_list_images_refuses_a_missing_or_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(CdirError, match="no folder"):
        list_images(tmp_path / "gone")
    _touch(tmp_path, "only.txt")
    with pytest.raises(CdirError, match="no images found"):
        list_images(tmp_path)


@pytest.mark.skipif(sys.platform == "win32", reason="symbolic links")
def test_a_link_loop_ends_and_each_real_folder_is_read_once(tmp_path: Path) -> None:
    _touch(tmp_path, "a/x.png")
    (tmp_path / "a" / "loop").symlink_to(tmp_path / "a", target_is_directory=True)
    (tmp_path / "b").symlink_to(tmp_path / "a", target_is_directory=True)
    assert [os.path.relpath(p, tmp_path) for p in list_images(tmp_path)] == ["a/x.png"]


@pytest.mark.skipif(sys.platform != "linux", reason="bytes in file names")
def test_names_that_are_not_utf8_are_listed_apart_or_kept(tmp_path: Path) -> None:
    _touch(tmp_path, "good.png")
    (tmp_path / os.fsdecode(b"bad\xff.png")).write_bytes(b"")
    bad: list[str] = []
    assert listdir(str(tmp_path), bad) == ([], ["good.png"])
    assert len(bad) == 1 and bad[0].endswith("bad\ufffd.png")
    assert len(list_images(tmp_path)) == 2  # a trainer can read it: kept


def test_scan_labelled_classes_subset_loose_images_and_counts(tmp_path: Path) -> None:
    _touch(tmp_path, "loose.png", "cat/1.png", "cat/sub/2.png", "dog/3.png", "owl/4.png",
           "owl/readme.txt", "empty/.keep")
    counts: list[int] = []
    scan = scan_labelled(tmp_path, rel="photo", found=counts.append)
    assert scan.rows == [("photo/cat/1.png", "cat"), ("photo/cat/sub/2.png", "cat"),
                         ("photo/dog/3.png", "dog"), ("photo/owl/4.png", "owl")]
    assert scan.classes == {"cat", "dog", "owl", "empty"} and scan.loose == ["photo/loose.png"]
    assert counts == [2, 1, 0, 1]  # cat, dog, empty, owl: byte order
    kept = scan_labelled(str(tmp_path), keep={"dog"})
    assert kept.rows == [("dog/3.png", "dog")] and kept.classes == scan.classes
    assert kept.loose == ["loose.png"]
