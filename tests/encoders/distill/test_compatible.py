"""Compatible query encoders: `cdir distill --compatible INDEX` trains a small student into an
index's space as the index stores it (after its normalisation), its checkpoint records that
index, and `cdir search --query-encoder` encodes queries with it there and nowhere else."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers.cli import cdir, pixels_workspace

torch.set_num_threads(1)

TRAIN = ["--student", "resnet18", "--set", "model.backbone_kwargs.width=0.125", "--set",
         "aug.size=32", "--set", "method.queue_size=64", "--epochs", 2, "--batch-size", 4,
         "--workers", 0, "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """(gallery, workspace with a plain `pixels` index and a whitened one named "white" (a
    shared PCA to at most 8 dims), the student trained into "white")."""
    parent = tmp_path_factory.mktemp("compatible")
    gallery, ws = pixels_workspace(parent)
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--normalize",
                "domain-whiten", "--normalize-dim", 8, "--name", "white", "--cpu") == 0
    out = parent / "student"
    assert cdir("distill", "rrd", "-w", ws, "--compatible", "white", *TRAIN, "--out", out) == 0
    return gallery, ws, out / "student.pt"


@pytest.fixture(scope="module")
def second(trained: tuple[Path, Path, Path], tmp_path_factory: pytest.TempPathFactory
           ) -> tuple[Path, str]:
    """(a copy of the workspace with "white" built again as at first, a student trained into
    it): the refusal test rebuilds "white" in the shared one."""
    import shutil

    _, ws, _ = trained
    parent = tmp_path_factory.mktemp("compatible2")
    ws2 = parent / "ws"
    shutil.copytree(ws, ws2)
    assert cdir("index", "build", "-w", ws2, "--encoder", "pixels", "--normalize",
                "domain-whiten", "--normalize-dim", 8, "--name", "white", "--cpu",
                "--force") == 0
    out = parent / "student"
    assert cdir("distill", "rrd", "-w", ws2, "--compatible", "white", *TRAIN, "--epochs", 1,
                "--out", out) == 0
    return ws2, f"ckpt:{out / 'student.pt'}"


def _one_line_error(capsys: pytest.CaptureFixture, rc: int, text: str) -> None:
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(err) == 1 and text in err[0], err


def test_the_student_learns_the_index_vectors_and_records_the_index(
        trained: tuple[Path, Path, Path]) -> None:
    from cdir.core.workspace import Workspace
    from cdir.stages.distill import index_rows
    from cdir.stages.index import open_index
    from encoders.image import load_image_encoder
    from indexes.meta import compatibility

    _, ws, student = trained
    w = Workspace(ws)
    index = open_index(w, "white")
    paths, x, _, record = index_rows(w, "white", progress=False)
    # the targets are the vectors the index holds, after its whitening (not the raw pixels)
    ids = w.manifest().set_index("path").loc[paths, "id"].astype(str).tolist()
    d = index.meta.dim
    assert d < 1024 and x.shape == (8, d)  # the PCA's (capped by the rank of 8 rows)
    np.testing.assert_allclose(x, index.stored_vectors(ids), atol=1e-5)
    assert record == {"index": "white", **compatibility(index.meta, w.index_path("white"))}
    assert record["normalize"] == "domain-whiten" and len(record["content_sha256"]) == 64
    ckpt = torch.load(student, weights_only=True)
    assert ckpt["compatible"] == record
    assert ckpt["encoder_arch"]["kwargs"]["embed_dim"] == d
    assert load_image_encoder(f"ckpt:{student}").dim == d


def test_search_encodes_queries_with_the_compatible_student(
        trained: tuple[Path, Path, Path], capsys: pytest.CaptureFixture) -> None:
    from PIL import Image

    from cdir.core.workspace import Workspace
    from cdir.stages.index import open_index
    from encoders.image import load_image_encoder

    gallery, ws, student = trained
    query = sorted(p for p in gallery.rglob("*") if p.is_file())[0]
    capsys.readouterr()
    assert cdir("search", "-w", ws, "--index", "white", "--image", query, "-k", 3,
                "--query-encoder", f"ckpt:{student}", "--json") == 0
    got = json.loads(capsys.readouterr().out)[0]["results"]
    # the student's vector searched as it is: no whitening of the query on top
    q = load_image_encoder(f"ckpt:{student}").encode_images([Image.open(query).convert("RGB")])
    want = open_index(Workspace(ws), "white").search(q, k=3)
    assert [h["id"] for h in got] == list(want.ids[0])
    np.testing.assert_allclose([h["score"] for h in got], want.scores[0], atol=1e-5)
    # the same search with the index's own encoder gives other scores (the check can fail)
    assert cdir("search", "-w", ws, "--index", "white", "--image", query, "-k", 3,
                "--json") == 0
    own = json.loads(capsys.readouterr().out)[0]["results"]
    assert [h["score"] for h in own] != [h["score"] for h in got]
    # no per-domain transform of the student's queries, so --query-domain changes nothing
    assert cdir("search", "-w", ws, "--index", "white", "--image", query, "-k", 3,
                "--query-encoder", f"ckpt:{student}", "--query-domain", "a", "--json") == 0
    out = capsys.readouterr()
    assert json.loads(out.out)[0]["results"] == got
    assert "--query-domain a changes nothing with --query-encoder" in out.err


def test_anything_not_recorded_as_compatible_is_refused_in_one_line(
        trained: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    gallery, ws, student = trained
    query = sorted(p for p in gallery.rglob("*") if p.is_file())[0]
    plain = [n.name.removesuffix(".json") for n in (ws / "indexes").glob("*.json")
             if n.name != "white.json"]
    assert len(plain) == 1
    search = ["search", "-w", ws, "--image", query, "--query-encoder"]
    capsys.readouterr()
    # another index of the same encoder (plain, 1024-d)
    rc = cdir(*search, f"ckpt:{student}", "--index", plain[0])
    _one_line_error(capsys, rc, f"not compatible with index {plain[0]}")
    # not a checkpoint, and a checkpoint without the record
    rc = cdir(*search, "pixels", "--index", "white")
    _one_line_error(capsys, rc, "not recorded as compatible")
    bare = torch.load(student, weights_only=True)
    del bare["compatible"]
    torch.save(bare, tmp_path / "bare.pt")
    rc = cdir(*search, f"ckpt:{tmp_path / 'bare.pt'}", "--index", "white")
    _one_line_error(capsys, rc, "not recorded as compatible with any index")
    # distilling into the index at another width
    from indexes.meta import read_meta

    d = read_meta(ws / "indexes" / "white").dim
    rc = cdir("distill", "rrd", "-w", ws, "--compatible", "white", "--embed-dim", d + 1,
              *TRAIN, "--out", tmp_path / "wide")
    _one_line_error(capsys, rc, f"index's {d} dims, not --embed-dim {d + 1}")
    # the index rebuilt with other statistics: the student no longer fits it
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--normalize",
                "domain-whiten", "--normalize-dim", 4, "--name", "white", "--cpu",
                "--force") == 0
    capsys.readouterr()
    rc = cdir(*search, f"ckpt:{student}", "--index", "white")
    _one_line_error(capsys, rc, "not compatible with index white")


def test_the_demo_encodes_queries_of_that_index_with_the_student(
        trained: tuple[Path, Path, Path], second: tuple[Path, str], tmp_path: Path) -> None:
    """`cdir demo --query-encoder`: image queries of the index the student was trained for are
    encoded by it (the answer equals `cdir search --query-encoder`'s); other indexes keep their
    own encoder; an encoder without the record is refused."""
    from PIL import Image

    from app.backend import ALL_DOMAINS, DemoBackend, Query
    from cdir.core.errors import CdirError
    from cdir.stages.search import Searcher

    gallery = trained[0]
    ws2, spec = second
    backend = DemoBackend(ws2, query_encoder=spec)
    query = sorted(p for p in gallery.rglob("*") if p.is_file())[-1]
    copy = tmp_path / "query.png"  # not a gallery file: encoded, not looked up
    Image.open(query).convert("RGB").save(copy)
    answer = backend.search(Query(path=str(copy)), "visual", "white", None, target=ALL_DOMAINS,
                            k=3)
    assert not answer.error, answer.message
    assert backend.searcher("white", "visual").query_encoder == spec
    hits, _, _ = Searcher(str(ws2), index="white", query_encoder=spec).search(
        [Image.open(copy).convert("RGB")], k=3)
    assert [h.id for h in answer.hits] == [h.id for h in hits[0]]
    np.testing.assert_allclose([h.score for h in answer.hits], [h.score for h in hits[0]],
                               atol=1e-5)
    plain = next(i.name for i in backend.indexes if i.name != "white")
    assert backend.searcher(plain, "visual").query_encoder is None
    with pytest.raises(CdirError, match="not recorded as compatible"):
        DemoBackend(ws2, query_encoder="pixels")


def test_the_bench_reports_p1_and_latency_of_both(second: tuple[Path, str]) -> None:
    """bench/compatible_query.py on the tiny index: a table row per encoder, with a P@1 and a
    positive latency, and the ratio line."""
    import os
    import subprocess
    import sys

    from tests.helpers.cli import REPO

    ws2, spec = second
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "bench/compatible_query.py", "-w", str(ws2), "--index",
                        "white", "--student", spec, "--queries", "2", "--repeats", "1"],
                       cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    rows = {ln.split("|")[1].strip(): ln for ln in r.stdout.splitlines()
            if ln.startswith(("| teacher", "| student"))}
    assert set(rows) == {"teacher", "student"}
    for ln in rows.values():
        p1, ms = (float(c) for c in ln.split("|")[2:4])
        assert 0 <= p1 <= 100 and ms > 0
    assert "faster per query" in r.stdout
