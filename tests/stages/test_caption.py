"""cdir.core.caption_store and cdir.stages.caption: the caption store (resume, kill -9, corrupt
files, OOM halving), import/export, and `cdir caption` on the command line. Uses the tiny BLIP from
tests/helpers/tiny_models.py offline."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pandas as pd
import pytest
import torch

from cdir.core.caption_store import (
    COLUMNS,
    CaptionStore,
    list_sources,
    load_captions,
    resolve_source,
)
from cdir.core.errors import CdirError
from cdir.core.manifest import make_manifest, save_manifest
from cdir.core.workspace import Workspace
from cdir.stages.caption import caption_workspace, export_captions, import_captions
from encoders.captioners import load_captioner
from tests.helpers.tiny_models import tiny_model_path
from tests.helpers.trees import manifest_rows, write_shape_tree

REPO = Path(__file__).resolve().parents[2]
GEN = {"max_new_tokens": 5, "min_new_tokens": 2}


pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture(scope="module")
def blip() -> str:
    return f"hf:{tiny_model_path('blip')}"


@pytest.fixture(scope="module")
def captioner(blip: str):
    return load_captioner(blip, **GEN)


def make_ws(root: Path, n_corrupt: int = 2) -> Workspace:
    """2 domains x 2 classes x 3 images (12 JPEGs, 32 px) + ``n_corrupt`` unreadable files."""
    base = write_shape_tree(root / "data", domains=("Art", "Clipart"),
                            classes=("Circle", "Square"), per_class=3, size=32,
                            n_corrupt=n_corrupt)
    ws = Workspace(root / "ws")
    save_manifest(make_manifest(manifest_rows(base)), ws.manifest_path)
    return ws


class Wrapped:
    """A real captioner with injected behaviour: OOM above a batch size, empty captions, a
    failure after some batches (the one place a fake failure stands in for a real one)."""

    def __init__(self, inner, oom_above: int | None = None, empty_every: int | None = None,
                 fail_on_call: int | None = None):
        self.inner = inner
        self.key, self.spec, self.family = inner.key, inner.spec, inner.family
        self.params, self.device = inner.params, inner.device
        self.oom_above, self.empty_every, self.fail_on_call = oom_above, empty_every, fail_on_call
        self.calls: list[int] = []

    def caption(self, images: list) -> list[str]:
        self.calls.append(len(images))
        if self.fail_on_call is not None and len(self.calls) == self.fail_on_call:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of a batch
        if self.oom_above is not None and len(images) > self.oom_above:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")
        out = self.inner.caption(images)
        if self.empty_every:
            out = ["" if k % self.empty_every == 0 else c for k, c in enumerate(out)]
        return out


def good_ids(ws: Workspace) -> list[str]:
    return [i for i in ws.manifest()["id"] if "zz_" not in i]


def test_caption_resume_and_corrupt_files(tmp_path: Path, blip: str,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    ws = make_ws(tmp_path)
    first = caption_workspace(ws, blip, batch_size=4, limit=5, progress=False, **GEN)
    key = first["key"]
    store = CaptionStore(ws, key)
    stored = store.read()
    assert first["new"] + first["failed"] == 5 and len(stored) == first["new"]
    before = dict(zip(stored["id"], stored["caption"], strict=True))

    second = caption_workspace(ws, blip, batch_size=4, progress=False, **GEN)
    assert second["already_done"] == first["new"]
    assert second["new"] == 12 - first["new"] and second["failed"] == 2
    rows = store.read()
    assert sorted(rows["id"]) == sorted(good_ids(ws)) and rows["id"].is_unique
    assert all(isinstance(c, str) and c.strip() for c in rows["caption"])
    assert dict(zip(rows["id"], rows["caption"], strict=True)).items() >= before.items()
    assert set(rows["model"]) == {first["model"]} == {f"hf:{tiny_model_path('blip').resolve()}"}
    assert json.loads(rows["params"].iloc[0]) == {"prompt": None, **GEN, "num_beams": 1}
    # the unreadable files are listed with their reasons, and not stored
    meta = store.meta()
    assert {r["id"] for r in meta["failed"]} == {i for i in ws.manifest()["id"] if "zz_" in i}
    assert all(r["reason"] for r in meta["failed"])
    assert meta["count"] == 12 and meta["kind"] == "model" and meta["key"] == key
    assert not store.parts_dir.exists()  # compacted at the end

    # nothing left but the unreadable files: the model is not even loaded
    from encoders.captioners import CaptionerSpec

    def no_load(*a, **k):
        raise AssertionError("model loaded although nothing readable was missing")

    monkeypatch.setattr(CaptionerSpec, "load", no_load)
    third = caption_workspace(ws, blip, batch_size=4, progress=False, **GEN)
    assert third["new"] == 0 and third["failed"] == 2 and third["already_done"] == 12
    assert len(list_sources(ws)) == 1  # one key: these generation parameters


def test_interrupted_run_loses_at_most_the_batch_in_flight(tmp_path: Path, captioner) -> None:
    ws = make_ws(tmp_path, n_corrupt=0)
    wrapped = Wrapped(captioner, fail_on_call=3)
    with pytest.raises(KeyboardInterrupt):
        caption_workspace(ws, batch_size=4, captioner=wrapped, progress=False)
    store = CaptionStore(ws, captioner.key)
    rows = store.read()
    assert len(rows) == 8 and rows["id"].is_unique  # two full batches kept, the third lost
    assert not store.lock_path.exists()
    rest = caption_workspace(ws, batch_size=4, captioner=captioner, progress=False)
    assert rest["new"] == 4 and rest["already_done"] == 8
    final = store.read()
    assert sorted(final["id"]) == sorted(ws.manifest()["id"]) and final["id"].is_unique
    assert len(pd.read_parquet(store.path)) == 12  # no duplicate rows on disk either


_KILL_SCRIPT = textwrap.dedent("""
    import os, sys, time
    os.environ["HF_HUB_OFFLINE"] = "1"
    sys.path.insert(0, {repo!r})
    import torch
    torch.set_num_threads(1)
    from cdir.stages.caption import caption_workspace
    from encoders.captioners import load_captioner

    inner = load_captioner({spec!r}, max_new_tokens=5, min_new_tokens=2)

    class Slow:
        key, spec, family, params, device = (inner.key, inner.spec, inner.family,
                                             inner.params, inner.device)
        calls = 0

        def caption(self, images):
            Slow.calls += 1
            if Slow.calls == 3:  # the third batch hangs: it is in flight when we are killed
                print("in flight", flush=True)
                time.sleep(120)
            return inner.caption(images)

    caption_workspace({ws!r}, batch_size=3, captioner=Slow(), progress=False)
""")


def test_kill_9_mid_run_then_resume(tmp_path: Path, blip: str, captioner) -> None:
    ws = make_ws(tmp_path, n_corrupt=0)
    script = tmp_path / "run.py"
    script.write_text(_KILL_SCRIPT.format(repo=str(REPO), spec=blip, ws=str(ws.root)))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()  # blocks until the third batch is in flight
        assert line.strip() == "in flight", proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    store = CaptionStore(ws, captioner.key)
    assert store.lock_path.exists()  # the killed run's lock stays behind ...
    rows = store.read()
    assert len(rows) == 6 and rows["id"].is_unique  # ... and its two finished batches too
    assert store.parts_dir.exists() and len(store._parts()) == 2
    (store.parts_dir / ".part-000003.parquet.x1y2.tmp").write_bytes(b"half a file")
    rest = caption_workspace(ws, batch_size=3, captioner=captioner, progress=False)
    assert rest["new"] == 6 and rest["already_done"] == 6  # the stale lock is taken over
    final = store.read()
    assert sorted(final["id"]) == sorted(ws.manifest()["id"]) and final["id"].is_unique
    assert not store.parts_dir.exists() and not store.lock_path.exists()


def test_live_lock_stops_a_second_writer(tmp_path: Path, captioner) -> None:
    ws = make_ws(tmp_path, n_corrupt=0)
    store = CaptionStore(ws, captioner.key)
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        store.lock_path.parent.mkdir(parents=True, exist_ok=True)
        store.lock_path.write_text(str(sleeper.pid))
        with pytest.raises(CdirError, match=f"another run \\(pid {sleeper.pid}\\)"):
            caption_workspace(ws, captioner=captioner, progress=False)
    finally:
        sleeper.kill()
        sleeper.wait()


def test_oom_halves_the_batch_and_the_run_goes_on(tmp_path: Path, captioner) -> None:
    ws = make_ws(tmp_path, n_corrupt=0)
    wrapped = Wrapped(captioner, oom_above=2)
    s = caption_workspace(ws, batch_size=8, captioner=wrapped, progress=False)
    assert s["new"] == 12 and s["batch_size"] == 2
    assert wrapped.calls[:3] == [8, 4, 2] and max(wrapped.calls[3:]) <= 2
    rows = CaptionStore(ws, captioner.key).read()
    # captions still belong to their images: the same as captioning one at a time
    from cdir.core.images import load_image

    df = ws.manifest().set_index("id")
    for i, c in list(zip(rows["id"], rows["caption"], strict=True))[:3]:
        assert captioner.caption([load_image(df.loc[i, "path"])])[0] == c


def test_empty_captions_are_stored_and_counted(tmp_path: Path, captioner) -> None:
    ws = make_ws(tmp_path, n_corrupt=0)
    s = caption_workspace(ws, batch_size=4, captioner=Wrapped(captioner, empty_every=2),
                          progress=False)
    assert s["new"] == 12 and s["empty"] == 6 and "6 empty" in s["line"]
    assert s["messages"] == ["6 caption(s) came out empty (stored as empty strings)"]
    rows = CaptionStore(ws, captioner.key).read()
    assert (rows["caption"] == "").sum() == 6
    assert list_sources(ws)[0]["empty"] == 6


# -- import / export -----------------------------------------------------------------------------

def test_import_reports_unknown_missing_and_empty(tmp_path: Path) -> None:
    ws = make_ws(tmp_path, n_corrupt=0)
    ids = list(ws.manifest()["id"])
    f = tmp_path / "mine.csv"
    pd.DataFrame({"id": ids[:8] + ["not/in/gallery.jpg"],
                  "caption": ["a red circle"] * 6 + ["", "NA", "x"]}).to_csv(f, index=False)
    r = import_captions(ws, f, "mine")
    text = "\n".join(r["messages"])
    assert r["imported"] == 8 and r["skipped"] == 1 and r["missing"] == 4 and r["empty"] == 1
    assert "not/in/gallery.jpg" in text and "not in the gallery" in text
    assert "4 gallery image(s) have no caption" in text and "1 caption(s) are empty" in text
    rows = load_captions(ws, "mine")
    got = dict(zip(rows["id"], rows["caption"], strict=True))
    assert got[ids[6]] == "" and got[ids[7]] == "NA"  # "NA" is a caption, not a missing value
    assert list(rows["id"]) == ids[:8]  # manifest order
    assert set(rows["model"]) == {"file:mine.csv"}

    # a file whose ids match nothing: an error, and the stored source is untouched
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "nope1", "caption": "x"}\n{"id": "nope2", "caption": "y"}\n')
    with pytest.raises(CdirError, match="none of the 2 ids.*nothing was imported"):
        import_captions(ws, bad, "mine")
    # conflicting duplicates: an error, nothing stored is lost
    dup = tmp_path / "dup.jsonl"
    dup.write_text(f'{{"id": "{ids[0]}", "caption": "one"}}\n{{"id": "{ids[0]}", '
                   '"caption": "two"}\n')
    with pytest.raises(CdirError, match="different captions for the same image"):
        import_captions(ws, dup, "mine")
    assert load_captions(ws, "mine").equals(rows)

    # a later import of the same name updates its rows and keeps the others
    upd = tmp_path / "upd.jsonl"
    upd.write_text(f'{{"id": "{ids[0]}", "caption": "updated"}}\n'
                   f'{{"id": "{ids[11]}", "caption": "new one"}}\n')
    r2 = import_captions(ws, upd, "mine")
    assert any("1 replaced, 7 kept" in m for m in r2["messages"])
    rows2 = load_captions(ws, "mine")
    got2 = dict(zip(rows2["id"], rows2["caption"], strict=True))
    assert len(rows2) == 9 and got2[ids[0]] == "updated" and got2[ids[11]] == "new one"
    assert got2[ids[1]] == "a red circle"


def test_import_by_path_and_bad_files(tmp_path: Path) -> None:
    ws = make_ws(tmp_path, n_corrupt=0)
    m = ws.manifest()
    f = tmp_path / "by_path.tsv"
    pd.DataFrame({"path": m["path"], "text": [f"c{i}" for i in range(len(m))]}).to_csv(
        f, sep="\t", index=False)
    r = import_captions(ws, f)
    assert r["key"] == "by_path" and r["imported"] == 12 and r["missing"] == 0
    with pytest.raises(CdirError, match="needs an 'id' \\(or 'path'\\) column and a 'caption'"):
        g = tmp_path / "g.csv"
        g.write_text("name,words\na,b\n")
        import_captions(ws, g)
    with pytest.raises(CdirError, match="line 2: not valid JSON"):
        h = tmp_path / "h.jsonl"
        h.write_text('{"id": "a", "caption": "b"}\n{oops\n')
        import_captions(ws, h)
    with pytest.raises(CdirError, match="unknown caption file type"):
        (tmp_path / "x.txt").write_text("id,caption\n")
        import_captions(ws, tmp_path / "x.txt")
    with pytest.raises(CdirError, match="must not start with 'hf'"):
        import_captions(ws, f, "hf:sneaky")
    with pytest.raises(CdirError, match="no caption file"):
        import_captions(ws, tmp_path / "missing.csv")


def test_export_import_round_trip(tmp_path: Path, captioner) -> None:
    ws = make_ws(tmp_path, n_corrupt=0)
    caption_workspace(ws, batch_size=6, captioner=captioner, progress=False)
    ids = list(ws.manifest()["id"])
    tricky = tmp_path / "tricky.jsonl"
    texts = ['comma, "quotes"', "line\nbreak", "NA", "null", "", "émoji 🐱 ü", "  spaced  "]
    tricky.write_text("".join(json.dumps({"id": i, "caption": t}) + "\n"
                              for i, t in zip(ids, texts, strict=False)))
    import_captions(ws, tricky, "tricky")
    for source in (captioner.key, "tricky"):
        original = CaptionStore(ws, resolve_source(ws, source)).read()
        for ext in ("csv", "jsonl"):
            out = tmp_path / f"{abs(hash(source))}.{ext}"
            e = export_captions(ws, source, out)
            assert e["rows"] == len(original) and out.exists()
            name = f"back_{ext}_{len(original)}"
            import_captions(ws, out, name)
            back = load_captions(ws, name)
            pd.testing.assert_frame_equal(back[COLUMNS].reset_index(drop=True),
                                          original[COLUMNS].reset_index(drop=True))


def test_sources_resolve_by_key_name_or_fragment(tmp_path: Path, captioner) -> None:
    ws = make_ws(tmp_path, n_corrupt=0)
    with pytest.raises(CdirError, match="no captions yet"):
        resolve_source(ws, None)
    caption_workspace(ws, batch_size=6, captioner=captioner, progress=False)
    assert resolve_source(ws, None) == captioner.key  # the only source
    f = tmp_path / "a.csv"
    pd.DataFrame({"id": list(ws.manifest()["id"])[:2], "caption": ["x", "y"]}).to_csv(
        f, index=False)
    import_captions(ws, f, "alpha")
    assert resolve_source(ws, "alpha") == "alpha"
    assert resolve_source(ws, captioner.key) == captioner.key
    assert resolve_source(ws, "num_beams=1") == captioner.key
    assert resolve_source(ws, Path(CaptionStore(ws, "alpha").path).stem) == "alpha"
    with pytest.raises(CdirError, match="several caption sources"):
        resolve_source(ws, None)
    with pytest.raises(CdirError, match="no caption source 'zzz'.*alpha"):
        resolve_source(ws, "zzz")
    kinds = {s["key"]: s["kind"] for s in list_sources(ws)}
    assert kinds == {captioner.key: "model", "alpha": "import"}
    # an import may not take over a model's captions and vice versa
    with pytest.raises(CdirError, match="imported captions, not a model's"):
        caption_workspace(ws, captioner=type("C", (), {
            "key": "alpha", "spec": "hf:x", "family": "blip", "params": {},
            "device": "cpu", "caption": lambda self, im: ["z"] * len(im)})(), progress=False)


def test_aligned_follows_the_manifest(tmp_path: Path, captioner) -> None:
    ws = make_ws(tmp_path)
    caption_workspace(ws, batch_size=6, captioner=captioner, progress=False)
    m = ws.manifest()
    s = CaptionStore(ws, captioner.key).aligned(m)
    assert len(s) == len(m)
    assert all((c is None) == ("zz_" in i) for i, c in zip(m["id"], s, strict=True))


# -- command line --------------------------------------------------------------------------------

def test_cli_caption_export_import_list(tmp_path: Path, blip: str,
                                        capsys: pytest.CaptureFixture) -> None:
    from cdir.cli import main

    ws = make_ws(tmp_path)
    w = str(ws.root)
    assert main(["caption", "-w", w, "--captioner", blip, "--batch-size", "5",
                 "--max-new-tokens", "4", "--min-new-tokens", "2", "--num-beams", "2",
                 "--prompt", "a picture of", "--no-progress"]) == 0
    out, err = capsys.readouterr()
    assert "captioned 12 new, 0 already done, 2 failed" in out
    assert "could not be read" in err
    key = list_sources(ws)[0]["key"]
    assert json.loads(CaptionStore(ws, key).read()["params"].iloc[0]) == {
        "prompt": "a picture of", "max_new_tokens": 4, "min_new_tokens": 2, "num_beams": 2}

    assert main(["caption", "-w", w, "--export", str(tmp_path / "o.csv")]) == 0
    assert "exported 12 caption(s)" in capsys.readouterr().out
    assert main(["caption", "-w", w, "--from-file", str(tmp_path / "o.csv"),
                 "--name", "copy"]) == 0
    assert "imported 12 caption(s)" in capsys.readouterr().out
    assert main(["caption", "-w", w, "--list"]) == 0
    listing = capsys.readouterr().out
    assert "copy\timport, 12 captions" in listing and "model, 12 captions, 2 failed" in listing
    assert main(["caption", "-w", w, "--export", str(tmp_path / "o.jsonl")]) == 2
    assert "several caption sources" in capsys.readouterr().err
    assert main(["caption", "-w", w, "--captioner", "hf:nobody-here/none"]) == 2
    err = capsys.readouterr().err
    assert "nobody-here/none" in err and "HF_HUB_OFFLINE" in err and err.count("\n") == 1
