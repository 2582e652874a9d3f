"""The command line run in-process, as the end-to-end tests drive it."""

from __future__ import annotations

from pathlib import Path

from cdir import cli


def cdir(*args: object) -> int:
    """``cdir ARGS...`` in this process; arguments may be paths or numbers. Returns the exit
    status (output goes to the test's captured stdout/stderr)."""
    # cli.main looked up at call time, so a test may monkeypatch the cli module
    return cli.main([str(a) for a in args])


def emoji_workspace(parent: Path, limit: int) -> Path:
    """``cdir data emoji -w PARENT/ws --limit N``: a workspace over N emoji categories in the three
    art sets; returns the workspace folder."""
    ws = Path(parent) / "ws"
    assert cdir("data", "emoji", "-w", ws, "--limit", limit) == 0
    return ws
