"""The Gradio search demo: drop an image, pick a target domain, see the top-k of a workspace index.

Built on `cdir.stages.search.Searcher`, so it searches exactly as `cdir search` does: an
image-embedding index with its image encoder, a caption index by captioning the query (cm-text)
or through the CLIP image tower (cm-image).
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import TYPE_CHECKING

import gradio as gr

from cdir.core.errors import CdirError
from cdir.core.images import load_image
from cdir.core.workspace import Workspace
from cdir.stages.index import list_indexes
from cdir.stages.modes import SINGLE_MODES
from cdir.stages.search import Searcher

if TYPE_CHECKING:
    from PIL import Image

ALL_DOMAINS = "all domains"
INFER = "infer"  # the query domain of the nearest gallery centroid (normalised indexes)
THUMB = 256


class DemoBackend:
    """One Searcher per (index, mode), loaded on first use and shared by the demo's threads."""

    def __init__(self, workspace: str | Path, device: str | None = None):
        self.ws = Workspace(workspace).require()
        self.device = device
        self.indexes = [r["name"] for r in list_indexes(self.ws.root) if r["current"]]
        if not self.indexes:
            raise CdirError(f"no up-to-date index in {self.ws.root}: build one with "
                            f"`cdir index build -w {self.ws.root} --encoder SPEC`")
        self.domains = sorted(self.ws.manifest()["domain"].astype(str).unique())
        self._searchers: dict[tuple[str, str | None], Searcher] = {}
        self._lock = threading.Lock()

    def searcher(self, index: str, mode: str | None) -> Searcher:
        with self._lock:
            key = (index, mode)
            if key not in self._searchers:
                self._searchers[key] = Searcher(str(self.ws.root), index=index, mode=mode,
                                                device=self.device)
            return self._searchers[key]

    def search(self, image: Image.Image | None, index: str, mode: str, domain: str, k: int,
               query_domain: str = INFER) -> tuple[list[tuple], str]:
        """Gallery items (thumbnail, label) and a status line; errors become the status line."""
        if image is None:
            return [], "Drop a query image first."
        try:
            s = self.searcher(index, None if mode == "auto" else mode)
            results, captions, used = s.search(
                [image.convert("RGB")], k=int(k), domain=None if domain == ALL_DOMAINS else domain,
                query_domain=None if query_domain == INFER else query_domain)
        except CdirError as e:
            return [], f"error: {e}"
        items = []
        for h in results[0]:
            thumb = load_image(h.path)
            thumb.thumbnail((THUMB, THUMB))
            items.append((thumb, f"#{h.rank} {h.domain} · {h.class_name} · {h.score:.3f}"))
        where = f" in {domain}" if domain != ALL_DOMAINS else ""
        status = f"{s.mode} search of {s.spec}: top {len(items)}{where}"
        if s.infers_domain:
            how = "nearest centroid" if query_domain == INFER else "given"
            status += f" — {s.domain_transform}, query as {used[0]} ({how})"
        if captions:
            status += f' — query caption: "{captions[0]}"'
        return items, status


def build_demo(workspace: str | Path, device: str | None = None) -> gr.Blocks:
    backend = DemoBackend(workspace, device)
    examples = _example_queries(backend)
    with gr.Blocks(title="cdir — cross-domain image search") as demo:
        gr.Markdown("# cdir — cross-domain image search\nFind the same thing drawn in other "
                    f"styles. Workspace: `{backend.ws.root}`")
        with gr.Row():
            with gr.Column(scale=1):
                query = gr.Image(type="pil", label="query image")
                index = gr.Dropdown(backend.indexes, value=backend.indexes[0], label="index")
                mode = gr.Radio(["auto", *SINGLE_MODES], value="auto",
                                label="mode (caption indexes: cm-text or cm-image)")
                domain = gr.Dropdown([ALL_DOMAINS] + backend.domains, value=ALL_DOMAINS,
                                     label="search in domain")
                k = gr.Slider(1, 50, value=12, step=1, label="results")
                query_domain = gr.Dropdown([INFER] + backend.domains, value=INFER,
                                           label="query domain (normalised indexes)")
                button = gr.Button("Search", variant="primary")
            with gr.Column(scale=2):
                status = gr.Markdown()
                gallery = gr.Gallery(label="results", columns=4, object_fit="contain",
                                     height="auto")
        inputs = [query, index, mode, domain, k, query_domain]
        button.click(backend.search, inputs, [gallery, status])
        query.upload(backend.search, inputs, [gallery, status])
        if examples:
            gr.Examples(examples, inputs=[query], label="example queries")
    return demo


def _example_queries(backend: DemoBackend, per_domain: int = 2) -> list[list[str]]:
    m = backend.ws.manifest()
    out = []
    for _, rows in m.groupby("domain", sort=True):
        step = max(1, len(rows) // per_domain)
        out += [[p] for p in rows["path"].iloc[::step][:per_domain] if Path(p).exists()]
    return out


def launch(workspace: str | Path, host: str = "127.0.0.1", port: int = 7860,
           device: str | None = None, share: bool = False) -> None:
    demo = build_demo(workspace, device)
    gallery_dirs = sorted({str(Path(p).parent.parent) for p in
                           Workspace(workspace).manifest()["path"].head(1000)})
    demo.launch(server_name=host, server_port=port, share=share, allowed_paths=gallery_dirs)
