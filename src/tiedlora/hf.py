"""The transformers Trainer, and TRL's trainers (which are Trainers), training a tiedlora model.

A Trainer saves the whole model at every checkpoint: 540 MB on SmolLM2-135M for a 170 KB
adapter. Put `TiedLoraMixin` before the Trainer class and every checkpoint, and the final
`save_model`, hold the adapter in tiedlora's format (`adapter.safetensors`,
`adapter_config.json`) instead, beside the Trainer's own optimizer, scheduler, RNG and state
files; `resume_from_checkpoint` and `load_best_model_at_end` load the adapter back. The output
folder is a tiedlora adapter folder: `tiedlora.load` reads it, `tiedlora serve` serves it.

Where the Trainer computes its default loss, the mixin computes the same value as `tiedlora
train` does, with the output head applied only to the positions that have a label (on a
49k-word vocabulary the head is a fifth of a small model's work). A Trainer subclass with a loss
of its own (TRL's SFTTrainer adds token accuracy and entropy) keeps it, and so does a model that
DDP wraps, whose forward synchronises the gradients.

    model = tiedlora.apply(AutoModelForCausalLM.from_pretrained(...), TiedLoraConfig.preset("tl6"))
    trainer = TiedLoraTrainer(model=model, args=TrainingArguments(...), train_dataset=...)

    class SFTTrainer(TiedLoraMixin, trl.SFTTrainer): ...   # TRL, or any other Trainer subclass

One process or DDP; the checkpoint paths of DeepSpeed and FSDP, which shard the model before
saving it, are not covered.
"""

from __future__ import annotations

from typing import Any

from transformers import Trainer

from .adapter_file import load, save
from .loss import TokenLoss


class TiedLoraMixin:
    """Checkpoints of a tiedlora model as its adapter only; mix in before the Trainer class."""

    args: Any
    model: Any
    accelerator: Any
    processing_class: Any
    state: Any
    label_smoother: Any
    compute_loss_func: Any
    model_accepts_loss_kwargs: bool

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """In place of Trainer._save, which writes the whole model: the adapter, then the
        tokenizer (or processor) as Trainer does."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        save(self.accelerator.unwrap_model(self.model), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        """Trainer's default causal-LM loss, the head run only where labels are: the sum over
        labelled tokens divided by `num_items_in_batch` (all labelled tokens of the accumulated
        batch, when the Trainer counts them) or else by this batch's count, as Trainer does."""
        mro = type(self).__mro__
        below = next(c for c in mro[mro.index(TiedLoraMixin) + 1 :] if "compute_loss" in c.__dict__)
        plain = below is Trainer and self.label_smoother is None and self.compute_loss_func is None
        wrapped = model is not self.accelerator.unwrap_model(model)  # DDP syncs gradients in its own forward
        if return_outputs or not plain or wrapped or "labels" not in inputs:
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)  # type: ignore[misc]
        labels = inputs["labels"]
        total = TokenLoss(model)(inputs["input_ids"], inputs.get("attention_mask"), labels, inputs.get("position_ids"))
        if num_items_in_batch is None or not self.model_accepts_loss_kwargs:  # the Trainer then divides by its steps
            return total / (labels[:, 1:] != -100).sum()
        return total / num_items_in_batch

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        load(self.model if model is None else model, resume_from_checkpoint)

    def _load_best_model(self) -> None:
        load(self.model, self.state.best_model_checkpoint)


class TiedLoraTrainer(TiedLoraMixin, Trainer):
    """transformers.Trainer with adapter-sized checkpoints."""
