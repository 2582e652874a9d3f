"""Requests that arrive together, encoded together: concurrent searches hand their query to
one thread that runs the model once per batch (a forward pass over 16 images costs far less
than 16 passes of one), so throughput grows with load instead of queueing behind it.

No request waits for others: the thread takes the first request and whatever else is already
queued (up to ``max_batch``) at that moment; a lone query runs alone at once.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Hashable
from concurrent.futures import Future
from typing import Any


class Batcher:
    """``submit(key, item)`` returns ``fn(key, items)[i]`` for its item, where ``items`` are
    the items of one key gathered into one call."""

    def __init__(self, fn: Callable[[Hashable, list], list], max_batch: int = 16):
        self.fn, self.max_batch = fn, max_batch
        self._queue: queue.Queue = queue.Queue()
        self._thread: threading.Thread | None = None
        self._start = threading.Lock()
        self.batches: list[int] = []  # the size of each batch run, for benchmarks

    def submit(self, key: Hashable, item: Any) -> Any:
        with self._start:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="cdir-batcher",
                                                daemon=True)
                self._thread.start()
        fut: Future = Future()
        self._queue.put((key, item, fut))
        return fut.result()

    def _loop(self) -> None:
        while True:
            pending = [self._queue.get()]
            while len(pending) < self.max_batch:
                try:
                    pending.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            groups: dict[Hashable, list] = {}
            for key, item, fut in pending:
                groups.setdefault(key, []).append((item, fut))
            for key, entries in groups.items():
                self._run(key, entries)

    def _run(self, key: Hashable, entries: list) -> None:
        try:
            out = self.fn(key, [item for item, _ in entries])
        except BaseException as e:  # noqa: BLE001 - each caller gets the batch's error
            for _, fut in entries:
                fut.set_exception(e)
            return
        self.batches.append(len(entries))
        for (_, fut), result in zip(entries, out, strict=True):
            fut.set_result(result)
