"""`tiedlora train`'s step against the loop a user would usually write, on the real SmolLM2-135M
and the same rows: tokens per second, interleaved in one run.

The usual loop is the transformers Trainer with PEFT's LoRA: batches padded in the data's order,
the model's own loss over full logits. `tiedlora train` sorts each global batch by length before
cutting micro batches (little padding) and runs the output head only where the loss is. Both
train LoRA at r = 8 on q, k and v with AdamW; a step is one global batch (`--rows`) in micro
batches of `--micro`, then the optimizer step. Also measured, to show what each part is worth:
tiedlora with full logits, tiedlora without the length sort, and the Trainer integration
(`tiedlora.hf.TiedLoraTrainer`) on tiedlora's sorted micro batches, whose training_step should
cost what tiedlora's own does. Each round takes the next `--rows` bundled SQuAD training rows
and runs every variant once on them, in a rotating order; tokens/s count the rows' real tokens
(padding excluded), and ratios are medians over rounds of the per-round ratio.

    python benchmarks/train_loop.py --rounds 3 --out benchmarks/train_loop_cpu.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
from timing import timed  # benchmarks/timing.py, beside this script

import tiedlora
from tiedlora.loss import TokenLoss, collate
from tiedlora.models import load_model
from tiedlora.tasks import get
from tiedlora.train import Processes, Run, TrainConfig, load_data, train_step

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def micro(examples: list[dict], size: int, sort: bool) -> list[list[dict]]:
    ordered = sorted(examples, key=lambda e: len(e["input_ids"])) if sort else examples
    return [ordered[i : i + size] for i in range(0, len(ordered), size)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--rows", type=int, default=16, help="Rows per optimizer step (the global batch).")
    p.add_argument("--micro", type=int, default=8, help="Rows per forward pass.")
    p.add_argument("--out", default=None, help="Also write the figures to this JSON file.")
    args = p.parse_args()
    from peft import LoraConfig, get_peft_model
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    from tiedlora.hf import TiedLoraTrainer

    task = get("squad")
    peft_base, tokenizer = load_model("smollm2-135m")
    peft_model = get_peft_model(peft_base, LoraConfig(r=8, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj"]))
    ours, _ = load_model("smollm2-135m")
    tiedlora.apply(ours, tiedlora.TiedLoraConfig.preset("lora", rank=8))
    peft_model.to(DEVICE), ours.to(DEVICE)
    pad = tokenizer.pad_token_id
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100, return_tensors="pt")
    hf_args = TrainingArguments(output_dir="/tmp/train_loop", report_to=[], use_cpu=DEVICE == "cpu", disable_tqdm=True)
    usual = Trainer(model=peft_model, args=hf_args, data_collator=collator)
    integrated = TiedLoraTrainer(model=ours, args=hf_args, data_collator=collator)
    optimizers = {
        name: torch.optim.AdamW([q for q in m.parameters() if q.requires_grad], lr=1e-4)
        for name, m in (("peft", peft_model), ("ours", ours))
    }

    def hf_step(trainer, model, optimizer, batches):
        model.train()
        n = sum((torch.tensor(e["labels"][1:]) != -100).sum().item() for b in batches for e in b)
        for b in batches:
            inputs = {k: v.to(DEVICE) for k, v in collator(b).items()}
            trainer.training_step(model, inputs, num_items_in_batch=torch.tensor(n, device=DEVICE))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def our_step(batches, full_logits: bool):
        loss_fn = TokenLoss(ours).train()
        n = sum(sum(1 for t in e["labels"][1:] if t != -100) for b in batches for e in b)
        for b in batches:
            batch = collate(b, pad, DEVICE)
            loss = ours(**batch).loss * (batch["labels"][:, 1:] != -100).sum() if full_logits else loss_fn(**batch)
            (loss / n).backward()
        optimizers["ours"].step()
        optimizers["ours"].zero_grad(set_to_none=True)

    cfg = TrainConfig(
        task="squad", preset="lora", rank=8, batch_size=args.rows, micro_batch_size=args.micro, precision="fp32"
    )
    procs = Processes.start(cfg)

    data = load_data(task, tokenizer, cfg)
    run = Run(cfg, ours, tokenizer, task, data, procs, Path("/tmp/train_loop"), quiet=True)
    trained = [q for q in ours.parameters() if q.requires_grad]

    def tiedlora_train_step(examples):
        data.train = examples  # this round's rows: step 0 reads all of them, as one global batch
        train_step(run, TokenLoss(ours), optimizers["ours"], trained, 0)

    rows = task.load("train", "bundled")
    variants = {
        "usual (Trainer + PEFT LoRA)": lambda ex: hf_step(
            usual, peft_model, optimizers["peft"], micro(ex, args.micro, False)
        ),
        "tiedlora train": tiedlora_train_step,
        "tiedlora, full logits": lambda ex: our_step(micro(ex, args.micro, True), True),
        "tiedlora, no length sort": lambda ex: our_step(micro(ex, args.micro, False), False),
        "TiedLoraTrainer, sorted": lambda ex: hf_step(
            integrated, ours, optimizers["ours"], micro(ex, args.micro, True)
        ),
    }
    examples_of = [
        [task.encode(tokenizer, r) for r in rows[i * args.rows : (i + 1) * args.rows]] for i in range(args.rounds + 1)
    ]
    for fn in variants.values():  # warm-up on rows no round uses
        fn(examples_of[-1])
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(timed(lambda name=name, r=r: variants[name](examples_of[r]), DEVICE))
    tokens = [sum(len(e["input_ids"]) for e in examples_of[r]) for r in range(args.rounds)]
    base = names[0]
    result = {
        "device": DEVICE,
        "threads": torch.get_num_threads(),
        "rows": args.rows,
        "micro": args.micro,
        "rounds": args.rounds,
        "variants": {},
    }
    print(
        f"SmolLM2-135M, LoRA r 8 on q/k/v, fp32, {args.rows} SQuAD rows a step in micro batches of {args.micro}, "
        f"{DEVICE}, {torch.get_num_threads()} threads, {args.rounds} rounds"
    )
    print(f"{'variant':<30} {'s/step':>7} {'tokens/s':>9} {'x usual':>8} {'x tiedlora train':>17}")
    for name in names:
        per_second = [t / s for t, s in zip(tokens, times[name])]
        vs_usual = statistics.median(a / b for a, b in zip(times[base], times[name]))
        vs_ours = statistics.median(a / b for a, b in zip(times["tiedlora train"], times[name]))
        result["variants"][name] = {
            "seconds": times[name],
            "tokens_per_s": per_second,
            "x_usual": vs_usual,
            "x_tiedlora_train": vs_ours,
        }
        seconds, rate = statistics.median(times[name]), statistics.median(per_second)
        print(f"{name:<30} {seconds:7.2f} {rate:9.0f} {vs_usual:8.3f} {vs_ours:17.3f}")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
