"""SIGTERM takes the path of Ctrl-C: finished work is kept.

Every stage keeps its finished work on KeyboardInterrupt: its ``finally`` blocks write what is
done, and every file lands atomically. SIGTERM is what ``kill``, ``timeout``, batch schedulers and
container runtimes send, and by default it ends the process on the spot, losing whatever was not
yet written (an embedding shard in flight holds up to 4096 rows). While :func:`graceful` is active
SIGTERM raises :class:`Terminated`, a KeyboardInterrupt, so the same blocks run; ``cdir`` then
exits with 143 (128 + 15) instead of Ctrl-C's 130. A second SIGTERM ends the process at once (the
default action), like a second Ctrl-C, for a clean-up that hangs.

:func:`shielded` marks a few lines that must not be cut in half (a shard written and then counted
as written): SIGINT and SIGTERM arriving inside are raised when the block ends.

``timeout``, batch schedulers and Ctrl-C signal every process of the job, DataLoader workers
included: PyTorch's workers die of a SIGTERM that does not come from their parent (whose
DataLoader then raises "worker killed by signal" in the middle of the clean-up). A DataLoader
built with ``worker_init_fn=loader_worker`` has workers that leave both signals to the main
process, which shuts them down on its way out (they also exit by themselves once it is gone), and
that keep quiet when the interrupted main process stops taking a batch half-way (that batch was
not stored: nothing is lost).

``cdir.cli.main`` installs :func:`graceful` once; stages decorated with ``@graceful()`` get it when
called from Python too (nested use, a handler of the caller's own, an ignored SIGTERM and threads
other than the main one are left as they are).
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

# signals that ask the process to stop; SIGINT already raises KeyboardInterrupt
_STOP = (signal.SIGINT, signal.SIGTERM)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised as a KeyboardInterrupt so that every clean-up for Ctrl-C runs."""

    def __init__(self, signum: int = signal.SIGTERM):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def exit_code(e: KeyboardInterrupt) -> int:
    """The shell's status for an interruption: 128 + the signal (143 for SIGTERM), 130 for
    Ctrl-C."""
    return 128 + e.signum if isinstance(e, Terminated) else 130


def _on_term(signum: int, frame: Any) -> None:
    signal.signal(signum, signal.SIG_DFL)  # a second one ends the process at once
    raise Terminated(signum)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


@contextmanager
def graceful() -> Iterator[None]:
    """While active, SIGTERM raises :class:`Terminated` in the main thread (also usable as a
    decorator: ``@graceful()``). The previous disposition comes back at the end."""
    if not _main_thread() or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield  # already graceful, ignored on purpose (nohup-like), or the caller's own handler
        return
    signal.signal(signal.SIGTERM, _on_term)
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGTERM) is _on_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def loader_worker(worker_id: int) -> None:
    """``worker_init_fn`` of a DataLoader: this worker ignores SIGINT and SIGTERM (see the module
    docstring). Runs after PyTorch installed its own worker signal handlers."""
    for s in _STOP:
        signal.signal(s, signal.SIG_IGN)
    sys.excepthook = _quiet_broken_handover


def _quiet_broken_handover(kind: type[BaseException], value: BaseException, tb: Any) -> None:
    # multiprocessing's resource_sharer thread hands a batch's tensors over to the main process
    # and reports (through sys.excepthook) a main process that hung up half-way
    if issubclass(kind, (ConnectionError, EOFError)) and any(
            f.filename.endswith("resource_sharer.py") for f in traceback.extract_tb(tb)):
        return
    sys.__excepthook__(kind, value, tb)


_shield: dict[str, list[int] | None] = {"caught": None}  # signals held by the active shield


@contextmanager
def shielded() -> Iterator[None]:
    """Run the block to its end: SIGINT / SIGTERM arriving inside are delivered when it ends."""
    if not _main_thread() or _shield["caught"] is not None:  # no signals here, or nested
        yield
        return
    caught: list[int] = []
    _shield["caught"] = caught
    saved = {s: signal.getsignal(s) for s in _STOP}
    for s in _STOP:
        signal.signal(s, lambda signum, frame: caught.append(signum))
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        _shield["caught"] = None
        for s in dict.fromkeys(caught):  # each signal once, in the order they came
            handler = saved[s]
            if callable(handler):
                handler(s, None)  # raises KeyboardInterrupt / Terminated
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), s)  # what it would have done without the shield
