"""The one clock the benchmarks read: CUDA events on a GPU (the kernels' own time, not the
launch queue's), the wall clock on the CPU; and the CPU's name, which every figure states."""

from __future__ import annotations

import time

import torch


def timed(fn, device: str) -> float:
    """Seconds that `fn()` takes."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return "unknown"
