"""`--type auto`: the family chosen for each size and budget, the tuning that reaches a recall
target against exact search, and the command that records both in the sidecar."""

import json

import numpy as np
import pytest

from cdir.core.errors import CdirError
from indexes.auto import _ground_truth, choose, parse_memory, tune
from indexes.build import build_index
from indexes.kinds import TRAIN_POINTS_PER_CENTROID, default_params
from tests.helpers.cli import cdir


def test_each_family_where_it_belongs():
    assert choose(5_000, 512).kind == "flat"
    assert choose(100_000, 512).kind == "hnsw"
    assert choose(200_000, 128).kind == "hnsw"
    assert choose(200_000, 128, parse_memory("120MB")).kind == "ivf"  # no room for the graph
    assert choose(1_000_000, 512, parse_memory("4GB")).kind == "hnsw"
    assert choose(1_000_000, 512, parse_memory("2.2GB")).kind == "ivf"  # vectors, no graph
    assert choose(3_000_000, 512).kind == "ivf"  # a graph that takes too long to build
    pq = choose(1_000_000, 512, parse_memory("1GB"))
    assert pq.kind == "ivfpq" and pq.params["pq_m"] <= 900 and 512 % pq.params["pq_m"] == 0
    small = choose(1_000_000, 512, parse_memory("40MB"))
    assert small.kind == "ivfpq" and small.params["pq_m"] <= 36
    with pytest.raises(CdirError, match="raise --memory"):
        choose(1_000_000, 512, parse_memory("100kB"))
    assert parse_memory("16GiB") == 16 * 2**30 and parse_memory(None) is None
    for bad in ("lots", "-1GB", "4 parsecs", "0"):
        with pytest.raises(CdirError, match="--memory"):
            parse_memory(bad)


def _clustered(n, d, centres, seed=0):
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d)).astype(np.float32)
    x = c[rng.integers(0, centres, n)] + 0.35 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_ground_truth_leaves_each_query_out():
    x = _clustered(700, 16, 5)
    rows = np.array([3, 50, 699])
    got = _ground_truth(x, x[rows], rows, 10, block=128)
    sims = x[rows] @ x.T
    sims[np.arange(3), rows] = -np.inf
    want = np.argsort(-sims, axis=1)[:, :10]
    assert [set(g) for g in got] == [set(w) for w in want]


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_tuning_reaches_the_target_with_the_smallest_setting(kind):
    x = _clustered(12_000, 32, 60)
    ids = [str(i) for i in range(len(x))]
    index = build_index(x, ids, ["d"] * len(x), kind=kind, gpu=False)
    record = tune(index, x, target=0.95, n_queries=150)
    name = "nprobe" if kind == "ivf" else "ef_search"
    assert record["reached"] and record["recall"] >= 0.95
    assert index.meta.params[name] == record[name] and index.meta.params["auto"] is record
    tried = record["tried"]
    assert tried[-1][0] == record[name] and all(r < 0.95 for _, r in tried[:-1])
    assert [v for v, _ in tried] == sorted(v for v, _ in tried)
    assert record["ms_per_query"] > 0


def test_tuning_says_when_the_target_is_out_of_reach():
    x = _clustered(3_000, 64, 30)
    index = build_index(x, [str(i) for i in range(len(x))], ["d"] * len(x), kind="ivfpq",
                        gpu=False, pq_m=2, pq_nbits=4)
    record = tune(index, x, target=0.999, n_queries=100)
    assert not record["reached"] and record["nprobe"] == index.meta.params["nlist"]


def test_cli_auto_records_the_choice(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert cdir("data", "emoji", "-w", ws, "--limit", "40") == 0
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    capsys.readouterr()
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--type", "auto",
                "--memory", "200kB", "--recall", "0.9") == 0
    err = capsys.readouterr().err
    assert "auto: ivfpq" in err and "held-out queries" in err
    meta = json.loads(next((ws / "indexes").glob("*.auto.json")).read_text())
    assert meta["kind"] == "ivfpq" and meta["params"]["auto"]["recall_target"] == 0.9
    assert "PQ codes" in meta["params"]["auto"]["reason"]
    assert cdir("search", "-w", ws, "--index", next((ws / "indexes").glob("*.auto.json")).stem,
                "--image", next((ws / "gallery").rglob("*.png")), "-k", "3") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--memory", "1GB") == 2
    assert "--memory applies to --type auto" in capsys.readouterr().err
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--type", "auto",
                "--nlist", "4") == 2


def test_refine_reranks_pq_candidates_by_exact_scores(tmp_path):
    """IVF-PQ with refine keeps the exact vectors: recall@10 near 1 where the codes alone miss
    most of it; the domain filter still holds, and the index saves and loads as it was."""
    from indexes.index import load_index

    x = _clustered(6_000, 64, 80)
    ids = [str(i) for i in range(len(x))]
    doms = ["a" if i % 3 else "b" for i in range(len(x))]
    flat = build_index(x, ids, doms, kind="flat", gpu=False)
    plain = build_index(x, ids, doms, kind="ivfpq", gpu=False, pq_m=8)
    refined = build_index(x, ids, doms, kind="ivfpq", gpu=False, pq_m=8, refine=10)
    q = x[:100]

    def recall(index, **kw):
        got, want = index.search(q, k=10, **kw), flat.search(q, k=10, **kw)
        return np.mean([len(set(a) & set(b)) / 10
                        for a, b in zip(got.positions, want.positions, strict=True)])

    assert recall(refined) >= 0.95 > recall(plain) + 0.2
    assert recall(refined, domain="b") >= 0.95
    hits = refined.search(q, k=10, domain="b")
    assert {doms[p] for p in hits.positions.ravel()} == {"b"}
    refined.save(tmp_path / "r")
    again = load_index(tmp_path / "r", gpu=False)
    assert again.meta.params["refine"] == 10
    np.testing.assert_array_equal(again.search(q, k=10).positions,
                                  refined.search(q, k=10).positions)
    with pytest.raises(CdirError, match="refine"):
        build_index(x, ids, doms, kind="ivf", gpu=False, refine=4)


@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_sharded_build_merged_on_disk_equals_a_single_build(tmp_path, kind):
    """Built in 4 shards and merged into on-disk lists: the same ids and, searched exhaustively
    (nprobe = nlist), the same results as one build on the same data; it saves, loads from a
    moved folder (the lists are found beside the index) and keeps the domain filter."""
    import shutil

    from indexes.build import build_sharded
    from indexes.index import load_index

    x = _clustered(4_000, 32, 40)
    ids = [f"i{k}" for k in range(len(x))]
    doms = ["a" if k % 2 else "b" for k in range(len(x))]
    kw = {"pq_m": 8} if kind == "ivfpq" else {}
    one = build_index(x, ids, doms, kind=kind, gpu=False, **kw)
    path = tmp_path / "ws" / "idx"
    sharded = build_sharded(x, ids, doms, path, 4, kind=kind, **kw)
    assert sharded.meta.params["shards"] == 4 and sharded.ids == one.ids
    sharded.save(path)
    lists = list((tmp_path / "ws").glob("idx.*.ivfdata"))
    assert [p.name for p in lists] == [sharded.meta.params["ivfdata"]]
    assert not list((tmp_path / "ws").glob(".shards-*"))
    shutil.move(tmp_path / "ws", tmp_path / "moved")
    again = load_index(tmp_path / "moved" / "idx", gpu=False)
    q = x[::97]
    nlist = one.meta.params["nlist"]
    a = again.search(q, k=10, nprobe=nlist)
    b = one.search(q, k=10, nprobe=nlist)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
    d = again.search(q, k=5, domain="a", nprobe=nlist)
    assert {doms[p] for p in d.positions.ravel()} == {"a"}
    # a rebuild under the same name leaves one lists file, its own
    rebuilt = build_sharded(x, ids, doms, tmp_path / "moved" / "idx", 2, kind=kind, **kw)
    rebuilt.save(tmp_path / "moved" / "idx")
    assert [p.name for p in (tmp_path / "moved").glob("idx.*.ivfdata")] == \
        [rebuilt.meta.params["ivfdata"]]


def test_cli_shards(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert cdir("data", "emoji", "-w", ws, "--limit", "60") == 0
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--type", "ivf",
                "--shards", "3") == 0
    meta = json.loads(next((ws / "indexes").glob("*.ivf.json")).read_text())
    assert meta["params"]["shards"] == 3 and (ws / "indexes" / meta["params"]["ivfdata"]).exists()
    capsys.readouterr()
    assert cdir("search", "-w", ws, "--image", next((ws / "gallery").rglob("*.png")), "-k",
                "3", "--json") == 0
    assert len(json.loads(capsys.readouterr().out)[0]["results"]) == 3
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--type", "hnsw",
                "--shards", "3", "--name", "h") == 2


def _store_of(tmp_path, x, ids, per_shard):
    """An embedding store of ``x`` written in shards of ``per_shard`` rows, in a shuffled order
    (manifest order is not store order), the last rows re-embedded into a later shard."""
    from cdir.core.store import EmbeddingStore

    store = EmbeddingStore(tmp_path / "store")
    store.open("test", x.shape[1])
    order = np.random.default_rng(1).permutation(len(x))
    for a in range(0, len(x), per_shard):
        part = order[a:a + per_shard]
        store.append([ids[k] for k in part], x[part])
    store.append([ids[k] for k in order[:5]], x[order[:5]])  # a later shard wins
    return store


def test_stored_rows_read_what_load_gives(tmp_path):
    import pandas as pd

    x = _clustered(1_000, 16, 8)
    ids = [f"i{k}" for k in range(len(x))]
    store = _store_of(tmp_path, x, ids, 128)
    manifest = pd.DataFrame({"id": ids[:900] + ["new1", "new2"]})  # two never embedded
    full, ok = store.load(manifest)
    view, valid = store.rows(manifest)
    np.testing.assert_array_equal(ok, valid)
    assert ok.sum() == 900 and view.shape == (900, 16)
    want = full[ok]
    np.testing.assert_allclose(want, x[:900], atol=1e-6)
    np.testing.assert_array_equal(view[100:300], want[100:300])
    pos = np.array([899, 3, 3, 500])
    np.testing.assert_array_equal(view[pos], want[pos])
    mask = np.arange(900) % 7 == 0
    np.testing.assert_array_equal(view[mask], want[mask])
    np.testing.assert_array_equal(np.asarray(view), want)


def test_sharded_build_reads_the_store_a_chunk_at_a_time(tmp_path, monkeypatch):
    """A sharded build from the store's view never reads more than one chunk (or the training
    sample) at once, and searches like the same build from vectors in memory."""
    import pandas as pd

    import indexes.build as fb
    from cdir.core.store import StoredRows

    x = _clustered(3_000, 32, 30)
    ids = [f"i{k}" for k in range(len(x))]
    doms = ["a" if k % 3 else "b" for k in range(len(x))]
    view, _ = _store_of(tmp_path, x, ids, 256).rows(pd.DataFrame({"id": ids}))
    reads = []
    real = StoredRows.__getitem__
    monkeypatch.setattr(StoredRows, "__getitem__",
                        lambda self, key: reads.append(len(out := real(self, key))) or out)
    monkeypatch.setattr(StoredRows, "__array__", None)  # reading it whole is refused
    monkeypatch.setattr(fb, "ADD_CHUNK", 500)
    from_view = fb.build_sharded(view, ids, doms, tmp_path / "v" / "idx", 3, kind="ivf", nlist=8)
    from_ram = fb.build_sharded(x, ids, doms, tmp_path / "r" / "idx", 3, kind="ivf", nlist=8)
    sample = TRAIN_POINTS_PER_CENTROID * 8
    assert max(reads) <= max(500, sample) < len(x) and sum(reads) == len(x) + sample
    q = x[::53]
    a = from_view.search(q, k=10, nprobe=8)
    b = from_ram.search(q, k=10, nprobe=8)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)


@pytest.mark.parametrize("row", [1234, 2998])  # in the training sample; read only when added
def test_a_bad_stored_row_is_named_by_its_gallery_position(tmp_path, monkeypatch, row):
    """A shard file damaged on disk (a NaN row): the sharded build stops naming the row's
    position in the gallery, not in the training sample or the chunk it was read with."""
    import pandas as pd

    import indexes.build as fb
    from cdir.core.store import EmbeddingStore

    x = _clustered(3_000, 16, 20)
    ids = [f"i{k}" for k in range(len(x))]
    store = EmbeddingStore(tmp_path / "store")
    store.open("test", 16)
    for a in range(0, len(x), 256):
        store.append(ids[a:a + 256], x[a:a + 256])
    shard = np.load(tmp_path / "store" / f"shard_{row // 256:05d}.npy", mmap_mode="r+")
    shard[row % 256, 3] = np.nan
    shard.flush()
    del shard
    view, _ = store.rows(pd.DataFrame({"id": ids}))
    monkeypatch.setattr(fb, "ADD_CHUNK", 500)
    sample = fb._train_sample(np.zeros((len(x), 1)), TRAIN_POINTS_PER_CENTROID * 8,
                              default_params("ivf", len(x), 16, nlist=8)["seed"])[1]
    assert (row in sample) == (row == 1234)
    with pytest.raises(CdirError, match=f"NaN or inf in 1 row\\(s\\) \\(first: row {row}\\)"):
        fb.build_sharded(view, ids, ["a"] * len(x), tmp_path / "idx", 3, kind="ivf", nlist=8)


def test_cli_shards_with_normalize_equals_a_single_build(tmp_path, capsys):
    """--shards with --normalize: the statistics fitted per domain, rows normalised as they are
    read; exhaustive search gives the results of the same index built in memory."""
    from indexes.index import load_index

    ws = tmp_path / "ws"
    assert cdir("data", "emoji", "-w", ws, "--limit", "80") == 0
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    common = ["index", "build", "-w", ws, "--encoder", "pixels", "--type", "ivf", "--nlist",
              "4", "--normalize", "domain-whiten"]
    assert cdir(*common, "--name", "one") == 0
    assert cdir(*common, "--shards", "3", "--name", "three") == 0
    one = load_index(ws / "indexes" / "one", gpu=False)
    three = load_index(ws / "indexes" / "three", gpu=False)
    assert three.meta.params["shards"] == 3 and three.ids == one.ids
    assert three.meta.normalize_fingerprint == one.meta.normalize_fingerprint
    q = one.normalizer.transform(np.eye(one.normalizer.dim, dtype=np.float32)[:5] + 0.1,
                                 [one.domains[0]] * 5)
    a, b = one.search(q, k=5, nprobe=4), three.search(q, k=5, nprobe=4)
    np.testing.assert_array_equal(a.positions, b.positions)
    np.testing.assert_allclose(a.scores, b.scores, atol=1e-5)
