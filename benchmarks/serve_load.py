"""A bounded load test against a running `tiedlora serve`: N completion requests, C at a time,
spread over the served models in turn; prints errors, latency percentiles and throughput.

    tiedlora serve --model smollm2-135m --adapters results/smollm2-135m/adapters --port 8000 &
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --requests 200 --concurrency 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

PROMPTS = [
    "Question: What is the capital of France?\nAnswer:",
    "Translate to English: Guten Morgen.\n",
    "Summarize: A man buys bread and goes home.\n",
    "Natalia sold 48 clips. How many are left?\n",
]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max_tokens", type=int, default=8)
    p.add_argument("--out", help="Also write the figures to this JSON file.")
    args = p.parse_args()
    with httpx.Client(base_url=args.url, timeout=600) as client:
        models = [m["id"] for m in client.get("/v1/models").json()["data"]]

        def one(i: int):
            t = time.perf_counter()
            r = client.post(
                "/v1/completions",
                json={
                    "model": models[i % len(models)],
                    "prompt": PROMPTS[i % len(PROMPTS)],
                    "max_tokens": args.max_tokens,
                },
            )
            return r.status_code, time.perf_counter() - t

        start = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            done = list(pool.map(one, range(args.requests)))
        wall = time.perf_counter() - start
    latencies = sorted(t for _, t in done)
    figures = {
        "requests": args.requests,
        "concurrency": args.concurrency,
        "models": len(models),
        "max_tokens": args.max_tokens,
        "errors": sum(status != 200 for status, _ in done),
        "p50_s": statistics.median(latencies),
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))],
        "requests_per_s": args.requests / wall,
        "wall_s": wall,
    }
    print(json.dumps(figures, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            f.write(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
