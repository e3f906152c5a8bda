"""How much a checkpoint of the real SmolLM2-135M weighs under the transformers Trainer, with and
without `tiedlora.hf.TiedLoraMixin`, and under TRL's SFTTrainer with it: one tl6 (r = 8) step on
bundled SQuAD rows, one checkpoint, its files and their sizes.

    python benchmarks/checkpoint_size.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from datasets import Dataset
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

import tiedlora
from tiedlora.hf import TiedLoraMixin, TiedLoraTrainer
from tiedlora.models import load_model
from tiedlora.tasks import get


class TiedLoraSFTTrainer(TiedLoraMixin, SFTTrainer):
    pass


def main() -> None:
    task = get("squad")
    rows = task.load("train", "bundled")[:8]
    for name, cls in (
        ("Trainer", Trainer),
        ("TiedLoraTrainer", TiedLoraTrainer),
        ("TRL SFTTrainer + mixin", TiedLoraSFTTrainer),
    ):
        model, tokenizer = load_model("smollm2-135m")
        tiedlora.apply(model, tiedlora.TiedLoraConfig.preset("tl6", rank=8))
        with tempfile.TemporaryDirectory() as out:
            common = dict(
                output_dir=out,
                max_steps=1,
                save_steps=1,
                per_device_train_batch_size=4,
                report_to=[],
                use_cpu=True,
                disable_tqdm=True,
            )
            if cls is TiedLoraSFTTrainer:
                data = Dataset.from_list([{"prompt": task.prompt(r) + " ", "completion": task.target(r)} for r in rows])
                trainer = cls(model=model, args=SFTConfig(**common), train_dataset=data, processing_class=tokenizer)
            else:
                data = [task.encode(tokenizer, r) for r in rows]
                collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
                trainer = cls(
                    model=model,
                    args=TrainingArguments(**common),
                    train_dataset=data,
                    data_collator=collator,
                    processing_class=tokenizer,
                )
            trainer.train()
            files = {p.name: p.stat().st_size for p in (Path(out) / "checkpoint-1").iterdir() if p.is_file()}
        tokenizer_bytes = sum(
            v for k, v in files.items() if k.startswith(("tokenizer", "chat_template", "special_tokens"))
        )
        print(
            f"{name}: {sum(files.values()):,} bytes in all, {sum(files.values()) - tokenizer_bytes:,} "
            "without the tokenizer "
            f"files ({tokenizer_bytes:,})"
        )
        for file, size in sorted(files.items(), key=lambda kv: -kv[1]):
            print(f"  {file:<28} {size:>13,}")


if __name__ == "__main__":
    main()
