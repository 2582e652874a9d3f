"""The demo's backend (no Gradio) and its server over plain HTTP on 127.0.0.1: every query
kind and mode, the query's own domain and the query itself left out, readable names,
thumbnails made once, bad input as a message, and only thumbnails served."""

import os
import shutil
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch
from PIL import Image

from app.http_api import call, file_data, upload
from cdir.core.errors import CdirError
from tests.helpers.cli import REPO, cdir
from tests.helpers.demo import blip, demo_workspace

torch.set_num_threads(1)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
pytestmark = pytest.mark.usefixtures("hf_offline")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    os.environ["HF_HUB_OFFLINE"] = "1"
    return demo_workspace(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def backend(ws):
    from app.backend import DemoBackend

    return DemoBackend(ws, captioner=blip())


def _index(backend, normalize="none", caption=False):
    return next(i.name for i in backend.indexes
                if i.caption == caption and (caption or i.normalize == normalize))


def _file(ws, domain, n=0):
    return str(sorted((ws / "gallery" / domain).rglob("*.png"))[n])


def test_modes_examples_and_names(backend):
    from app.backend import readable_name

    assert backend.modes() == ["visual", "cm-text", "fusion"]  # MiniLM captions: no cm-image
    assert backend.domains == ["noto_mono", "openmoji", "twemoji"]
    examples = backend.examples()
    assert len(examples) == 3
    rows = [backend.rows.loc[backend.gallery_item(p)] for p in examples]
    assert sorted(r["domain"] for r in rows) == backend.domains
    assert len({r["class_name"] for r in rows}) == 3  # different things, not three suns
    assert readable_name("u1f47b_ghost") == "👻 ghost"
    assert readable_name("u02600") == "☀ black sun with rays"
    assert readable_name("Alarm_Clock") == "Alarm Clock"


def test_image_query_leaves_out_its_own_domain_and_itself(ws, backend, tmp_path):
    from app.backend import ALL_DOMAINS, Query, readable_name

    path = _file(ws, "twemoji")
    a = backend.search(Query(path=path), "visual", _index(backend), None, k=5)
    assert not a.error and len(a.hits) == 5, a.message
    assert a.query_domain == "twemoji" and "the gallery item's" in a.message
    assert all(h.domain != "twemoji" for h in a.hits)
    assert a.hits[0].score >= a.hits[-1].score and "·" not in readable_name(a.hits[0].class_name)
    # all domains: the query's own file is not its own first result at 1.000
    a = backend.search(Query(path=path), "visual", _index(backend), None, ALL_DOMAINS, k=5)
    item = backend.gallery_item(path)
    assert item not in [h.id for h in a.hits] and a.hits[0].score < 0.999
    # the same bytes uploaded under another name are recognised as that gallery item
    copy = tmp_path / "upload.png"
    shutil.copy(path, copy)
    b = backend.search(Query(path=str(copy)), "visual", _index(backend), None, ALL_DOMAINS, 5)
    assert [h.id for h in b.hits] == [h.id for h in a.hits]
    # a new image gets its domain detected from its nearest gallery items
    im = Image.open(path).convert("RGB").rotate(7)
    im.save(tmp_path / "new.png")
    c = backend.search(Query(path=str(tmp_path / "new.png")), "visual", _index(backend), None)
    assert c.query_domain in backend.domains and "detected" in c.message
    assert all(h.domain != c.query_domain for h in c.hits)
    d = backend.search(Query(path=str(tmp_path / "new.png")), "visual", _index(backend), None,
                       "openmoji", 4, query_domain="noto_mono")
    assert [h.domain for h in d.hits] == ["openmoji"] * 4 and "(given)" in d.message


def test_normalised_index_and_click_query(ws, backend):
    from app.backend import Query

    item = backend.gallery_item(_file(ws, "openmoji", 3))
    a = backend.search(backend.item_query(item), "visual", _index(backend, "domain-whiten"),
                       None, k=6)
    assert not a.error and len(a.hits) == 6 and "domain-whiten" in a.message
    assert a.query_domain == "openmoji"
    # clicking a result searches with it: its own domain is now the one left out
    nxt = backend.search(backend.item_query(a.hits[0].id), "visual",
                         _index(backend, "domain-whiten"), None, k=6)
    assert nxt.query_domain == a.hits[0].domain
    assert all(h.domain != a.hits[0].domain and h.id != a.hits[0].id for h in nxt.hits)
    assert backend.search(Query(), "visual", None, None).message.startswith("Upload")
    # a gallery item is searched with its stored vector: the one the model and the normaliser
    # give its image
    from cdir.core.images import load_image

    s = backend.searcher(_index(backend, "domain-whiten"), "visual")
    q, _ = s.query_vectors([load_image(_file(ws, "openmoji", 3))])
    q, _ = s.normalizer.transform_query(q, ["openmoji"])
    np.testing.assert_allclose(s.index.stored_vectors([item]), q, atol=1e-5)
    assert s.index.stored_vectors(["no such id"]) is None


def test_text_queries(backend):
    from app.backend import Query, readable_name

    cap = _index(backend, caption=True)
    thing = backend.rows["class_name"].iloc[5].split("_", 1)[1].replace("_", " ")
    a = backend.search(Query(text=f"a picture of a {thing}"), "cm-text", None, cap, k=3)
    assert [readable_name(h.class_name).split(" ", 1)[1] for h in a.hits] == [thing] * 3, a.hits
    assert sorted(h.domain for h in a.hits) == backend.domains
    assert not a.error and len(a.hits) == 3 and a.message.startswith("text cm-text")
    assert a.hits[0].caption and a.hits[0].caption.startswith("a picture of")
    name = backend.rows["class_name"].iloc[0].split("_", 1)[1].replace("_", " ")
    b = backend.search(Query(text=name), "visual", _index(backend), None, k=3)
    assert not b.error and "cm-text" in b.message  # pixels have no text tower: the captions do
    assert {h.domain for h in b.hits} <= set(backend.domains)
    assert name in readable_name(b.hits[0].class_name)
    c = backend.search(Query(text=name), "fusion", None, None)
    assert c.error and "no image to fuse" in c.message


def test_cm_text_and_fusion_image_queries(ws, backend):
    from app.backend import Query

    q = Query(path=_file(ws, "noto_mono", 2))
    a = backend.search(q, "cm-text", None, None, k=4)
    assert not a.error and len(a.hits) == 4 and isinstance(a.caption, str)
    vis = backend.search(q, "visual", _index(backend), None, k=4)
    only_visual = backend.search(q, "fusion", _index(backend), None, k=4, weight=1.0)
    assert [h.id for h in only_visual.hits] == [h.id for h in vis.hits]
    half = backend.search(q, "fusion", _index(backend), None, k=4, weight=0.5)
    assert not half.error and len(half.hits) == 4 and "cm-text" in half.message


@pytest.mark.parametrize("kind", ["text", "empty", "truncated", "bomb"])
def test_bad_uploads_are_messages(ws, backend, tmp_path, monkeypatch, kind):
    from app.backend import Query

    path = tmp_path / "bad.png"
    good = open(_file(ws, "twemoji"), "rb").read()
    want = {"text": "not an image", "empty": "empty file", "truncated": "cannot decode",
            "bomb": "too large"}[kind]
    path.write_bytes({"text": b"hello, I am not a picture", "empty": b"",
                      "truncated": good[: len(good) // 2], "bomb": good}[kind])
    if kind == "bomb":
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    a = backend.search(Query(path=str(path)), "visual", _index(backend), None)
    assert a.error and a.bad_file and a.hits == [] and want in a.message, a.message


def test_warm_up_loads_the_encoder(ws):
    from app.backend import DemoBackend

    b = DemoBackend(ws)
    b.warm_up()
    s = b.searcher(b.image_indexes()[0].name, "visual")
    assert s._image_encoder is not None


def test_thumbnails_are_made_once(backend, tmp_path):
    big = tmp_path / "big.png"
    Image.new("RGB", (1200, 900), "red").save(big)
    thumb = backend.thumbnail(str(big))
    assert thumb.endswith(".jpg") and max(Image.open(thumb).size) <= 192
    stamp = os.stat(thumb).st_mtime_ns
    assert backend.thumbnail(str(big)) == thumb and os.stat(thumb).st_mtime_ns == stamp
    small = backend.thumbnail(backend.rows["path"].iloc[0])
    assert small.startswith(str(backend.thumb_dir)) and small.endswith(".png")


def test_a_starting_server_prepares_the_thumbnails(backend, monkeypatch):
    paths = [str(p) for p in backend.rows["path"]]
    assert backend.warm_thumbnails(limit=len(paths)) == len(paths)
    ready = {p: backend.thumbnail(p) for p in paths}

    def made(*_):
        raise AssertionError("a thumbnail made or looked up at answer time")

    monkeypatch.setattr(backend, "_make_thumbnail", made)
    assert all(backend.thumbnail(p) == t for p, t in ready.items())
    assert all(t.startswith(str(backend.thumb_dir)) for t in ready.values())


def test_backend_needs_an_index(tmp_path):
    from app.backend import DemoBackend

    assert cdir("data", "emoji", "-w", tmp_path / "ws", "--limit", "3") == 0
    with pytest.raises(CdirError, match="no up-to-date index"):
        DemoBackend(tmp_path / "ws")


# -- the server ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(backend):
    from app.demo import serve

    demo = serve(backend, port=None, max_upload="200kb", block=False)
    yield demo
    demo.close()


def _call(url, endpoint, data):
    with httpx.Client(base_url=url, timeout=60) as c:
        return call(c, endpoint, data)


def _upload(url, path):
    with httpx.Client(base_url=url, timeout=60) as c:
        return upload(c, open(path, "rb").read(), os.path.basename(path))


def test_server_answers_image_text_and_item_queries(server, ws, backend):
    url = server.local_url
    path = _upload(url, _file(ws, "noto_mono")).json()[0]
    kind, out = _call(url, "search_image", [file_data(path),
                                            "visual", None, None, "every other domain", 3,
                                            "detect", 0.5])
    assert kind == "complete" and len(out[1]) == 3, out
    assert "query domain noto_mono" in out[2] and "/cache/thumbs/" in out[1][0]["image"]["url"]
    kind, out = _call(url, "search_text", ["a picture of a cat", "cm-text", None, None,
                                           "all domains", 4, "detect", 0.5])
    assert kind == "complete" and out[0] is None and len(out[2]) == 4, out
    assert "text cm-text" in out[3] and "top 4 in all domains" in out[3]
    item = backend.gallery_item(_file(ws, "openmoji"))
    kind, out = _call(url, "search_item", [item, "visual", None, None, "every other domain",
                                           12, "detect", 0.5])
    grid, status, _ = out[0]
    assert kind == "complete" and len(grid) == 12 and "query domain openmoji" in status, out


def test_server_bad_input_is_a_message_not_an_error(server, tmp_path):
    url = server.local_url
    bad = tmp_path / "notes.png"
    bad.write_text("not a picture")
    path = _upload(url, bad).json()[0]
    kind, out = _call(url, "search_image", [file_data(path),
                                            "visual", None, None, "every other domain", 3,
                                            "detect", 0.5])
    assert kind == "complete" and out[1] == [] and "not an image" in out[2], out
    assert not os.path.exists(path)  # a useless upload is not kept
    big = tmp_path / "big.png"
    big.write_bytes(os.urandom(300_000))
    r = _upload(url, big)
    assert r.status_code == 413 and "size" in r.text.lower(), (r.status_code, r.text[:200])


def test_only_thumbnails_are_served(server, ws, backend):
    url = server.local_url
    thumb = backend.thumbnail(_file(ws, "twemoji"))
    with httpx.Client(base_url=url, timeout=30) as c:
        assert c.get(f"/gradio_api/file={thumb}").status_code == 200
        for path in ("/etc/passwd", str(ws / "manifest.parquet"), _file(ws, "twemoji"),
                     f"{backend.thumb_dir}/../../manifest.parquet",
                     f"{backend.thumb_dir}/%2e%2e/%2e%2e/manifest.parquet"):
            assert c.get(f"/gradio_api/file={path}").status_code in (403, 404), path


def test_cli_refuses_bad_arguments_and_says_when_it_listens_beyond_loopback(ws, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "GRADIO_ANALYTICS_ENABLED": "False"}
    r = subprocess.run([sys.executable, "-m", "cdir", "demo", "-w", ws, "--max-upload", "lots"],
                       capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--max-upload" in r.stderr
    log = tmp_path / "demo.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cdir", "demo", "-w", ws, "--host",
                                 "0.0.0.0", "--port", "0"], stdout=f, stderr=f, env=env,
                                cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while "anyone who can reach this machine" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_concurrent_queries_of_every_kind_all_answer(server, ws, backend):
    """60 queries from 12 clients at once (image uploads, clicks, texts): every one answered,
    none an error, each with its own results (the batched backend keeps them apart)."""
    from concurrent.futures import ThreadPoolExecutor

    url = server.local_url
    files = sorted((ws / "gallery").rglob("*.png"))[:20]

    def image(path):
        up = _upload(url, str(path)).json()[0]
        kind, out = _call(url, "search_image", [file_data(up),
                                                "visual", None, None, "every other domain", 4,
                                                "detect", 0.5])
        return kind, out[2], path.parent.parent.name

    def item(path):
        kind, out = _call(url, "search_item", [backend.gallery_item(str(path)), "visual", None,
                                               None, "every other domain", 4, "detect", 0.5])
        return kind, out[0][1], path.parent.parent.name

    def text(path):
        name = path.parent.name.split("_", 1)[1].replace("_", " ")
        kind, out = _call(url, "search_text", [f"a picture of a {name}", "cm-text", None, None,
                                               "all domains", 4, "detect", 0.5])
        return kind, out[3], None

    jobs = [(f, p) for p in files for f in (image, item, text)]
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda job: job[0](job[1]), jobs))
    assert len(answers) == 60
    for kind, status, domain in answers:
        assert kind == "complete" and "top 4" in status and "Cannot" not in status, status
        if domain:
            assert f"query domain {domain} " in status, (domain, status)


def test_batcher_gathers_waiting_requests_and_routes_results_and_errors():
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from app.batcher import Batcher

    gate = threading.Event()

    def fn(key, items):
        gate.wait(10)  # the first batch holds the thread while the others queue up
        if key == "bad":
            raise CdirError("no")
        return [(key, x * 10) for x in items]

    b = Batcher(fn, max_batch=16)
    with ThreadPoolExecutor(9) as pool:
        first = pool.submit(b.submit, "a", 0)
        time.sleep(0.2)
        rest = [pool.submit(b.submit, "a" if i % 2 else "b", i) for i in range(1, 9)]
        bad = pool.submit(b.submit, "bad", 99)
        time.sleep(0.3)
        gate.set()
        assert first.result() == ("a", 0)
        assert [f.result() for f in rest] == [("a" if i % 2 else "b", i * 10)
                                              for i in range(1, 9)]
        with pytest.raises(CdirError, match="no"):
            bad.result()
    assert b.batches[0] == 1 and sorted(b.batches[1:]) == [4, 4]  # one call per key


def test_cm_image_and_text_on_a_clip_caption_index(tmp_path):
    """A caption index of CLIP text embeddings: image queries go through the CLIP image tower
    (cm-image), text queries through its text tower; a CLIP image index takes text queries."""
    from app.backend import ALL_DOMAINS, DemoBackend, Query
    from tests.helpers.cli import emoji_workspace
    from tests.helpers.tiny_models import write_tiny_clip_config

    ws = emoji_workspace(tmp_path, 4)
    clip = f"clip:{write_tiny_clip_config(tmp_path)}/random"
    names = tmp_path / "names.csv"
    import pandas as pd

    m = pd.read_parquet(ws / "manifest.parquet")
    pd.DataFrame({"id": m["id"], "caption": m["class_name"].str.replace("_", " ")}).to_csv(
        names, index=False)
    assert cdir("caption", "-w", ws, "--from-file", names, "--name", "names") == 0
    assert cdir("embed", "-w", ws, "--captions", "names", "--text-encoder", clip) == 0
    assert cdir("index", "build", "-w", ws, "--captions", "names", "--text-encoder", clip) == 0
    assert cdir("embed", "-w", ws, "--encoder", clip, "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", clip) == 0
    backend = DemoBackend(ws)
    assert backend.modes() == ["visual", "cm-text", "cm-image", "fusion"]
    query = Query(path=str(sorted((ws / "gallery" / "openmoji").rglob("*.png"))[0]))
    a = backend.search(query, "cm-image", None, None, k=3)
    assert not a.error and len(a.hits) == 3 and "cm-image on" in a.message, a.message
    f = backend.search(query, "fusion", None, None, k=3)  # CLIP captions: fused through cm-image
    assert not f.error and "visual on" in f.message and "cm-image on" in f.message, f.message
    t = backend.search(Query(text="a red umbrella"), "visual", None, None, ALL_DOMAINS, 3)
    assert not t.error and t.message.startswith("text visual on clip:"), t.message
    assert len(t.hits) == 3
