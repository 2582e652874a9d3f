"""The Gradio demo: its search backend, and the real server answering on 127.0.0.1."""

import os

import pytest
import torch

from cdir.cli import main
from cdir.core.errors import CdirError
from cdir.core.images import load_image
from tests.helpers.cli import cdir, emoji_workspace

torch.set_num_threads(1)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = emoji_workspace(tmp_path_factory.mktemp("demo"), 10)
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    return ws


def test_backend_search_and_domain_filter(ws):
    from app.demo import ALL_DOMAINS, DemoBackend

    backend = DemoBackend(ws)
    assert backend.domains == ["noto_mono", "openmoji", "twemoji"]
    query = load_image(next((ws / "gallery" / "twemoji").rglob("*.png")))
    items, status = backend.search(query, backend.indexes[0], "auto", ALL_DOMAINS, 5)
    assert len(items) == 5 and items[0][1].startswith("#1 twemoji")  # finds itself first
    assert "visual search of pixels" in status
    items, _ = backend.search(query, backend.indexes[0], "auto", "openmoji", 4)
    assert len(items) == 4 and all(" openmoji · " in label for _, label in items)
    items, status = backend.search(None, backend.indexes[0], "auto", ALL_DOMAINS, 5)
    assert items == [] and "query image" in status
    items, status = backend.search(query, backend.indexes[0], "cm-text", ALL_DOMAINS, 5)
    assert items == [] and status.startswith("error:")  # an image index has no captions


def test_backend_needs_an_index(tmp_path):
    from app.demo import DemoBackend

    ws = tmp_path / "ws"
    assert main(["data", "emoji", "-w", str(ws), "--limit", "3"]) == 0
    with pytest.raises(CdirError, match="no up-to-date index"):
        DemoBackend(ws)


def test_server_answers_on_loopback(ws):
    from gradio_client import Client, handle_file

    from app.demo import build_demo

    demo = build_demo(ws)
    demo.launch(server_name="127.0.0.1", server_port=None, prevent_thread_lock=True,
                allowed_paths=[str(ws)], quiet=True)
    try:
        client = Client(demo.local_url, verbose=False)
        query = next((ws / "gallery" / "noto_mono").rglob("*.png"))
        gallery, status = client.predict(handle_file(str(query)), demo.fns[0].inputs[1].value,
                                         "auto", "twemoji", 3, fn_index=0)
        assert len(gallery) == 3 and "top 3 in twemoji" in status
    finally:
        demo.close()
