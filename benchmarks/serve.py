"""Serving many adapters from one base model, against PEFT LoRA's mixed batches, in one run.

Prefill latency (one forward of the whole batch, the last position's logits, as `generate`
does) and generation speed (greedy, every row making the same number of tokens) for the base
model, one adapter, and 16 and 256 adapters loaded with the rows spread over them, ours
(`MultiAdapterModel`, rows of one batch on different adapters and configurations) beside
PEFT's LoRA with `adapter_names`; plus the memory each loaded adapter takes. Variants are timed
in rounds of shuffled order; a ratio is the median over rounds of variant / base in that round.

    python benchmarks/serve.py --device cpu     # a small Llama shape
    python benchmarks/serve.py --device cuda    # LLaMA-7B shape, 8 layers, bf16, prefill 64 x 256
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import statistics
import tempfile
from pathlib import Path

import torch
from timing import timed  # benchmarks/timing.py, beside this script
from transformers import AutoModelForCausalLM, LlamaConfig

import tiedlora
from tiedlora.multi import MultiAdapterModel

SHAPES = {
    "cpu": dict(
        config=dict(
            hidden_size=256,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            intermediate_size=688,
            vocab_size=1000,
        ),
        batch=16,
        tokens=64,
        new=16,
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
        batch=64,
        tokens=256,
        new=32,
        dtype=torch.bfloat16,
    ),
}
RANK = 8
TARGETS = ["q_proj", "k_proj", "v_proj"]


def save_adapters(base, n: int, folder: Path, dtype) -> list[Path]:
    """n adapters with random trained parts, cycling through every configuration."""
    paths = []
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        name = list(tiedlora.PRESETS)[i % len(tiedlora.PRESETS)]
        tiedlora.apply(base, tiedlora.TiedLoraConfig.preset(name, rank=RANK, seed=i))
        with torch.no_grad():
            for p in tiedlora.adapter_parameters(base).values():
                if p.requires_grad:
                    p.copy_(torch.randn(p.shape, generator=g).to(p.dtype) * 0.01)
        paths.append(folder / f"a{i}")
        tiedlora.save(base, paths[-1], dtype=dtype)
        tiedlora.remove(base)
    return paths


def peft_lora(base, n: int):
    """PEFT LoRA with n adapters (random B, so none is a no-op)."""
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=RANK, lora_alpha=RANK, target_modules=TARGETS, init_lora_weights=False)
    model = get_peft_model(base, config, adapter_name="a0")
    for i in range(1, n):
        model.add_adapter(f"a{i}", config)
    return model.eval()


def rows_over(n: int, batch: int, seed: int = 0) -> list[int]:
    """Adapter index of each row: every adapter once while rows last, then at random."""
    rng = random.Random(seed)
    return [i if i < n else rng.randrange(n) for i in range(batch)] if n <= batch else rng.sample(range(n), batch)


def measure(device: str, rounds: int, gen_rounds: int) -> dict:
    shape = SHAPES[device]
    torch.manual_seed(0)
    config = LlamaConfig(**shape["config"])
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=shape["dtype"]).eval()
    batch, tokens, new = shape["batch"], shape["tokens"], shape["new"]
    ids = torch.randint(3, config.vocab_size, (batch, tokens), device=device)
    prompt = ids[:, : tokens // 2]

    paths = save_adapters(copy.deepcopy(base), 256, Path(tempfile.mkdtemp()), shape["dtype"])
    ours = MultiAdapterModel(copy.deepcopy(base), dtype=shape["dtype"])
    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    names = [f"a{i}" for i in range(256)]
    for name, path in zip(names, paths):
        ours.add(name, path)
    ours(ids[:1, :2], adapter_ids=[1])  # stack the banks
    bank_bytes = sum(
        t.numel() * t.element_size() for b in ours.banks.values() for t in (b.A, b.B, b.u, b.v, b.a_index, b.b_index)
    )
    ours_per_adapter = ((torch.cuda.memory_allocated() - before) if device == "cuda" else bank_bytes) / 256

    before = torch.cuda.memory_allocated() if device == "cuda" else 0
    peft = peft_lora(copy.deepcopy(base), 256)
    lora_bytes = sum(p.numel() * p.element_size() for n, p in peft.named_parameters() if "lora_" in n)
    peft_per_adapter = (
        (torch.cuda.memory_allocated() - before - sum(p.numel() * p.element_size() for p in base.parameters()))
        if device == "cuda"
        else lora_bytes
    ) / 256
    peft.set_adapter("a0")

    def ours_ids(n):
        return [ours.id_of(names[i]) for i in rows_over(n, batch)]

    def peft_names(n):
        return [f"a{i}" for i in rows_over(n, batch)]

    variants = {"base": (lambda x, **k: base(x, **k), lambda x, **k: base.generate(x, **k))}
    for n in (1, 16, 256):
        a, p = ours_ids(n), peft_names(n)
        variants[f"ours, {n} adapter{'s' if n > 1 else ''}"] = (
            lambda x, a=a, **k: ours(x, adapter_ids=a, **k),
            lambda x, a=a, **k: ours.generate(x, adapter_ids=a, **k),
        )
        if n == 1:  # PEFT's one active adapter, no per-row dispatch
            variants["peft lora, 1 adapter"] = (
                lambda x, **k: peft(input_ids=x, **k),
                lambda x, **k: peft.generate(input_ids=x, **k),
            )
        else:
            variants[f"peft lora, {n} adapters"] = (
                lambda x, p=p, **k: peft(input_ids=x, adapter_names=p, **k),
                lambda x, p=p, **k: peft.generate(input_ids=x, adapter_names=p, **k),
            )

    def prefill(fwd):
        return lambda: fwd(ids, logits_to_keep=1)

    def generate(gen):
        return lambda: gen(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)

    results = {}
    with torch.inference_mode():
        for label, make, n_rounds, which in (("prefill", prefill, rounds, 0), ("generate", generate, gen_rounds, 1)):
            times = {name: [] for name in variants}
            for fns in variants.values():  # warm-up
                make(fns[which])()
            for r in range(n_rounds):
                order = list(variants)
                random.Random(r).shuffle(order)
                for name in order:
                    times[name].append(timed(make(variants[name][which]), device))
            results[label] = {
                name: {"s": statistics.median(t), "x_base": statistics.median(a / b for a, b in zip(t, times["base"]))}
                for name, t in times.items()
            }
    return {
        "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "shape": shape["config"],
        "dtype": str(shape["dtype"]),
        "batch": batch,
        "prefill_tokens": tokens,
        "prompt_tokens": tokens // 2,
        "new_tokens": new,
        "rank": RANK,
        "targets": TARGETS,
        "rounds": {"prefill": rounds, "generate": gen_rounds},
        "results": results,
        "bytes_per_adapter": {"ours (the 8 configurations in turn)": ours_per_adapter, "peft lora": peft_per_adapter},
        "versions": {"torch": torch.__version__, "tiedlora": tiedlora.__version__},
    }


def table(out: dict) -> str:
    pre, gen = out["results"]["prefill"], out["results"]["generate"]
    tokens = out["batch"] * out["new_tokens"]
    lines = [
        f"{out['device']}, {out['dtype']}, batch {out['batch']}: prefill {out['prefill_tokens']} tokens; "
        f"generation {out['new_tokens']} new tokens after {out['prompt_tokens']}",
        f"{'variant':<24} {'prefill ms':>10} {'x base':>7} {'gen tok/s':>10} {'x base':>7}",
    ]
    for name in pre:
        lines.append(
            f"{name:<24} {pre[name]['s'] * 1e3:>10.1f} {pre[name]['x_base']:>7.3f} {tokens / gen[name]['s']:>10.0f} "
            f"{1 / gen[name]['x_base']:>7.3f}"
        )
    lines.append(
        "memory per loaded adapter: "
        + ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in out["bytes_per_adapter"].items())
    )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=list(SHAPES), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rounds", type=int, default=10, help="Prefill rounds.")
    p.add_argument("--gen_rounds", type=int, default=3, help="Generation rounds.")
    p.add_argument("--out", help="Also write the numbers to this JSON file.")
    args = p.parse_args()
    out = measure(args.device, args.rounds, args.gen_rounds)
    print(table(out))
    if args.out:
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
