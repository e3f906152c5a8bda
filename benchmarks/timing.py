"""The one clock the benchmarks read: CUDA events on a GPU (the kernels' own time, not the
launch queue's), the wall clock on the CPU; and the CPU's name, which every figure states."""

from __future__ import annotations

import json
import time
from pathlib import Path

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


def bounded(result: dict, out: str | None) -> None:
    """Print a ratio benchmark's result, write it to `out` if given, and exit 1 if any of its
    figures' ratios is above its bound: a benchmark that checks a claim fails where it does not hold."""
    print(json.dumps(result, indent=2))
    if out:
        Path(out).write_text(json.dumps(result, indent=2) + "\n")
    if any(f["ratio"] > result["bound"] for f in result["figures"].values()):
        raise SystemExit(f"a ratio is above {result['bound']}")
