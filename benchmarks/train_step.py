"""Training-step cost of every preset against the frozen model and against PEFT, in one run.

A step is forward + backward of the decoder stack (no LM head, no optimizer), loss = mean of
squares of the last hidden state. The floor is the frozen model with the backward pass taken to
its inputs (no weight gradients): what any adapter must pay at least. Variants are timed in
rounds of shuffled order (so drift hits all alike); a ratio is the median over rounds of the
two variants' times in that round; memory is the CUDA peak on
a GPU (the model's own weights plus the step's peak above what was resident, as if it ran
alone), and on the CPU the bytes autograd saves for backward (what training memory grows with).

    python benchmarks/train_step.py --device cpu    # a small Llama shape, seconds
    python benchmarks/train_step.py --device cuda   # LLaMA-7B shape, 8 layers, bf16, batch 8 x 1024
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics

import torch
from timing import timed  # benchmarks/timing.py, beside this script
from transformers import AutoModelForCausalLM, LlamaConfig

import tiedlora

SHAPES = {
    "cpu": dict(
        config=dict(
            hidden_size=512,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=1376,
            vocab_size=1000,
        ),
        batch=4,
        tokens=256,
        dtype=torch.float32,
    ),
    "cuda": dict(
        config=dict(
            hidden_size=4096,
            num_hidden_layers=8,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=11008,
            vocab_size=32000,
        ),
        batch=8,
        tokens=1024,
        dtype=torch.bfloat16,
    ),
}


def variants(base, rank: int) -> dict:
    """name -> model; the floor is the base itself, every other a deep copy with its adapter."""
    from peft import LoraConfig, VeraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "v_proj"]
    out = {"frozen floor": base}
    for name in tiedlora.PRESETS:
        out[name] = tiedlora.apply(copy.deepcopy(base), tiedlora.TiedLoraConfig.preset(name, rank=rank))
    out["peft lora"] = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=rank, target_modules=targets))
    out["peft vera"] = get_peft_model(copy.deepcopy(base), VeraConfig(r=rank, target_modules=targets))
    return out


def decoder(model):
    """The transformer stack (below the LM head) of a plain, adapted or PEFT-wrapped model."""
    return model.get_base_model().model if hasattr(model, "get_base_model") else model.model


def step(model, embeds) -> None:
    hidden = decoder(model)(inputs_embeds=embeds, use_cache=False).last_hidden_state
    hidden.float().pow(2).mean().backward()


def saved_bytes(model, embeds) -> int:
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        decoder(model)(inputs_embeds=embeds, use_cache=False).last_hidden_state.float().pow(2).mean()
    return sum(storages.values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=40, help="Timed steps per variant, in rounds of shuffled order.")
    parser.add_argument("--compile", action="store_true", help="torch.compile every model (ours and PEFT's alike).")
    parser.add_argument("--out", default="benchmarks/train_step.json")
    parser.add_argument(
        "--profile", nargs="*", default=[], help="Also print the profiler's top operations of these variants."
    )
    args = parser.parse_args()

    shape = SHAPES[args.device]
    torch.manual_seed(0)
    with torch.device(args.device):
        base = AutoModelForCausalLM.from_config(LlamaConfig(**shape["config"]), dtype=shape["dtype"])
    base.requires_grad_(False)
    models = variants(base, args.rank)
    if args.compile:
        models = {name: torch.compile(m) for name, m in models.items()}
    embeds = torch.randn(
        shape["batch"],
        shape["tokens"],
        shape["config"]["hidden_size"],
        device=args.device,
        dtype=shape["dtype"],
        requires_grad=True,
    )

    memory = {}
    for name, model in models.items():
        model.train()
        for _ in range(args.warmup):
            step(model, embeds)
        if args.device == "cuda":
            # As if this model ran alone: its own weights plus the step's peak above what was resident.
            torch.cuda.synchronize()
            resident = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step(model, embeds)
            own = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())
            memory[name] = torch.cuda.max_memory_allocated() - resident + own
        else:
            memory[name] = saved_bytes(model, embeds)
        model.zero_grad(set_to_none=True)
    times = {name: [] for name in models}
    order = list(models)
    shuffle = random.Random(0)
    for _ in range(args.rounds):
        shuffle.shuffle(order)  # no variant always runs first, or right after another
        for name in order:
            times[name].append(timed(lambda m=models[name]: step(m, embeds), args.device))
            models[name].zero_grad(set_to_none=True)

    def ratio(name, reference):
        """Median over rounds of this round's time over the reference's: steadier than a ratio of medians."""
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name in models:
        trainable = (
            0 if name == "frozen floor" else sum(p.numel() for p in models[name].parameters() if p.requires_grad)
        )
        rows.append(
            {
                "variant": name,
                "ms": 1000 * median[name],
                "vs_floor": ratio(name, "frozen floor"),
                "vs_peft_lora": ratio(name, "peft lora"),
                "memory_bytes": memory[name],
                "memory_vs_peft_lora": memory[name] / memory["peft lora"],
                "trainable": trainable,
            }
        )
    what = "peak GiB" if args.device == "cuda" else "saved MiB"
    unit = 1024**3 if args.device == "cuda" else 1024**2
    device_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    print(
        f"{device_name}: {shape['config']['num_hidden_layers']} layers, d = "
        f"{shape['config']['hidden_size']}, batch {shape['batch']} x "
        f"{shape['tokens']} tokens, {str(shape['dtype']).removeprefix('torch.')}, rank {args.rank}, q/k/v; "
        f"median of {args.rounds} steps" + (", torch.compile" if args.compile else "")
    )
    print(
        f"{'variant':<13} {'ms':>9} {'x floor':>8} {'x PEFT LoRA':>12} {what:>10} {'mem x LoRA':>11} {'trainable':>11}"
    )
    for r in rows:
        print(
            f"{r['variant']:<13} {r['ms']:9.1f} {r['vs_floor']:8.3f} {r['vs_peft_lora']:12.3f} "
            f"{r['memory_bytes'] / unit:10.2f} "
            f"{r['memory_vs_peft_lora']:11.3f} {r['trainable']:11,}"
        )
    for name in args.profile:
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if args.device == "cuda" else [])
        with profile(activities=activities) as prof:
            for _ in range(3):
                step(models[name], embeds)
            if args.device == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if args.device == "cuda" else "self_cpu_time_total"
        print(f"\nprofile of 3 steps, {name}:")
        print(prof.key_averages().table(sort_by=key, row_limit=15, max_name_column_width=60))
    with open(args.out, "w") as f:
        json.dump(
            {
                "device": device_name,
                "shape": {**shape, "dtype": str(shape["dtype"])},
                "rank": args.rank,
                "rounds": args.rounds,
                "compile": args.compile,
                "rows": rows,
            },
            f,
            indent=2,
        )


if __name__ == "__main__":
    main()
