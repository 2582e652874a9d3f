"""`torchrun -m cdir embed` and `-m cdir caption`: the rows split over ranks (Gloo on CPU), each
rank writing its own shards or parts into the one store; the same ids and vectors (captions) as
one process, and a run continued with another world size, also after a rank was killed,
neither repeats nor misses a row."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cdir.core.store import EmbeddingStore
from tests.helpers.cli import REPO, cdir, emoji_workspace, torchrun

ENCODER = "pixels"


def _torchrun(nproc: int, *args: object, stage: str = "embed") -> subprocess.CompletedProcess:
    return torchrun(nproc, stage, *args, env={"HF_HUB_OFFLINE": "1"})


def _stored(ws):
    store = EmbeddingStore(next((ws / "embeddings").iterdir()))
    ids = [i for n in store._shards() for i in
           pd.read_json(store.dir / f"shard_{n:05d}.ids.json", typ="series").tolist()]
    m = pd.read_parquet(ws / "manifest.parquet")
    x, ok = store.load(m)
    return store, ids, x, ok


def test_two_ranks_embed_what_one_process_does(tmp_path):
    one = emoji_workspace(tmp_path / "one", 12)
    two = emoji_workspace(tmp_path / "two", 12)
    assert cdir("embed", "-w", one, "--encoder", ENCODER, "--workers", "0", "--no-progress") == 0
    proc = _torchrun(2, "-w", two, "--encoder", ENCODER, "--workers", "0", "--shard-rows", "5",
                     "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("embedded 36 new") == 1, proc.stdout  # rank 0 alone reports
    s1, ids1, x1, ok1 = _stored(one)
    s2, ids2, x2, ok2 = _stored(two)
    assert len(ids2) == len(set(ids2)) == 36 and set(ids2) == set(ids1)
    assert ok1.all() and ok2.all()
    np.testing.assert_allclose(x2, x1, atol=1e-6)
    assert len(s2._shards()) >= 8  # 18 rows a rank in shards of 5: each rank wrote its own
    assert not list(s2.dir.glob("*.claim"))


def test_a_run_continued_with_another_world_size(tmp_path):
    ws = emoji_workspace(tmp_path, 15)
    proc = _torchrun(2, "-w", ws, "--encoder", ENCODER, "--workers", "0", "--limit", "17",
                     "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    _, ids, _, _ = _stored(ws)
    assert len(ids) == len(set(ids)) == 17
    proc = _torchrun(3, "-w", ws, "--encoder", ENCODER, "--workers", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "embedded 28 new, 17 already done" in proc.stdout, proc.stdout
    _, ids, _, ok = _stored(ws)
    assert len(ids) == len(set(ids)) == 45 and ok.all()
    assert cdir("embed", "-w", ws, "--encoder", ENCODER, "--workers", "0") == 0  # one process:
    _, again, _, _ = _stored(ws)
    assert again == ids  # nothing left to do


def _rank_pid(parent: int, rank: int, timeout: float = 60) -> int:
    """The pid of the torchrun worker of ``rank`` among the children of ``parent``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for task in Path(f"/proc/{parent}/task").iterdir():
            for child in (task / "children").read_text().split():
                try:
                    env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
                except OSError:  # gone already
                    continue
                if f"RANK={rank}".encode() in env:
                    return int(child)
        time.sleep(0.05)
    raise AssertionError(f"no worker of rank {rank} under pid {parent}")


def test_a_killed_rank_loses_only_its_shard_in_flight(tmp_path):
    """SIGKILL one of two ranks mid-run: every shard in the store is whole (no duplicated
    rows), and a run with three ranks embeds only what is missing, to the vectors of one
    process."""
    encoder = "ckpt:encoders/weights/emoji_adapted.pt"
    flags = ["--encoder", encoder, "--workers", "0", "--batch-size", "4", "--shard-rows", "8",
             "--no-progress"]
    ws = emoji_workspace(tmp_path / "two", 150)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           "2", "-m", "cdir", "embed", "-w", str(ws), *flags]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        victim = _rank_pid(proc.pid, 1)
        deadline = time.monotonic() + 120
        while len(list(ws.glob("embeddings/*/shard_*.ids.json"))) < 4:  # both ranks under way
            assert proc.poll() is None and time.monotonic() < deadline, "finished before the kill"
            time.sleep(0.02)
        os.kill(victim, signal.SIGKILL)
        out = proc.communicate(timeout=120)[0]
    finally:
        proc.kill()
    assert proc.returncode != 0, out[-3000:]
    _, ids, _, _ = _stored(ws)
    total = len(pd.read_parquet(ws / "manifest.parquet"))
    assert len(ids) == len(set(ids)) and 0 < len(ids) < total
    again = _torchrun(3, "-w", ws, *flags)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"embedded {total - len(ids)} new, {len(ids)} already done" in again.stdout, \
        again.stdout
    _, ids, x, ok = _stored(ws)
    assert len(ids) == len(set(ids)) == total and ok.all()
    one = emoji_workspace(tmp_path / "one", 150)
    assert cdir("embed", "-w", one, *flags) == 0
    np.testing.assert_allclose(x, _stored(one)[2], atol=1e-5)


def test_unreadable_images_of_every_rank_are_listed_once(tmp_path):
    import json

    from tests.helpers.trees import write_shape_tree

    root = write_shape_tree(tmp_path / "gallery", domains=("a", "b"), classes=("c", "s"),
                            per_class=3, n_corrupt=3)
    ws = tmp_path / "ws"
    assert cdir("data", "folder", root, "-w", ws) == 0
    proc = _torchrun(2, "-w", ws, "--encoder", ENCODER, "--workers", "0", "--no-progress")
    assert proc.returncode == 0, proc.stderr[-3000:]
    store, ids, _, ok = _stored(ws)
    failed = json.loads((store.dir / "failed.json").read_text())
    assert len(failed) == 3 == len({r["id"] for r in failed})
    assert len(ids) == len(set(ids)) == int(ok.sum()) == 12
    assert "3 failed" in proc.stdout, proc.stdout


def test_two_ranks_caption_what_one_process_does(tmp_path, hf_offline):
    from cdir.core.caption_store import list_sources, load_captions
    from tests.helpers.tiny_models import tiny_model_path

    blip = f"hf:{tiny_model_path('blip')}"
    gen = ["--min-new-tokens", "2", "--max-new-tokens", "4", "--batch-size", "4",
           "--no-progress"]
    one = emoji_workspace(tmp_path / "one", 5)
    two = emoji_workspace(tmp_path / "two", 5)
    assert cdir("caption", "-w", one, "--captioner", blip, *gen) == 0
    proc = _torchrun(2, "-w", two, "--captioner", blip, "--limit", "9", *gen, stage="caption")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("captioned 9 new") == 1, proc.stdout
    proc = _torchrun(3, "-w", two, "--captioner", blip, *gen, stage="caption")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "captioned 6 new, 9 already done" in proc.stdout, proc.stdout
    a = load_captions(one).set_index("id")["caption"].sort_index()
    b = load_captions(two).set_index("id")["caption"].sort_index()
    assert b.index.is_unique and len(b) == 15 and b.equals(a)
    assert list_sources(two)[0]["count"] == 15
    store_parts = list((two / "captions").glob("*.parts"))
    assert not store_parts or not any(p.iterdir() for p in store_parts)  # all folded in


def test_memory_mapped_load_equals_the_stored_rows(tmp_path):
    """The store reads its shards memory-mapped into the manifest's order: the same vectors as
    the shards hold, a re-embedded id taking its later shard's vector, missing rows zero."""
    store = EmbeddingStore(tmp_path / "s")
    store.open("x", 4)
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((3, 4)).astype(np.float32) for _ in range(3))
    store.append(["p", "q", "r"], a)
    store.append(["s", "q"], b[:2])
    store.append(["t"], c[:1])
    unit = lambda v: v / np.linalg.norm(v)  # noqa: E731
    m = pd.DataFrame({"id": ["t", "q", "nope", "p", "s", "r"]})
    x, ok = store.load(m)
    assert ok.tolist() == [True, True, False, True, True, True]
    want = [unit(c[0]), unit(b[1]), np.zeros(4), unit(a[0]), unit(b[0]), unit(a[2])]
    np.testing.assert_allclose(x, np.stack(want), atol=1e-6)
    allrows, ok = store.load()
    assert allrows.shape == (6, 4) and ok.all()
    assert not list(store.dir.glob("*.claim"))
