"""Train a tiedlora adapter with TRL's SFTTrainer.

    python examples/trl_sft.py --model DIR --data FILE.jsonl --out DIR --max_steps N

FILE.jsonl holds {"prompt", "completion"} rows, TRL's prompt-completion format: the loss is on
the completions only. Every checkpoint under --out, and --out itself at the end, is a tiedlora
adapter folder (plus the trainer's optimizer and scheduler state): `tiedlora.load` and
`tiedlora serve` read it. Run it again with --resume true to continue from the last checkpoint.
"""

from __future__ import annotations

import torch
from datasets import load_dataset
from jsonargparse import auto_cli
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint
from trl import SFTConfig, SFTTrainer

import tiedlora
from tiedlora.hf import TiedLoraMixin
from tiedlora.train import native_bf16


class TiedLoraSFTTrainer(TiedLoraMixin, SFTTrainer):
    """TRL's SFTTrainer with adapter-sized checkpoints."""


def main(
    *,
    model: str,
    data: str,
    out: str,
    max_steps: int = 100,
    config: str = "tl6",
    rank: int = 8,
    lr: float = 1e-2,
    batch_size: int = 8,
    save_steps: int = 50,
    seed: int = 0,
    resume: bool = False,
) -> None:
    """Train `config` at `rank` on the rows of `data`; checkpoints and the adapter go to `out`.

    Args:
        model: A local transformers model folder (or Hub id) to adapt.
        data: A .jsonl file of prompt/completion rows.
        out: The output folder: checkpoint-N/ folders, then the final adapter.
        max_steps: Optimizer steps.
        config: A tiedlora preset (lora, vera, tl1 ... tl6).
        rank: The rank r.
        lr: The peak learning rate.
        batch_size: Rows per step.
        save_steps: Checkpoint every this many steps.
        seed: Seeds the adapter's init, the data order and dropout.
        resume: Continue from the last checkpoint in `out`.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")  # bf16 only where it is native: emulated, it is many times slower
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    lm = tiedlora.apply(
        AutoModelForCausalLM.from_pretrained(model), tiedlora.TiedLoraConfig.preset(config, rank=rank, seed=seed)
    )
    rows = load_dataset("json", data_files=data, split="train")
    args = SFTConfig(
        output_dir=out,
        max_steps=max_steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="cosine",
        warmup_steps=min(10, max_steps // 10),
        save_steps=save_steps,
        logging_steps=max(1, max_steps // 10),
        seed=seed,
        report_to=[],
        use_cpu=not cuda,
        bf16=native_bf16(device),
    )
    trainer = TiedLoraSFTTrainer(model=lm, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train(resume_from_checkpoint=get_last_checkpoint(out) if resume else None)
    trainer.save_model(out)
    print(f"wrote {out}: a tiedlora adapter ({tiedlora.trainable_parameters(lm):,} trained parameters)")


if __name__ == "__main__":
    auto_cli(main)
