"""Load test of the search demo: image, text and click queries from concurrent clients over
plain HTTP on 127.0.0.1, against `cdir demo` running in its own process.

    python bench/bench_demo.py [--clients 20] [--queries 100] [-w runs/demo-bench]

The workspace is the default one (`cdir demo` with no -w: the emoji gallery, the project's own
encoder, plain and whitened flat indexes) plus a caption index so that text queries have
something to search: the gallery's file names ("a picture of a mushroom") as imported captions,
embedded with MiniLM. They stand in for real captions (no captioner runs offline); text-query
latency is that of MiniLM and the search, whatever the captions say.

Each query kind runs first from one client (the warm single query, the baseline of the same
run), then from ``--clients`` clients at once, ``--queries`` in all: an image query uploads a
new image (a gallery image moved by one pixel) and searches with it, as a drop in the page does;
a click searches with a gallery item (its stored vector: no model); a text query searches the
caption index. Prints p50 / p95 / errors / queries per second and the
ratio to the single query; exits 1 on any error.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from app.http_api import call, file_data, upload  # noqa: E402

MINILM = "st:sentence-transformers/all-MiniLM-L6-v2"
TARGET = "every other domain"


def prepare(ws: Path) -> None:
    """The default workspace in ``ws``, plus file-name captions embedded with MiniLM."""
    import pandas as pd

    from app.default_workspace import ensure_default_workspace
    from cdir.cli import main

    ensure_default_workspace(ws)
    m = pd.read_parquet(ws / "manifest.parquet")
    table = ws / "names.csv"
    with open(table, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "caption"])
        for id_, cls in zip(m["id"], m["class_name"], strict=True):
            w.writerow([id_, "a picture of a " + cls.split("_", 1)[-1].replace("_", " ")])
    for argv in (["caption", "-w", str(ws), "--from-file", str(table), "--name", "names"],
                 ["embed", "-w", str(ws), "--captions", "names", "--text-encoder", MINILM],
                 ["index", "build", "-w", str(ws), "--captions", "names", "--text-encoder",
                  MINILM]):
        if main(argv) != 0:
            sys.exit(f"bench_demo: `cdir {' '.join(argv)}` failed")


def new_image(path: str) -> bytes:
    """A gallery image moved by one pixel, as PNG bytes: not a gallery file (whose stored
    vector would be used), so the query goes through the model, the domain detection and the
    normaliser like any new upload."""
    import io

    from PIL import Image, ImageChops

    with Image.open(path) as im:
        out = io.BytesIO()
        ImageChops.offset(im.convert("RGBA"), 1, 1).save(out, format="PNG")
    return out.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(ws: Path, port: int, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "GRADIO_ANALYTICS_ENABLED": "False",
           "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cdir", "demo", "-w", str(ws),
                                 "--port", str(port)], stdout=f, stderr=f, env=env, cwd=ROOT)
    import httpx

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"bench_demo: the demo exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    sys.exit("bench_demo: the demo did not come up in 300 s")


class Client:
    """One HTTP connection and one session per thread (a user with a page open), speaking the
    demo's API (`app.http_api`)."""

    def __init__(self, url: str):
        self.url = url
        self.local = threading.local()

    def http(self):
        import uuid

        import httpx

        if not hasattr(self.local, "c"):
            self.local.c = httpx.Client(base_url=self.url, timeout=120)
            self.local.session = uuid.uuid4().hex  # one session per client, as a page has
        return self.local.c

    def call(self, endpoint: str, data: list) -> tuple[bool, str]:
        kind, payload = call(self.http(), endpoint, data, session=self.local.session)
        return kind == "complete", json.dumps(payload, ensure_ascii=False)

    def image(self, data: bytes, name: str) -> tuple[bool, str]:
        path = upload(self.http(), data, name).json()[0]
        return self.call("search_image", [file_data(path), "visual", None, None, TARGET, 12,
                                          "detect", 0.5])

    def text(self, text: str) -> tuple[bool, str]:
        return self.call("search_text", [text, "cm-text", None, None, TARGET, 12, "detect", 0.5])

    def item(self, item: str) -> tuple[bool, str]:
        return self.call("search_item", [item, "visual", None, None, TARGET, 12, "detect", 0.5])


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process ``pid`` (Linux /proc), None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(fn, args: list, clients: int, server: int | None = None) -> dict:
    """``fn(*a)`` for each ``a`` of ``args`` from ``clients`` threads; with ``server`` (its
    pid), also the server's CPU time per query: where the load's time goes."""
    before = cpu_seconds(server) if server else None

    def one(a):
        t0 = time.perf_counter()
        ok, body = fn(*a)
        ok = ok and "Cannot search" not in body
        ms = re.search(r"— (\d+) ms", body)
        return time.perf_counter() - t0, ok, int(ms.group(1)) if ms else None

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        out = list(pool.map(one, args))
    wall = time.perf_counter() - t0
    after = cpu_seconds(server) if server else None
    lat = sorted(o[0] for o in out)
    search = [o[2] for o in out if o[2] is not None]
    return {"n": len(out), "clients": clients, "errors": sum(not o[1] for o in out),
            "p50_s": statistics.median(lat), "p95_s": lat[max(0, int(0.95 * len(lat)) - 1)],
            "qps": len(out) / wall,
            "search_ms_p50": statistics.median(search) if search else None,
            "server_cpu_ms": None if before is None or after is None
            else 1000 * (after - before) / len(out)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-w", "--workspace", default="runs/demo-bench")
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--queries", type=int, default=100)
    ap.add_argument("--single", type=int, default=20, help="queries from one client")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    ws = Path(args.workspace)
    prepare(ws)
    import pandas as pd

    m = pd.read_parquet(ws / "manifest.parquet")
    rows = m.sample(n=args.queries, random_state=0, replace=len(m) < args.queries)
    files = [(new_image(p), Path(p).name) for p in rows["path"]]
    items = [[i] for i in rows["id"]]
    texts = [["a picture of a " + c.split("_", 1)[-1].replace("_", " ")]
             for c in rows["class_name"]]
    port = free_port()
    log = ws / "bench_demo_server.log"
    server = start_server(ws, port, log)
    client = Client(f"http://127.0.0.1:{port}")
    results = {}
    try:
        kinds = {"image": (client.image, files), "click": (client.item, items),
                 "text": (client.text, texts)}
        for kind, (fn, data) in kinds.items():
            run(fn, data[:3], 1)  # warm: the first text query loads MiniLM
            single = run(fn, data[:args.single], 1, server.pid)
            loaded = run(fn, data, args.clients, server.pid)
            results[kind] = {"single": single, "loaded": loaded}
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    print(f"\n{args.queries} queries per kind from {args.clients} concurrent clients over "
          f"loopback HTTP; single: {args.single} queries from one client; "
          f"{os.cpu_count()} CPU cores"
          + (f"; load average at the end {load[0]:.1f} / {load[1]:.1f} (1 / 5 min)" if load
             else "") + "\n")
    print("| query | clients | errors | p50 s | p95 s | queries/s | search ms p50 | "
          "server CPU ms / query | p50 / single p50 |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for kind, r in results.items():
        for which in ("single", "loaded"):
            x = r[which]
            ratio = x["p50_s"] / r["single"]["p50_s"]
            cpu = "" if x["server_cpu_ms"] is None else f"{x['server_cpu_ms']:.0f}"
            print(f"| {kind} | {x['clients']} | {x['errors']} | {x['p50_s']:.3f} | "
                  f"{x['p95_s']:.3f} | {x['qps']:.1f} | {x['search_ms_p50']} | {cpu} | "
                  f"{ratio:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    errors = sum(r[w]["errors"] for r in results.values() for w in r)
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
