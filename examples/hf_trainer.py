"""Train a tiedlora adapter with the transformers Trainer, your own loop's usual tool.

    python examples/hf_trainer.py --model DIR --data FILE.jsonl --out DIR --max_steps N

FILE.jsonl holds {"prompt", "completion"} or {"messages": [...]} rows (see `tiedlora train
--data`). Every checkpoint under --out, and --out itself at the end, is a tiedlora adapter
folder (plus the Trainer's optimizer and scheduler state): `tiedlora.load` and `tiedlora serve`
read it. Run it again with --resume true to continue from the last checkpoint.
"""

from __future__ import annotations

import torch
from jsonargparse import auto_cli
from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

import tiedlora
from tiedlora.hf import TiedLoraTrainer
from tiedlora.tasks import OwnData
from tiedlora.train import native_bf16


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
        data: A .jsonl, .csv or .parquet file of prompt/completion or chat rows.
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
    own = OwnData(data)
    examples = [own.encode(tokenizer, row) for row in own.load("train")]
    args = TrainingArguments(
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
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
    trainer = TiedLoraTrainer(
        model=lm, args=args, train_dataset=examples, data_collator=collator, processing_class=tokenizer
    )
    trainer.train(resume_from_checkpoint=get_last_checkpoint(out) if resume else None)
    trainer.save_model(out)
    print(f"wrote {out}: a tiedlora adapter ({tiedlora.trainable_parameters(lm):,} trained parameters)")


if __name__ == "__main__":
    auto_cli(main)
