"""Embedding extraction: shards, L2 norm, manifest order, resume after a limit or a hard kill,
corrupt files, DataLoader workers, the `cdir embed` command."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from cdir.core.manifest import make_manifest, save_manifest
from cdir.core.store import EmbeddingStore
from cdir.core.workspace import Workspace
from tests.helpers.tiny_models import write_tiny_clip_config
from tests.helpers.trees import make_bomb_png

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[2]
DOMAINS = ("photo", "sketch", "clipart")
CLASSES = ("ball", "box", "star", "tree")


def _draw(domain: str, cls: str, k: int, size: int) -> Image.Image:
    rng = np.random.default_rng(zlib.crc32(f"{domain}/{cls}/{k}".encode()))
    bg = (255, 255, 255) if domain != "photo" else tuple(int(c) for c in rng.integers(0, 255, 3))
    img = Image.new("RGB", (size, size + 8 * k), bg)
    d = ImageDraw.Draw(img)
    fill = None if domain == "sketch" else tuple(int(c) for c in rng.integers(0, 255, 3))
    box = [size * 0.2, size * 0.2, size * 0.8, size * 0.8]
    shape = {"ball": d.ellipse, "box": d.rectangle, "star": d.polygon, "tree": d.polygon}[cls]
    if cls == "star":
        shape([(size / 2, 5), (size * 0.6, size * 0.4), (size - 5, size * 0.45),
               (size * 0.65, size * 0.65), (size * 0.75, size - 5), (size / 2, size * 0.75)],
              fill=fill, outline=(0, 0, 0))
    elif cls == "tree":
        shape([(size / 2, 4), (size - 6, size * 0.7), (6, size * 0.7)], fill=fill,
              outline=(0, 0, 0))
    else:
        shape(box, fill=fill, outline=(0, 0, 0), width=2)
    return img


def make_gallery(root: Path, per_class: int = 3) -> Workspace:
    """3 domains x 4 classes x per_class images (PNG, JPEG and RGBA PNG) and their manifest."""
    rows = []
    for di, domain in enumerate(DOMAINS):
        for cls in CLASSES:
            for k in range(per_class):
                img = _draw(domain, cls, k, 48 + 8 * k)
                ext = ("png", "jpg", "png")[di]
                path = root / "images" / domain / cls / f"{cls}_{k}.{ext}"
                path.parent.mkdir(parents=True, exist_ok=True)
                if di == 2:
                    img = img.convert("RGBA")
                img.save(path)
                rows.append({"id": f"{domain}/{cls}/{path.name}", "path": str(path),
                             "domain": domain, "class_name": cls})
    ws = Workspace(root / "ws")
    save_manifest(make_manifest(rows), ws.manifest_path)
    return ws


def clone_workspace(ws: Workspace, root: Path) -> Workspace:
    """Another workspace over the same images (for an uninterrupted reference run)."""
    other = Workspace(root)
    save_manifest(ws.manifest(), other.manifest_path)
    return other


def stored_rows(ws: Workspace, spec: str) -> tuple[list[str], np.ndarray]:
    """Every stored row in shard order: (ids, vectors)."""
    d = ws.embeddings_dir(spec)
    ids: list[str] = []
    for f in sorted(d.glob("shard_*.ids.json")):
        ids += json.loads(f.read_text())
    vectors, _ = EmbeddingStore(d).load()
    return ids, vectors


@pytest.fixture(scope="module")
def gallery(tmp_path_factory) -> Workspace:
    return make_gallery(tmp_path_factory.mktemp("gallery"))


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory) -> str:
    return f"clip:{write_tiny_clip_config(tmp_path_factory.mktemp('cfg'))}/random"


def test_embed_pixels_gallery(gallery, tmp_path, capsys):
    from cdir.stages.embed import embed_images

    ws = clone_workspace(gallery, tmp_path / "ws")
    s = embed_images(ws, "pixels", batch_size=8, num_workers=0, shard_rows=16, progress=True)
    out = capsys.readouterr()
    assert s["new"] == 36 and s["already_done"] == 0 and s["failed"] == 0 and s["dim"] == 1024
    # the stage says nothing but its bar: the command prints the summary
    assert out.out == "" and "img/s" in out.err  # the tqdm bar
    assert "embedded 36 new, 0 already done, 0 failed" in s["line"] and "images/s" in s["line"]
    assert s["messages"] == []
    ids, vectors = stored_rows(ws, "pixels")
    manifest = ws.manifest()
    assert ids == manifest["id"].tolist()  # manifest order
    assert len(sorted(ws.embeddings_dir("pixels").glob("shard_*.npy"))) == 3  # 16 + 16 + 4
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)
    loaded, valid = EmbeddingStore(ws.embeddings_dir("pixels")).load(manifest)
    assert valid.all() and np.array_equal(loaded, vectors)

    again = embed_images(ws, "pixels", num_workers=0, progress=False)  # nothing left to do
    assert (again["new"], again["already_done"]) == (0, 36)
    assert stored_rows(ws, "pixels")[0] == ids


def test_stored_rows_are_the_encoders_vectors_of_the_bytes_hashed(gallery, tiny_clip, tmp_path):
    """What loader workers hand over (uint8 images, made float per batch) embeds as the
    encoder's own transform does, and each row records the hash of the bytes it was made from."""
    from cdir.core.images import load_image
    from cdir.core.manifest import file_sha256, stamp_files
    from cdir.stages.embed import embed_images
    from encoders.image import load_image_encoder

    ws = clone_workspace(gallery, tmp_path / "ws")
    manifest = ws.manifest()
    stamp_files(manifest)  # sizes and times, as `cdir data` records them
    save_manifest(manifest, ws.manifest_path)
    embed_images(ws, tiny_clip, batch_size=5, num_workers=2, progress=False)
    ids, vecs = stored_rows(ws, tiny_clip)
    paths = ws.manifest().set_index("id").loc[ids, "path"].tolist()
    want = load_image_encoder(tiny_clip).encode_images([load_image(p) for p in paths])
    np.testing.assert_allclose(vecs, want, atol=1e-6)
    versions = EmbeddingStore(ws.embeddings_dir(tiny_clip)).versions()
    assert [versions[i].split()[1] for i in ids] == [file_sha256(p) for p in paths]


def test_resume_after_limit_matches_uninterrupted(gallery, tiny_clip, tmp_path):
    from cdir.stages.embed import embed_images

    ref_ws = clone_workspace(gallery, tmp_path / "ref")
    s = embed_images(ref_ws, tiny_clip, batch_size=4, num_workers=0, shard_rows=8,
                     progress=False)
    assert s["new"] == 36 and s["dim"] == 32
    ref_ids, ref_vecs = stored_rows(ref_ws, tiny_clip)

    ws = clone_workspace(gallery, tmp_path / "ws")
    first = embed_images(ws, tiny_clip, batch_size=4, num_workers=0, shard_rows=8, limit=10,
                         progress=False)
    assert (first["new"], first["remaining"]) == (10, 26)
    rest = embed_images(ws, tiny_clip, batch_size=4, num_workers=0, shard_rows=8,
                        progress=False)
    assert (rest["new"], rest["already_done"]) == (26, 10)
    ids, vecs = stored_rows(ws, tiny_clip)
    assert ids == ref_ids == ws.manifest()["id"].tolist()  # no duplicates, no gaps, same order
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1, atol=1e-5)


def test_resume_after_hard_kill(gallery, tiny_clip, tmp_path):
    """SIGKILL mid-run (after 20 of 36 rows, shards of 8): the two finished shards survive, the
    next run embeds exactly the other 20 rows, and the result equals an uninterrupted run."""
    from cdir.stages.embed import embed_images

    ws = clone_workspace(gallery, tmp_path / "ws")
    script = (
        "import os, signal, torch\n"
        "torch.set_num_threads(1)\n"
        "from cdir.stages.embed import embed_images\n"
        "def cb(done, total):\n"
        "    if done >= 20:\n"
        "        os.kill(os.getpid(), signal.SIGKILL)\n"
        f"embed_images({str(ws.root)!r}, {tiny_clip!r}, batch_size=4, num_workers=0,\n"
        "             shard_rows=8, progress=False, callback=cb)\n"
        "print('not killed')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    store = EmbeddingStore(ws.embeddings_dir(tiny_clip))
    assert len(store.done_ids()) == 16  # rows 17-20 were in flight
    assert not list(store.dir.glob(".*.tmp"))

    s = embed_images(ws, tiny_clip, batch_size=4, num_workers=0, shard_rows=8, progress=False)
    assert (s["new"], s["already_done"]) == (20, 16)
    ref_ws = clone_workspace(gallery, tmp_path / "ref")
    embed_images(ref_ws, tiny_clip, batch_size=4, num_workers=0, shard_rows=8, progress=False)
    ids, vecs = stored_rows(ws, tiny_clip)
    ref_ids, ref_vecs = stored_rows(ref_ws, tiny_clip)
    assert ids == ref_ids and len(set(ids)) == 36
    np.testing.assert_allclose(vecs, ref_vecs, atol=1e-5)


def test_corrupt_files_are_skipped_and_listed(gallery, tmp_path, capsys):
    from cdir.stages.embed import embed_images

    bad = tmp_path / "bad"
    bad.mkdir()
    good = Image.open(gallery.manifest()["path"].iloc[0]).convert("RGB")
    good.save(bad / "full.jpg", quality=90)
    data = (bad / "full.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "empty.jpg").write_bytes(b"")
    (bad / "text.jpg").write_text("this is not an image\n")
    make_bomb_png(bad / "bomb.png", 20_000, 20_000)  # 400 Mpx: the decompression-bomb guard
    rows = [{"id": r.id, "path": r.path, "domain": r.domain, "class_name": r.class_name}
            for r in gallery.manifest().itertuples()]
    names = ("truncated.jpg", "empty.jpg", "text.jpg", "bomb.png")
    rows += [{"id": f"bad/{n}", "path": str(bad / n), "domain": "photo", "class_name": "ball"}
             for n in names]
    ws = Workspace(tmp_path / "ws")
    save_manifest(make_manifest(rows), ws.manifest_path)

    s = embed_images(ws, "pixels", batch_size=8, num_workers=0, shard_rows=16, progress=True)
    out = capsys.readouterr()
    assert (s["new"], s["failed"]) == (36, 4)
    reasons = {r["id"]: r["reason"] for r in s["failures"]}
    assert set(reasons) == {f"bad/{n}" for n in names}
    assert "empty file" in reasons["bad/empty.jpg"]
    assert "not an image" in reasons["bad/text.jpg"]
    assert "truncated" in reasons["bad/truncated.jpg"]
    assert "too large" in reasons["bad/bomb.png"]
    assert "could not be read" not in out.err  # the command prints the messages
    report, = s["messages"]
    assert "4 image(s) could not be read" in report and "bad/bomb.png" in report
    assert str(ws.embeddings_dir("pixels") / "failed.json") in report
    store = EmbeddingStore(ws.embeddings_dir("pixels"))
    assert {r["id"] for r in store.failed()} == set(reasons)
    assert all(r["path"].startswith(str(bad)) for r in store.failed())
    _, valid = store.load(ws.manifest())
    assert valid.sum() == 36

    again = embed_images(ws, "pixels", num_workers=0, progress=False)  # failures are retried
    assert (again["new"], again["already_done"], again["failed"]) == (0, 36, 4)
    good.save(bad / "empty.jpg")  # the user fixes one file
    fixed = embed_images(ws, "pixels", num_workers=0, progress=False)
    assert (fixed["new"], fixed["failed"], fixed["failed_total"]) == (1, 3, 3)
    assert "bad/empty.jpg" not in {r["id"] for r in store.failed()}


def test_workers_give_the_same_rows(gallery, tmp_path):
    from cdir.stages.embed import embed_images

    a = clone_workspace(gallery, tmp_path / "a")
    b = clone_workspace(gallery, tmp_path / "b")
    embed_images(a, "pixels", batch_size=5, num_workers=0, progress=False)
    s = embed_images(b, "pixels", batch_size=5, num_workers=2, shard_rows=7, progress=False)
    assert s["new"] == 36
    ids_a, vecs_a = stored_rows(a, "pixels")
    ids_b, vecs_b = stored_rows(b, "pixels")
    assert ids_a == ids_b
    np.testing.assert_array_equal(vecs_a, vecs_b)


class _Niceness(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int) -> int:
        return os.nice(0)


def test_loader_workers_beside_a_cpu_model_run_at_the_lowest_priority():
    """Workers that share the cores with a CPU model yield to its threads (nice 19); the main
    process keeps its own priority."""
    from cdir.stages.embed import cpu_loader_worker

    before = os.nice(0)
    loader = torch.utils.data.DataLoader(_Niceness(), batch_size=1, num_workers=1,
                                         worker_init_fn=cpu_loader_worker)
    assert [int(x) for x in loader] == [min(before + 19, 19)] * 2  # 19 above ours, at most 19
    assert os.nice(0) == before


def test_cli_embed(gallery, tmp_path, capsys):
    from cdir.cli import main

    ws = clone_workspace(gallery, tmp_path / "ws")
    args = ["embed", "-w", str(ws.root), "--workers", "0", "--no-progress"]
    assert main(args + ["--encoder", "pixels", "--limit", "5"]) == 0
    assert "embedded 5 new, 0 already done, 0 failed, 31 left" in capsys.readouterr().out
    assert main(args + ["--encoder", "pixels"]) == 0
    assert "embedded 31 new, 5 already done" in capsys.readouterr().out
    # with the bar too, the command (not the stage) says it, once
    assert main(["embed", "-w", str(ws.root), "--workers", "0", "--encoder", "pixels"]) == 0
    assert capsys.readouterr().out.count("embedded 0 new, 36 already done") == 1

    assert main(args + ["--encoder", "nope:x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "unknown image encoder 'nope:x'" in err
    assert main(args) == 2
    assert "--encoder" in capsys.readouterr().err
    assert main(["embed", "-w", str(tmp_path / "nowhere"), "--encoder", "pixels"]) == 2
    assert "not a cdir workspace" in capsys.readouterr().err


def test_non_finite_rows_are_listed_not_fatal(gallery, tmp_path):
    """A model that overflows on some inputs (fp16) loses those rows, not the run."""
    from cdir.stages.embed import embed_images
    from encoders.image import PixelsEncoder

    class Overflowing(PixelsEncoder):
        def encode(self, batch):
            out = super().encode(batch)
            out[batch[:, 0] > 0.2] = float("nan")  # images with a bright top-left pixel
            return out

    ws = clone_workspace(gallery, tmp_path / "ws")
    enc = Overflowing("pixels")
    expected = sum(float(enc.transform(Image.open(p).convert("RGB"))[0]) > 0.2
                   for p in ws.manifest()["path"])
    assert 0 < expected < 36
    s = embed_images(ws, "pixels", num_workers=0, encoder=enc, progress=False)
    assert (s["new"], s["failed"]) == (36 - expected, expected)
    assert {r["reason"] for r in s["failures"]} == {"non-finite embedding"}


def test_ctrl_c_keeps_every_finished_row(gallery, tmp_path):
    """On KeyboardInterrupt (or any error) the rows already encoded are flushed, not dropped."""
    from cdir.stages.embed import embed_images

    ws = clone_workspace(gallery, tmp_path / "ws")

    def interrupt(done, total):
        if done >= 12:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_images(ws, "pixels", batch_size=4, num_workers=0, shard_rows=8, progress=False,
                     callback=interrupt)
    ids, _ = stored_rows(ws, "pixels")
    assert ids == ws.manifest()["id"].tolist()[:12]  # the shard of 8 and the 4 in flight
    s = embed_images(ws, "pixels", num_workers=0, progress=False)
    assert (s["new"], s["already_done"]) == (24, 12)
    assert stored_rows(ws, "pixels")[0] == ws.manifest()["id"].tolist()
