"""The Gradio search demo: query a workspace's indexes by image (upload, paste, webcam), by
text, or by clicking a result, in every mode the indexes allow; the results update whenever a
control changes.

The search itself is `app.backend.DemoBackend` (no Gradio there). This module lays out the page,
turns answers into a result grid, a table and a status line, and launches the server: loopback
unless a host is given, uploads capped in size and cleaned up, only gallery files served, a
bounded queue in front of one warm, shared backend.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
import shutil
import types
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from app.backend import (
    ALL_DOMAINS,
    DETECT,
    OTHER_DOMAINS,
    Answer,
    DemoBackend,
    Query,
    readable_name,
)
from cdir.stages.modes import MODES

TITLE = "cdir — cross-domain image search"
MAX_UPLOAD = "10mb"
CONCURRENCY = 16  # searches at once: their queries are encoded in one batch (app.batcher)
QUEUE_SIZE = 256
LOOPBACK = ("127.0.0.1", "localhost", "::1")


class Refused(str):
    """A query image the preprocessing refused before decoding it; the text says why."""


def upload_limit(max_upload: str | int | None) -> int | None:
    """``10mb`` -> bytes (Gradio's parser, so the paste and the upload route agree)."""
    from gradio.utils import _parse_file_size

    return _parse_file_size(max_upload)


def _raw_path_of(limit: int | None) -> Callable[[gr.Image, Any], str | None]:
    def raw_path(component: gr.Image, payload: Any) -> str | None:
        """The query image's preprocessing: the upload's path, not decoded. The backend
        decodes it with the project's checks, so a non-image, an empty or truncated file or a
        decompression bomb becomes a message in the page, not a bare "Error" (Gradio's own
        decoding raises). A pasted data URL gets the upload route's size limit, then its bytes
        go to a file as they are: Gradio's own route would decode the whole image first."""
        if payload is None:
            return None
        if payload.url and payload.url.startswith("data:"):
            path = _paste_to_file(payload.url, limit)
            if not isinstance(path, Refused):
                component.temp_files.add(path)  # deleted with the uploads (delete_cache)
            return path
        return None if payload.path is None else str(payload.path)

    return raw_path


def _paste_to_file(url: str, limit: int | None) -> str:
    from gradio.utils import get_upload_folder

    head, _, data = url.partition(",")
    if limit is not None and len(data) * 3 // 4 > limit:
        return Refused(f"too large: a pasted image of about {_size(len(data) * 3 // 4)}, over "
                       f"the {_size(limit)} limit")
    try:
        raw = (base64.b64decode(data, validate=True) if ";base64" in head
               else urllib.parse.unquote_to_bytes(data))
    except (binascii.Error, ValueError):
        return Refused("not an image (the pasted data is not base64)")
    if limit is not None and len(raw) > limit:
        return Refused(f"too large ({_size(len(raw))}, over the {_size(limit)} limit)")
    folder = Path(get_upload_folder()) / "pasted"
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{uuid.uuid4().hex}.img"
    out.write_bytes(raw)
    return str(out)


def _size(n: int) -> str:
    return f"{n / 1024:.0f} KB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MB"


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes gets 413 before it is read whole.
    The upload route keeps Gradio's own limit; this one bounds every other body, so a query
    posted as JSON (a pasted image as a data URL) cannot be larger than an upload."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if (scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS")
                or scope["path"].rstrip("/").endswith("/upload")):
            await self.app(scope, receive, send)  # no body, or Gradio's own limit
            return
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        seen, started = 0, False

        async def counted() -> dict:
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise _TooLarge
            return message

        async def watched(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted, watched)
        except _TooLarge:
            if not started:
                await self._refuse(send)

    async def _refuse(self, send: Callable) -> None:
        body = (f'{{"error": "request body over {self.limit} bytes: the server takes images '
                'up to --max-upload, uploaded or pasted"}').encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def _drop_upload(path: str) -> None:
    """Delete an upload that is no use (not an image): Gradio keeps every upload otherwise."""
    from gradio.utils import get_upload_folder

    folder = Path(get_upload_folder()).resolve()
    p = Path(path).resolve()
    if p.is_relative_to(folder) and p.is_file():
        p.unlink(missing_ok=True)


# what Markdown would read as markup: HTML, emphasis, links, code, table cells, maths, an
# entity (&amp;), and a line-leading heading, quote or list mark; an intraword _ is plain text
_MARKUP = re.compile(r"[\\`*\[\]<>|$~]|(?<![0-9A-Za-z])_|_(?![0-9A-Za-z])|&(?=#?\w+;)"
                     r"|^(\s*)([#>+\-=])", re.M)
_LIST = re.compile(r"^(\s*\d+)([.)])", re.M)  # "1." or "1)" opening a line: a list


def _md(text: str) -> str:
    """Text from the gallery or a message, shown as it is inside Markdown: each character that
    would be markup (HTML, emphasis, links, code, table cells, maths, an entity such as &amp;,
    a heading, quote or list mark opening a line) is backslash-escaped, so no HTML gets through
    and an API client reading the Markdown sees the text, not HTML entities."""
    text = _MARKUP.sub(lambda m: f"{m.group(1)}\\{m.group(2)}" if m.group(2)
                       else "\\" + m.group(), text)
    return _LIST.sub(r"\1\\\2", text)


def _root_url() -> str | None:
    """The public root URL of the request being answered (as Gradio derives it: forwarded
    host and protocol, root path), or None outside a request."""
    from gradio import route_utils
    from gradio.context import LocalContext

    try:
        request = LocalContext.request.get(None)
        raw = getattr(request, "request", None)
        if raw is None:
            return None
        blocks = LocalContext.blocks.get(None)
        root_path = getattr(getattr(blocks, "app", None), "root_path", None)
        return route_utils.get_root_url(request=raw, root_path=root_path,
                                        route_path=route_utils.get_api_call_path(raw))
    except Exception:  # noqa: BLE001 - any doubt: file paths, which Gradio resolves itself
        return None


def _thumb_url(root: str | None, path: str | None) -> str | None:
    """A thumbnail as the URL the page fetches it from. Given as a URL, Gradio serves it as it
    is; given as a path, Gradio checks it against every static folder twice per answer (two
    `realpath`s each, on the event loop): the largest part of its per-answer work."""
    from gradio.route_utils import API_PREFIX
    from gradio_client.utils import encode_file_path

    return f"{root}{API_PREFIX}/file={encode_file_path(path)}" if root and path else path


def _grid_postprocess(component: gr.Gallery, value: Any) -> Any:
    """Gallery.postprocess for (image URL or path, caption) pairs, built inline: Gradio's own
    starts a thread pool for every answer."""
    from gradio.components.gallery import GalleryData, GalleryImage
    from gradio.data_classes import ImageData
    from gradio_client.utils import get_mimetype, is_http_url_like

    items = list(value or [])
    if not all(isinstance(v, tuple) and isinstance(v[0], str) for v in items):
        return gr.Gallery.postprocess(component, value)
    out = []
    for src, caption in items:
        name = Path(src.rsplit("/", 1)[-1]).name
        url = src if is_http_url_like(src) else None
        out.append(GalleryImage(image=ImageData(path=src, url=url, orig_name=name,
                                                mime_type=get_mimetype(name)), caption=caption))
    return GalleryData(root=out)


def render(answer: Answer) -> tuple[list[tuple[str, str]], str, str]:
    """(grid items, status line, result table) of an answer."""
    names = [readable_name(h.class_name) for h in answer.hits]
    root = _root_url() if answer.hits else None
    grid = [(_thumb_url(root, h.thumb), f"#{h.rank}  {h.score:.3f}  {h.domain}\n{name}")
            for h, name in zip(answer.hits, names, strict=True)]
    if answer.error:
        status = f"**Cannot search:** {_md(answer.message)}"
    else:
        status = _md(answer.message)
        if answer.hits:
            status += f" — {answer.seconds * 1000:.0f} ms"
    if answer.caption:
        status += f'\n\nquery caption: "{_md(answer.caption)}"'
    rows = ["| rank | score | domain | name | caption |", "|---:|---:|---|---|---|"]
    rows += [f"| {h.rank} | {h.score:.3f} | {_md(h.domain)} | {_md(name)} | "
             f"{_md(h.caption or '')} |" for h, name in zip(answer.hits, names, strict=True)]
    return grid, status, "\n".join(rows) if answer.hits else ""


class _Blocks(gr.Blocks):
    """gr.Blocks whose API answers a call with too few inputs with what the endpoint takes
    (Gradio's own error is hidden from clients: they got ``{"error": null}``)."""

    def validate_inputs(self, block_fn: Any, inputs: list[Any]) -> None:
        try:
            super().validate_inputs(block_fn, inputs)
        except ValueError:
            names = [getattr(b, "label", None) or getattr(b, "name", None) or type(b).__name__
                     for b in block_fn.inputs]
            wanted = ", ".join(map(str, names))
            raise gr.Error(f"{block_fn.name} takes {len(names)} inputs ({wanted}), got "
                           f"{len(inputs)}", print_exception=False) from None


def build_demo(workspace: str | Path | None = None, device: str | None = None,
               captioner: str | None = None, backend: DemoBackend | None = None,
               max_upload: str | int | None = MAX_UPLOAD) -> gr.Blocks:
    backend = backend or DemoBackend(workspace, device, captioner)
    images = [(i.label, i.name) for i in backend.image_indexes()]
    captions = [(i.label, i.name) for i in backend.caption_indexes()]
    modes = backend.modes()
    examples = backend.examples()
    no_text = backend.text_note()
    with _Blocks(title=TITLE, delete_cache=(600, 3600)) as demo:
        gr.Markdown(f"# {TITLE}\nFind the same thing drawn in other styles: drop, paste or "
                    "snap an image, type a text, or click any result to search with it. "
                    f"Workspace {_md(str(backend.ws.root))}, "
                    f"{len(backend.rows)} images in {len(backend.domains)} domains "
                    f"({', '.join(backend.domains)}).")
        query_state = gr.State(None)
        hits_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                query = gr.Image(type="filepath", label="query image",
                                 sources=["upload", "clipboard", "webcam"], elem_id="query",
                                 height=260)
                query.preprocess = types.MethodType(_raw_path_of(upload_limit(max_upload)),
                                                    query)
                with gr.Row():
                    # no text route: the box says why and how, instead of failing each query
                    text = gr.Textbox(label="or search by text", elem_id="text-query", scale=4,
                                      placeholder="no text search here: see below" if no_text
                                      else "a red umbrella", interactive=not no_text)
                    text_button = gr.Button("Search text", elem_id="text-search", scale=1,
                                            interactive=not no_text)
                if no_text:
                    # the operator's own path and specs, each command in a code span
                    gr.Markdown(no_text, elem_id="text-note")
                if examples:
                    example_grid = gr.Gallery(
                        [(backend.thumbnail(p), backend.rows.loc[backend.gallery_item(p), "domain"])
                         for p in examples], label="examples: one per domain (click one)",
                        columns=len(examples), height=150, object_fit="contain",
                        allow_preview=False, buttons=[], elem_id="examples")
                mode = gr.Radio(modes, value=modes[0], label="mode", elem_id="mode")
                index = gr.Dropdown(images, value=images[0][1] if images else None,
                                    label="image index", visible=bool(images),
                                    elem_id="index")
                caption_index = gr.Dropdown(captions, value=captions[0][1] if captions else None,
                                            label="caption index", visible=bool(captions),
                                            elem_id="caption-index")
                fuses = any(MODES[m].fuses for m in modes if m in MODES)
                weight = gr.Slider(0, 1, value=0.5, step=0.05, label="fusion: weight of the "
                                   "image index", visible=fuses, elem_id="weight")
                target = gr.Dropdown([OTHER_DOMAINS, ALL_DOMAINS, *backend.domains],
                                     value=OTHER_DOMAINS, label="search in", elem_id="target")
                query_domain = gr.Dropdown([DETECT, *backend.domains], value=DETECT,
                                           label="query domain", elem_id="query-domain")
                k = gr.Slider(1, 50, value=12, step=1, label="results", elem_id="k")
            with gr.Column(scale=2):
                status = gr.Markdown(elem_id="status")
                gallery = gr.Gallery(label="results (click one to search with it)", columns=4,
                                     object_fit="contain", height="auto", allow_preview=False,
                                     buttons=[], elem_id="results")
                gallery.postprocess = types.MethodType(_grid_postprocess, gallery)
                table = gr.Markdown(elem_id="result-table")
        controls = [mode, index, caption_index, target, k, query_domain, weight]
        outputs = [gallery, status, table, hits_state]

        def answer(q: Query | None, *settings) -> tuple:
            a = backend.search(q or Query(), *settings)
            return (*render(a), [h.id for h in a.hits])

        def on_image(path: str | None, *settings) -> tuple:
            if isinstance(path, Refused):  # a paste over the limit or not base64: never decoded
                a = Answer(message=f"This file cannot be searched: {path}", error=True)
                return (None, *render(a), [])
            q = Query(path=path) if path else None
            a = backend.search(q or Query(), *settings)
            if a.bad_file and path:
                _drop_upload(path)
                q = None
            # the image box is no output here: sending the upload back costs a copy and a hash
            # per query, and gr.skip() would rebuild the component without _raw_path
            return (q, *render(a), [h.id for h in a.hits])

        def on_text(value: str, *settings) -> tuple:
            q = Query(text=value) if value and value.strip() else None
            return (None, q, *answer(q, *settings))  # the image box no longer is the query

        def on_item(item: str, *settings) -> tuple:
            q = backend.item_query(item)
            return (backend.preview(q), q, *answer(q, *settings))

        def on_result(hits: list[str], evt: gr.SelectData, *settings) -> tuple:
            return on_item(hits[evt.index], *settings)

        def on_example(evt: gr.SelectData, *settings) -> tuple:
            return on_item(backend.gallery_item(examples[evt.index]), *settings)

        def rerun(q: Query | None, *settings) -> tuple:
            return answer(q, *settings)

        query.input(on_image, [query, *controls], [query_state, *outputs],
                    api_name="search_image")
        text.submit(on_text, [text, *controls], [query, query_state, *outputs],
                    api_name="search_text")
        text_button.click(on_text, [text, *controls], [query, query_state, *outputs],
                          api_visibility="private")
        gallery.select(on_result, [hits_state, *controls], [query, query_state, *outputs],
                       api_visibility="private")
        if examples:
            example_grid.select(on_example, controls, [query, query_state, *outputs],
                                api_visibility="private")
        for c in controls:
            c.change(rerun, [query_state, *controls], outputs, api_visibility="private")

        def search_item(item: str, mode: str = modes[0], index: str | None = None,
                        caption_index: str | None = None, target: str = OTHER_DOMAINS,
                        k: int = 12, query_domain: str = DETECT, weight: float = 0.5
                        ) -> tuple[list, str, str]:
            """Search with the gallery item ``item`` (an id), as a click on it does."""
            q = backend.item_query(item) if item in backend.rows.index else Query()
            a = backend.search(q, mode, index, caption_index, target, k, query_domain, weight)
            return render(a)

        gr.api(search_item, api_name="search_item")
    # Gradio's queue rebuilds a pandas summary of every event it keeps (up to 10,000) after
    # each event, for a monitoring page the demo does not serve: a cost that grows with
    # the events served. Once per 1,000 events, over the last 1,000, unless the user says.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "1000")
    os.environ.setdefault("GRADIO_ANALYTICS_MAX_EVENTS", "1000")
    demo.queue(default_concurrency_limit=CONCURRENCY, max_size=QUEUE_SIZE)
    return demo


def is_loopback(host: str) -> bool:
    return host in LOOPBACK or host.startswith("127.")


def compute_threads() -> int:
    """Give the model, FAISS and numpy's BLAS every core but one: the server's event loop (HTTP,
    Gradio's per-request work) needs the other, and compute threads that outnumber the free
    cores spin against it (on 2 busy cores, one BLAS thread whitened a batch of 6 queries in
    30 ms, two in 150 ms)."""
    import faiss
    import torch

    n = max(1, (os.cpu_count() or 2) - 1)
    torch.set_num_threads(n)
    faiss.omp_set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits  # present with sentence-transformers
    except ImportError:
        pass
    else:
        threadpool_limits(n, user_api="blas")  # for the life of the process
    return n


def serve(backend: DemoBackend, host: str = "127.0.0.1", port: int | None = 7860,
          share: bool = False, max_upload: str = MAX_UPLOAD, block: bool = True) -> gr.Blocks:
    """Start the server over a warm backend; with ``block``, serve until Ctrl-C. A port in use
    is a CdirError that names --port."""
    from starlette.middleware import Middleware

    from cdir.core.errors import CdirError

    compute_threads()
    backend.warm_up()
    gr.set_static_paths(backend.served_dirs())  # served as they are: no copy per result
    demo = build_demo(backend=backend, max_upload=max_upload)
    limit = upload_limit(max_upload)
    # a JSON body may carry the image as a data URL: base64 of an upload, plus the settings
    body = None if limit is None else limit * 4 // 3 + 65536
    try:
        # quiet: Gradio's banner would advise share=True, which `cdir demo` spells --share
        demo.launch(server_name=host, server_port=port, share=share,
                    allowed_paths=backend.served_dirs(), max_file_size=max_upload,
                    show_error=False, prevent_thread_lock=True, quiet=True,
                    app_kwargs={"middleware": [Middleware(BodyLimit, limit=body)]
                                if body else []})
    except OSError as e:
        if "port" not in str(e).lower():
            raise
        raise CdirError(f"cannot listen on {host}:{port} (in use?): choose another port with "
                        "--port N, or --port 0 for the first free one from 7860") from None
    if block:
        print(f"cdir demo: serving {demo.local_url}"
              + (f" and {demo.share_url}" if share and demo.share_url else "")
              + " (Ctrl-C to stop)", flush=True)
        try:
            demo.block_thread()
        finally:
            demo.close()
    return demo


def launch(workspace: str | Path, host: str = "127.0.0.1", port: int | None = 7860,
           device: str | None = None, captioner: str | None = None, share: bool = False,
           max_upload: str = MAX_UPLOAD, query_encoder: str | None = None) -> None:
    """`cdir demo`: uploads go to a private temporary folder (GRADIO_TEMP_DIR, set by the
    command before Gradio is imported), removed at exit; while it runs, uploads older than an
    hour are deleted every ten minutes."""
    try:
        serve(DemoBackend(workspace, device, captioner, query_encoder), host, port, share,
              max_upload)
    finally:
        uploads = os.environ.get("GRADIO_TEMP_DIR", "")
        if Path(uploads).name.startswith("cdir-demo-"):
            shutil.rmtree(uploads, ignore_errors=True)
