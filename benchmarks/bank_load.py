"""What loading one adapter costs a server that already holds 10 or 1,000: SmolLM2-135M's
`MultiAdapterModel`, tl6 rank-8 adapters; the load (`put`: the adapter written into the banks)
and a cold first request (the load plus a forward of one token with that adapter) against the
same forward warm, in one run. The banks write an adapter into free rows in place, so the load
should not grow with the adapters resident (it re-stacked every bank before, O(resident)).

    python benchmarks/bank_load.py --out benchmarks/bank_load_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

import tiedlora
from tiedlora.adapter_file import read_adapter
from tiedlora.models import SMOLLM2, load_model
from tiedlora.multi import MultiAdapterModel


def ms(work, repeat: int = 9) -> float:
    """Median milliseconds of `work()` over `repeat` calls."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        work()
        times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def measure(base, adapter, resident: int) -> dict:
    """Load, cold first request and warm request, in ms, with `resident` adapters loaded."""
    multi = MultiAdapterModel(base)
    for i in range(resident):
        multi.put(f"r{i}", adapter)
    token, counter = torch.tensor([[1]]), iter(range(10**6))

    def load_and_forget() -> None:
        name = f"new{next(counter)}"
        multi.put(name, adapter)
        multi.remove(name)  # its rows freed: the next load finds the same room

    def cold() -> None:
        name = f"cold{next(counter)}"
        multi.put(name, adapter)
        multi(token, adapter_ids=[multi.id_of(name)])
        multi.remove(name)

    warm_id = multi.id_of("r0")
    return {
        "load_ms": round(ms(load_and_forget), 3),
        "cold_first_request_ms": round(ms(cold), 3),
        "warm_request_ms": round(ms(lambda: multi(token, adapter_ids=[warm_id])), 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--resident", type=int, nargs="+", default=[10, 1000])
    p.add_argument("--out", help="Also write the numbers to this JSON file.")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    base, _ = load_model(SMOLLM2)
    model = tiedlora.apply(base, tiedlora.TiedLoraConfig.preset("tl6", rank=8))
    for t in tiedlora.adapter_parameters(model).values():
        t.normal_(0, 0.01)
    folder = Path(tempfile.mkdtemp()) / "a"
    tiedlora.save(model, folder)
    tiedlora.remove(model)
    adapter = read_adapter(folder)  # read once: the disk is not what is measured
    figures = {}
    for resident in args.resident:
        figures[resident] = measure(base, adapter, resident)
        print(resident, figures[resident], flush=True)
        base, _ = load_model(SMOLLM2)  # MultiAdapterModel replaced the last one's projections
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    out = {"cpu": cpu, "threads": torch.get_num_threads(), "by_resident": figures}
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
