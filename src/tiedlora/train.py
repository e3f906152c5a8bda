"""Training with the paper's recipe (section 4.3), resumable to the bit.

AdamW (weight decay 0.01), linear warm-up then cosine decay, global batches reached by gradient
accumulation (and data parallelism through accelerate), validation every `val_every` steps with
early stopping, the best adapter kept, then scored on the test split. `train` reads top to
bottom as those steps.

Everything a resumed run needs is a function of the step or stored in a checkpoint: the data
order is a seeded permutation per epoch, the learning rate a formula of the step, dropout's RNG
is re-seeded every step, and the optimizer's moments are saved with safetensors (no pickle).
"""

from __future__ import annotations

import contextlib
import copy
import csv
import dataclasses
import io
import math
import platform
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from .adapter_file import adapter_files, load, put, read_adapter, regular_file, save
from .atomic import discard, json_bytes, write_atomic, write_folder
from .config import TiedLoraConfig, TiedLoraError
from .layout import find_layers
from .loss import TokenLoss, answer_tokens, collate, encode_rows, mean_loss, pack
from .model import adapter_parameters, apply, trainable_parameters
from .models import SMOLLM2
from .quantize import quantize
from .runs import (
    BEST,
    CHECKPOINTS,
    LOG,
    RESULTS,
    RUN,
    clean_stale,
    read_json,
    run_options,
    write_json,
    write_jsonl,
)
from .tokens import pad_id
from .version import __version__

if TYPE_CHECKING:
    from .evaluate import Scorer
    from .tasks import Rows, TaskLike

PRECISIONS = ("auto", "bf16", "fp32")
RECIPES = Path(__file__).parent / "configs" / "paper"  # the paper's recipe per task, as YAML
# What may change between a run and its resumption without changing the result.
RESUMABLE = ("out", "test_rows", "eval_batch_size", "max_new_tokens")


@dataclass
class TrainConfig:
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
    prompt_field: str = "prompt"
    """With --data: the column holding the prompt."""
    completion_field: str = "completion"
    """With --data: the column holding the completion."""
    messages_field: str = "messages"
    """With --data: the column holding a conversation."""
    metric: str | None = None
    """With --data: also score generated answers against the references: exact_match, f1, rougeL or bleu."""
    too_long: str = "cut"
    """Examples longer than --max_length: cut (their prompt loses its start) or drop (left out)."""
    packing: bool = False
    """Pack several examples into each sequence of a micro batch (positions restart per example, and no
    example attends to another): no padding."""
    samples: int = 5
    """With --data: write this many validation generations to samples.jsonl beside the results."""
    config: str = "tl6"
    """The configuration: lora, vera, tl1, tl2, tl3, tl4, tl5 or tl6 (the paper's Table 1)."""
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
    model: str = SMOLLM2
    """smollm2-135m (bundled), a local model folder, or a Hub id."""
    quantize: str | None = None
    """Hold the frozen base's decoder layers in 8bit or 4bit (NF4) with bitsandbytes, on a GPU or the CPU;
    the adapter stays fp32."""
    out: str = "runs/run"
    """The run folder."""
    source: str = "bundled"
    """Data: bundled, hub, a folder of <split>.jsonl, or a root with one folder per task."""
    lr: float = 1e-4
    """Peak learning rate (the paper tried 1e-4 and 1e-5; tied configurations often want more)."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    warmup_steps: int = 50
    """Linear warm-up steps before the cosine decay."""
    max_steps: int = 2000
    """At most this many optimizer steps."""
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

    def task_data(self) -> TaskLike:
        """The data and its scoring: the user's own (--data) or one of the paper's tasks."""
        from .tasks import task_for

        return task_for(
            self.task,
            self.data,
            validation=self.validation,
            split=self.split,
            prompt_field=self.prompt_field,
            completion_field=self.completion_field,
            messages_field=self.messages_field,
            metric=self.metric,
            samples=self.samples,
        )

    def adapter(self) -> TiedLoraConfig:
        return TiedLoraConfig.preset(
            self.config,
            rank=self.rank,
            alpha=self.alpha,
            seed=self.seed,
            layers=self.layers,
            init=self.init,
            dropout=self.dropout,
        )


def from_recipe(options: dict) -> TrainConfig:
    """The config of a run: the task's paper recipe (configs/paper/<task>.yaml), then `options`.
    Own data (--data) starts from TrainConfig's defaults instead."""
    recipe = RECIPES / f"{options.get('task', TrainConfig.task)}.yaml"
    base = yaml.safe_load(recipe.read_text()) if recipe.is_file() and options.get("data") is None else {}
    return TrainConfig(**{**base, **options})


class Diverged(TiedLoraError):
    """A non-finite loss or gradient: training stops and the last good checkpoint stays."""


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to 0 at `max_steps` (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def step_batches(n: int, cfg: TrainConfig, step: int) -> list[int]:
    """Example indices of global step `step`: epoch e reads a seed-(seed+e) permutation in
    consecutive slices of batch_size (a remainder smaller than a batch is skipped)."""
    size = min(cfg.batch_size, n)
    per_epoch = n // size
    epoch, pos = divmod(step, per_epoch)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed + epoch)).tolist()
    return order[pos * size : (pos + 1) * size]


def micro_batches(indices: list[int], examples: list[dict], cfg: TrainConfig, world: int, rank: int) -> list[list[int]]:
    """This process's share of a global batch: sorted by length (little padding), cut into
    `world * k` near-equal micro batches, every k-th to each process, so all processes step
    together and the union over processes is the global batch."""
    ordered = sorted(indices, key=lambda i: len(examples[i]["input_ids"]))
    k = math.ceil(len(ordered) / (cfg.micro_batch_size * world))
    parts = world * k
    bounds = [round(j * len(ordered) / parts) for j in range(parts + 1)]
    chunks = [ordered[bounds[j] : bounds[j + 1]] for j in range(parts)]
    return chunks[rank::world]


def shard_base(model: nn.Module) -> nn.Module:
    """FSDP for models too large for one device: torch's fully_shard splits each decoder
    layer's frozen weights over the processes and gathers them for its forward and backward.
    The adapter stays whole on every process (tied tensors at the root, per-layer ones ignored
    by FSDP), so saving, loading and gradient averaging see plain tensors."""
    from torch.distributed.fsdp import fully_shard

    adapter = set(adapter_parameters(model).values())
    for layer in find_layers(model):
        fully_shard(layer, ignored_params=adapter & set(layer.parameters()))
    return TokenLoss(model)


class Checkpoints:
    """`checkpoint/step-N/` folders, each written whole (built aside, then renamed into place)
    before `checkpoint/latest` (written atomically) names it; all but it and the one before are
    then removed, each as a unit. A kill at any moment leaves every step-N whole, and a
    checkpoint damaged later is passed over for the one before."""

    STATE_KEYS = {"step", "best", "best_step", "bad_evals", "tokens", "elapsed_s", "stopped"}

    def __init__(self, folder: Path):
        self.folder = folder / CHECKPOINTS

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if not pointer.is_file():
            return None
        name = pointer.read_bytes()[:64].decode("utf-8", "replace").strip()
        path = self.folder / name
        if not re.fullmatch(r"step-\d+", name) or not path.resolve().is_relative_to(self.folder.resolve()):
            raise TiedLoraError(
                f"{pointer} names {name!r}, not a step-N folder of this run's; delete {self.folder} to start over."
            )
        if not path.is_dir():
            raise TiedLoraError(f"{pointer} names {path.name}, which is missing; delete {self.folder} to start over.")
        return path

    def steps(self) -> list[Path]:
        """The checkpoints there, newest first."""
        found = [p for p in self.folder.glob("step-*") if re.fullmatch(r"step-\d+", p.name) and p.is_dir()]
        return sorted(found, key=lambda p: -int(p.name.split("-")[1]))

    def write(self, model, optimizer, state: dict) -> Path:
        from safetensors.torch import save as to_bytes

        path = self.folder / f"step-{state['step']}"
        pointer = self.folder / "latest"
        previous = self.folder / pointer.read_text().strip() if pointer.is_file() else None  # kept, to fall back to
        params = {id(p): k for k, p in adapter_parameters(model).items()}
        moments = {
            f"{params[id(p)]}/{name}": t.detach().cpu().contiguous()
            for p, s in optimizer.state.items()
            for name, t in s.items()
            if torch.is_tensor(t)
        }
        files = adapter_files(model) | {
            "optimizer.safetensors": to_bytes(moments),
            "state.json": json_bytes(state),
        }
        write_folder(path, files)
        write_atomic(self.folder / "latest", path.name.encode())
        for old in self.steps():
            if old not in (path, previous):
                discard(old)
        return path

    def read(self, path: Path, model, optimizer) -> dict:
        """The training state at `path`, its adapter and AdamW moments put on the model and the
        optimizer; every file is checked before either is touched."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        state = read_json(path / "state.json")
        if not isinstance(state, dict) or set(state) != self.STATE_KEYS or not isinstance(state["step"], int):
            raise TiedLoraError(f"{path / 'state.json'} is damaged: expected the keys {sorted(self.STATE_KEYS)}.")
        try:
            moments = load_file(regular_file(path / "optimizer.safetensors"))
        except (SafetensorError, OSError) as e:
            raise TiedLoraError(f"{path / 'optimizer.safetensors'} is damaged ({e}).") from None
        adapter = read_adapter(path)
        params = adapter_parameters(model)
        for key in moments:
            name, _, field = key.rpartition("/")
            if name not in params:
                raise TiedLoraError(f"{path}/optimizer.safetensors has state for {name}, which this adapter lacks.")
        put(model, adapter)
        for key, t in moments.items():
            name, _, field = key.rpartition("/")
            # AdamW keeps its step count on the CPU unless fused or capturable
            optimizer.state[params[name]][field] = t if field == "step" else t.to(params[name].device)
        return state


def versions() -> dict:
    import transformers

    return {
        "tiedlora": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def prepare_folder(cfg: TrainConfig, resume: bool) -> Path:
    """The run folder: new, or (with resume) holding this same run; anything else is an error."""
    folder = Path(cfg.out)
    run_file = folder / RUN
    mine = dataclasses.asdict(cfg)
    if run_file.is_file():
        # An option added after that run was written ran at its default, which keeps the old behaviour.
        theirs = {f.name: f.default for f in dataclasses.fields(TrainConfig)} | (run_options(folder) or {})
        if not resume:
            raise TiedLoraError(f"{folder} already holds a run: pass --resume to continue it, or choose another --out.")
        changed = sorted(k for k in set(mine) | set(theirs) if k not in RESUMABLE and mine.get(k) != theirs.get(k))
        if changed:
            diff = ", ".join(f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in changed)
            raise TiedLoraError(
                f"--resume with a different config than {run_file} ({diff}); resume with the same options or "
                "choose another --out."
            )
    elif folder.exists() and any(folder.iterdir()):
        raise TiedLoraError(f"{folder} is not empty and holds no tiedlora run: choose another --out.")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TiedLoraError(
            f"Cannot create --out {folder} ({e.strerror or e}); choose a folder you can write."
        ) from None
    clean_stale(folder)
    if not run_file.is_file():
        write_json(run_file, {"config": mine, "versions": versions()})
    return folder


class Log:
    """log.csv and TensorBoard events in the run folder; on resume both drop what came after the
    checkpoint, so a resumed run's log reads as one run."""

    FIELDS = ("step", "loss", "lr", "tokens_per_s", "val_loss", "val_metric", "elapsed_s")

    def __init__(self, folder: Path, start: int, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        self.path = folder / LOG
        rows = self.rows_until(start) if self.path.is_file() else []
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, self.FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        write_atomic(self.path, buffer.getvalue().encode())  # a kill here leaves the old log whole
        self.tb = SummaryWriter(str(folder / "tensorboard"), purge_step=start + 1)

    def rows_until(self, start: int) -> list[dict]:
        """The log's rows up to step `start`; from a damaged row on, none (said in one line)."""
        rows = []
        with self.path.open(newline="", errors="replace") as f:
            for n, row in enumerate(csv.DictReader(f), 2):
                if set(row) != set(self.FIELDS) or not (row["step"] or "").isdigit():
                    print(f"tiedlora train: {self.path} is damaged at line {n}; its rows from there on are dropped.")
                    break
                if int(row["step"]) <= start:
                    rows.append(row)
        return rows

    def write(self, **row):
        if not self.enabled:
            return
        try:
            with self.path.open("a", newline="") as f:
                csv.DictWriter(f, self.FIELDS).writerow(row)
            for key, value in row.items():
                if key != "step" and value not in ("", None):
                    self.tb.add_scalar(key, value, row["step"])
            self.tb.flush()
        except OSError as e:
            raise TiedLoraError(
                f"Could not write the log in {self.path.parent} ({e.strerror or e}); the last checkpoint "
                "written stays: free some space, then --resume."
            ) from None

    def close(self):
        if self.enabled:
            self.tb.close()


@dataclass
class Data:
    """A run's rows (with where they came from) and their tokenised examples."""

    train_rows: Rows
    val_rows: Rows
    train: list[dict]
    val: list[dict]
    long: int  # training examples longer than --max_length: cut or dropped
    pad: int  # the token that pads a batch


def load_data(task: TaskLike, tokenizer, cfg: TrainConfig) -> Data:
    train_rows, val_rows = task.load("train", cfg.source), task.load("validation", cfg.source)
    limits = (cfg.max_length, cfg.too_long, cfg.chat)
    train_examples, long = encode_rows(task, train_rows[: cfg.train_rows], tokenizer, *limits)
    val_examples, _ = encode_rows(task, val_rows[: cfg.val_rows], tokenizer, *limits)
    if not train_examples:
        raise TiedLoraError(
            f"Every training example is longer than --max_length {cfg.max_length} and --too_long drop "
            "left none; raise --max_length or use --too_long cut."
        )
    return Data(train_rows, val_rows, train_examples, val_examples, long, pad_id(tokenizer))


@dataclass
class Processes:
    """Where training runs: one process, or several (DDP, or FSDP with --fsdp) under torchrun."""

    accelerator: Any  # accelerate's Accelerator, imported when training starts
    device: torch.device
    world: int
    rank: int
    fsdp: bool
    bf16: bool

    @property
    def main(self) -> bool:
        return self.rank == 0

    @classmethod
    def start(cls, cfg: TrainConfig) -> Processes:
        from accelerate import Accelerator

        cuda = torch.cuda.is_available()
        accelerator = Accelerator(
            cpu=not cuda
        )  # its mixed_precision is fixed per process; a sweep runs cells of any precision
        world = accelerator.num_processes
        bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and native_bf16(accelerator.device))
        return cls(accelerator, accelerator.device, world, accelerator.process_index, cfg.fsdp and world > 1, bf16)

    def wrap(self, model: nn.Module, optimizer):
        """The loss module and optimizer as the engine needs them."""
        if self.fsdp:
            return shard_base(model.to(self.device)), self.accelerator.prepare(optimizer)
        return self.accelerator.prepare(TokenLoss(model), optimizer)


def native_bf16(device: torch.device) -> bool:
    """Does `device` compute in bf16 natively? On a CPU without AVX512-BF16 or AMX, bf16 matmuls
    are emulated and many times slower than fp32, so `--precision auto` keeps those in fp32."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


@dataclass
class Run:
    """What every step of a run reads: its options, model, data, processes and folder."""

    cfg: TrainConfig
    model: nn.Module
    tokenizer: Any
    task: TaskLike
    data: Data
    procs: Processes
    folder: Path
    quiet: bool

    def scorer(self) -> Scorer:
        """The model with the run's decoding options and its --max_length and --too_long."""
        from .evaluate import Scorer

        cfg = self.cfg
        return Scorer(
            self.model,
            self.tokenizer,
            cfg.max_new_tokens,
            cfg.eval_batch_size,
            cfg.chat,
            progress=not self.quiet,
            max_length=cfg.max_length,
            too_long=cfg.too_long,
        )

    def score(self, rows) -> dict:
        """The task's scores on `rows` by greedy generation, with the run's decoding options."""
        return self.scorer().scores(self.task, rows)


def resume_state(checkpoints: Checkpoints, resume: bool, model, optimizer, cfg: TrainConfig, main: bool) -> dict:
    """The training state: fresh, or the latest intact checkpoint's (saying so in one line, and
    naming any newer one passed over as damaged)."""
    latest = checkpoints.latest() if resume else None
    if latest is None:
        return {
            "step": 0,
            "best": None,
            "best_step": None,
            "bad_evals": 0,
            "tokens": 0,
            "elapsed_s": 0.0,
            "stopped": None,
        }
    candidates = [latest, *[p for p in checkpoints.steps() if p != latest]]
    damaged = []
    for path in candidates:
        try:
            state = checkpoints.read(path, model, optimizer)
        except TiedLoraError as e:
            damaged.append(str(e))
            continue
        if main:
            passed = f" ({'; '.join(damaged)}: resuming from the checkpoint before)" if damaged else ""
            print(
                f"tiedlora train: resuming at step {state['step']} of {cfg.max_steps} from {path}{passed}", flush=True
            )
        return state
    raise TiedLoraError(
        f"No intact checkpoint to resume from: {'; '.join(damaged)}. Delete {checkpoints.folder} to start over."
    )


def train_step(run: Run, loss_fn, optimizer, params, step: int):
    """One optimizer step over global batch `step`; returns (loss, input tokens, answer tokens)."""
    cfg, data, procs = run.cfg, run.data, run.procs
    torch.manual_seed(cfg.seed * 100_003 + step * procs.world + procs.rank)  # dropout masks: a function of the step
    for group in optimizer.param_groups:
        group["lr"] = lr_at(step, cfg)
    loss_fn.train()
    indices = step_batches(len(data.train), cfg, step)
    n_tokens = answer_tokens([data.train[i] for i in indices])
    mine = micro_batches(indices, data.train, cfg, procs.world, procs.rank)
    total = torch.zeros((), device=procs.device)
    for j, chunk in enumerate(mine):
        examples = [data.train[i] for i in chunk]
        batch = (
            pack(examples, data.pad, cfg.max_length, procs.device)
            if cfg.packing
            else collate(examples, data.pad, procs.device)
        )
        last = j == len(mine) - 1
        sync = procs.accelerator.no_sync(loss_fn) if not last and not procs.fsdp else contextlib.nullcontext()
        with sync, torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=procs.bf16):
            loss = loss_fn(**batch) / n_tokens
            procs.accelerator.backward(loss * procs.world)  # DDP averages over processes; the loss is a global mean
        total += loss.detach()
    if procs.fsdp:  # the adapter is not sharded: average its gradients as DDP would
        for p in params:
            torch.distributed.all_reduce(p.grad)
            p.grad /= procs.world
    total = procs.accelerator.reduce(total, reduction="sum")
    bad_loss = not torch.isfinite(total)
    if bad_loss or any(not torch.isfinite(p.grad).all() for p in params if p.grad is not None):
        what = (
            f"the training loss became {total.item()}"
            if bad_loss
            else f"a gradient became non-finite (loss {total.item():.4g})"
        )
        raise Diverged(
            f"{what} at step {step + 1} (lr {lr_at(step, cfg):.3g}); the last good checkpoint stays in "
            f"{Path(cfg.out) / CHECKPOINTS}; lower --lr and start again, or --resume from it."
        )
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return total.item(), sum(len(data.train[i]["input_ids"]) for i in indices), n_tokens


def validate(run: Run, loss_fn, state: dict) -> dict:
    """Validation loss (and the headline metric if asked); keeps the best adapter and counts
    validations without improvement for early stopping. Returns the log's validation columns."""
    from tqdm.auto import tqdm

    cfg, data, procs = run.cfg, run.data, run.procs
    loss_fn.eval()
    step = state["step"]
    val_loss = mean_loss(loss_fn, data.val, data.pad, cfg.micro_batch_size, procs.device)
    headline, metric = "", None
    if cfg.val_metric or cfg.early_stop_on == "metric":
        headline, metric = next(iter(run.score(data.val_rows[: cfg.val_rows]).items()))
    value = -metric if metric is not None and cfg.early_stop_on == "metric" else val_loss
    if state["best"] is None or value < state["best"]:
        state.update(best=value, best_step=step, bad_evals=0)
        if procs.main:
            save(run.model, run.folder / BEST)
    else:
        state["bad_evals"] += 1
        if state["bad_evals"] >= cfg.patience:
            state["stopped"] = f"early stop: no better validation {cfg.early_stop_on} in {cfg.patience} validations"
    if not run.quiet and procs.main:
        tqdm.write(
            f"step {step}: validation loss {val_loss:.4f}"
            + (f", {headline} {metric:.2f}" if metric is not None else "")
            + (" (best)" if state["best_step"] == step else "")
        )
    return {"val_loss": round(val_loss, 6), "val_metric": "" if metric is None else metric}


def test_and_record(run: Run, state: dict, started: float) -> dict:
    """Score the best adapter by its task's test (own data: on the validation rows, by loss and
    perplexity, the metric if one was chosen, and a few sample generations); write the file the
    task keeps its predictions in (predictions.jsonl; samples.jsonl for own data) and results.json."""
    cfg, data, procs, folder = run.cfg, run.data, run.procs, run.folder
    load(run.model, folder / BEST)
    test_all = run.task.load("test", cfg.source)
    test_rows = test_all[: cfg.test_rows]
    scores = run.task.test(run.scorer(), test_rows)
    predictions = scores.pop("predictions")
    results = {
        "task": run.task.name,
        "config": cfg.config,
        "rank": cfg.rank,
        "model": cfg.model,
        "params": trainable_parameters(run.model),
        "metrics": scores,
        "steps": state["step"],
        "best_step": state["best_step"],
        "validation": {"on": cfg.early_stop_on, "best": abs(state["best"]) if state["best"] is not None else None},
        "stopped": state["stopped"] or "max_steps",
        "train_tokens": state["tokens"],
        "train_time_s": round(state["elapsed_s"], 1),
        "wall_time_s": round(time.time() - started, 1),
        "precision": "bf16" if procs.bf16 else "fp32",
        "processes": procs.world,
        "engine": "fsdp" if procs.fsdp else "ddp" if procs.world > 1 else "single",
        "data": {
            "train": data.train_rows.info,
            "validation": data.val_rows.info,
            "test": test_all.info,
            "train_rows_used": len(data.train),
            "validation_rows_used": len(data.val),
            "test_rows_used": len(test_rows),
        },
        "recipe": dataclasses.asdict(cfg),
        "versions": versions(),
    }
    if procs.main:
        name, lines = run.task.predictions_file(run.tokenizer, test_rows, predictions, cfg.chat)
        write_jsonl(folder / name, lines)
        write_json(folder / RESULTS, results)
    return results


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, base=None) -> dict:
    """Train, keep the best adapter, score it on the test split; returns results.json's content.
    `base` = (model, tokenizer) already loaded for cfg.model: a copy is trained, so a sweep
    loads its model once rather than once per cell."""
    from tqdm.auto import tqdm

    from .models import load_model

    started = time.time()
    task = cfg.task_data()
    model, tokenizer = load_model(cfg.model) if base is None else (copy.deepcopy(base[0]), base[1])
    if cfg.quantize is not None:
        quantize(model, cfg.quantize)
    apply(model, cfg.adapter())
    data = load_data(task, tokenizer, cfg)

    procs = Processes.start(cfg)
    folder = prepare_folder(cfg, resume) if procs.main else Path(cfg.out)
    procs.accelerator.wait_for_everyone()
    if resume and (folder / RESULTS).is_file():
        return read_json(folder / RESULTS)
    if data.long and procs.main:
        fate = (
            "they were left out (--too_long drop)"
            if cfg.too_long == "drop"
            else "their prompts were cut from the start"
        )
        total = len(data.train) + (data.long if cfg.too_long == "drop" else 0)
        print(f"tiedlora train: {data.long} of {total} training examples exceed --max_length {cfg.max_length}; {fate}.")

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    checkpoints = Checkpoints(folder)
    state = resume_state(checkpoints, resume, model, optimizer, cfg, procs.main)
    loss_fn, optimizer = procs.wrap(model, optimizer)
    run = Run(cfg, model, tokenizer, task, data, procs, folder, quiet)
    checkpoint_every = cfg.checkpoint_every or cfg.val_every
    log = Log(folder, state["step"], procs.main)
    bar = tqdm(
        total=cfg.max_steps,
        initial=state["step"],
        desc=f"{cfg.task} {cfg.config} r{cfg.rank}",
        unit="step",
        disable=quiet or not procs.main,
        dynamic_ncols=True,
    )
    try:
        while state["step"] < cfg.max_steps and state["stopped"] is None:
            t0 = time.time()
            loss, n_inputs, n_answers = train_step(run, loss_fn, optimizer, params, state["step"])
            dt = time.time() - t0
            state["step"] += 1
            state["tokens"] += n_answers
            state["elapsed_s"] += dt
            step, lr = state["step"], lr_at(state["step"] - 1, cfg)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{n_inputs / dt:.0f}")
            row = {
                "step": step,
                "loss": round(loss, 6),
                "lr": lr,
                "tokens_per_s": round(n_inputs / dt, 1),
                "val_loss": "",
                "val_metric": "",
                "elapsed_s": round(state["elapsed_s"], 2),
            }
            if step % cfg.val_every == 0 or step == cfg.max_steps:
                row.update(validate(run, loss_fn, state))
            log.write(**row)
            if procs.main and (step % checkpoint_every == 0 or step == cfg.max_steps or state["stopped"]):
                checkpoints.write(model, optimizer, state)
            procs.accelerator.wait_for_everyone()
    finally:
        bar.close()
        log.close()

    if not (procs.main or procs.fsdp):  # sharded layers need every process in every forward
        return {}
    results = test_and_record(run, state, started)
    return results if procs.main else {}
