"""The resumable, sharded row job of the batch stages (caption, embed): one run over the rows of a
workspace's manifest that are not done yet, each finished batch stored as it finishes, so that a
killed run loses at most the batch in flight and the next run does exactly the rest.

- :func:`plan`: the rows this process does: those not done, in manifest order, at most
  ``limit`` of them; under torchrun every world-th of them is this rank's.
- :class:`RowJob`: one run's tallies: counts, a progress bar, the clock, and its failures beside
  the failure ledger earlier runs left (a bad file is data, not an exception: it is listed and
  retried by the next run, and leaves the ledger once it is done). :meth:`RowJob.gather` sums
  the ranks' tallies under torchrun; :meth:`RowJob.summary` gives the fields every stage's
  summary has.
- :func:`prefetched`: a batch's inputs loaded in a thread while the caller works on the previous
  batch; :func:`print_summary`: what the callers of a stage print of its summary.

Which store holds the rows and the ledger, and when the ledger is written, is the stage's: in one
process it writes the ledger as it goes; under torchrun rank 0 writes the gathered one at the end.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from cdir.core.dist import all_gather_object, rank_world

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class Plan:
    """The rows this process does (positions in the manifest, in its order) and how many rows
    of the manifest were done before this run (over all ranks)."""

    rows: list[int]
    already: int


def plan(ids: Sequence[str], done: Collection[str], limit: int | None = None, rank: int = 0,
         world: int = 1) -> Plan:
    """The rows of ``ids`` not in ``done`` (earlier failures are not done: they are retried), the
    first ``limit`` of them (all when None), every ``world``-th of those from ``rank`` on."""
    todo = [j for j, i in enumerate(ids) if i not in done]
    already = len(ids) - len(todo)
    if limit is not None:
        todo = todo[:max(0, int(limit))]
    return Plan(todo[rank::world], already)


class RowJob:
    """One run over ``ids`` (with their ``paths``): ``counts`` (``rows`` handled and the names
    given), this run's failures (id -> {id, path, reason}), the ids finished in this run, and the
    failure ledger ``earlier`` runs left. The clock starts here."""

    def __init__(self, ids: Sequence[str], paths: Sequence[str], earlier: Iterable[dict],
                 counts: Iterable[str] = ()) -> None:
        self.ids, self.paths = ids, paths
        self.earlier = {r["id"]: r for r in earlier}
        self.counts = dict.fromkeys(("rows", *counts), 0)
        self.failures: dict[str, dict] = {}
        self.finished: set[str] = set()
        self.rank, self.world = rank_world()
        self.device = "-"
        self.seconds = 0.0
        self._t0 = time.perf_counter()
        self._bar: Any = None
        self._total = 0
        self._callback: Callable[[int, int], None] | None = None

    # -- rows -------------------------------------------------------------------------------------
    def fail(self, row: int, reason: str) -> None:
        """Row ``row`` (a manifest position) could not be done, for ``reason``."""
        i = self.ids[row]
        self.failures[i] = {"id": i, "path": self.paths[row], "reason": reason}

    def finish(self, ids: Iterable[str]) -> None:
        """These ids are done (they leave the ledger)."""
        self.finished.update(ids)

    def ledger(self) -> list[dict]:
        """The failure ledger now: earlier failures not done in this run, and this run's; by id."""
        merged = {k: r for k, r in self.earlier.items() if k not in self.finished}
        merged.update(self.failures)
        return sorted(merged.values(), key=lambda r: r["id"])

    def ledger_changed(self) -> bool:
        """Whether this run failed a row or finished one the ledger lists."""
        return bool(self.failures) or not self.finished.isdisjoint(self.earlier)

    # -- progress ---------------------------------------------------------------------------------
    @contextmanager
    def progress(self, total: int, desc: str, enabled: bool = True,
                 callback: Callable[[int, int], None] | None = None) -> Iterator[None]:
        """A bar of ``total`` images on stderr (shown when ``enabled``) while the block runs;
        ``callback(rows handled, total)`` hears of every :meth:`advance`."""
        from tqdm.auto import tqdm

        self._total, self._callback = total, callback
        self._bar = tqdm(total=total, unit="img", desc=desc, disable=not enabled,
                         dynamic_ncols=True, file=sys.stderr)
        try:
            yield
        finally:
            self._bar.close()

    def advance(self, n: int, **shown: int) -> None:
        """``n`` more rows handled: the bar moves (showing the failures so far and ``shown``,
        once any is non-zero) and the callback hears of it."""
        self.counts["rows"] += n
        self._bar.update(n)
        postfix = {"failed": len(self.failures), **shown}
        if any(postfix.values()):
            self._bar.set_postfix(refresh=False, **postfix)
        if self._callback is not None:
            self._callback(self.counts["rows"], self._total)

    def note(self, text: str) -> None:
        """A line on stderr that leaves the bar intact."""
        self._bar.write(text, file=sys.stderr)

    # -- the end ----------------------------------------------------------------------------------
    def gather(self) -> None:
        """Stop the clock. Under torchrun every rank then holds the whole run's tallies: counts
        summed, failures and finished ids united, the slowest rank's seconds, the devices seen."""
        self.seconds = time.perf_counter() - self._t0
        if self.world == 1:
            return
        shares = all_gather_object((self.counts, self.failures, self.finished, self.seconds,
                                    self.device))
        self.counts = {k: sum(s[0][k] for s in shares) for k in self.counts}
        self.failures = {k: v for s in shares for k, v in s[1].items()}
        self.finished = set().union(*(s[2] for s in shares))
        self.seconds = max(s[3] for s in shares)
        self.device = ",".join(sorted({s[4] for s in shares}))

    def summary(self, already: int, rate_of: str = "new") -> dict:
        """The fields of every row job's summary: ``new`` (the count of that name), the rows
        ``already_done`` before the run, ``failed`` in it (listed in ``failures``), ``remaining``,
        ``seconds`` and ``images_per_s`` (of the count ``rate_of``)."""
        new, failed, n = self.counts["new"], len(self.failures), self.counts[rate_of]
        rate = n / self.seconds if self.seconds > 0 and n else 0.0
        return {"total": len(self.ids), "new": new, "already_done": already, "failed": failed,
                "remaining": len(self.ids) - already - new - failed,
                "seconds": round(self.seconds, 3), "images_per_s": round(rate, 2),
                "failures": sorted(self.failures.values(), key=lambda r: r["id"])}


def print_summary(summary: dict) -> None:
    """Say what a row job did, as its command does: the ``messages`` on stderr (skipped images,
    ...), the ``line`` on stdout. Stages return their summary; their callers print it."""
    for m in summary["messages"]:
        print(m, file=sys.stderr)
    print(summary["line"])


def prefetched(batches: Sequence[T], load: Callable[[T], R]) -> Iterator[tuple[T, R]]:
    """(batch, ``load(batch)``) for each of ``batches`` in order; the next batch is loaded in a
    thread while the caller works on this one. Close it (``contextlib.closing``) to wait for the
    load in flight when the caller stops early."""
    if not batches:
        return
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(load, batches[0])
        for b, batch in enumerate(batches):
            loaded = pending.result()
            if b + 1 < len(batches):
                pending = pool.submit(load, batches[b + 1])
            yield batch, loaded
