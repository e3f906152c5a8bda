"""A run's data: its rows, their tokenised examples, and which of them each step reads."""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import TiedLoraError
from ..layer import RowSeeds
from ..loss import encode_rows, pack_rows
from ..tokens import pad_id
from .auto import steps_per_epoch
from .config import TrainConfig

if TYPE_CHECKING:
    from ..tasks import Rows, TaskLike


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
    """The rows and examples; with --epochs, `cfg.max_steps` set from the training examples, so
    the schedule, the log and run.json see the steps the epochs take."""
    train_rows, val_rows = task.load("train", cfg.source), task.load("validation", cfg.source)
    limits = (cfg.max_length, cfg.too_long, cfg.chat)
    train_examples, long = encode_rows(task, train_rows[: cfg.train_rows], tokenizer, *limits)
    val_examples, _ = encode_rows(task, val_rows[: cfg.val_rows], tokenizer, *limits)
    if not train_examples:
        raise TiedLoraError(
            f"Every training example is longer than --max_length {cfg.max_length} and --too_long drop "
            "left none; raise --max_length or use --too_long cut."
        )
    if cfg.epochs is not None:
        cfg.max_steps = cfg.epochs * steps_per_epoch(len(train_examples), cfg.batch_size)
    return Data(train_rows, val_rows, train_examples, val_examples, long, pad_id(tokenizer))


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


def example_seed(seed: int, step: int, index: int) -> int:
    """The seed of training example `index`'s dropout masks at step `step` of a run seeded `seed`:
    a function of the run alone, never of the process, the micro batch or who shares the batch."""
    return zlib.crc32(f"{seed}/{step}/{index}".encode())


def laid_out(chunk: list[int], examples: list[dict], cfg: TrainConfig, step: int) -> tuple[list[list[dict]], RowSeeds]:
    """The rows a micro batch's examples are laid in (end to end in rows of --max_length with
    --packing, else one to a row) and each row's (seed, length) per example, for dropout."""
    seeds = {id(examples[i]): example_seed(cfg.seed, step, i) for i in chunk}
    laid = [examples[i] for i in chunk]
    rows = pack_rows(laid, cfg.max_length) if cfg.packing else [[e] for e in laid]
    return rows, [[(seeds[id(e)], len(e["input_ids"])) for e in row] for row in rows]
