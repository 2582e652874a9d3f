"""One writer per stage output: an exclusive lock file beside what a stage writes.

Two runs of a stage on one output do the work twice and interleave their files (two `cdir embed`
runs stored 7394 rows for 3825 ids). :func:`exclusive` holds ``<output>.lock`` while a stage
writes; a second run stops at once with one line naming the holder.

The file holds one JSON line, ``{"pid", "host", "started", "since", "what", "argv", "run_id"}``
(``started``: the holder's start time in clock ticks since boot, from /proc, so that a reused pid
is not taken for the holder; ``run_id``: torchrun's TORCHELASTIC_RUN_ID). A lock is busy while

- another process holds its ``flock`` (the kernel drops it when the holder dies, even on SIGKILL;
  the file itself stays behind until the next run takes it over), or
- it names a live process on this host (a holder that does not flock: a plain pid file, or a
  filesystem without flock), or any process on another host (whose liveness cannot be checked
  from here: the message says to delete the file if that run is gone).

Otherwise it is stale (its holder is gone: dead, a zombie, or its pid reused) and is taken over.
Releasing removes the file. Under torchrun (WORLD_SIZE > 1) the ranks of one run cooperate: rank 0
holds the lock for all of them and the other ranks do not lock. A process that already holds a
lock may enter it again (nested stages).
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cdir.core.dist import launch_rank
from cdir.core.errors import CdirError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: the record alone decides
    fcntl = None  # type: ignore[assignment]

_held: dict[str, list[int]] = {}  # lock files held by this process -> [fd, depth]


def beside(target: str | os.PathLike) -> Path:
    """The lock file of an output file or folder: ``<target>.lock`` next to it."""
    target = Path(target)
    return target.with_name(target.name + ".lock")


@contextmanager
def exclusive(path: str | os.PathLike, what: str) -> Iterator[None]:
    """Hold the lock file ``path`` for the block; ``what`` says what the holder does, for the
    message of a second run (``another run (pid N) is <what> ...``)."""
    path = Path(path)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and launch_rank() != 0:
        yield  # torchrun: rank 0 holds it for the whole run
        return
    key = os.path.abspath(path)
    if key in _held:  # nested stages of one process
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    fd = _acquire(path, what)
    _held[key] = [fd, 1]
    try:
        yield
    finally:
        del _held[key]
        try:
            if _same_file(fd, path):  # not if someone deleted it and a new run took the path
                path.unlink()
        finally:
            os.close(fd)  # drops the flock


def running(path: str | os.PathLike) -> dict[str, Any] | None:
    """The record of a live process holding the lock file ``path`` (None: nobody, or this
    process): what a reader checks to tell "still being written" from "left unfinished". Only
    reads the record (no flock is taken, so a run starting at this instant is never refused)."""
    path = Path(path)
    if os.path.abspath(path) in _held:
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        holder = _read(fd)
    finally:
        os.close(fd)
    return holder if holder is not None and _alive(holder) else None


def _acquire(path: Path, what: str) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(20):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except PermissionError as e:
            raise CdirError(f"cannot take the lock {path}: {e.strerror}") from None
        try:
            if not _flock(fd):
                raise _busy(path, what, _holder_record(fd))
            if not _same_file(fd, path):
                os.close(fd)  # released and removed while we opened it: try the new file
                continue
            holder = _read(fd)
            if holder is not None and _alive(holder):
                raise _busy(path, what, holder)
            record = {"pid": os.getpid(), "host": socket.gethostname(),
                      "started": _proc_stat(os.getpid())[1],
                      "since": time.strftime("%Y-%m-%dT%H:%M:%S"), "what": what,
                      "argv": sys.argv[:12], "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}
            data = (json.dumps(record) + "\n").encode()
            os.pwrite(fd, data, 0)  # write, then cut: a reader never sees the file empty
            os.ftruncate(fd, len(data))
            return fd
        except BaseException:
            os.close(fd)
            raise
    raise CdirError(f"could not take the lock {path}: it keeps changing hands")  # pragma: no cover


def _holder_record(fd: int, wait: float = 1.0) -> dict[str, Any] | None:
    """The record of the process holding the flock. A holder that took the flock an instant
    ago may not have written it yet, so an empty file is read again for up to ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        holder = _read(fd)
        if holder is not None or time.monotonic() >= deadline:
            return holder
        time.sleep(0.01)


def _flock(fd: int) -> bool:
    """Take the kernel lock without waiting: False when another process holds it."""
    if fcntl is None:
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:
        return True  # no flock on this filesystem: the record alone decides
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _read(fd: int) -> dict[str, Any] | None:
    """The holder named in the lock file; a bare number is a pid (the older caption lock)."""
    try:
        text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        value = json.loads(text) if text else None
    except (OSError, ValueError):
        return None
    if isinstance(value, int) and value > 0:
        return {"pid": value}
    if isinstance(value, dict) and isinstance(value.get("pid"), int):
        return value
    return None


def _proc_stat(pid: int) -> tuple[str | None, int | None]:
    """(state letter, start time in clock ticks since boot) of a process, from /proc (Linux);
    (None, None) where that cannot be read."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name may hold spaces and ')'
        return fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return None, None


def _alive(holder: dict[str, Any]) -> bool:
    """Whether the holder may still be running (see the module docstring)."""
    host = holder.get("host")
    if host and host != socket.gethostname():
        return True
    pid = holder["pid"]
    if pid == os.getpid():
        return False  # not in _held: a record this process left behind (or inherited)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # it exists, under another user
    state, started = _proc_stat(pid)
    if state in ("Z", "X"):
        return False  # dead, not yet reaped by its parent
    return not (holder.get("started") is not None and started is not None
                and started != holder["started"])  # a new process under a reused pid


def _busy(path: Path, what: str, holder: dict[str, Any] | None) -> CdirError:
    if holder is None:
        who = "another run"
    else:
        host = holder.get("host")
        where = f" on {host}" if host and host != socket.gethostname() else ""
        who = f"another run (pid {holder['pid']}{where})"
        if holder.get("since"):
            who += f", started {holder['since'].replace('T', ' ')},"
        what = holder.get("what") or what
    return CdirError(f"{who} is {what}: wait for it to finish, or delete {path} if that process "
                     "is gone")


def _close_in_child() -> None:
    # A forked child (a DataLoader worker) shares the parent's flock; closing its copy of the
    # descriptor keeps the lock with the parent, while a child that outlives a killed parent
    # does not keep holding it.
    for fd, _ in list(_held.values()):
        try:
            os.close(fd)
        except OSError:
            pass
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_in_child)
