"""Timing shared by the benchmarks that race candidates against a baseline in the same run."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work, so a wall-clock interval covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(fns: dict[str, Callable[[], None]], reps: int, warmup: int,
                     device: torch.device, label: str = "rep") -> dict[str, list[float]]:
    """Seconds per call of each function over ``reps`` rounds (after ``warmup`` untimed ones),
    alternating the functions call by call so drifting machine load hits them alike; each
    round's times are printed as it ends."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for i in range(reps):
        for name, fn in fns.items():
            sync(device)
            t0 = time.perf_counter()
            fn()
            sync(device)
            times[name].append(time.perf_counter() - t0)
        print(f"  {label} {i + 1}/{reps}: " + ", ".join(
            f"{k} {v[-1] * 1e3:.1f} ms" for k, v in times.items()), flush=True)
    return times
