"""Serving under load, one run each, side by side: an OpenAI-compatible server (ours before or
after continuous batching, or vLLM with the same adapters exported to PEFT) driven by C
streaming clients over many adapters; and the registry at ten thousand adapters.

    # adapters for SmolLM2-135M (random trained tensors, seeded), and PEFT copies of the first 64
    python benchmarks/serve_load.py prepare --out /tmp/bench/adapters --count 1000 --peft 64
    # the workload against a running server (Zipf popularity over the adapters it names)
    tiedlora serve --adapters /tmp/bench/adapters --max_batch 64 --port 8000 &
    python benchmarks/serve_load.py load --url http://127.0.0.1:8000 --count 1000 --clients 64 --requests 256
    # 10,000 registered adapters in one process: start-up, memory per loaded adapter, a cold first request
    python benchmarks/serve_load.py registry --out /tmp/bench/many --count 10000

Prompts are SQuAD validation rows (context, question) in the paper's prompt; each request asks
for 8 to 64 tokens (seeded), greedy. Time to first token and inter-token latency are measured
at the client, from the streamed chunks: TTFT from sending to the first text, ITL as each
request's (last - first) / (tokens - 1).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "squad" / "validation.jsonl"


def squad_prompts(n: int, seed: int = 0) -> list[str]:
    rows = [json.loads(line) for line in DATA.read_text().splitlines()[:2000]]
    rng = random.Random(seed)
    picked = [rows[rng.randrange(len(rows))] for _ in range(n)]
    return [f"Context: {r['context'][:600]}\nQuestion: {r['question']}\nAnswer:" for r in picked]


def zipf(count: int, n: int, seed: int = 0, s: float = 1.0) -> list[int]:
    rng = random.Random(seed)
    weights = [1 / (i + 1) ** s for i in range(count)]
    return rng.choices(range(count), weights, k=n)


def prepare(args) -> None:
    """`count` tl6 adapters of rank 8 (their trained u and v random, seeded per adapter), and
    PEFT exports of the first `peft` of them."""
    import torch

    import tiedlora
    from tiedlora.models import load_model

    out = Path(args.out)
    model, _ = load_model("smollm2-135m")
    model = tiedlora.apply(model, tiedlora.TiedLoraConfig.preset(args.config, rank=args.rank))
    params = tiedlora.adapter_parameters(model)
    start = time.perf_counter()
    for i in range(args.count):
        g = torch.Generator().manual_seed(i)
        with torch.no_grad():
            for p in params.values():
                if p.requires_grad:
                    p.copy_(1 + torch.randn(p.shape, generator=g) * 0.5)
        tiedlora.save(model, out / f"a{i:04d}")
        if i < args.peft:
            tiedlora.export_peft(model, out.parent / "peft" / f"a{i:04d}")
    print(f"{args.count} adapters in {time.perf_counter() - start:.1f} s under {out}", file=sys.stderr)


async def drive(url: str, model_of, prompts: list[str], lengths: list[int], clients: int) -> dict:
    import httpx

    results: list[dict] = []
    todo = list(range(len(prompts)))

    async def client(http):
        while todo:
            i = todo.pop(0)
            body = {"model": model_of(i), "prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0}
            body.update(stream=True, stream_options={"include_usage": True})
            sent, first, last, tokens, status, text = time.perf_counter(), None, None, 0, None, ""
            async with http.stream("POST", "/v1/completions", json=body) as r:
                status = r.status_code
                async for line in r.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    data = json.loads(line[6:])
                    if data.get("usage"):
                        tokens = data["usage"]["completion_tokens"]
                    if data.get("choices") and data["choices"][0].get("text"):
                        first = first or time.perf_counter()
                        last = time.perf_counter()
                        text += data["choices"][0]["text"]
            results.append({"i": i, "status": status, "sent": sent, "first": first, "last": last, "tokens": tokens})
            results[-1]["text"] = text

    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=httpx.Limits(max_connections=clients)) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200 and r["first"] is not None]
    ttft = sorted(r["first"] - r["sent"] for r in ok)
    itl = sorted((r["last"] - r["first"]) / (r["tokens"] - 1) for r in ok if r["tokens"] > 1)

    def pct(xs, q):
        return round(1000 * xs[min(len(xs) - 1, int(q * len(xs)))], 1) if xs else None

    tokens = sum(r["tokens"] for r in ok)
    return {
        "texts": {r["i"]: r["text"] for r in ok},
        "requests": len(results),
        "errors": len(results) - len(ok),
        "completion_tokens": tokens,
        "wall_s": round(wall, 1),
        "tokens_per_s": round(tokens / wall, 2),
        "ttft_ms_p50": pct(ttft, 0.5),
        "ttft_ms_p95": pct(ttft, 0.95),
        "itl_ms_p50": pct(itl, 0.5),
        "itl_ms_p95": pct(itl, 0.95),
    }


def load(args) -> None:
    prompts = squad_prompts(args.requests, args.seed)
    rng = random.Random(args.seed + 1)
    lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in prompts]
    picks = zipf(args.count, args.requests, args.seed) if args.popularity == "zipf" else None

    def model_of(i: int) -> str:
        a = picks[i] if picks is not None else i % args.count
        return f"{args.prefix}{a:04d}"

    figures = asyncio.run(drive(args.url, model_of, prompts, lengths, args.clients))
    texts = figures.pop("texts")
    if args.texts:
        Path(args.texts).write_text(json.dumps({str(i): texts[i] for i in sorted(texts)}, indent=0))
    distinct = len({model_of(i) for i in range(args.requests)})
    figures = {"label": args.label, "clients": args.clients, "adapters_asked": distinct, **figures}
    print(json.dumps(figures))
    if args.out:
        with open(args.out, "a") as f:
            f.write(json.dumps(figures) + "\n")


def registry(args) -> None:
    """Register `count` adapter folders (hard links of one adapter's files), then load a
    thousand of them, and time a first request to a cold one against a warm one."""
    import psutil
    import torch

    import tiedlora
    from tiedlora.models import load_model
    from tiedlora.serve.server import build

    out = Path(args.out)
    one = out / "a00000"
    if not one.exists():
        model, _ = load_model("smollm2-135m")
        tiedlora.save(tiedlora.apply(model, tiedlora.TiedLoraConfig.preset("tl6", rank=8)), one)
    for i in range(1, args.count):
        folder = out / f"a{i:05d}"
        if not folder.exists():
            folder.mkdir()
            for f in one.iterdir():
                os.link(f, folder / f.name)
    process = psutil.Process()
    start = time.perf_counter()
    engine, app = build("smollm2-135m", out, max_resident=args.resident, max_batch=1)
    built = time.perf_counter() - start
    from fastapi.testclient import TestClient

    def bank_bytes() -> int:
        return sum(b.numel() * b.element_size() for b in engine.multi.buffers())

    def ask(client, name) -> float:
        t = time.perf_counter()
        r = client.post("/v1/completions", json={"model": name, "prompt": "Hello", "max_tokens": 1})
        assert r.status_code == 200, r.text
        return time.perf_counter() - t

    with TestClient(app) as client:
        ask(client, "a00000")
        rss0, bank0 = process.memory_info().rss, bank_bytes()
        cold = [ask(client, f"a{i:05d}") for i in range(1, args.loaded + 1)]
        warm = [ask(client, f"a{i:05d}") for i in range(1, 51)]
        rss1, bank1 = process.memory_info().rss, bank_bytes()
        listed = len(client.get("/v1/models").json()["data"]) - 1
    engine.close()
    print(
        json.dumps(
            {
                "registered": listed,
                "start_up_s_including_model_load": round(built, 2),
                "loaded": args.loaded,
                "bank_bytes_per_adapter": (bank1 - bank0) // args.loaded,
                "rss_bytes_per_adapter": (rss1 - rss0) // args.loaded,
                "adapter_file_bytes": sum(f.stat().st_size for f in one.iterdir()),
                "cold_first_request_ms_p50": round(1000 * statistics.median(cold), 1),
                "warm_request_ms_p50": round(1000 * statistics.median(warm), 1),
                "torch_threads": torch.get_num_threads(),
            }
        )
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("prepare")
    a.add_argument("--out", required=True)
    a.add_argument("--count", type=int, default=1000)
    a.add_argument("--peft", type=int, default=64)
    a.add_argument("--config", default="tl6")
    a.add_argument("--rank", type=int, default=8)
    b = sub.add_parser("load")
    b.add_argument("--url", default="http://127.0.0.1:8000")
    b.add_argument("--count", type=int, default=1000, help="adapters a0000 ... named by the server")
    b.add_argument("--prefix", default="a")
    b.add_argument("--popularity", choices=["zipf", "round-robin"], default="zipf")
    b.add_argument("--clients", type=int, default=64)
    b.add_argument("--requests", type=int, default=256)
    b.add_argument("--min_tokens", type=int, default=8)
    b.add_argument("--max_tokens", type=int, default=64)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--label", default="")
    b.add_argument("--out", help="append the figures to this JSON-lines file")
    b.add_argument("--texts", help="write each request's text to this JSON file, to compare servers")
    c = sub.add_parser("registry")
    c.add_argument("--out", required=True)
    c.add_argument("--count", type=int, default=10000)
    c.add_argument("--loaded", type=int, default=1000)
    c.add_argument("--resident", type=int, default=2048)
    args = p.parse_args()
    {"prepare": prepare, "load": load, "registry": registry}[args.command](args)


if __name__ == "__main__":
    main()
