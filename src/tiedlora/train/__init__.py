"""Training with the paper's recipe (section 4.3), resumable to the bit, one adapter per run or
many tenants' adapters in one batch.

AdamW (weight decay 0.01), linear warm-up then cosine decay, global batches reached by gradient
accumulation (and data parallelism over torchrun's processes), validation every `val_every`
steps with early stopping, the best adapter kept, then scored on the test split.

Everything a resumed run needs is a function of the step or stored in a checkpoint: the data
order is a seeded permutation per epoch, the learning rate a formula of the step, each
example's dropout masks come from its own seed (the run's seed, the step and the example), and
the optimizer's moments are saved with safetensors (no pickle).

Modules: `config` (the options), `auto` (the tuned defaults), `data` (rows, examples and each
step's batches), `folder` (the run folder and its log), `checkpoints` (the state and its
checkpoints), `processes` (one or several, DDP or FSDP), `step` (the one optimizer step, for a
run alone and for many), `loop` (one run, top to bottom), and for many runs in one batch:
`jobs_file` (the jobs), `routing` (each tenant's rows through its adapter) and `tenants` (the
scheduler).
"""

from .checkpoints import Checkpoints
from .config import TrainConfig, from_recipe
from .data import load_data, micro_batches, step_batches
from .loop import Run, train, train_step
from .processes import Processes, native_bf16
from .step import Diverged, lr_at

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
