"""The demo in a real browser: Debian's Chromium driven by playwright (no browser download).
Upload a query and see the results, click one and see a new search, type a text query, upload
a non-image and read the message, change a control and see the results follow; screenshots
go to the test's folder (and to $CDIR_SCREENSHOTS when set)."""

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers.demo import blip, demo_workspace

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--disable-background-networking", "--disable-component-update", "--no-first-run",
         "--disable-sync", "--disable-dev-shm-usage"]
pytestmark = [
    pytest.mark.usefixtures("hf_offline"),
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install "
                       "chromium; .ci/run installs it)"),
]
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    from app.backend import DemoBackend
    from app.demo import serve

    os.environ["HF_HUB_OFFLINE"] = "1"
    ws = demo_workspace(tmp_path_factory.mktemp("browser"))
    backend = DemoBackend(ws, captioner=blip())
    demo = serve(backend, port=None, block=False)
    yield ws, demo.local_url
    demo.close()


@pytest.fixture(scope="module")
def page(site):
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        # playwright gives the browser a fresh profile of its own (no --user-data-dir)
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(site[1])
        page.wait_for_selector("#query input[type=file]", state="attached")
        yield page
        browser.close()


def _status(page) -> str:
    return page.inner_text("#status")


def _wait_status(page, old: str, want: str = r"top \d+|Cannot search") -> str:
    # a finished search says what it did ("... top N ...") or why it could not; while it
    # runs, the box shows Gradio's timer ("processing | 0.3s") over the old text; ``want``
    # tells this search's answer from a re-run of the previous one
    page.wait_for_function("([old, want]) => { const s = document.querySelector('#status'); "
                           "const t = s ? s.innerText : ''; return t !== old && "
                           "new RegExp(want).test(t) && "
                           "!/processing|queue:|pending/.test(t); }", arg=[old, want])
    page.wait_for_timeout(300)  # the grid renders with the status
    return _status(page)


def _results(page) -> int:
    return page.locator("#results img").count()


def _shot(page, tmp_path: Path, name: str) -> Path:
    out = tmp_path / f"{name}.png"
    page.screenshot(path=str(out), full_page=True)
    if os.environ.get("CDIR_SCREENSHOTS"):
        Path(os.environ["CDIR_SCREENSHOTS"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(os.environ["CDIR_SCREENSHOTS"]) / out.name)
    assert out.stat().st_size > 10_000
    return out


def test_upload_click_text_and_bad_file(site, page, tmp_path):
    ws, _ = site
    query = sorted((ws / "gallery" / "twemoji").rglob("*.png"))[1]
    assert "cross-domain image search" in page.title()
    old = _status(page)
    page.set_input_files("#query input[type=file]", str(query))
    status = _wait_status(page, old)
    assert "top 12 in every domain but the query's" in status, status
    assert "query domain twemoji" in status
    page.wait_for_function("() => document.querySelectorAll('#results img').length == 12")
    labels = page.inner_text("#results")
    assert "twemoji" not in labels and ("openmoji" in labels or "noto_mono" in labels)
    assert "| rank |" not in page.inner_text("#result-table")  # a rendered table, not text
    assert page.locator("#result-table table tr").count() == 13
    _shot(page, tmp_path, "demo_image_query")

    # fewer results when the slider moves: the results follow the control
    old = _status(page)
    slider = page.locator("#k input[type=number]")
    slider.fill("5")
    slider.press("Enter")
    status = _wait_status(page, old, "top 5 ")
    assert "top 5" in status and _results(page) == 5

    # a click on a result searches with it
    first_domain = page.locator("#result-table table tr").nth(1).inner_text().split("\t")[2]
    old = _status(page)
    page.locator("#results button.thumbnail-item").first.click()
    status = _wait_status(page, old)
    assert f"query domain {first_domain.strip()} (the gallery item's)" in status, status
    assert page.locator("#query img").count() >= 1  # the clicked item is the query now
    _shot(page, tmp_path, "demo_click_query")

    # a text query, against the caption index
    old = _status(page)
    name = query.parent.name.split("_", 1)[1].replace("_", " ")
    page.fill("#text-query textarea", f"a picture of a {name}")
    page.press("#text-query textarea", "Enter")
    status = _wait_status(page, old, "^text ")
    assert status.startswith("text cm-text") and "in all domains" in status, status
    assert page.locator("#query img").count() == 0  # the image is no longer the query
    first = page.locator("#result-table table tr").nth(1).inner_text()
    assert name in first, (name, first)
    _shot(page, tmp_path, "demo_text_query")

    # a non-image upload: a message in the page, no bare "Error"
    bad = tmp_path / "notes.png"
    bad.write_text("this is not a picture")
    old = _status(page)
    page.set_input_files("#query input[type=file]", str(bad))
    status = _wait_status(page, old)
    assert "Cannot search: This file cannot be searched: not an image" in status, status
    assert _results(page) == 0
    assert page.locator(".toast-body.error").count() == 0
    _shot(page, tmp_path, "demo_bad_upload")


def test_examples_are_one_per_domain_and_search_on_click(site, page):
    assert page.locator("#examples img").count() == 3
    old = _status(page)
    page.locator("#examples button.thumbnail-item").nth(2).click()
    status = _wait_status(page, old)
    assert "query domain twemoji (the gallery item's)" in status, status
    assert _results(page) >= 1
