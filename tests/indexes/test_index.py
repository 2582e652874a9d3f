"""The indexes package (kinds, build, meta, index) on real FAISS (CPU): exactness, recall,
filters, persistence, refusals."""

from __future__ import annotations

import os

import numpy as np
import pytest

faiss = pytest.importorskip("faiss")

from cdir.core.errors import CdirError  # noqa: E402
from indexes import index as fi  # noqa: E402
from indexes import meta as fm  # noqa: E402
from indexes.build import build_index  # noqa: E402
from indexes.index import load_index  # noqa: E402
from indexes.kinds import KINDS, choose_device, default_params  # noqa: E402
from indexes.meta import index_files, read_meta  # noqa: E402

DOMAINS = ("clipart", "photo", "sketch")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # the test machine is small and shared; FAISS would otherwise use every core
    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def random_data(n: int, d: int = 32, seed: int = 0):
    rng = np.random.default_rng(seed)
    x = unit(rng.standard_normal((n, d)).astype(np.float32))
    ids = [f"img/{i:05d}.png" for i in range(n)]
    doms = [DOMAINS[i % 3] if i % 10 else "sketch" for i in range(n)]  # unequal domain sizes
    return x, ids, doms


def clustered(n: int, d: int = 32, c: int = 40, seed: int = 0, sigma: float = 0.35) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = unit(rng.standard_normal((c, d)).astype(np.float32))
    x = centers[rng.integers(0, c, n)] + sigma / np.sqrt(d) * rng.standard_normal((n, d))
    return unit(x.astype(np.float32))


def brute_force(x: np.ndarray, q: np.ndarray, k: int, rows: np.ndarray | None = None):
    rows = np.arange(len(x)) if rows is None else rows
    s = unit(q) @ x[rows].T
    order = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(s, order, axis=1), rows[order]


# -- exactness and recall ------------------------------------------------------------------------
def test_flat_equals_brute_force():
    x, ids, doms = random_data(600)
    q = np.random.default_rng(1).standard_normal((25, 32)).astype(np.float32) * 3  # not unit
    index = build_index(x * 2.5, ids, doms, kind="flat", encoder_spec="pixels")  # re-normalised
    res = index.search(q, 10)
    s_ref, p_ref = brute_force(x, q, 10)
    np.testing.assert_array_equal(res.positions, p_ref)
    np.testing.assert_allclose(res.scores, s_ref, atol=1e-5)
    assert res.ids[3, 0] == ids[p_ref[3, 0]]
    assert res.scores.dtype == np.float32 and res.positions.dtype == np.int64
    one = index.search(q[0], 3)  # a 1-D query is one query
    assert one.positions.shape == (1, 3) and list(one.positions[0]) == list(p_ref[0, :3])


@pytest.mark.parametrize("kind, params, min_recall, min_top1", [
    ("ivf", {}, 0.95, 0.98),
    ("ivfpq", {}, 0.25, 0.45),  # 8 bytes per vector: lossy by design
    ("ivfpq", {"pq_m": 16}, 0.45, 0.75),
    ("hnsw", {}, 0.95, 0.98),
])
def test_approximate_recall_against_flat(kind, params, min_recall, min_top1):
    x = clustered(4100, d=64)
    x, q = x[:4000], x[4000:]
    ids, doms = [str(i) for i in range(4000)], ["d"] * 4000
    truth = build_index(x, ids, doms, "flat").search(q, 10).positions
    found = build_index(x, ids, doms, kind, **params).search(q, 10).positions
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(found, truth, strict=True)])
    top1 = np.mean([t[0] in f for f, t in zip(found, truth, strict=True)])
    # measured on this data (10-recall@10 / true NN in top 10): ivf 1.0/1.0, hnsw 1.0/1.0,
    # ivfpq 0.34/0.55 with the default 8 sub-quantizers, 0.56/0.86 with 16; chance is 0.0025
    assert recall >= min_recall and top1 >= min_top1, (kind, recall, top1)


@pytest.mark.parametrize("kind", KINDS)
def test_tiny_collection_every_kind(kind):
    x, ids, doms = random_data(5, d=8)
    index = build_index(x, ids, doms, kind=kind)
    res = index.search(x, 10)
    assert (res.positions[:, :5] >= 0).all()
    np.testing.assert_array_equal(res.positions[:, 5:], -1)  # padded at the end
    assert np.isneginf(res.scores[:, 5:]).all() and (res.ids[:, 5:] == "").all()
    if kind != "ivfpq":  # PQ codes of 5 vectors are too coarse to promise self-match first
        np.testing.assert_array_equal(res.positions[:, 0], np.arange(5))


# -- domain filter ---------------------------------------------------------------------------------
def test_domain_filter_is_exact_top_k_within_the_domain():
    x, ids, doms = random_data(900)
    q = np.random.default_rng(2).standard_normal((30, 32)).astype(np.float32)
    index = build_index(x, ids, doms, "flat")
    for domain in (["photo"], ["clipart", "sketch"]):
        rows = np.flatnonzero(np.isin(doms, domain))
        res = index.search(q, 15, domain=domain if len(domain) > 1 else domain[0])
        s_ref, p_ref = brute_force(x, q, 15, rows)
        np.testing.assert_array_equal(res.positions, p_ref)
        np.testing.assert_allclose(res.scores, s_ref, atol=1e-5)
        # and it is not "top-k overall, then filtered": that would return fewer rows
        overall = index.search(q, 15).positions
        assert np.isin(overall, rows).sum() < res.positions.size


@pytest.mark.parametrize("kind", ["ivf", "ivfpq", "hnsw"])
def test_domain_filter_approximate_kinds_fill_k_from_a_small_domain(kind):
    x = clustered(3000, seed=3)
    doms = ["rare" if i % 60 == 0 else "common" for i in range(3000)]  # 50 rare rows
    ids = [str(i) for i in range(3000)]
    # a small nprobe / efSearch finds few rare rows at first: the search must widen by itself
    params = {"ivf": {"nprobe": 1}, "ivfpq": {"nprobe": 1}, "hnsw": {"ef_search": 10}}[kind]
    index = build_index(x, ids, doms, kind, **params)
    sel = index._selection("rare")
    (reach,) = params.values()
    one_pass = index._cpu.search(x[:20], 20, params=index._params(
        reach, faiss.IDSelectorBitmap(len(sel[1]), faiss.swig_ptr(sel[1]))))[1]
    assert ((one_pass >= 0).sum(axis=1) < 20).any()  # a single FAISS pass would come up short
    res = index.search(x[:20], 20, domain="rare")
    assert (res.positions >= 0).all()
    assert all(doms[p] == "rare" for p in res.positions.ravel())
    assert (np.diff(res.scores, axis=1) <= 1e-6).all()  # best first
    if kind != "ivfpq":  # exact scores: the widened search finds the true in-domain top-k
        rare = np.flatnonzero(np.array(doms) == "rare")
        _, p_ref = brute_force(x, x[:20], 20, rare)
        assert np.mean([len(set(a) & set(b)) / 20 for a, b in zip(res.positions, p_ref,
                                                                    strict=True)]) >= 0.85


def test_domain_smaller_than_k_is_padded_and_unknown_domain_refused():
    x, ids, _ = random_data(40)
    doms = ["few"] * 3 + ["many"] * 37
    index = build_index(x, ids, doms, "flat")
    res = index.search(x[:2], 5, domain="few")
    assert sorted(res.positions[0, :3]) == [0, 1, 2]
    np.testing.assert_array_equal(res.positions[:, 3:], -1)
    with pytest.raises(CdirError, match="unknown domain.*'Clipart'.*few, many"):
        index.search(x[:1], 5, domain="Clipart")


def test_oversampling_path_without_selectors_matches_selector_search():
    # the GPU path: an index that can't filter is asked for more neighbours; any CPU index stands in
    x, ids, doms = random_data(500)
    index = build_index(x, ids, doms, "flat")
    q = x[:12]
    sel = index._selection("photo")
    want = index.search(q, 10, domain="photo")
    calls = []

    def fallback(rows):
        calls.append(rows)
        return index._search_cpu(q[rows], 10, 10, sel, None)

    s, p = fi._oversample_search(index._cpu, q, 10, 10, sel[0], None, fallback)
    np.testing.assert_array_equal(p, want.positions)
    assert not calls  # 500 rows fit under the GPU k limit: no CPU fall-back needed
    # with a k limit too small to reach 10 in-domain hits, the short queries go to the fallback
    s, p = fi._oversample_search(index._cpu, q, 10, 10, sel[0], None, fallback, max_k=12)
    np.testing.assert_array_equal(p, want.positions)
    np.testing.assert_allclose(s, want.scores, atol=1e-6)
    assert calls and len(calls[0]) > 0


# -- growing ---------------------------------------------------------------------------------------
def test_incremental_add_matches_a_full_build(tmp_path):
    x, ids, doms = random_data(500)
    full = build_index(x, ids, doms, "flat")
    grown = build_index(x[:300], ids[:300], doms[:300], "flat", manifest_fingerprint="fp300")
    grown.add(x[300:], ids[300:], doms[300:], manifest_fingerprint="fp500")
    assert len(grown) == 500 and grown.meta.count == 500 and grown.position(ids[450]) == 450
    assert grown.meta.domain_counts == full.meta.domain_counts
    q = x[::50]
    np.testing.assert_array_equal(grown.search(q, 10).positions, full.search(q, 10).positions)
    np.testing.assert_array_equal(
        grown.search(q, 10, domain="photo").positions, full.search(q, 10, domain="photo").positions)
    grown.save(tmp_path / "g.faiss")
    back = load_index(tmp_path / "g.faiss", expect_fingerprint="fp500")
    assert back.meta.count == 500 and back.ids == ids


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_incremental_add_approximate(kind):
    x = clustered(2000, seed=5)
    ids = [str(i) for i in range(2000)]
    index = build_index(x[:1500], ids[:1500], ["a"] * 1500, kind)
    index.add(x[1500:], ids[1500:], ["b"] * 500)
    res = index.search(x[1500:1510], 1, domain="b")
    np.testing.assert_array_equal(res.positions[:, 0], np.arange(1500, 1510))  # finds itself


def test_duplicate_ids_are_rejected():
    x, ids, doms = random_data(20)
    with pytest.raises(CdirError, match="duplicate id"):
        build_index(x, ids[:19] + [ids[0]], doms)
    index = build_index(x[:10], ids[:10], doms[:10])
    with pytest.raises(CdirError, match="already in the index.*img/00003"):
        index.add(x[10:12], [ids[3], "new"], doms[10:12])
    assert len(index) == 10  # nothing was added


# -- input validation ------------------------------------------------------------------------------
def test_bad_vectors_are_rejected():
    x, ids, doms = random_data(10)
    bad = x.copy()
    bad[4, 2] = np.nan
    with pytest.raises(CdirError, match="NaN or inf.*row 4"):
        build_index(bad, ids, doms)
    bad[4, 2] = np.inf
    with pytest.raises(CdirError, match="NaN or inf"):
        build_index(bad, ids, doms)
    bad[4] = 0
    with pytest.raises(CdirError, match="all-zero"):
        build_index(bad, ids, doms)
    with pytest.raises(CdirError, match="2-D"):
        build_index(x[0], ids[:1], doms[:1])
    with pytest.raises(CdirError, match="10 vectors but 9 ids"):
        build_index(x, ids[:9], doms)
    with pytest.raises(CdirError, match="unknown index type"):
        build_index(x, ids, doms, kind="lsh")
    index = build_index(x, ids, doms)
    with pytest.raises(CdirError, match="dimension 16 but the index holds 32"):
        index.search(np.ones((1, 16), np.float32), 3)
    with pytest.raises(CdirError, match="NaN"):
        index.search(np.full((1, 32), np.nan, np.float32), 3)
    with pytest.raises(CdirError, match="positive integer"):
        index.search(x[:1], 0)


def test_default_params():
    assert default_params("ivf", 100_000, 128)["nlist"] == 1265  # 4·√N
    assert default_params("ivf", 1000, 128)["nlist"] == 25  # ≥ 39 training points per list
    assert default_params("ivf", 5, 8)["nlist"] == 1
    p = default_params("ivfpq", 100_000, 384)
    assert p["pq_m"] == 48 and p["pq_nbits"] == 8  # 8-dim sub-vectors
    assert default_params("ivfpq", 100_000, 768)["pq_m"] == 64  # at most 64 bytes per vector
    assert default_params("ivfpq", 1000, 100)["pq_m"] == 10  # a divisor of the dimension
    assert default_params("ivfpq", 100, 32)["pq_nbits"] == 4
    assert default_params("hnsw", 10, 8) == {"hnsw_m": 32, "ef_construction": 80, "ef_search": 64}
    assert default_params("hnsw", 10, 8, ef_search=200)["ef_search"] == 200
    with pytest.raises(CdirError, match="must divide"):
        default_params("ivfpq", 1000, 32, pq_m=5)
    with pytest.raises(CdirError, match="nlist=500 needs at least 500"):
        default_params("ivf", 100, 32, nlist=500)
    with pytest.raises(CdirError, match="no parameter.*ef_search"):
        default_params("ivf", 100, 32, ef_search=5)


# -- persistence -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip(tmp_path, kind):
    x = clustered(1200, seed=7)
    ids = [f"id{i}" for i in range(1200)]
    doms = [DOMAINS[i % 3] for i in range(1200)]
    index = build_index(x, ids, doms, kind, encoder_spec="clip:ViT-B-32/openai",
                        manifest_fingerprint="abc123")
    out = index.save(tmp_path / "indexes" / "main.faiss")
    files = index_files(out)
    assert out == files.faiss and all(f.exists() for f in files)
    assert not [p for p in files.faiss.parent.iterdir() if p.name.endswith(".tmp")]
    meta = read_meta(files.meta)
    assert (meta.kind, meta.dim, meta.count, meta.metric) == (kind, 32, 1200, "ip")
    assert meta.encoder_spec == "clip:ViT-B-32/openai" and meta.manifest_fingerprint == "abc123"
    assert meta.versions["faiss"] == faiss.__version__ and set(meta.versions) >= {"numpy", "cdir"}
    assert meta.domain_counts == {"clipart": 400, "photo": 400, "sketch": 400}

    back = load_index(tmp_path / "indexes" / "main", expect_encoder="clip:ViT-B-32/openai",
                      expect_fingerprint="abc123", gpu=False)
    assert back.meta.params == index.meta.params and back.ids == ids and back.domains == doms
    for domain in (None, "photo"):
        a, b = index.search(x[:20], 10, domain=domain), back.search(x[:20], 10, domain=domain)
        np.testing.assert_array_equal(a.positions, b.positions)
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.ids, b.ids)


def test_refuses_other_encoder_and_changed_gallery(tmp_path):
    x, ids, doms = random_data(50)
    build_index(x, ids, doms, encoder_spec="clip:ViT-B-32/openai",
                manifest_fingerprint="fp-old").save(tmp_path / "img.faiss")
    with pytest.raises(CdirError) as e:
        load_index(tmp_path / "img.faiss", expect_encoder="st:all-MiniLM-L6-v2")
    msg = str(e.value)
    assert "img.faiss" in msg and "clip:ViT-B-32/openai" in msg and "st:all-MiniLM-L6-v2" in msg
    assert "cdir index build --encoder st:all-MiniLM-L6-v2" in msg
    with pytest.raises(CdirError, match="fp-old.*fp-new.*cdir index build"):
        load_index(tmp_path / "img.faiss", expect_encoder="clip:ViT-B-32/openai",
                   expect_fingerprint="fp-new")
    assert len(load_index(tmp_path / "img.faiss", "clip:ViT-B-32/openai", "fp-old")) == 50


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(CdirError, match="no index at .*nothing.*cdir index build"):
        load_index(tmp_path / "nothing.faiss")
    x, ids, doms = random_data(50)
    path = build_index(x, ids, doms).save(tmp_path / "a.faiss")
    files = index_files(path)
    data = files.faiss.read_bytes()
    files.faiss.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(CdirError, match="does not match its sidecar"):
        load_index(path)
    with pytest.raises(CdirError, match="could not be read"):
        load_index(path, verify=False)
    files.faiss.write_bytes(data)
    files.meta.write_text("{not json")
    with pytest.raises(CdirError, match="unreadable"):
        load_index(path)


def test_interrupted_save_leaves_the_previous_index_intact(tmp_path, monkeypatch):
    x, ids, doms = random_data(300)
    index = build_index(x[:200], ids[:200], doms[:200], "hnsw", encoder_spec="pixels")
    path = index.save(tmp_path / "ix.faiss")
    files = index_files(path)
    before = {f: f.read_bytes() for f in files}
    index.add(x[200:], ids[200:], doms[200:])

    import pyarrow.parquet as pq

    def crash(*a, **k):
        raise OSError("disk full")

    for target, name in ((fi, "_write_faiss"), (pq, "write_table"), (fm, "sha256_file")):
        with monkeypatch.context() as m:  # fail at each stage of the write
            m.setattr(target, name, crash)
            with pytest.raises(OSError, match="disk full"):
                index.save(path)
        assert {f: f.read_bytes() for f in files} == before
        assert sorted(os.listdir(tmp_path)) == sorted(f.name for f in files)  # no temp files
    assert len(load_index(path)) == 200

    # a crash between two renames (new .faiss, old sidecar) is detected, not silently mixed
    index.save(tmp_path / "other.faiss")
    files.faiss.write_bytes((tmp_path / "other.faiss").read_bytes())
    with pytest.raises(CdirError, match="does not match its sidecar"):
        load_index(path)
    index.save(path)
    assert len(load_index(path)) == 300


# -- device choice ---------------------------------------------------------------------------------
def test_choose_device():
    assert choose_device("flat", None, num_gpus=1, gpu_build=True)[0] == "gpu"
    assert choose_device("ivfpq", True, num_gpus=2, gpu_build=True)[0] == "gpu"
    assert choose_device("hnsw", None, num_gpus=1, gpu_build=True)[0] == "cpu"
    assert choose_device("hnsw", True, num_gpus=1, gpu_build=True) == (
        "cpu", "FAISS has no GPU version of hnsw indexes")
    assert choose_device("flat", False, num_gpus=1, gpu_build=True)[0] == "cpu"
    assert choose_device("flat", None, num_gpus=0, gpu_build=False)[0] == "cpu"
    with pytest.raises(CdirError, match=r"CPU-only build.*cdir\[gpu\]"):
        choose_device("flat", True, num_gpus=0, gpu_build=False)
    with pytest.raises(CdirError, match="sees no GPU"):
        choose_device("ivf", True, num_gpus=0, gpu_build=True)


@pytest.mark.skipif(hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0,
                    reason="a GPU is present")
def test_gpu_required_without_gpu_is_a_clear_error(tmp_path):
    x, ids, doms = random_data(20)
    with pytest.raises(CdirError, match=r"--gpu asked for a GPU.*pip install 'cdir\[gpu\]'"):
        build_index(x, ids, doms, "flat", gpu=True)
    index = build_index(x, ids, doms, "flat", gpu=None)  # auto: quietly CPU
    assert index.device == "cpu"
    index.save(tmp_path / "a.faiss")
    with pytest.raises(CdirError, match="--gpu"):
        load_index(tmp_path / "a.faiss", gpu=True)


def test_faiss_prints_nothing_of_its_own_during_build_and_search(tmp_path):
    """The on-disk lists of a sharded index print from C++ ("resizing ...", "IO_FLAG_ONDISK
    ...") when built, extended and read: none of it reaches the terminal of `cdir index build`
    or `cdir search` (a process of its own, so C's buffers are flushed at its exit)."""
    import shutil
    import subprocess
    import sys

    from tests.helpers.cli import REPO, pixels_workspace
    from tests.helpers.trees import write_shape_tree

    root, ws = pixels_workspace(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}

    def output(*args: object) -> str:
        proc = subprocess.run([sys.executable, "-m", "cdir", *map(str, args)], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout + proc.stderr

    build = ("index", "build", "-w", ws, "--encoder", "pixels", "--type", "ivf", "--shards", 2,
             "--name", "disk")
    query = sorted((root / "a" / "circle").iterdir())[0]
    texts = [output(*build), output("search", "-w", ws, "--index", "disk", "--image", query)]
    extra = write_shape_tree(tmp_path / "extra", domains=("a", "b"), classes=("ring",),
                             per_class=2)
    for dom in ("a", "b"):  # a grown gallery: the on-disk lists are built again
        shutil.copytree(extra / dom / "ring", root / dom / "ring")
    texts.append(output("data", "folder", root, "-w", ws))
    texts.append(output("embed", "-w", ws, "--encoder", "pixels", "--workers", "0"))
    texts.append(output(*build))
    texts.append(output("search", "-w", ws, "--index", "disk", "--image", query))
    assert "built ivf index disk" in texts[0] and str(query) in texts[1]
    for text in texts:
        assert "resizing" not in text and "IO_FLAG" not in text, text
