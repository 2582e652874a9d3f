"""The command line run in-process, as the end-to-end tests drive it."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from cdir import cli

REPO = Path(__file__).resolve().parents[2]


def cdir(*args: object) -> int:
    """``cdir ARGS...`` in this process; arguments may be paths or numbers. Returns the exit
    status (output goes to the test's captured stdout/stderr)."""
    # cli.main looked up at call time, so a test may monkeypatch the cli module
    return cli.main([str(a) for a in args])


def torchrun(nproc: int, *args: object, env: dict[str, str] | None = None
             ) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node NPROC -m cdir ARGS...`` on this machine (Gloo on
    a CPU, one thread a rank), from the repository; the finished process, output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
           str(nproc), "-m", "cdir", *map(str, args)]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def two_rank_checkpoint(out: Path, epochs: int, steps: int) -> dict:
    """The ``latest.pt`` of a finished two-process training run in ``out``, checked: the epochs
    and steps asked for, both ranks' RNG states, and ``encoder.pt`` written."""
    from encoders.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(Path(out) / "latest.pt")
    assert (ckpt["epoch"], ckpt["step"]) == (epochs, steps)
    assert ckpt["meta"]["world_size"] == 2 and len(ckpt["rng"]["ranks"]) == 2
    assert (Path(out) / "encoder.pt").is_file()
    return ckpt


def emoji_workspace(parent: Path, limit: int) -> Path:
    """``cdir data emoji -w PARENT/ws --limit N``: a workspace over N emoji categories in the three
    art sets; returns the workspace folder."""
    ws = Path(parent) / "ws"
    assert cdir("data", "emoji", "-w", ws, "--limit", limit) == 0
    return ws


def pixels_workspace(parent: Path) -> tuple[Path, Path]:
    """A folder gallery PARENT/gallery (2 domains x circle, square x 2 images) described,
    embedded with `pixels` and indexed (flat) in PARENT/ws; returns (gallery, workspace)."""
    from tests.helpers.trees import write_shape_tree

    root = write_shape_tree(Path(parent) / "gallery", domains=("a", "b"),
                            classes=("circle", "square"), per_class=2)
    ws = Path(parent) / "ws"
    assert cdir("data", "folder", root, "-w", ws) == 0
    assert cdir("embed", "-w", ws, "--encoder", "pixels", "--workers", "0") == 0
    assert cdir("index", "build", "-w", ws, "--encoder", "pixels") == 0
    return root, ws


def sigterm_when(args: list[str], log: Path, ready: Callable[[str], bool],
                 timeout: float = 180, wait: float = 60) -> str:
    """``python -m cdir ARGS`` started afresh (output into ``log``), sent SIGTERM as soon as
    ``ready(output so far)`` holds; asserts that it exits 143 and returns its output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    with open(log, "wb") as f:
        proc = subprocess.Popen([sys.executable, "-m", "cdir", *map(str, args)], cwd=REPO,
                                env=env, stdout=f, stderr=f)
    try:
        deadline = time.monotonic() + timeout
        while not ready(log.read_text(errors="replace")):
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=wait) == 143, log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return log.read_text()


def command_parsers(parser: argparse.ArgumentParser | None = None, path: tuple[str, ...] = ()
                    ) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    """The parser of `cdir` (or ``parser``) and of every command below it, by their words:
    ``()`` is `cdir` itself, ``("index", "build")`` is `cdir index build`."""
    parser = parser or cli.build_parser()
    out = {path: parser}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out.update(command_parsers(sub, (*path, name)))
    return out
