"""Faults: `cdir embed` and `cdir caption` killed with SIGTERM, SIGINT and SIGKILL at seeded random
points, then resumed, end with every id exactly once and the vectors / captions of an uninterrupted
run; SIGTERM keeps finished work like Ctrl-C (exit 143), also for a stage called from Python; two
runs on one output never both write (`cdir.core.lock`); the lock file's takeover rules;
`cdir.core.signals` itself.

The runs are real `cdir ARGS` processes (``cdir.cli.main`` in a process of its own, which gets the
signals), forked from a warm interpreter (:class:`Zygote`) that has imported torch and transformers
once: a fresh `cdir caption` spends 10-20 s importing on the small machines that run the tests,
which would leave no room for several runs. ``-m slow`` adds more seeds, small shards (kills in
the middle of a flush), process-group kills with DataLoader workers (what `timeout` and batch
schedulers do), and `python -m cdir` started from scratch.
"""

from __future__ import annotations

import json
import os
import random
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cdir.core.caption_store import CaptionStore, list_sources
from cdir.core.lock import beside, exclusive
from cdir.core.manifest import make_manifest, save_manifest
from cdir.core.store import EmbeddingStore
from cdir.core.workspace import Workspace
from tests.helpers.cli import sigterm_when
from tests.helpers.trees import manifest_rows, write_shape_tree

REPO = Path(__file__).resolve().parents[2]
INTERRUPTED = "interrupted; finished work is kept, re-run to continue"
EXIT = {signal.SIGTERM: 143, signal.SIGINT: 130, signal.SIGKILL: -signal.SIGKILL}
EMBED = ("--encoder", "pixels", "--batch-size", "1", "--workers", "0")
CAPTION_GEN = ("--batch-size", "2", "--max-new-tokens", "5", "--min-new-tokens", "2")

# The warm interpreter: one JSON request per line on stdin, one JSON answer per line on stdout.
# A run is `os.fork()` + `cdir.cli.main(argv)` with stdout/stderr to a log file, in a process
# group of its own (so that a test can signal it together with its DataLoader workers). Progress
# bars print every row (TQDM_*), so that a test sees how far a run is without a 0.1 s lag.
_ZYGOTE = r"""
import json, os, sys, traceback
os.environ.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
                  HF_HUB_OFFLINE="1", TQDM_MININTERVAL="0", TQDM_MINITERS="1")
sys.path.insert(0, sys.argv[1])
import torch
torch.set_num_threads(1)
from pathlib import Path
from cdir import cli
import cdir.stages.caption, cdir.stages.embed, encoders.captioners, encoders.image, transformers
from transformers import BlipForConditionalGeneration, BlipProcessor
from tests.helpers.tiny_models import build_tiny


def run(argv, log, snippet=None):
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        os.setpgid(0, 0)
        fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        if snippet is None:
            code = cli.main(argv)
        else:  # Python code instead of the command line
            exec(snippet, {"__name__": "__main__"})
            code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)  # no atexit of the warm interpreter in the child


for line in iter(sys.stdin.readline, ""):
    req = json.loads(line)
    if req["op"] == "run":
        out = {"pid": run(req.get("argv"), req["log"], req.get("code"))}
    elif req["op"] == "poll":
        pid, status = os.waitpid(req["pid"], os.WNOHANG)
        out = {"rc": os.waitstatus_to_exitcode(status) if pid else None}
    elif req["op"] == "build":
        out = {"path": str(build_tiny(req["family"], Path(req["folder"])))}
    else:
        out = {"ok": True}
    print(json.dumps(out), flush=True)
"""


class Zygote:
    """Starts `cdir ARGS` runs as forks of a warm interpreter (see the module docstring)."""

    def __init__(self, log: Path):
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.stderr = open(log, "wb")  # noqa: SIM115 - closed in close()
        self.proc = subprocess.Popen([sys.executable, "-c", _ZYGOTE, str(REPO)], cwd=REPO,
                                     env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.stderr, bufsize=0)
        self.log = log
        self.count = 0
        self.ended: dict[int, int] = {}  # pid -> exit status, once reaped
        self._ask({"op": "ping"}, timeout=300)

    def _ask(self, req: dict, timeout: float = 60) -> dict:
        self.proc.stdin.write((json.dumps(req) + "\n").encode())
        buf = b""
        deadline = time.monotonic() + timeout
        while not buf.endswith(b"\n"):
            left = deadline - time.monotonic()
            ready, _, _ = select.select([self.proc.stdout], [], [], max(left, 0))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            if not chunk:
                raise AssertionError(f"the warm interpreter did not answer {req}: "
                                     f"{self.log.read_text()[-3000:]}")
            buf += chunk
        return json.loads(buf)

    def start(self, workdir: Path, *args: object, code: str | None = None) -> tuple[int, Path]:
        """Fork ``cdir ARGS`` (or run the Python ``code``); returns its pid and its log file."""
        self.count += 1
        log = workdir / f"run{self.count:03d}.log"
        req = {"op": "run", "argv": [str(a) for a in args], "log": str(log), "code": code}
        return self._ask(req)["pid"], log

    def poll(self, pid: int) -> int | None:
        if pid not in self.ended:
            rc = self._ask({"op": "poll", "pid": pid})["rc"]
            if rc is None:
                return None
            self.ended[pid] = rc
        return self.ended[pid]

    def wait(self, pid: int, timeout: float = 180) -> int:
        deadline = time.monotonic() + timeout
        while (rc := self.poll(pid)) is None:
            if time.monotonic() > deadline:
                os.killpg(pid, signal.SIGKILL)
                raise AssertionError(f"cdir run {pid} did not end within {timeout} s")
            time.sleep(0.02)
        while time.monotonic() < deadline:  # its DataLoader workers may still be writing the log
            try:
                os.killpg(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        return rc

    def run(self, workdir: Path, *args: object, code: str | None = None) -> tuple[int, str]:
        """``cdir ARGS`` (or the Python ``code``) to its end: (exit status, output)."""
        pid, log = self.start(workdir, *args, code=code)
        rc = self.wait(pid)
        return rc, log.read_text()

    def build(self, family: str, folder: Path) -> Path:
        return Path(self._ask({"op": "build", "family": family, "folder": str(folder)},
                              timeout=300)["path"])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)
        self.stderr.close()


@pytest.fixture(scope="module")
def zygote(tmp_path_factory: pytest.TempPathFactory):
    z = Zygote(tmp_path_factory.mktemp("zygote") / "zygote.log")
    yield z
    z.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """Manifest rows of 384 PNGs (4 domains x 4 classes x 24, 160 px): a `cdir embed --encoder
    pixels --batch-size 1` run takes a few tenths of a second (about 1400 images/s here), long
    enough to be cut anywhere, also after its bar's first refresh (tqdm redraws every 0.1 s:
    with 96 images a fast run could finish before a SIGTERM sent at "10 done" arrived)."""
    base = write_shape_tree(tmp_path_factory.mktemp("images"), per_class=24, size=160,
                            ext=".png")
    return manifest_rows(base)


@pytest.fixture(scope="module")
def small_images(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    """24 JPEGs of 32 px (2 domains x 3 classes x 4) for the tiny captioner."""
    base = write_shape_tree(tmp_path_factory.mktemp("small"), domains=("Art", "Clipart"),
                            classes=("Circle", "Square", "Triangle"), per_class=4, size=32)
    return manifest_rows(base)


@pytest.fixture(scope="module")
def blip(zygote: Zygote, tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"hf:{zygote.build('blip', tmp_path_factory.mktemp('blip') / 'blip')}"


def _workspace(root: Path, rows: list[dict]) -> Workspace:
    ws = Workspace(root)
    save_manifest(make_manifest(rows), ws.manifest_path)
    return ws


def _raw_ids(ws: Workspace, spec: str = "pixels") -> list[str]:
    """Every stored row id, shard by shard, duplicates kept."""
    ids: list[str] = []
    for f in sorted(ws.embeddings_dir(spec).glob("shard_*.ids.json")):
        ids += json.loads(f.read_text())
    return ids


def _vectors(ws: Workspace, spec: str = "pixels") -> np.ndarray:
    vecs, valid = EmbeddingStore(ws.embeddings_dir(spec)).load(ws.manifest())
    assert valid.all()
    return vecs


def _caption_store(ws: Workspace) -> CaptionStore:
    (source,) = list_sources(ws)
    return CaptionStore(ws, source["key"])


def _raw_caption_ids(store: CaptionStore) -> list[str]:
    """Ids of every stored caption row (compacted file and parts), duplicates kept."""
    files = ([store.path] if store.path.exists() else []) + store._parts()
    return [i for f in files for i in pd.read_parquet(f)["id"].astype(str)]


def _captions(ws: Workspace) -> dict[str, str]:
    rows = _caption_store(ws).read()
    return dict(zip(rows["id"], rows["caption"], strict=True))


def _shown(log: Path, stage: str) -> int:
    """The last row count that the stage's progress bar printed in ``log``."""
    return _shown_in(log.read_text(errors="replace") if log.exists() else "", stage)


def _shown_in(text: str, stage: str) -> int:
    """The last row count that a stage's progress bar printed (tqdm's "N/M"; the bar's
    description starts with the stage's name, unlike a model loader's bars)."""
    counts = [int(m.group(1)) for seg in re.split(r"[\r\n]", text) if seg.startswith(stage)
              for m in [re.search(r"\| *(\d+)/\d+ \[", seg)] if m]
    return counts[-1] if counts else 0


def _wait_shown(zygote: Zygote, pid: int, log: Path, stage: str, rows: int,
                timeout: float = 120) -> int:
    """Wait until the run's progress bar shows at least ``rows`` done; returns the count."""
    deadline = time.monotonic() + timeout
    while (n := _shown(log, stage)) < rows:
        assert zygote.poll(pid) is None, f"the run ended before {rows} rows: {log.read_text()}"
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.01)
    return n


def _sigterm_after(zygote: Zygote, workdir: Path, stage: str, argv: list, rows: int
                   ) -> tuple[int, str]:
    """Start ``cdir STAGE ARGV`` in the zygote, SIGTERM it once its bar shows ``rows`` done;
    asserts exit 143 with the interrupted line; returns (rows shown, output)."""
    pid, log = zygote.start(workdir, stage, *argv)
    shown = _wait_shown(zygote, pid, log, stage, rows)
    os.kill(pid, signal.SIGTERM)
    rc = zygote.wait(pid)
    out = log.read_text()
    assert rc == 143, out
    assert f"cdir {stage}: {INTERRUPTED}" in out
    return shown, out


def _wait_fraction(zygote: Zygote, pid: int, log: Path, stage: str, fraction: float,
                   timeout: float = 120) -> None:
    """Wait until the stage's bar shows ``fraction`` of its rows done (at once for 0: the bar
    appears before the captioner is loaded), or the run ends."""
    deadline = time.monotonic() + timeout
    while zygote.poll(pid) is None and time.monotonic() < deadline:
        text = log.read_text(errors="replace") if log.exists() else ""
        bars = [m for seg in re.split(r"[\r\n]", text) if seg.startswith(stage)
                for m in [re.search(r"\| *(\d+)/(\d+) \[", seg)] if m]
        if bars and int(bars[-1].group(1)) >= fraction * int(bars[-1].group(2)):
            return
        time.sleep(0.005)


def _fault_runs(zygote: Zygote, workdir: Path, argv: tuple, runs: int, seed: int,
                after_each, group: bool = False) -> list[tuple[str, int]]:
    """``runs`` runs of ``cdir ARGV``, hit in turn (seeded order) by SIGTERM, SIGINT and SIGKILL
    (sent to the process, or with ``group`` to its process group) at a seeded random point: when
    its progress bar shows a random fraction (0 .. 0.6) of its rows done.
    ``after_each(signal name, exit status)`` checks the store in between."""
    rng = random.Random(seed)
    kinds = (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)
    signals = [*kinds, *(rng.choice(kinds) for _ in range(runs - len(kinds)))]  # each kind
    rng.shuffle(signals)
    stage = argv[0]
    outcomes = []
    for sig in signals:
        fraction = rng.uniform(0, 0.6)
        pid, log = zygote.start(workdir, *argv)
        _wait_fraction(zygote, pid, log, stage, fraction)
        try:
            (os.killpg if group else os.kill)(pid, sig)
        except ProcessLookupError:
            pass  # its process group is gone already
        rc = zygote.wait(pid)
        out = log.read_text()
        assert rc in (0, EXIT[sig]), f"{sig.name} at {fraction:.2f} gave {rc}:\n{out[-3000:]}"
        if rc in (130, 143):
            assert INTERRUPTED in out, out[-3000:]
            assert "Traceback" not in out, out[-3000:]
        outcomes.append((sig.name, rc))
        after_each(sig.name, rc)
    # SIGTERM and SIGINT did cut runs short (a run that finished first proves nothing)
    assert {143, 130} <= {rc for _, rc in outcomes}, outcomes
    return outcomes


# -- embed --------------------------------------------------------------------------------------

def _embed_faults(zygote: Zygote, tmp_path: Path, images: list[dict], runs: int, seed: int,
                  extra: tuple = (), group: bool = False) -> None:
    ref = _workspace(tmp_path / "ref", images)
    rc, out = zygote.run(tmp_path, "embed", "-w", ref.root, *EMBED)
    assert rc == 0, out
    ws = _workspace(tmp_path / "ws", images)
    argv = (*EMBED, *extra)
    counts = [0]

    def after_each(sig: str, rc: int) -> None:
        ids = _raw_ids(ws)
        assert len(ids) == len(set(ids)), f"duplicate rows after {sig} ({rc})"
        assert len(ids) >= counts[-1]  # nothing finished is ever lost
        counts.append(len(ids))
        if rc != -signal.SIGKILL:  # a killed run's lock file stays for the next to take over
            assert not beside(ws.embeddings_dir("pixels")).exists()

    outcomes = _fault_runs(zygote, tmp_path, ("embed", "-w", ws.root, *argv), runs, seed,
                           after_each, group)
    rc, out = zygote.run(tmp_path, "embed", "-w", ws.root, *argv)
    assert rc == 0, out
    ids = _raw_ids(ws)
    manifest_ids = ws.manifest()["id"].tolist()
    assert len(ids) == len(set(ids)) and set(ids) == set(manifest_ids), outcomes
    np.testing.assert_allclose(_vectors(ws), _vectors(ref), atol=1e-6)
    assert not list(ws.embeddings_dir("pixels").glob(".*.tmp"))
    assert not beside(ws.embeddings_dir("pixels")).exists()


def test_embed_killed_at_random_points_resumes_to_the_uninterrupted_result(
        zygote: Zygote, tmp_path: Path, images: list[dict]) -> None:
    _embed_faults(zygote, tmp_path, images, runs=5, seed=0)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(1, 9))
def test_embed_faults_more(zygote: Zygote, tmp_path: Path, images: list[dict],
                           seed: int) -> None:
    """More seeds; small shards (kills inside a flush) for even seeds, and for odd ones
    DataLoader workers with the signals sent to the whole process group (what `timeout` and
    batch schedulers do)."""
    extra = ("--workers", "2") if seed % 2 else ("--shard-rows", "7")
    _embed_faults(zygote, tmp_path, images, runs=5, seed=seed, extra=extra,
                  group=bool(seed % 2))


def test_sigterm_keeps_the_open_shard(zygote: Zygote, tmp_path: Path,
                                      images: list[dict]) -> None:
    """SIGTERM with one shard of 4096 rows open: the rows embedded so far are written (before,
    the whole shard was lost), the exit status is 143 and the next run does only the rest."""
    ws = _workspace(tmp_path / "ws", images)
    shown, _ = _sigterm_after(zygote, tmp_path, "embed", ["-w", ws.root, *EMBED], 10)
    ids = _raw_ids(ws)
    assert shown <= len(ids) < len(images) and len(set(ids)) == len(ids)
    assert not beside(ws.embeddings_dir("pixels")).exists()  # released on the way out
    rc, out = zygote.run(tmp_path, "embed", "-w", ws.root, *EMBED)
    assert rc == 0 and f"embedded {len(images) - len(ids)} new, {len(ids)} already done" in out


_FROM_PYTHON = """
import os, signal
from cdir.core.signals import Terminated
from cdir.stages.embed import embed_images

def stop(done, total):
    if done == 20:
        os.kill(os.getpid(), signal.SIGTERM)

try:
    embed_images({ws!r}, "pixels", batch_size=1, num_workers=0, progress=False, callback=stop)
except Terminated:
    print("Terminated", signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
"""


def test_a_stage_called_from_python_keeps_its_work_on_sigterm(
        zygote: Zygote, tmp_path: Path, images: list[dict]) -> None:
    """Without the command line: the stage itself turns SIGTERM into Terminated (a
    KeyboardInterrupt), writes the 20 rows done, and puts the default disposition back."""
    ws = _workspace(tmp_path / "ws", images)
    rc, out = zygote.run(tmp_path, code=_FROM_PYTHON.format(ws=str(ws.root)))
    assert rc == 0 and out.strip() == "Terminated True", out
    assert len(_raw_ids(ws)) == 20


# -- caption ------------------------------------------------------------------------------------

def _caption_faults(zygote: Zygote, tmp_path: Path, rows: list[dict], blip: str, runs: int,
                    seed: int) -> None:
    argv = ("--captioner", blip, *CAPTION_GEN)
    ref = _workspace(tmp_path / "ref", rows)
    rc, out = zygote.run(tmp_path, "caption", "-w", ref.root, *argv)
    assert rc == 0, out
    ws = _workspace(tmp_path / "ws", rows)
    counts = [0]

    def after_each(sig: str, rc: int) -> None:
        if not list_sources(ws):
            return  # stopped before the source was described
        store = _caption_store(ws)
        done = len(store.done_ids())  # parts and compacted file may overlap until compacted
        assert done >= counts[-1]
        counts.append(done)
        if rc != -signal.SIGKILL:
            assert not store.lock_path.exists()

    outcomes = _fault_runs(zygote, tmp_path, ("caption", "-w", ws.root, *argv), runs, seed,
                           after_each)
    rc, out = zygote.run(tmp_path, "caption", "-w", ws.root, *argv)
    assert rc == 0, out
    store = _caption_store(ws)
    ids = _raw_caption_ids(store)
    assert len(ids) == len(set(ids)) and set(ids) == {r["id"] for r in rows}, outcomes
    assert _captions(ws) == _captions(ref)
    assert not store.lock_path.exists() and not store.parts_dir.exists()


def test_caption_killed_at_random_points_resumes_to_the_uninterrupted_result(
        zygote: Zygote, tmp_path: Path, small_images: list[dict], blip: str) -> None:
    _caption_faults(zygote, tmp_path, small_images, blip, runs=4, seed=1)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(2, 6))
def test_caption_faults_more(zygote: Zygote, tmp_path: Path, small_images: list[dict],
                             blip: str, seed: int) -> None:
    _caption_faults(zygote, tmp_path, small_images, blip, runs=5, seed=seed)


def test_sigterm_ends_a_caption_run_like_ctrl_c(zygote: Zygote, tmp_path: Path,
                                                small_images: list[dict], blip: str) -> None:
    """SIGTERM: exit 143, the finished batches compacted into the source, its lock released
    (before, the process died on the spot and left both behind)."""
    ws = _workspace(tmp_path / "ws", small_images)
    shown, out = _sigterm_after(zygote, tmp_path, "caption",
                                ["-w", ws.root, "--captioner", blip, *CAPTION_GEN], 4)
    store = _caption_store(ws)
    assert not store.lock_path.exists() and not store.parts_dir.exists()
    ids = _raw_caption_ids(store)
    assert shown <= len(ids) < len(small_images) and len(set(ids)) == len(ids)
    assert store.meta()["count"] == len(ids)


# -- two runs at once, and the lock file ----------------------------------------------------------

def test_two_embed_runs_at_once_one_refuses(zygote: Zygote, tmp_path: Path,
                                            images: list[dict]) -> None:
    """Two `cdir embed` on one workspace at the same moment: one embeds everything, the other
    stops at once with one line naming the first one's pid; each id is stored once."""
    ws = _workspace(tmp_path / "ws", images)
    a = zygote.start(tmp_path, "embed", "-w", ws.root, *EMBED)
    b = zygote.start(tmp_path, "embed", "-w", ws.root, *EMBED)
    (rc_a, rc_b) = (zygote.wait(a[0]), zygote.wait(b[0]))
    assert sorted([rc_a, rc_b]) == [0, 2], (a[1].read_text(), b[1].read_text())
    (winner, _), (loser, loser_log) = (a, b) if rc_a == 0 else (b, a)
    err = loser_log.read_text().strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cdir embed: error: another run "
                                               f"(pid {winner}), started "), err
    assert "is writing the embeddings of pixels: wait for it to finish" in err[0]
    ids = _raw_ids(ws)
    assert sorted(ids) == sorted(ws.manifest()["id"])  # each id exactly once


_HOLDER = """
import sys, time
sys.path.insert(0, {repo!r})
from cdir.core.lock import exclusive
with exclusive({path!r}, "writing the embeddings of pixels"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_killed_holders_lock_is_taken_over(zygote: Zygote, tmp_path: Path,
                                             images: list[dict]) -> None:
    """While a holder lives, `cdir embed` refuses (exit 2) naming it; after the holder is
    SIGKILLed its lock file stays behind, and the next run takes it over."""
    ws = _workspace(tmp_path / "ws", images[:8])
    lock = beside(ws.embeddings_dir("pixels"))
    holder = subprocess.Popen([sys.executable, "-c",
                               _HOLDER.format(repo=str(REPO), path=str(lock))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        rc, out = zygote.run(tmp_path, "embed", "-w", ws.root, *EMBED)
        assert rc == 2 and f"another run (pid {holder.pid})" in out, out
        assert _raw_ids(ws) == []
        holder.kill()
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert lock.exists()  # a SIGKILL leaves the file; its flock went with the process
    rc, out = zygote.run(tmp_path, "embed", "-w", ws.root, *EMBED)
    assert rc == 0 and "embedded 8 new" in out, out
    assert not lock.exists()


_SLOW_WRITER = """
import fcntl, json, os, sys, time
fd = os.open({path!r}, os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("flocked", flush=True)
time.sleep(0.3)  # the instant between taking the flock and writing the record, stretched
os.pwrite(fd, (json.dumps({{"pid": os.getpid(), "what": "embedding"}}) + "\\n").encode(), 0)
time.sleep(120)
"""


def test_a_holder_that_has_not_written_its_record_yet_is_still_named(tmp_path: Path) -> None:
    """Two runs started together: the second may find the flock taken before the first has
    written who it is; it waits for the record rather than refusing anonymously."""
    from cdir.core.errors import CdirError
    from cdir.core.lock import exclusive

    lock = tmp_path / "x.lock"
    holder = subprocess.Popen([sys.executable, "-c", _SLOW_WRITER.format(path=str(lock))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "flocked"
        with pytest.raises(CdirError, match=rf"^another run \(pid {holder.pid}\) is embedding"):
            with exclusive(lock, "writing"):
                pass
    finally:
        holder.kill()
        holder.wait()


def test_index_build_and_caption_embeddings_take_a_lock_too(tmp_path: Path,
                                                             images: list[dict]) -> None:
    """`cdir index build` (one build at a time per workspace) and caption embeddings (one
    writer per source and text encoder) stop at once while another run holds their lock."""
    from cdir.core.errors import CdirError
    from cdir.core.workspace import caption_spec
    from cdir.stages.caption import import_captions
    from cdir.stages.embed import embed_captions
    from cdir.stages.index import build_index

    ws = _workspace(tmp_path / "ws", images[:4])
    table = tmp_path / "mine.csv"
    table.write_text("id,caption\n" + "".join(f"{r['id']},a drawing\n" for r in images[:4]))
    key = import_captions(ws, table)["key"]
    text_encoder = "st:all-MiniLM-L6-v2"
    for lock, run in ((beside(ws.root / "indexes"), lambda: build_index(ws.root, "pixels")),
                      (beside(ws.embeddings_dir(caption_spec(text_encoder, key))),
                       lambda: embed_captions(ws, key, text_encoder))):
        holder = subprocess.Popen([sys.executable, "-c",
                                   _HOLDER.format(repo=str(REPO), path=str(lock))],
                                  stdout=subprocess.PIPE, text=True)
        try:
            assert holder.stdout.readline().strip() == "held"
            with pytest.raises(CdirError, match=rf"^another run \(pid {holder.pid}\), started "):
                run()
        finally:
            holder.kill()
            holder.wait()


def _record(path: Path, **fields: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(fields) + "\n")


def test_lock_file_rules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from cdir.core.errors import CdirError
    from cdir.core.lock import _proc_stat

    lock = tmp_path / "out.lock"
    here = socket.gethostname()
    parent = os.getppid()  # alive for the whole test

    # a live holder on this host (no flock: a plain pid file, as the caption lock used to be)
    lock.write_text(str(parent))
    with pytest.raises(CdirError, match=rf"^another run \(pid {parent}\) is writing x: wait"):
        with exclusive(lock, "writing x"):
            pass
    # another host: its liveness is unknown here, so it is busy until someone deletes the file
    _record(lock, pid=parent, host="elsewhere", since="2024-01-02T03:04:05", what="training")
    with pytest.raises(CdirError, match=r"another run \(pid \d+ on elsewhere\), started "
                                        r"2024-01-02 03:04:05, is training: .* delete "):
        with exclusive(lock, "writing x"):
            pass
    # stale: the pid now belongs to another process (other start time), a dead pid, a zombie
    _record(lock, pid=parent, host=here, started=_proc_stat(parent)[1] + 1)
    with exclusive(lock, "writing x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()  # released
    dead = subprocess.Popen(["true"])
    dead.wait()
    _record(lock, pid=dead.pid, host=here)
    with exclusive(lock, "writing x"):
        pass
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    while _proc_stat(zombie.pid)[0] != "Z":
        time.sleep(0.01)
    _record(lock, pid=zombie.pid, host=here)
    with exclusive(lock, "writing x"):
        pass
    zombie.wait()

    # nested in one process: the inner stage enters the lock its caller holds
    with exclusive(lock, "writing x"), exclusive(lock, "writing x"):
        record = json.loads(lock.read_text())
    assert record["pid"] == os.getpid() and record["host"] == here and record["what"] == "writing x"
    assert not lock.exists()

    # torchrun: rank 0 holds the run's lock, the other ranks do not lock
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    lock.write_text(str(parent))  # even a live holder: rank 1 cooperates with its rank 0
    with exclusive(lock, "writing x"):
        assert lock.read_text() == str(parent)
    lock.unlink()
    monkeypatch.setenv("RANK", "0")
    with exclusive(lock, "writing x"):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


# -- the signals module ---------------------------------------------------------------------------

_SIGNALS = """
import os, signal, sys, time
sys.path.insert(0, {repo!r})
from cdir.core.signals import Terminated, exit_code, graceful, shielded

with graceful():
    try:
        with shielded():
            os.kill(os.getpid(), signal.SIGTERM)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            print("block finished", flush=True)
    except Terminated as e:
        print("then", type(e).__name__, exit_code(e), flush=True)
    try:
        with shielded():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
    except KeyboardInterrupt as e:
        print("then", type(e).__name__, exit_code(e), flush=True)
assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # restored
signal.signal(signal.SIGTERM, signal.SIG_IGN)
with graceful():  # an ignored SIGTERM (nohup-like) stays ignored
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.05)
signal.signal(signal.SIGTERM, signal.SIG_DFL)
print("ignored", flush=True)
with graceful():
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(1)
    except Terminated:
        print("second one ends the process", flush=True)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
print("not reached")
"""


def test_signals_module() -> None:
    """SIGTERM raises Terminated (a KeyboardInterrupt, exit 143); a shielded block runs to its
    end and the signals that came meanwhile follow in order; an ignored SIGTERM stays ignored; a
    second SIGTERM ends the process."""
    proc = subprocess.run([sys.executable, "-c", _SIGNALS.format(repo=str(REPO))],
                          capture_output=True, text=True, timeout=60)
    assert proc.stdout.splitlines() == [
        "block finished", "then Terminated 143", "then KeyboardInterrupt 130", "ignored",
        "second one ends the process"], proc.stderr
    assert proc.returncode == -signal.SIGTERM


# -- from scratch -------------------------------------------------------------------------------

@pytest.mark.slow
def test_python_m_cdir_embed_sigterm(tmp_path: Path, images: list[dict]) -> None:
    """The same as test_sigterm_keeps_the_open_shard, with `python -m cdir` started afresh."""
    ws = _workspace(tmp_path / "ws", images)
    out = sigterm_when(["embed", "-w", ws.root, *EMBED], tmp_path / "log",
                       lambda text: _shown_in(text, "embed") >= 10)
    assert INTERRUPTED in out
    assert 10 <= len(set(_raw_ids(ws))) == len(_raw_ids(ws))
