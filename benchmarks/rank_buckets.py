"""What one large adapter resident costs everyone else: SmolLM2-135M's `MultiAdapterModel` with 8
tl6 rank-8 adapters (every projection group), a batch of 16 rows over them, timed with and
without one rank-256 adapter loaded beside them, in one run, interleaved. The banks keep one
stack per rank bucket, so the rank-8 rows should not notice it (the issue's bound: at most 1.1x);
the banks before padded every adapter to the largest rank loaded, so every row computed at 256.

    python benchmarks/rank_buckets.py --out benchmarks/rank_buckets_cpu.json

Two shapes: a prefill (16 rows of 64 tokens) and a decode step (16 rows, one token after a KV
cache of 64). Exits 1 if either ratio is above --bound.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from timing import bounded, cpu_name  # benchmarks/timing.py, beside this script

import tiedlora
from tiedlora.adapter_file import read_adapter
from tiedlora.models import SMOLLM2, load_model
from tiedlora.multi import MultiAdapterModel

GROUPS = ["qkv", "o", "mlp_in", "mlp_out"]


def adapter(base, config: str, rank: int, seed: int):
    model = tiedlora.apply(base, tiedlora.TiedLoraConfig.preset(config, rank=rank, seed=seed, targets=GROUPS))
    for t in tiedlora.adapter_parameters(model).values():
        t.normal_(0, 0.01)
    folder = Path(tempfile.mkdtemp()) / "a"
    tiedlora.save(model, folder)
    tiedlora.remove(model)
    return read_adapter(folder)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=16)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--repeat", type=int, default=15)
    p.add_argument("--bound", type=float, default=1.1)
    p.add_argument("--out")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    base, _ = load_model(SMOLLM2)
    small = [adapter(base, "tl6", 8, seed) for seed in range(8)]
    large = adapter(base, "lora", 256, 99)
    multi = MultiAdapterModel(base)
    ids = [multi.put(f"s{i}", a) for i, a in enumerate(small)]
    rows = [ids[i % len(ids)] for i in range(args.rows)]
    prompt = torch.randint(1, 1000, (args.rows, args.tokens))
    cache = multi(prompt, adapter_ids=rows, use_cache=True).past_key_values
    step = torch.randint(1, 1000, (args.rows, 1))
    position = torch.full((args.rows, 1), args.tokens)

    def prefill() -> None:
        multi(prompt, adapter_ids=rows)

    def decode() -> None:
        multi(step, adapter_ids=rows, past_key_values=cache, position_ids=position, use_cache=False)

    def timed(work) -> float:
        start = time.perf_counter()
        work()
        return time.perf_counter() - start

    times: dict[str, dict[str, list[float]]] = {w: {"without": [], "with": []} for w in ("prefill", "decode")}
    for _ in range(args.repeat):  # interleaved: the machine's drift touches both alike
        for resident in ("without", "with"):
            if resident == "with":
                multi.put("large", large)
            for name, work in (("prefill", prefill), ("decode", decode)):
                work()  # warm
                times[name][resident].append(timed(work))
            if resident == "with":
                multi.remove("large")
    figures = {}
    for name, by in times.items():
        without, with_large = statistics.median(by["without"]), statistics.median(by["with"])
        figures[name] = {
            "without_ms": round(1000 * without, 2),
            "with_rank256_resident_ms": round(1000 * with_large, 2),
            "ratio": round(with_large / without, 3),
        }
    out = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "rows": args.rows,
        "tokens": args.tokens,
        "adapters": "8 tl6 rank 8, every group; one lora rank 256, every group, resident or not",
        "figures": figures,
        "bound": args.bound,
    }
    bounded(out, args.out)


if __name__ == "__main__":
    main()
