"""A training step of the real SmolLM2-135M on the CPU in fp32 against bf16 autocast
(`tiedlora train --precision bf16`), in one run: the figure behind choosing bf16 for CPU sweeps.

A step is what `tiedlora train` does per micro batch: TokenLoss (logits only on answer tokens),
forward and backward, on 16 real SQuAD training rows of the bundled sample. Variants alternate in
rounds, so drift hits both alike; the ratio is the median over rounds of fp32 / bf16 in that round.
bf16 pays off where the CPU has AVX512-BF16 or AMX; elsewhere it can be slower than fp32.

    python benchmarks/cpu_precision.py --rounds 4
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import timed  # benchmarks/timing.py, beside this script

from tiedlora import TiedLoraConfig, apply
from tiedlora.loss import TokenLoss, collate, encode_rows
from tiedlora.models import load_model
from tiedlora.tasks import get


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="lora", help="The preset trained.")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--rows", type=int, default=16, help="One micro batch.")
    args = p.parse_args()

    model, tokenizer = load_model("smollm2-135m")
    apply(model, TiedLoraConfig.preset(args.config, rank=8))
    task = get("squad")
    examples, _ = encode_rows(task, task.load("train", "bundled")[: args.rows], tokenizer, max_length=1024)
    batch = collate(examples, tokenizer.pad_token_id or tokenizer.eos_token_id, "cpu")
    loss_fn = TokenLoss(model).train()

    def step(bf16: bool):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(**batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    step(False), step(True)  # warm-up: allocator, oneDNN kernels
    times = {"fp32": [], "bf16": []}
    for _ in range(args.rounds):
        for name in times:
            times[name].append(timed(lambda bf16=(name == "bf16"): step(bf16), "cpu"))
    tokens = int(batch["attention_mask"].sum())
    flags = open("/proc/cpuinfo").read()
    print(
        f"SmolLM2-135M, {args.config} r 8, {args.rows} SQuAD rows ({tokens} tokens), "
        f"{torch.get_num_threads()} threads, "
        f"avx512_bf16 {'avx512_bf16' in flags}, amx {'amx_bf16' in flags}"
    )
    for name, ts in times.items():
        print(
            f"{name}: median {statistics.median(ts):.2f} s a step ({tokens / statistics.median(ts):.0f} "
            f"tokens/s), rounds {[round(t, 2) for t in ts]}"
        )
    ratios = [a / b for a, b in zip(times["fp32"], times["bf16"])]
    print(f"fp32 / bf16: median {statistics.median(ratios):.2f} (rounds {[round(r, 2) for r in ratios]})")


if __name__ == "__main__":
    main()
