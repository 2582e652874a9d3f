"""What cdir computed is keyed by what the model and the images
ARE, not by their names. A checkpoint retrained at the same path, a tiny CLIP whose weights file
changed, an image or a caption rewritten in place: every stage either computes again or refuses
in one line that says what to re-run; none serves the old vectors. Also: `search --encoder`
against an index of another encoder, a workspace path that is a file or cannot be created, and
`embed` without `--encoder`.

Everything runs for real (emoji gallery, tiny checkpoints built here, FAISS); the only stand-in is
a spy that counts the hashing calls (the real hash still runs)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from cdir.core.store import EmbeddingStore
from cdir.core.workspace import Workspace
from tests.helpers.cli import cdir, emoji_workspace
from tests.helpers.tiny_models import write_tiny_clip_config

torch.set_num_threads(1)
pytestmark = pytest.mark.usefixtures("hf_offline")
N_CATEGORIES = 6  # 18 images in three art sets


def write_checkpoint(path: Path, seed: int) -> Path:
    """A tiny exported encoder (`ckpt:PATH`); another seed = the same path retrained."""
    from encoders.zoo.backbones import build_backbone

    torch.manual_seed(seed)
    net, _ = build_backbone("cifar_resnet18", width=0.25)
    torch.save({"version": 1, "method": "moco", "encoder": net.state_dict(),
                "encoder_arch": {"name": "cifar_resnet18", "kwargs": {"width": 0.25}},
                "config": {"aug": {"size": 32, "eval_resize": 1.0}}}, path)
    return path


def fails(capsys, *args: object, match: str) -> str:
    """``cdir ARGS`` exits 2 with one error line (no traceback) containing ``match``."""
    capsys.readouterr()
    assert cdir(*args) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert match in errors[0], errors[0]
    return errors[0]


def vectors(ws: Path, spec: str) -> np.ndarray:
    w = Workspace(ws)
    return EmbeddingStore(w.embeddings_dir(spec)).load(w.manifest())[0]


def image_path(ws: Path, domain: str = "twemoji", n: int = 0) -> Path:
    m = pd.read_parquet(ws / "manifest.parquet")
    return Path(m[m["domain"] == domain]["path"].iloc[n])


@pytest.fixture
def ws(tmp_path: Path) -> Path:
    return emoji_workspace(tmp_path, N_CATEGORIES)


@pytest.fixture
def sha_calls(monkeypatch) -> list[str]:
    """The files `encoders.hub` hashes in full (the spy calls the real hash)."""
    import encoders.hub as hub

    calls: list[str] = []
    real = hub.sha256_file

    def spy(path: str) -> str:
        calls.append(os.path.realpath(path))
        return real(path)

    monkeypatch.setattr(hub, "sha256_file", spy)
    return calls


# -- 1. a retrained checkpoint at the same path ----------------------------------------------------

def test_retrained_checkpoint_is_re_embedded_and_never_served_stale(ws, tmp_path, capsys):
    ckpt = write_checkpoint(tmp_path / "enc.pt", seed=0)
    spec = f"ckpt:{ckpt}"
    assert cdir("embed", "-w", ws, "--encoder", spec, "--workers", "0", "--no-progress") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", spec) == 0
    query = image_path(ws)
    assert cdir("search", "-w", ws, "--image", query, "-k", "2") == 0
    old = vectors(ws, spec)
    sidecar = json.loads(next((ws / "indexes").glob("*.json")).read_text())

    write_checkpoint(ckpt, seed=1)  # retrained, same path
    for args in (("eval", "-w", ws, "--encoder", spec),
                 ("index", "build", "-w", ws, "--encoder", spec)):
        fails(capsys, *args, match=f"other weights of {spec}")
    line = fails(capsys, "search", "-w", ws, "--image", query, match="other weights")
    assert "cdir embed" in line and "cdir index build" in line

    # embed notices, starts over, and says so
    capsys.readouterr()
    assert cdir("embed", "-w", ws, "--encoder", spec, "--workers", "0", "--no-progress") == 0
    out, err = capsys.readouterr()
    assert f"embedded {3 * N_CATEGORIES} new, 0 already done" in out
    assert "other weights" in err and "embedding every image again" in err
    new = vectors(ws, spec)
    from encoders.image import load_image_encoder

    fresh = load_image_encoder(spec, device="cpu").encode_images([Image.open(query).convert("RGB")])
    row = pd.read_parquet(ws / "manifest.parquet")["path"].tolist().index(str(query))
    np.testing.assert_allclose(new[row], fresh[0], atol=1e-5)
    assert not np.allclose(new, old, atol=1e-3)

    # the index still holds the old vectors: search refuses until it is rebuilt
    fails(capsys, "search", "-w", ws, "--image", query, match="other weights")
    assert cdir("index", "build", "-w", ws, "--encoder", spec) == 0
    assert "built flat index" in capsys.readouterr().out
    assert cdir("search", "-w", ws, "--image", query, "-k", "1", "--json") == 0
    hit = json.loads(capsys.readouterr().out)[0]["results"][0]
    assert hit["path"] == str(query) and hit["score"] == pytest.approx(1.0, abs=1e-5)
    assert cdir("eval", "-w", ws, "--encoder", spec, "--run", "new") == 0
    # what the index records: the identity of the weights its vectors came from
    from encoders.hub import model_identity

    rebuilt = json.loads(next((ws / "indexes").glob("*.json")).read_text())
    assert rebuilt["model_id"] == model_identity(spec).id != sidecar["model_id"]


def test_checkpoint_is_hashed_only_when_its_size_or_mtime_change(ws, tmp_path, capsys,
                                                                  sha_calls):
    import hashlib

    import encoders.hub as hub

    ckpt = write_checkpoint(tmp_path / "enc.pt", seed=0)
    spec = f"ckpt:{ckpt}"
    real = os.path.realpath(ckpt)
    # the identity is the content hash of the file
    assert hub.model_identity(spec).id == "sha256:" + hashlib.sha256(
        ckpt.read_bytes()).hexdigest()[:16]
    assert cdir("embed", "-w", ws, "--encoder", spec, "--workers", "0", "--no-progress") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", spec) == 0
    query = image_path(ws)

    def hashed_by(*args: object) -> int:
        hub._hashed.clear()  # what a new process knows: only the records on disk
        sha_calls.clear()
        assert cdir(*args) == 0
        return sha_calls.count(real)

    # size + mtime match the records of the embeddings and the index: no hashing
    assert hashed_by("search", "-w", ws, "--image", query, "-k", "1") == 0
    assert hashed_by("eval", "-w", ws, "--encoder", spec, "--run", "a") == 0
    # touched, same content: hashed once, still the same model, and the record is refreshed
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert hashed_by("eval", "-w", ws, "--encoder", spec, "--run", "b") == 1
    assert hashed_by("eval", "-w", ws, "--encoder", spec, "--run", "c") == 0


def test_embeddings_written_before_model_identities_still_open(ws, tmp_path, capsys):
    """A store of an older cdir: the legacy fingerprint (size + first/last MiB) in params, no
    hash records, no row versions. It keeps working and is upgraded in place; a legacy
    fingerprint that does not match the file now is refused."""
    import hashlib

    def legacy_fingerprint(path: Path) -> str:  # what cdir recorded before content hashes
        data = path.read_bytes()
        h = hashlib.sha256(str(len(data)).encode())
        h.update(data[:1 << 20])
        if len(data) > 2 << 20:
            h.update(data[-(1 << 20):])
        return h.hexdigest()[:16]

    ckpt = write_checkpoint(tmp_path / "enc.pt", seed=0)
    spec = f"ckpt:{ckpt}"
    assert cdir("embed", "-w", ws, "--encoder", spec, "--workers", "0", "--no-progress") == 0
    store = EmbeddingStore(Workspace(ws).embeddings_dir(spec))
    info = store.info()
    new_id = info["params"]["weights"]
    info["params"]["weights"] = legacy_fingerprint(ckpt)
    info.pop("weights_files", None)
    store.info_path.write_text(json.dumps(info))
    for f in store.dir.glob("shard_*.versions.json"):
        f.unlink()

    assert cdir("eval", "-w", ws, "--encoder", spec, "--run", "old") == 0
    upgraded = store.info()
    assert upgraded["params"]["weights"] == new_id and upgraded["weights_files"]
    assert list(store.dir.glob("shard_*.versions.json"))  # rows adopted as current
    capsys.readouterr()
    assert cdir("embed", "-w", ws, "--encoder", spec, "--workers", "0", "--no-progress") == 0
    assert "embedded 0 new" in capsys.readouterr().out

    info = store.info()
    info["params"]["weights"] = "0123456789abcdef"  # a legacy fingerprint of other weights
    store.info_path.write_text(json.dumps(info))
    fails(capsys, "eval", "-w", ws, "--encoder", spec, match="other weights")


# -- 2. an image whose content changed at the same path --------------------------------------------

def test_changed_image_is_re_embedded_alone_and_later_stages_see_it(ws, capsys):
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    before = vectors(ws, "pixels")
    img = image_path(ws, "openmoji", 2)
    Image.open(img).convert("RGB").rotate(90).save(img)  # new content at the same path
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))

    assert cdir("data", "emoji", "-w", ws, "--limit", N_CATEGORIES) == 0

    fails(capsys, "eval", "-w", ws, "--encoder", "pixels", match="1 image(s) changed")
    fails(capsys, "index", "build", "-w", ws, "--encoder", "pixels", match="changed")
    fails(capsys, "search", "-w", ws, "--image", img, match="changed")

    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    out = capsys.readouterr().out
    assert f"embedded 1 new, {3 * N_CATEGORIES - 1} already done" in out and "1 changed" in out
    after = vectors(ws, "pixels")
    row = pd.read_parquet(ws / "manifest.parquet")["path"].tolist().index(str(img))
    from encoders.image import PixelsEncoder

    np.testing.assert_allclose(after[row], PixelsEncoder().encode_images(
        [Image.open(img).convert("RGB")])[0], atol=1e-6)
    others = np.arange(len(after)) != row
    np.testing.assert_array_equal(after[others], before[others])  # only that row was re-made
    assert not np.allclose(after[row], before[row])

    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    assert "built flat index" in capsys.readouterr().out  # the old index held the old vector
    assert cdir("search", "-w", ws, "--image", img, "-k", "1", "--json") == 0
    hit = json.loads(capsys.readouterr().out)[0]["results"][0]
    assert hit["path"] == str(img) and hit["score"] == pytest.approx(1.0, abs=1e-5)
    assert cdir("eval", "-w", ws, "--encoder", "pixels") == 0


def test_embed_finds_an_image_changed_in_place_without_cdir_data(ws, capsys, monkeypatch):
    import cdir.core.manifest as manifest_module

    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    before = vectors(ws, "pixels")
    hashed: list[str] = []
    real = manifest_module.file_sha256
    monkeypatch.setattr(manifest_module, "file_sha256", lambda p: hashed.append(p) or real(p))

    # size and mtime as recorded: the fast path reads no image
    capsys.readouterr()
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert f"embedded 0 new, {3 * N_CATEGORIES} already done" in capsys.readouterr().out
    assert hashed == []

    # touched (same bytes, new mtime): hashed, and it keeps its vector
    touched = image_path(ws, "noto_mono", 1)
    st = touched.stat()
    os.utime(touched, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    # rewritten in place, no `cdir data` since
    img = image_path(ws, "openmoji", 2)
    Image.open(img).convert("RGB").rotate(90).save(img)
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    out = capsys.readouterr().out
    assert f"embedded 1 new, {3 * N_CATEGORIES - 1} already done" in out and "1 changed" in out
    assert sorted(hashed) == sorted([str(touched), str(img)])
    after = vectors(ws, "pixels")
    row = pd.read_parquet(ws / "manifest.parquet")["path"].tolist().index(str(img))
    others = np.arange(len(after)) != row
    np.testing.assert_array_equal(after[others], before[others])
    assert not np.allclose(after[row], before[row])

    # later stages see the new content: the old index is stale, the rebuilt one finds the image
    fails(capsys, "search", "-w", ws, "--image", img, match="stale")
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    assert "built flat index" in capsys.readouterr().out
    assert cdir("search", "-w", ws, "--image", img, "-k", "1", "--json") == 0
    hit = json.loads(capsys.readouterr().out)[0]["results"][0]
    assert hit["path"] == str(img) and hit["score"] == pytest.approx(1.0, abs=1e-5)
    assert cdir("eval", "-w", ws, "--encoder", "pixels") == 0
    hashed.clear()
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert "embedded 0 new" in capsys.readouterr().out and hashed == []
    # a removed image keeps its record: dropping it is `cdir data`'s scan
    recorded = pd.read_parquet(ws / "manifest.parquet")
    image_path(ws, "twemoji", 3).unlink()
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert "embedded 0 new" in capsys.readouterr().out
    pd.testing.assert_frame_equal(pd.read_parquet(ws / "manifest.parquet"), recorded)


def test_touched_image_keeps_its_vector_and_data_hashes_only_changed_files(tmp_path, capsys,
                                                                          monkeypatch):
    import cdir.core.manifest as manifest_module

    hashed: list[str] = []
    real = getattr(manifest_module, "file_sha256", None)
    monkeypatch.setattr(manifest_module, "file_sha256",
                        lambda p: hashed.append(p) or real(p), raising=False)
    ws = emoji_workspace(tmp_path, N_CATEGORIES)
    assert hashed == []  # a first scan only stats the files
    m = pd.read_parquet(ws / "manifest.parquet")
    assert (m["file_size"] > 0).all() and (m["file_mtime_ns"] > 0).all()
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0

    img = image_path(ws, "noto_mono", 1)
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # same bytes, new mtime
    assert cdir("data", "emoji", "-w", ws, "--limit", N_CATEGORIES) == 0
    assert hashed == [str(img)]  # `cdir data` stats every file and hashes only the changed one
    capsys.readouterr()
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert "embedded 0 new" in capsys.readouterr().out
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    assert "up to date" in capsys.readouterr().out
    assert cdir("search", "-w", ws, "--image", img, "-k", "1") == 0


# -- 1 (captions): the text encoder's weights and the caption texts --------------------------------

def test_caption_embeddings_follow_the_text_encoder_weights_and_the_captions(ws, tmp_path,
                                                                            capsys):
    from encoders.clip import load_open_clip

    cfg = write_tiny_clip_config(tmp_path)
    model, _, _ = load_open_clip(f"clip:{cfg}/random")
    ckpt = tmp_path / "clip.pt"

    def train_clip(seed: int) -> None:
        torch.manual_seed(seed)
        torch.save({"state_dict": {k: torch.randn_like(v) * 0.05 if v.is_floating_point() else v
                                   for k, v in model.state_dict().items()}}, ckpt)

    def import_captions(changed: str | None = None) -> None:
        m = pd.read_parquet(ws / "manifest.parquet")
        path = tmp_path / "captions.csv"
        with open(path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "caption"])
            for n, (id_, cls) in enumerate(zip(m["id"], m["class_name"], strict=True)):
                w.writerow([id_, changed if changed and n == 0 else f"a drawing of {cls}"])
        assert cdir("caption", "-w", ws, "--from-file", path, "--name", "hand") == 0

    train_clip(0)
    text = f"clip:{cfg}/{ckpt}"
    import_captions()
    embed = ("embed", "-w", ws, "--captions", "hand", "--text-encoder", text)
    evaluate = ("eval", "-w", ws, "--mode", "cm-text", "--captions", "hand", "--text-encoder",
                text)
    assert cdir(*embed) == 0
    assert cdir(*evaluate) == 0

    train_clip(1)  # the CLIP retrained at the same path
    fails(capsys, *evaluate, match=f"other weights of {text}")
    assert cdir(*embed) == 0
    out, err = capsys.readouterr()
    assert f"embedded {3 * N_CATEGORIES} captions" in out and "other weights" in err
    assert cdir(*evaluate) == 0

    import_captions(changed="a photo of something else entirely")  # one caption rewritten
    fails(capsys, *evaluate, match="1 caption(s) changed")
    assert cdir(*embed) == 0
    assert "embedded 1 captions" in capsys.readouterr().out
    assert cdir(*evaluate) == 0


# -- 6. --encoder beside an index of another encoder -----------------------------------------------

def test_search_refuses_an_encoder_the_index_was_not_built_with(ws, tmp_path, capsys):
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels", "--name", "px") == 0
    query = image_path(ws)
    other = f"ckpt:{tmp_path / 'enc.pt'}"
    fails(capsys, "search", "-w", ws, "--index", "px", "--encoder", other, "--image", query,
          match="index px was built with pixels, not --encoder")
    assert cdir("search", "-w", ws, "--index", "px", "--encoder", "pixels", "--image", query) == 0


# -- rough edges ---------------------------------------------------------------------------------

def test_workspace_that_is_a_file_or_cannot_be_created_is_one_line(tmp_path, capsys):
    file = tmp_path / "notes.txt"
    file.write_text("not a workspace")
    query = tmp_path / "q.png"
    Image.new("RGB", (8, 8), "white").save(query)
    for args in (("data", "emoji", "--limit", "2"), ("embed", "--encoder", "pixels"),
                 ("eval", "--encoder", "pixels"), ("index", "build", "--encoder", "pixels"),
                 ("search", "--image", query), ("caption", "--list")):
        fails(capsys, *args, "-w", file, match="is a file, not a folder")
    fails(capsys, "data", "emoji", "-w", file / "ws", "--limit", "2",
          match="cannot create the workspace folder")


def test_embed_without_encoder_names_the_offline_default(ws, capsys):
    line = fails(capsys, "embed", "-w", ws, match="emoji_student.pt")
    assert "pixels" in line
    from cdir.commands.embed import ENCODER_HELP

    assert "offline" in ENCODER_HELP and "emoji_student.pt" in ENCODER_HELP


def test_reproduce_after_a_retrain_re_embeds_and_re_evaluates(tmp_path, capsys):
    """A recipe run again after its checkpoint was retrained at the same path runs embed and
    eval again instead of skipping them (and never reuses the old report)."""
    import yaml

    from cdir.recipe.config import load_recipe
    from cdir.recipe.runner import Runner

    ckpt = write_checkpoint(tmp_path / "enc.pt", seed=0)
    recipe = tmp_path / "visual.yaml"
    recipe.write_text(yaml.safe_dump({
        "name": "visual", "workspace": str(tmp_path / "ws"),
        "dataset": {"kind": "emoji", "limit": N_CATEGORIES, "size": 32},
        "image_encoders": [f"ckpt:{ckpt}"], "eval": {"modes": ["visual"], "ks": [1]},
        "batch": {"workers": 0}}))

    def run() -> dict[str, str]:
        return {st.kind: st.status
                for st in Runner(load_recipe(recipe), progress=False).run()}

    first = run()
    assert first["embed-images"] == first["eval"] == "ran"
    again = run()
    assert again["embed-images"] == again["eval"] == "skipped"
    write_checkpoint(ckpt, seed=1)  # retrained in place
    after = run()
    assert after["embed-images"] == after["eval"] == "ran", after
    spec = f"ckpt:{ckpt}"
    w = Workspace(tmp_path / "ws")
    info = EmbeddingStore(w.embeddings_dir(spec)).info()
    from encoders.hub import model_identity

    assert info["params"]["weights"] == model_identity(spec).id


def test_changed_image_is_re_captioned_alone_and_keeps_one_caption_per_id(ws, capsys):
    from cdir.core.caption_store import CaptionStore, list_sources, load_captions
    from tests.helpers.tiny_models import tiny_model_path

    caption = ("caption", "-w", ws, "--captioner", f"hf:{tiny_model_path('blip')}",
               "--max-new-tokens", "4", "--min-new-tokens", "2", "--no-progress")
    assert cdir(*caption) == 0
    assert f"captioned {3 * N_CATEGORIES} new" in capsys.readouterr().out
    key = list_sources(ws)[0]["key"]
    before = load_captions(ws, key).set_index("id")["caption"]

    img, other = image_path(ws, "openmoji", 2), image_path(ws, "twemoji", 4)
    img.write_bytes(other.read_bytes())  # another image's content at the same path
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert cdir("data", "emoji", "-w", ws, "--limit", N_CATEGORIES) == 0
    capsys.readouterr()

    assert cdir(*caption) == 0
    out = capsys.readouterr().out
    assert f"captioned 1 new, {3 * N_CATEGORIES - 1} already done" in out, out
    assert "1 changed since captioned" in out, out
    m = pd.read_parquet(ws / "manifest.parquet")
    row_id = str(m[m["path"] == str(img)]["id"].iloc[0])
    store = CaptionStore(ws, key)
    after = store.read()
    assert after["id"].is_unique and sorted(after["id"]) == sorted(m["id"].astype(str))
    kept = after.set_index("id")["caption"].drop(row_id)
    pd.testing.assert_series_equal(kept, before.drop(row_id).loc[kept.index])  # byte-for-byte
    assert set(store.versions()[row_id].split()) & set(
        str(v) for v in m[m["path"] == str(img)]["file_sha256"])  # captioned from the new bytes
    assert cdir(*caption) == 0
    assert "captioned 0 new" in (out := capsys.readouterr().out) and "changed since" not in out

    # a store written before captions recorded image versions opens; its rows count as current
    df = pd.read_parquet(store.path).drop(columns="version")
    df.to_parquet(store.path, index=False)
    assert cdir(*caption) == 0
    assert "captioned 0 new" in (out := capsys.readouterr().out) and "changed since" not in out
    assert all(store.versions().values())  # ... and get the present versions recorded
    pd.testing.assert_frame_equal(store.read(), after)
