"""One optimizer step, the one every run takes: a run alone is a step of one trainee, many
tenants' runs a step of them all (`tenants.JointTraining`). Here alone: the step's learning
rate, each process's share of the step's micro batches, each example's dropout seeds, autocast,
passes of at most `max_rows` rows, each trainee's loss over its own answer tokens, the gradients
summed over the processes in one all-reduce (DDP's arithmetic; under FSDP each forward gathers
the layers' shards, and the adapter, whole on every process, is summed the same way), and
AdamW's step."""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..config import TiedLoraError
from ..layer import RowSeeds
from ..loss import answer_tokens, collate, packed_batch
from ..runs import CHECKPOINTS
from .config import TrainConfig
from .data import Data, laid_out, micro_batches, step_batches
from .processes import Processes


class Diverged(TiedLoraError):
    """A non-finite loss or gradient: training stops and the last good checkpoint stays."""


@dataclass
class Trainee:
    """What a step reads and moves of one run: its options, examples, step, optimizer and the
    adapter's trainable tensors."""

    name: str
    cfg: TrainConfig
    data: Data
    step: int
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]


# A pass's rows by trainee: each one's rows of the batch and their examples' dropout seeds. The
# caller's `through(parts)` makes the forward route each trainee's rows through its adapter.
Parts = list[tuple[Trainee, slice, RowSeeds]]
Through = Callable[[Parts], contextlib.AbstractContextManager]
Figures = tuple[float, int, int]  # the step's loss, input tokens and answer tokens


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up over `warmup_steps`, then cosine decay to 0 at `max_steps` (step counts from 0)."""
    if step < cfg.warmup_steps:
        return cfg.peak_lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.peak_lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


def diverged(cfg: TrainConfig, step: int, total: torch.Tensor, params) -> Diverged | None:
    """The error to stop with if step `step`'s loss `total` or a gradient is not finite."""
    bad_loss = not torch.isfinite(total)
    if not bad_loss and all(torch.isfinite(p.grad).all() for p in params if p.grad is not None):
        return None
    what = (
        f"the training loss became {total.item()}"
        if bad_loss
        else f"a gradient became non-finite (loss {total.item():.4g})"
    )
    return Diverged(
        f"{what} at step {step + 1} (lr {lr_at(step, cfg):.3g}); the last good checkpoint stays in "
        f"{Path(cfg.out) / CHECKPOINTS}; lower --lr and start again, or --resume from it."
    )


def step_trainees(
    trainees: list[Trainee], loss_fn, procs: Processes, through: Through, max_rows: int | None = None
) -> dict[str, Figures | Diverged]:
    """One optimizer step of every trainee: each contributes its global batch of this step, cut
    into its micro batches (length-sorted); micro batch j of the step is every trainee's micro
    batch j, in passes of at most `max_rows` rows (default: the largest micro batch, a run alone's
    memory). Returns each trainee's figures, or the Diverged error it stops with (then it did not step)."""
    plans = []
    for t in trainees:
        for group in t.optimizer.param_groups:
            group["lr"] = lr_at(t.step, t.cfg)
        train = t.data.train
        indices = step_batches(len(train), t.cfg, t.step)
        chunks = micro_batches(indices, train, t.cfg, procs.world, procs.rank)  # this process's share
        n_inputs = sum(len(train[i]["input_ids"]) for i in indices)
        plans.append((t, chunks, answer_tokens([train[i] for i in indices]), n_inputs))
    totals = {t.name: torch.zeros((), device=procs.device) for t in trainees}
    # torch's RNG (the base model's own dropout, if it has any): a function of the trainees' seeds
    # and steps, so a resumed run draws the same; the adapters' dropout has each example's own seed
    key = json.dumps([procs.rank] + [(t.cfg.seed, t.step) for t in trainees]).encode()
    loss_fn.train()
    limit = max_rows or max(t.cfg.micro_batch_size for t in trainees)
    for j in range(max(len(chunks) for _, chunks, _, _ in plans)):
        rows = [(t, n_answers, i) for t, chunks, n_answers, _ in plans if j < len(chunks) for i in chunks[j]]
        for c, start in enumerate(range(0, len(rows), limit)):
            torch.manual_seed(zlib.crc32(key + f"/{j}/{c}".encode()))  # distinct for every pass
            forward_backward(rows[start : start + limit], loss_fn, procs, through, totals)
    procs.sum_gradients([p for t in trainees for p in t.params])
    if procs.world > 1:
        summed = torch.stack([totals[t.name] for t in trainees])
        torch.distributed.all_reduce(summed)
        totals = dict(zip((t.name for t in trainees), summed))
    figures: dict[str, Figures | Diverged] = {}
    for t, _, n_answers, n_inputs in plans:
        total = totals[t.name]
        bad = diverged(t.cfg, t.step, total, t.params)
        if bad is not None:
            figures[t.name] = bad
        else:
            t.optimizer.step()
            figures[t.name] = (total.item(), n_inputs, n_answers)
        t.optimizer.zero_grad(set_to_none=True)
    return figures


def forward_backward(
    rows: list[tuple[Trainee, int, int]], loss_fn, procs: Processes, through: Through, totals: dict[str, torch.Tensor]
) -> None:
    """One forward and backward pass over `rows` (trainee, its answer tokens this step, example
    index), each trainee's rows contiguous, each trainee's loss divided by its own answer tokens.
    Each trainee's examples are laid out as alone (`laid_out`: with its --packing end to end in
    rows of its --max_length; the batch is then packed throughout, the others one to a row)."""
    owners: list[tuple[Trainee, int, list[int]]] = []  # each trainee's example indices in this pass
    for t, n_answers, i in rows:
        if not owners or owners[-1][0] is not t:
            owners.append((t, n_answers, []))
        owners[-1][2].append(i)
    laid = [laid_out(chunk, t.data.train, t.cfg, t.step) for t, _, chunk in owners]
    pad = owners[0][0].data.pad
    if any(t.cfg.packing for t, _, _ in owners):
        batch = packed_batch([row for tenant_rows, _ in laid for row in tenant_rows], pad, procs.device)
    else:
        batch = collate([row[0] for tenant_rows, _ in laid for row in tenant_rows], pad, procs.device)
    ends = list(itertools.accumulate(len(tenant_rows) for tenant_rows, _ in laid))
    spans = [slice(end - len(tenant_rows), end) for end, (tenant_rows, _) in zip(ends, laid)]
    parts = [(t, span, seeds) for (t, _, _), span, (_, seeds) in zip(owners, spans, laid)]
    with through(parts), torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=procs.bf16):
        per_row = loss_fn(**batch, per_row=True)
        losses = [per_row[span].sum() / n_answers for (_, n_answers, _), span in zip(owners, spans)]
    torch.stack(losses).sum().backward()
    for (t, _, _), loss in zip(owners, losses):
        totals[t.name] += loss.detach()
