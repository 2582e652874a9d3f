"""Core modules: manifest, workspace keys, atomic writes, the resumable embedding store."""

import numpy as np
import pytest

from cdir.core.errors import CdirError
from cdir.core.io import atomic_write, read_json, write_json
from cdir.core.manifest import fingerprint, load_manifest, make_manifest, save_manifest
from cdir.core.store import EmbeddingStore
from cdir.core.workspace import Workspace, spec_key


def rows(n_per=2, domains=("b", "a"), classes=("Table", "TV", "apple")):
    return [{"id": f"{d}/{c}/{i}.png", "path": f"/x/{d}/{c}/{i}.png", "domain": d, "class_name": c}
            for d in domains for c in classes for i in range(n_per)]


def test_labels_follow_byte_sorted_class_names():
    df = make_manifest(rows())
    labels = dict(zip(df["class_name"], df["label"], strict=False))
    assert labels == {"TV": 0, "Table": 1, "apple": 2}  # uppercase first, TV before Table
    assert list(df["domain"].unique()) == ["a", "b"]  # rows sorted by domain
    assert set(df["split"]) == {"all"}


def test_manifest_rejects_empty_and_duplicates(tmp_path):
    with pytest.raises(CdirError, match="empty"):
        make_manifest([])
    with pytest.raises(CdirError, match="duplicate"):
        make_manifest(rows() + rows()[:1])
    with pytest.raises(CdirError, match="no manifest"):
        load_manifest(tmp_path / "missing.parquet")


def test_manifest_roundtrip_and_fingerprint(tmp_path):
    df = make_manifest(rows())
    save_manifest(df, tmp_path / "m.parquet")
    back = load_manifest(tmp_path / "m.parquet")
    assert back.equals(df)
    assert fingerprint(back) == fingerprint(df)
    changed = df.copy()
    changed.loc[0, "label"] = 2
    assert fingerprint(changed) != fingerprint(df)


def test_spec_key_is_safe_and_distinct():
    a, b = spec_key("clip:ViT-B-32/openai"), spec_key("clip:ViT-B-32-openai")
    assert a != b and "/" not in a and ":" not in a


def test_workspace_requires_manifest(tmp_path):
    with pytest.raises(CdirError, match="not a cdir workspace"):
        Workspace(tmp_path).require()


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "x.json"
    write_json(path, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_write(path) as f:
            f.write("partial")
            raise RuntimeError("boom")
    assert read_json(path) == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]  # no temp file left behind


def test_store_resume_and_manifest_order(tmp_path):
    df = make_manifest(rows())
    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(len(df), 8)).astype(np.float32)
    store = EmbeddingStore(tmp_path / "emb")
    store.open("pixels", 8)
    ids = df["id"].tolist()
    # two shards written out of manifest order, one row missing
    store.append(ids[5:], vecs[5:])
    store.append(ids[:4], vecs[:4])
    assert store.done_ids() == set(ids) - {ids[4]}
    out, valid = store.load(df)
    assert valid.tolist() == [i != 4 for i in range(len(df))]
    expected = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
    np.testing.assert_allclose(out[valid], expected[valid], rtol=1e-6)
    assert not out[4].any()
    # a different model must not be mixed into the same store
    with pytest.raises(CdirError, match="holds embeddings of pixels"):
        EmbeddingStore(tmp_path / "emb").open("pixels", 16)


def test_store_rejects_nonfinite(tmp_path):
    store = EmbeddingStore(tmp_path / "emb")
    store.open("x", 2)
    with pytest.raises(CdirError, match="non-finite"):
        store.append(["a"], np.array([[np.nan, 1.0]]))
