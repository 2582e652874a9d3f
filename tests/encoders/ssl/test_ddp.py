"""Two-process Gloo DDP on CPU: key gather, shuffle-BN, global-batch enqueue, DDP-wrapped steps."""

from __future__ import annotations

import datetime
import inspect
import os
import tempfile
import traceback

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2
LOCAL_B = 4
# The queue and BN statistics must not be broadcast from rank 0 on every forward (the queue is
# 32 MB at the paper's size); the keyword changed name in recent torch releases.
_DDP_ARGS = inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
NO_FORWARD_BUFFER_SYNC = (
    {"forward_sync_buffers": False} if "forward_sync_buffers" in _DDP_ARGS
    else {"broadcast_buffers": False}
)


def _check_collectives(rank: int) -> None:
    from cdir.core.dist import concat_all_gather
    from encoders.engine.parts import ddp_shuffle, ddp_unshuffle

    # gather: rank order, every rank sees the same global batch
    x = torch.arange(LOCAL_B * 3, dtype=torch.float32).view(LOCAL_B, 3) + 100 * rank
    x_all = concat_all_gather(x)
    expect = torch.cat([torch.arange(LOCAL_B * 3, dtype=torch.float32).view(LOCAL_B, 3) + 100 * r
                        for r in range(WORLD)])
    assert torch.equal(x_all, expect)

    # shuffle-BN: same permutation on every rank, shards partition the global batch,
    # unshuffle restores each rank's own samples and the global order
    torch.manual_seed(1000 + rank)  # rank-specific RNG: the broadcast must override it
    found_mixed = False
    for _ in range(5):
        x_shuf, idx_unshuffle = ddp_shuffle(x)
        idx_all = concat_all_gather(idx_unshuffle.unsqueeze(0))
        assert torch.equal(idx_all[0], idx_all[1])
        perm = torch.argsort(idx_unshuffle)
        assert torch.equal(x_shuf, x_all[perm.view(WORLD, -1)[rank]])
        shards = concat_all_gather(x_shuf)
        assert sorted(shards[:, 0].tolist()) == sorted(x_all[:, 0].tolist())
        found_mixed |= not torch.equal(x_shuf, x)
        y = x_shuf * 2 + 1  # a per-sample "encoder"
        y_local, y_all = ddp_unshuffle(y, idx_unshuffle)
        assert torch.equal(y_local, x * 2 + 1)
        assert torch.equal(y_all, x_all * 2 + 1)
    assert found_mixed


def _check_methods(rank: int) -> None:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from encoders.ssl.plugin import build_method

    torch.manual_seed(rank)  # different init per rank: DDP must sync parameters and queues
    for name, kw in [
        ("moco", {}),
        ("synco", {"n_hard": 8, "n1": 2, "n2": 2, "n3": 2, "n4": 1, "n5": 1, "n6": 1,
                   "warmup_epochs": 0}),
        ("isd_plus", {}),
    ]:
        method = build_method(name, "cifar_resnet18", {"width": 0.25}, queue_size=12, **kw)
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []
        encode = method._encode_key if name != "isd_plus" else method._encode_teacher

        def record(x: torch.Tensor, _encode=encode, _seen=seen):
            local, glob = _encode(x)
            _seen.append((local.clone(), glob.clone()))
            return local, glob

        if name == "isd_plus":
            method._encode_teacher = record
        else:
            method._encode_key = record
        model = DDP(method, **NO_FORWARD_BUFFER_SYNC)
        m = model.module
        q0 = concat_all_gather_cpu(m.queue.feats.unsqueeze(0))
        assert torch.equal(q0[0], q0[1]), f"{name}: queues differ after DDP init"
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        g = torch.Generator().manual_seed(10 + rank)
        for step in range(2):
            x = torch.randn(LOCAL_B, 3, 16, 16, generator=g)  # small: keep the test fast
            out = model([x, x.flip(3)])
            out["loss"].backward()
            opt.step()
            opt.zero_grad()
            k_local, k_glob = seen[-1]
            # the enqueued block is the global batch in rank order, identical on both ranks
            gathered = concat_all_gather_cpu(k_local)
            assert torch.allclose(torch.nn.functional.normalize(gathered, dim=1),
                                  torch.nn.functional.normalize(k_glob, dim=1), atol=1e-6)
            start = (step * LOCAL_B * WORLD) % 12
            idx = (start + torch.arange(LOCAL_B * WORLD)) % 12
            assert torch.allclose(m.queue.feats[idx],
                                  torch.nn.functional.normalize(k_glob, dim=1), atol=1e-6)
        assert int(m.queue.ptr) == (2 * LOCAL_B * WORLD) % 12
        # one gather of everything (many small gloo gathers are slow on a busy machine)
        flat = torch.cat([m.queue.feats.flatten(), *[p.detach().flatten() for p in m.parameters()]])
        both = concat_all_gather_cpu(flat.unsqueeze(0))
        assert torch.equal(both[0], both[1]), f"{name}: ranks diverged"


def concat_all_gather_cpu(t: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(t) for _ in range(WORLD)]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _worker(rank: int, init_file: str, err_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=WORLD, timeout=datetime.timedelta(seconds=60))
    try:
        _check_collectives(rank)
        _check_methods(rank)
    except BaseException:
        with open(os.path.join(err_dir, f"rank{rank}.txt"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def test_ddp_gather_shuffle_enqueue_two_ranks() -> None:
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "store")
        try:
            mp.spawn(_worker, args=(init_file, tmp), nprocs=WORLD, join=True)
        except Exception as exc:  # show the worker's traceback, not just the exit code
            logs = [open(os.path.join(tmp, f)).read() for f in sorted(os.listdir(tmp))
                    if f.startswith("rank")]
            raise AssertionError("\n".join(logs) or str(exc)) from exc
