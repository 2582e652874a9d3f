"""The demo on the default workspace (the emoji gallery, the project's 128 px encoder, the one
whitened index `make run` builds; a few categories), in Debian's Chromium driven by playwright:
the text box says why text search is off and how to turn it on, the status shows the encoder
spec's `&` as it is, and the result thumbnails load. Screenshots go to the test's folder (and to
$CDIR_SCREENSHOTS when set)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.app.test_demo_browser import CHROMIUM, FLAGS, _shot, _status, _wait_status

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: "
                                "apt-get install chromium; .ci/run installs it)")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
TEACHER = "ckpt:encoders/weights/emoji_adapted.pt?grid=4&layers=3,4"


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory):
    from app.backend import DemoBackend
    from app.default_workspace import ensure_default_workspace
    from app.demo import serve

    # the shipped teacher's spec: its '&' checks that the status line is not HTML-escaped
    ws = ensure_default_workspace(tmp_path_factory.mktemp("default") / "emoji", limit=8,
                                  encoder=TEACHER)
    demo = serve(DemoBackend(ws), port=None, block=False)
    yield ws, demo.local_url
    demo.close()


def test_default_workspace_text_box_and_an_image_query(site, tmp_path: Path) -> None:
    sync_api = pytest.importorskip("playwright.sync_api")
    ws, url = site
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(url)
        page.wait_for_selector("#query input[type=file]", state="attached")
        # no caption index, no CLIP: the box is off and says why and how
        assert page.locator("#text-query textarea").is_disabled()
        note = page.inner_text("#text-note")
        assert "Text search needs a caption index" in note and "--from-file" in note, note
        assert "cdir index build" in note and "`" not in note  # commands rendered as code
        _shot(page, tmp_path, "demo_text_default_workspace")

        query = sorted((ws / "gallery" / "twemoji").rglob("*.png"))[2]
        old = _status(page)
        page.set_input_files("#query input[type=file]", str(query))
        status = _wait_status(page, old)
        assert "?grid=4&layers=3,4" in status and "&amp;" not in status, status
        assert "query domain twemoji" in status
        page.wait_for_function("() => { const im = document.querySelectorAll('#results img'); "
                               "return im.length > 0 && [...im].every(i => i.complete && "
                               "i.naturalWidth > 0); }")
        _shot(page, tmp_path, "demo_image_default_workspace")
        browser.close()
