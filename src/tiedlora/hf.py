"""The transformers Trainer, and TRL's trainers (which are Trainers), training a tiedlora model.

A Trainer saves the whole model at every checkpoint: 540 MB on SmolLM2-135M for a 170 KB
adapter. Put `TiedLoraMixin` before the Trainer class and every checkpoint, and the final
`save_model`, hold the adapter in tiedlora's format (`adapter.safetensors`,
`adapter_config.json`) instead, beside the Trainer's own optimizer, scheduler, RNG and state
files; `resume_from_checkpoint` and `load_best_model_at_end` load the adapter back. The output
folder is a tiedlora adapter folder: `tiedlora.load` reads it, `tiedlora serve` serves it.

    model = tiedlora.apply(AutoModelForCausalLM.from_pretrained(...), TiedLoraConfig.preset("tl6"))
    trainer = TiedLoraTrainer(model=model, args=TrainingArguments(...), train_dataset=...)

    class SFTTrainer(TiedLoraMixin, trl.SFTTrainer): ...   # TRL, or any other Trainer subclass

One process or DDP; the checkpoint paths of DeepSpeed and FSDP, which shard the model before
saving it, are not covered.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from .io import load, save


class TiedLoraMixin:
    """Checkpoints of a tiedlora model as its adapter only; mix in before the Trainer class."""

    args: Any
    model: Any
    accelerator: Any
    processing_class: Any
    state: Any

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """In place of Trainer._save, which writes the whole model: the adapter, then the
        tokenizer (or processor) as Trainer does."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load(self.model, self.state.best_model_checkpoint)


class TiedLoraTrainer(TiedLoraMixin, Trainer):
    """transformers.Trainer with adapter-sized checkpoints."""
