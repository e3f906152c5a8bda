"""Training with the paper's recipe (section 4.3), resumable to the bit, one adapter per run or
many tenants' adapters in one batch.

AdamW (weight decay 0.01), linear warm-up then cosine decay, global batches reached by gradient
accumulation (and data parallelism through accelerate), validation every `val_every` steps with
early stopping, the best adapter kept, then scored on the test split.

Everything a resumed run needs is a function of the step or stored in a checkpoint: the data
order is a seeded permutation per epoch, the learning rate a formula of the step, dropout's RNG
is re-seeded every step, and the optimizer's moments are saved with safetensors (no pickle).

Modules: `config` (the options), `data` (rows, examples and each step's batches), `folder` (the
run folder and its log), `checkpoints`, `processes` (one or several, DDP or FSDP), `loop` (one
run, top to bottom), `tenants` (many runs in one batch).
"""

from .checkpoints import Checkpoints
from .config import TrainConfig, from_recipe
from .data import load_data, micro_batches, step_batches
from .loop import Diverged, Run, lr_at, train, train_step
from .processes import Processes, native_bf16

__all__ = [
    "Checkpoints",
    "Diverged",
    "Processes",
    "Run",
    "TrainConfig",
    "from_recipe",
    "load_data",
    "lr_at",
    "micro_batches",
    "native_bf16",
    "step_batches",
    "train",
    "train_step",
]
