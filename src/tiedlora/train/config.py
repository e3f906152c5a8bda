"""Every option of a training run, and the paper's recipe each task starts from."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from ..config import TiedLoraConfig, TiedLoraError
from ..models import SMOLLM2
from ..tasks.own import OwnDataOptions
from .auto import learning_rate

if TYPE_CHECKING:
    from ..tasks import TaskLike

PRECISIONS = ("auto", "bf16", "fp32")
RECIPES = Path(__file__).parents[1] / "paper" / "configs"  # the paper's recipe per task, as YAML (data, not code)
# What may change between a run and its resumption without changing the result.
RESUMABLE = ("out", "test_rows", "eval_batch_size", "max_new_tokens")
# Every group: better than q, k, v alone on SmolLM2 at the same steps (docs/training.md has the figures).
DEFAULT_TARGETS = ("qkv", "o", "mlp_in", "mlp_out")
PAPER_LR = 1e-4  # the paper's recipe (section 4.3); own data takes the configuration's tuned rate instead
# What a run written before an option existed trained with, where that is not today's default.
UNRECORDED = {"targets": ["qkv"]}


@dataclass
class TrainConfig(OwnDataOptions):
    """Every option of `tiedlora train`; the defaults are the paper's recipe."""

    task: str = "gsm8k"
    """squad, dialogsum, hellaswag, iwslt2017-de-en or gsm8k (ignored with --data)."""
    data: str | None = None
    """Your own data instead of a task: a .jsonl, .csv or .parquet file, or a Hub data set name, of
    {"prompt", "completion"} or {"messages": [{"role", "content"}, ...]} rows."""
    validation: str | None = None
    """With --data: a validation file (default: 10% of the rows, chosen by the sha256 of each row)."""
    split: str = "train"
    """With a Hub data set: the split to train on."""
    too_long: str = "cut"
    """Examples longer than --max_length: cut (their prompt loses its start) or drop (left out)."""
    packing: bool = False
    """Pack several examples into each sequence of a micro batch (positions restart per example, and no
    example attends to another): no padding."""
    samples: int = 5
    """With --data: write this many validation generations to samples.jsonl beside the results."""
    preset: str = "tl6"
    """The configuration, as a preset of the paper's Table 1: lora, vera, tl1, tl2, tl3, tl4, tl5 or tl6."""
    rank: int = 8
    """The rank r."""
    alpha: float | None = None
    """Scale numerator (default: rank, i.e. scale 1 as in the paper)."""
    layers: list[int] | None = None
    """Adapt only these layer indices, e.g. [3]."""
    init: dict[str, str] | None = None
    """Override a part's init, e.g. {"A": "zeros"} (tl1's zero-start variant)."""
    dropout: float = 0.0
    """Dropout on the adapter's input (0: none, no copy)."""
    targets: list[str] | None = None
    """The projection groups adapted in every layer, of qkv (attention's q, k, v), o (attention's output), mlp_in
    (gate and up) and mlp_out (down); default: all four, see docs/training.md."""
    model: str = SMOLLM2
    """smollm2-135m (bundled), a local model folder, or a Hub id."""
    quantize: str | None = None
    """Hold the frozen base's decoder layers in 8bit or 4bit (NF4) with bitsandbytes, on a GPU or the CPU;
    the adapter stays fp32."""
    out: str = "runs/run"
    """The run folder."""
    source: str = "bundled"
    """Data: bundled, hub, a folder of <split>.jsonl, or a root with one folder per task."""
    lr: float | None = None
    """Peak learning rate (default: with --data, the configuration's tuned rate, see docs/training.md; else the
    paper's 1e-4)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    max_steps: int = 2000
    """At most this many optimizer steps."""
    epochs: int | None = None
    """Instead of --max_steps: this many passes over the training rows (each step reads --batch_size of them)."""
    batch_size: int = 256
    """Global batch (examples per optimizer step), reached by accumulation and data parallelism."""
    micro_batch_size: int = 8
    """Examples per forward pass on one device."""
    val_every: int = 30
    """Validate every this many steps."""
    val_rows: int | None = 500
    """Validation rows used (all if null)."""
    patience: int = 10
    """Stop after this many validations without improvement."""
    early_stop_on: str = "loss"
    """loss (validation loss, cheap) or metric (the task's headline, by generation)."""
    fsdp: bool = False
    """With several processes, shard the frozen base model's layers over them (torch FSDP2); the adapter stays whole."""
    precision: str = "auto"
    """Training matmuls: auto (bf16 autocast on a GPU, and on a CPU with native bf16, AVX512-BF16 or AMX;
    fp32 elsewhere), bf16 or fp32. The adapter and optimizer stay fp32; results.json records the choice."""
    val_metric: bool = False
    """Also score the task's headline metric (by generation) at every validation."""
    checkpoint_every: int | None = None
    """Checkpoint every this many steps (default: val_every)."""
    max_length: int = 1024
    """Longest training example in tokens; longer prompts lose their start."""
    train_rows: int | None = None
    """Use only the first N training rows (all if null)."""
    test_rows: int | None = None
    """Score only the first N test rows (all if null)."""
    max_new_tokens: int = 500
    """Greedy decoding stops at EOS or after this many tokens."""
    eval_batch_size: int = 16
    """Prompts per generation batch."""
    chat: bool = False
    """Wrap prompts in the tokenizer's chat template."""
    seed: int = 0
    """Seeds the adapter's init, the data order and dropout."""

    def __post_init__(self):
        for name in (
            "rank",
            "max_steps",
            "batch_size",
            "micro_batch_size",
            "val_every",
            "patience",
            "max_length",
            "max_new_tokens",
        ):
            if getattr(self, name) <= 0:
                raise TiedLoraError(f"--{name} {getattr(self, name)} must be positive.")
        if self.epochs is not None and self.epochs <= 0:
            raise TiedLoraError(f"--epochs {self.epochs} must be positive (or unset: --max_steps decides).")
        if self.targets is None:
            self.targets = list(DEFAULT_TARGETS)
        if self.lr is None:
            self.lr = learning_rate(self.preset, self.rank) if self.data is not None else PAPER_LR
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise TiedLoraError(f"--lr {self.lr} must be a positive number, e.g. 1e-4.")
        if self.precision not in PRECISIONS:
            raise TiedLoraError(
                f"--precision {self.precision!r}: choose auto (bf16 where the hardware has it natively), bf16 or fp32."
            )
        if self.quantize not in (None, "8bit", "4bit"):
            raise TiedLoraError(f"--quantize {self.quantize!r}: choose 8bit or 4bit, or leave it unset.")
        if self.too_long not in ("cut", "drop"):
            raise TiedLoraError(f"--too_long {self.too_long!r}: choose cut (the prompt loses its start) or drop.")
        if self.data is not None and self.early_stop_on == "metric" and self.metric is None:
            raise TiedLoraError("--early_stop_on metric with --data needs --metric exact_match, f1, rougeL or bleu.")
        if self.early_stop_on not in ("loss", "metric"):
            raise TiedLoraError(
                f"--early_stop_on {self.early_stop_on!r}: choose loss (validation loss) or metric "
                "(the task's headline, by generation)."
            )
        self.task_data()
        self.adapter()

    @property
    def peak_lr(self) -> float:
        """--lr, resolved when the config was made (unset: the tuned or the paper's rate)."""
        assert self.lr is not None
        return self.lr

    def task_data(self) -> TaskLike:
        """The data and its scoring: the user's own (--data) or one of the paper's tasks."""
        from ..tasks import task_for

        return task_for(
            self.task,
            self.data,
            validation=self.validation,
            split=self.split,
            **self.own_options(),
            samples=self.samples,
        )

    def adapter(self) -> TiedLoraConfig:
        return TiedLoraConfig.preset(
            self.preset,
            rank=self.rank,
            alpha=self.alpha,
            seed=self.seed,
            layers=self.layers,
            init=self.init,
            dropout=self.dropout,
            targets=tuple(self.targets or ()),
        )


def from_recipe(options: dict) -> TrainConfig:
    """The config of a run: the task's paper recipe (paper/configs/<task>.yaml), then `options`.
    Own data (--data) starts from TrainConfig's defaults instead."""
    recipe = RECIPES / f"{options.get('task', TrainConfig.task)}.yaml"
    base = yaml.safe_load(recipe.read_text()) if recipe.is_file() and options.get("data") is None else {}
    return TrainConfig(**{**base, **options})
