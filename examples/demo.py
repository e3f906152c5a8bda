"""`make demo`: the parameter counts of the paper's two models, then tl6 on the real
SmolLM2-135M-Instruct: a few training steps on bundled SQuAD rows, an exact merge, a tiny file.
About two minutes on 2 CPU cores."""

import copy
import tempfile
import time
from pathlib import Path

import torch

import tiedlora
from tiedlora.cli import params
from tiedlora.models import SMOLLM2, load_model
from tiedlora.tasks import encode, get

STEPS, BATCH, LR = 12, 4, 1e-2  # tied configurations want a larger learning rate than LoRA


def batches(tokenizer, rows):
    """Right-padded batches of (prompt, answer) examples, loss on answer tokens only."""
    task = get("squad")
    examples = [encode(tokenizer, task.prompt(r), task.target(r)) for r in rows]
    for i in range(0, len(examples), BATCH):
        chunk = examples[i:i + BATCH]
        width = max(len(e["input_ids"]) for e in chunk)

        def pad(seq, value):
            return seq + [value] * (width - len(seq))

        yield {
            "input_ids": torch.tensor([pad(e["input_ids"], tokenizer.pad_token_id) for e in chunk]),
            "attention_mask": torch.tensor([pad([1] * len(e["input_ids"]), 0) for e in chunk]),
            "labels": torch.tensor([pad(e["labels"], -100) for e in chunk]),
        }


def mean_loss(model, held_out):
    with torch.no_grad():
        return sum(model(**b).loss.item() for b in held_out) / len(held_out)


def main():
    torch.manual_seed(0)
    for name, rank in (("llama2-7b", 8), ("gpt-2b-001", 4)):
        params(name, rank, as_json=False)
        print()

    t = time.time()
    base, tokenizer = load_model(SMOLLM2)
    print(f"Loaded {SMOLLM2}: {sum(p.numel() for p in base.parameters()):,} parameters in {time.time() - t:.0f} s")
    model = tiedlora.apply(copy.deepcopy(base), tiedlora.TiedLoraConfig.preset("tl6", rank=8))
    print(f"tl6, rank 8: {tiedlora.trainable_parameters(model):,} trainable parameters")

    rows = get("squad").load("train")[: STEPS * BATCH]
    train = list(batches(tokenizer, rows))
    held_out = list(batches(tokenizer, get("squad").load("validation")[:8]))
    print(f"SQuAD, bundled offline split: {len(rows)} training rows, 8 validation rows; held-out loss {mean_loss(model, held_out):.3f}")

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.01)
    model.train()
    for step, batch in enumerate(train, 1):
        t = time.time()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        print(f"step {step:2d}  loss {loss.item():.3f}  {time.time() - t:.1f} s")
    model.eval()
    print(f"held-out loss after {STEPS} steps: {mean_loss(model, held_out):.3f}")

    batch = held_out[0]
    with torch.no_grad():
        before = model(**batch).logits
        tiedlora.merge(model)
        error = (model(**batch).logits - before).abs().max().item()
        tiedlora.unmerge(model)
    print(f"merged vs unmerged logits: max |difference| {error:.2e}")

    with tempfile.TemporaryDirectory() as tmp:
        tiedlora.save(model, Path(tmp) / "tl6")
        tiedlora.export_peft(model, Path(tmp) / "peft")
        ours, peft = (Path(tmp, f).stat().st_size for f in ("tl6/adapter.safetensors", "peft/adapter_model.safetensors"))
        print(f"adapter file: {ours:,} bytes (fp32); as a standard PEFT LoRA: {peft:,} bytes")


if __name__ == "__main__":
    main()
