"""Which dtype `tiedlora serve --dtype auto` should choose on this machine: the whole server
(SmolLM2-135M, continuous batching, 8 adapters) in float32 against bfloat16, in one run.

Both servers are built and kept loaded; rounds alternate between them, each round a fixed
workload (16 greedy requests of up to 32 tokens over the adapters, 8 at a time). The ratio is the
median over rounds of bf16's generated tokens/s over fp32's in that round.

    python benchmarks/serve_dtype.py --rounds 3 --out benchmarks/serve_dtype_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from fastapi.testclient import TestClient

import tiedlora
from tiedlora.models import SMOLLM2, load_model
from tiedlora.serve.server import build

PROMPT = "Question: Which river flows through Paris, and where does it reach the sea?\nAnswer:"


def save_adapters(folder: Path, n: int) -> None:
    base, _ = load_model(SMOLLM2)
    for i in range(n):
        model = tiedlora.apply(base, tiedlora.TiedLoraConfig.preset(["tl6", "tl5", "lora"][i % 3], rank=8, seed=i))
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in tiedlora.adapter_parameters(model).values():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.01)
        tiedlora.save(model, folder / f"a{i}")
        tiedlora.remove(model)


def workload(client: TestClient, adapters: int) -> float:
    """Generated tokens per second over 16 requests of up to 32 tokens, 8 in flight (tokens, not
    requests: the two dtypes may stop at EOS after different counts)."""

    def ask(i: int) -> int:
        body = {"model": f"a{i % adapters}", "prompt": PROMPT, "max_tokens": 32, "temperature": 0}
        r = client.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["completion_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        tokens = sum(pool.map(ask, range(16)))
    return tokens / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--adapters", type=int, default=8)
    p.add_argument("--out", help="Also write the numbers to this JSON file.")
    args = p.parse_args()
    folder = Path(tempfile.mkdtemp())
    save_adapters(folder, args.adapters)
    servers = {d: build(SMOLLM2, folder, device="cpu", dtype=d) for d in ("float32", "bfloat16")}
    clients = {d: TestClient(app).__enter__() for d, (_, app) in servers.items()}
    for client in clients.values():
        workload(client, args.adapters)  # warm-up: every adapter loaded, kernels chosen
    rates: dict[str, list[float]] = {d: [] for d in servers}
    for r in range(args.rounds):
        for d in sorted(servers, reverse=r % 2 == 1):
            rates[d].append(workload(clients[d], args.adapters))
    ratio = statistics.median(b / f for b, f in zip(rates["bfloat16"], rates["float32"]))
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "")
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "")
    out = {
        "cpu": cpu,
        "avx512_bf16": "avx512_bf16" in flags,
        "amx": "amx_tile" in flags,
        "tokens_per_s": {d: [round(x, 3) for x in v] for d, v in rates.items()},
        "bf16_over_fp32": round(ratio, 3),
    }
    print(json.dumps(out, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    for engine, _ in servers.values():
        engine.close()


if __name__ == "__main__":
    main()
