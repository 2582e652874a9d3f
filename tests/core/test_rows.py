"""The row-job skeleton (cdir/core/rows.py): the plan of rows (done, limit, ranks), the failure
ledger, the progress and callback, the summary, the gather over two real gloo processes, and the
prefetching of batches."""

from __future__ import annotations

import datetime
import json
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from cdir.core.rows import RowJob, plan, prefetched, print_summary

IDS = [f"r{i}" for i in range(10)]
PATHS = [f"/data/{i}.png" for i in IDS]


def test_plan_skips_done_rows_in_manifest_order_and_counts_them() -> None:
    p = plan(IDS, {"r1", "r4", "r5", "gone"})  # an id no longer in the manifest is not counted
    assert p.rows == [0, 2, 3, 6, 7, 8, 9] and p.already == 3
    assert plan(IDS, set()).rows == list(range(10)) and plan(IDS, set(IDS)).rows == []
    assert plan(IDS, set(IDS)).already == 10


def test_plan_limit_applies_before_the_ranks_share() -> None:
    done = {"r0", "r1"}
    assert plan(IDS, done, limit=3).rows == [2, 3, 4]
    assert plan(IDS, done, limit=3).already == 2  # the limit does not change what was done
    assert plan(IDS, done, limit=0).rows == [] and plan(IDS, done, limit=-5).rows == []
    assert plan(IDS, done, limit=99).rows == list(range(2, 10))
    shares = [plan(IDS, done, limit=7, rank=r, world=3).rows for r in range(3)]
    assert shares == [[2, 5, 8], [3, 6], [4, 7]]  # every world-th row of the first 7
    assert sorted(sum(shares, [])) == plan(IDS, done, limit=7).rows  # each row once
    assert {plan(IDS, done, rank=r, world=3).already for r in range(3)} == {2}


def test_the_ledger_keeps_earlier_failures_not_done_now_and_adds_this_runs() -> None:
    earlier = [{"id": "r7", "path": "/old/r7.png", "reason": "empty file"},
               {"id": "r2", "path": PATHS[2], "reason": "truncated"},
               {"id": "r9", "path": PATHS[9], "reason": "not an image"}]
    job = RowJob(IDS, PATHS, earlier, counts=("new",))
    assert [r["id"] for r in job.ledger()] == ["r2", "r7", "r9"]  # by id
    assert not job.ledger_changed()
    job.finish(["r0", "r1"])  # not in the ledger: nothing changes there
    assert not job.ledger_changed()
    job.finish(["r2"])  # fixed since
    assert job.ledger_changed()
    job.fail(7, "still bad")  # this run's reason and path replace the earlier record
    job.fail(3, "cannot decode")
    assert job.ledger() == [
        {"id": "r3", "path": PATHS[3], "reason": "cannot decode"},
        {"id": "r7", "path": PATHS[7], "reason": "still bad"},
        {"id": "r9", "path": PATHS[9], "reason": "not an image"}]
    assert list(job.failures) == ["r7", "r3"]  # this run's only


def test_progress_moves_the_bar_and_tells_the_callback(capsys) -> None:
    heard: list[tuple[int, int]] = []
    job = RowJob(IDS, PATHS, [], counts=("new", "empty"))
    with job.progress(10, "caption m", enabled=True, callback=lambda d, t: heard.append((d, t))):
        job.advance(4)
        job.fail(5, "bad")
        job.note("out of memory: batch size halved to 2")
        job.advance(6, empty=1)
    assert heard == [(4, 10), (10, 10)] and job.counts == {"rows": 10, "new": 0, "empty": 0}
    err = capsys.readouterr().err
    assert "caption m" in err and "out of memory" in err and "failed=1" in err
    assert "empty=1" in err
    with job.progress(3, "quiet", enabled=False):
        job.advance(3)
    assert "quiet" not in capsys.readouterr().err


def test_summary_counts_what_is_left_and_the_rate_of_the_count_named() -> None:
    job = RowJob(IDS, PATHS, [], counts=("new",))
    with job.progress(6, "x", enabled=False):
        job.counts["new"] = 4
        job.fail(8, "bad")
        job.fail(6, "worse")
        job.advance(6)
    time.sleep(0.01)
    job.gather()  # one process: stops the clock, changes nothing else
    assert job.seconds >= 0.01 and job.counts["new"] == 4 and job.device == "-"
    s = job.summary(already=3)
    assert (s["total"], s["new"], s["already_done"], s["failed"], s["remaining"]) == (10, 4, 3,
                                                                                     2, 1)
    assert [r["id"] for r in s["failures"]] == ["r6", "r8"]
    assert s["images_per_s"] == round(4 / job.seconds, 2)
    assert job.summary(3, rate_of="rows")["images_per_s"] == round(6 / job.seconds, 2)
    idle = RowJob(IDS, PATHS, [], counts=("new",))
    idle.gather()
    assert idle.summary(10)["images_per_s"] == 0.0 and idle.summary(10)["remaining"] == 0


def _gather_worker(rank: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=60))
    try:
        job = RowJob(IDS, PATHS, [], counts=("new",))
        job.device = f"cpu:{rank}"
        job.counts["new"] = 3 + rank
        job.fail(rank, f"bad on rank {rank}")
        job.finish([f"r{5 + rank}"])
        time.sleep(0.2 * rank)  # rank 1 is the slow one
        job.gather()
        Path(out, f"{rank}.json").write_text(json.dumps({
            "counts": job.counts, "failures": sorted(job.failures), "seconds": job.seconds,
            "finished": sorted(job.finished), "device": job.device, "world": job.world}))
    finally:
        dist.destroy_process_group()


def test_gather_over_two_gloo_processes(tmp_path: Path) -> None:
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    mp.spawn(_gather_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    got = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(2)]
    assert got[0] == got[1]  # every rank holds the whole run
    assert got[0]["counts"] == {"rows": 0, "new": 7} and got[0]["failures"] == ["r0", "r1"]
    assert got[0]["finished"] == ["r5", "r6"] and got[0]["device"] == "cpu:0,cpu:1"
    assert got[0]["seconds"] >= 0.2 and got[0]["world"] == 2


def test_prefetched_loads_the_next_batch_in_a_thread_while_this_one_is_used() -> None:
    loading: list[tuple[int, str]] = []

    def load(batch: list[int]) -> list[int]:
        loading.append((batch[0], threading.current_thread().name))
        return [x * 10 for x in batch]

    batches = [[1, 2], [3], [4, 5]]
    seen = []
    for batch, loaded in prefetched(batches, load):
        seen.append((batch, loaded))
        ahead = min(len(seen) + 1, 3)  # the next batch loads while this one is in use
        deadline = time.monotonic() + 10
        while len(loading) < ahead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(loading) == ahead  # one batch ahead, never more
    assert seen == [([1, 2], [10, 20]), ([3], [30]), ([4, 5], [40, 50])]
    assert all(name != threading.current_thread().name for _, name in loading)
    assert list(prefetched([], load)) == []


def test_closing_prefetched_waits_for_the_load_in_flight() -> None:
    finished: list[int] = []

    def slow(batch: list[int]) -> list[int]:
        time.sleep(0.2)
        finished.append(batch[0])
        return batch

    loads = prefetched([[1], [2], [3]], slow)
    with pytest.raises(KeyError), closing(loads):
        for _ in loads:
            raise KeyError("the caller stops on the first batch")
    assert finished == [1, 2]  # the second load ran to its end, the third never started


def test_print_summary_puts_messages_on_stderr_and_the_line_on_stdout(capsys) -> None:
    print_summary({"messages": ["2 image(s) could not be read", "1 caption(s) came out empty"],
                   "line": "captioned 3 new"})
    out, err = capsys.readouterr()
    assert out == "captioned 3 new\n"
    assert err == "2 image(s) could not be read\n1 caption(s) came out empty\n"
