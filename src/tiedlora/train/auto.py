"""The `auto` hyperparameters of a fine-tune: a learning rate per configuration and rank, and
epochs and batch size by the number of training rows, as OpenAI's fine-tuning API picks its
own. `tiedlora train --data` without --lr and every fine-tuning job left at `auto` take them
here. The figures behind them are in docs/training.md (benchmarks/hyperparameters.py).
"""

from __future__ import annotations

import math

# Peak learning rate per configuration (alpha = rank, every projection group): of 3e-3, 1e-2 and 3e-2
# (LoRA: 3e-4 to 1e-2; VeRA up to 1e-1), the one with the lowest validation loss after a fine-tune of
# SmolLM2-135M on 57 SQuAD rows (3 epochs of 8), the smaller where two are within 0.02
# (benchmarks/hyperparameters.py; the table is in docs/training.md). At rank 2 and 32 the same rates won
# for tl6 and LoRA, so the rank does not change them.
RATES = {"lora": 1e-3, "vera": 3e-2, "tl1": 3e-3, "tl2": 3e-2, "tl3": 1e-2, "tl4": 1e-2, "tl5": 1e-2, "tl6": 1e-2}
# OpenAI's rule for `auto` epochs (its fine-tuning data guide): 3 passes, more for a small file so that
# at least 100 examples are seen, fewer for a large one so that at most 25,000 are.
EPOCHS, MIN_SEEN, MAX_SEEN, MAX_EPOCHS = 3, 100, 25_000, 25
MAX_BATCH = 8  # `auto` batch size: at most this many rows a step, fewer for a smaller file


def learning_rate(config: str, rank: int) -> float:
    """The `auto` peak learning rate of `config` at `rank` (measured at ranks 2 to 32: the same)."""
    return RATES.get(config, RATES["tl6"])


def epochs(rows: int) -> int:
    if rows * EPOCHS < MIN_SEEN:
        return min(MAX_EPOCHS, math.ceil(MIN_SEEN / rows))
    if rows * EPOCHS > MAX_SEEN:
        return max(1, MAX_SEEN // rows)
    return EPOCHS


def batch_size(rows: int) -> int:
    return min(MAX_BATCH, rows)


def steps_per_epoch(rows: int, batch: int) -> int:
    """Optimizer steps in one pass over `rows` training examples (the trainer's --epochs rule: whole
    batches only)."""
    return max(1, rows // min(batch, rows))


def job_options(rows: int, config: str, rank: int, n_epochs=None, batch=None, lr=None) -> dict:
    """`tiedlora train` options of a fine-tune of `rows` training rows, each hyperparameter given
    or `auto` (None): warm-up over a tenth of the steps, validation and a checkpoint each epoch,
    no early stop before the epochs asked for."""
    n_epochs = epochs(rows) if n_epochs is None else n_epochs
    batch = batch_size(rows) if batch is None else batch
    per_epoch = steps_per_epoch(rows, batch)
    return dict(
        preset=config,
        rank=rank,
        epochs=n_epochs,
        batch_size=batch,
        lr=learning_rate(config, rank) if lr is None else lr,
        warmup_steps=math.ceil(0.1 * per_epoch * n_epochs),
        val_every=per_epoch,
        checkpoint_every=per_epoch,
        patience=n_epochs + 1,
    )
