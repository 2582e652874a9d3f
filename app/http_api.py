"""The demo's HTTP API from the client side (Gradio's two-step protocol), shared by the load
bench and the tests: an upload, and a call that posts its inputs, then reads the event stream
until the result."""

from __future__ import annotations

import json
from typing import Any


def upload(http: Any, data: bytes, name: str) -> Any:
    """POST one file to ``/gradio_api/upload`` with ``http`` (an httpx.Client on the server);
    returns the response, whose JSON is the list of stored paths on success."""
    return http.post("/gradio_api/upload", files=[("files", (name, data))])


def file_data(path: str) -> dict:
    """An uploaded file as an input value."""
    return {"path": path, "meta": {"_type": "gradio.FileData"}}


def call(http: Any, endpoint: str, data: list, session: str | None = None
         ) -> tuple[str | None, Any]:
    """Run ``/gradio_api/call/ENDPOINT`` with the input values ``data``: (the closing event,
    "complete" or "error", and its decoded payload); (None, None) if the stream ends without.
    ``session``: the session hash of a client that makes several calls, as a page does (without
    one, the server sets up a new session, its copy of the page's state, for every call)."""
    body: dict = {"data": data} if session is None else {"data": data, "session_hash": session}
    event = http.post(f"/gradio_api/call/{endpoint}", json=body).json()["event_id"]
    kind = None
    with http.stream("GET", f"/gradio_api/call/{endpoint}/{event}") as stream:
        for line in stream.iter_lines():
            if line.startswith("event:"):
                kind = line[6:].strip()
            elif line.startswith("data:") and kind in ("complete", "error"):
                return kind, json.loads(line[5:])
    return None, None
