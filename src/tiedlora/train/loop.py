"""One run, top to bottom: `train` reads as the recipe's steps."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..adapter_file import load, save
from ..layer import row_seeds
from ..loss import TokenLoss, mean_loss
from ..model import apply, trainable_parameters
from ..quantize import quantize
from ..runs import BEST, RESULTS, read_json, write_json, write_jsonl
from .checkpoints import Checkpoints, TrainState, resume_state
from .config import TrainConfig
from .data import Data, load_data
from .folder import Log, prepare_folder, versions
from .processes import Processes
from .step import Diverged, Figures, Trainee, lr_at, step_trainees

if TYPE_CHECKING:
    from ..evaluate import Scorer
    from ..tasks import TaskLike


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
    # The module whose forward scores the adapter: `model` itself, or for a tenant of a joint
    # run the shared base model with every row routed through the tenant's adapter.
    scored_on: nn.Module | None = None

    def scorer(self) -> Scorer:
        """The model with the run's decoding options and its --max_length and --too_long."""
        from ..evaluate import Scorer

        cfg = self.cfg
        return Scorer(
            self.model if self.scored_on is None else self.scored_on,
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


def train_step(run: Run, loss_fn, optimizer, params, step: int) -> Figures:
    """One optimizer step of a run alone: the one step (`step.step_trainees`) of one trainee, its
    examples' dropout seeds set for the model's adapted layers; returns (loss, input tokens,
    answer tokens)."""
    trainee = Trainee(run.folder.name, run.cfg, run.data, step, optimizer, params)
    outcome = step_trainees([trainee], loss_fn, run.procs, lambda parts: row_seeds(parts[0][2]))[trainee.name]
    if isinstance(outcome, Diverged):
        raise outcome
    return outcome


def validate(run: Run, loss_fn, state: TrainState) -> dict:
    """Validation loss (and the headline metric if asked); keeps the best adapter and counts
    validations without improvement for early stopping. Returns the log's validation columns."""
    from tqdm.auto import tqdm

    cfg, data, procs = run.cfg, run.data, run.procs
    loss_fn.eval()
    step = state.step
    val_loss = mean_loss(loss_fn, data.val, data.pad, cfg.micro_batch_size, procs.device)
    headline, metric = "", None
    if cfg.val_metric or cfg.early_stop_on == "metric":
        headline, metric = next(iter(run.score(data.val_rows[: cfg.val_rows]).items()))
    value = -metric if metric is not None and cfg.early_stop_on == "metric" else val_loss
    if state.best is None or value < state.best:
        state.best, state.best_step, state.bad_evals = value, step, 0
        if procs.main:
            save(run.model, run.folder / BEST)
    else:
        state.bad_evals += 1
        if state.bad_evals >= cfg.patience:
            state.stopped = f"early stop: no better validation {cfg.early_stop_on} in {cfg.patience} validations"
    if not run.quiet and procs.main:
        tqdm.write(
            f"step {step}: validation loss {val_loss:.4f}"
            + (f", {headline} {metric:.2f}" if metric is not None else "")
            + (" (best)" if state.best_step == step else "")
        )
    return {"val_loss": round(val_loss, 6), "val_metric": "" if metric is None else metric}


def test_and_record(run: Run, state: TrainState, started: float) -> dict:
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
        "config": cfg.preset,
        "rank": cfg.rank,
        "model": cfg.model,
        "params": trainable_parameters(run.model),
        "metrics": scores,
        "steps": state.step,
        "best_step": state.best_step,
        "validation": {"on": cfg.early_stop_on, "best": abs(state.best) if state.best is not None else None},
        "stopped": state.stopped or "max_steps",
        "train_tokens": state.tokens,
        "train_time_s": round(state.elapsed_s, 1),
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


def long_examples(data: Data, cfg: TrainConfig) -> str:
    """The line that says how many training examples exceed --max_length, and what became of them."""
    fate = "they were left out (--too_long drop)" if cfg.too_long == "drop" else "their prompts were cut from the start"
    total = len(data.train) + (data.long if cfg.too_long == "drop" else 0)
    return f"tiedlora train: {data.long} of {total} training examples exceed --max_length {cfg.max_length}; {fate}."


def record_step(
    run: Run, loss_fn, optimizer, checkpoints: Checkpoints, log: Log, state: TrainState, figures: tuple
) -> tuple[dict, bool]:
    """After an optimizer step (`figures`: its loss, input and answer tokens, seconds): the state
    moves on, validation runs when due, the log gets its row and a checkpoint is written when
    due; the same for a run alone and for each tenant of a joint one. Returns the log's row, and
    whether a checkpoint was written."""
    cfg = run.cfg
    loss, n_inputs, n_answers, dt = figures
    state.step += 1
    state.tokens += n_answers
    state.elapsed_s += dt
    step = state.step
    row = {
        "step": step,
        "loss": round(loss, 6),
        "lr": lr_at(step - 1, cfg),
        "tokens_per_s": round(n_inputs / dt, 1),
        "val_loss": "",
        "val_metric": "",
        "elapsed_s": round(state.elapsed_s, 2),
    }
    if step % cfg.val_every == 0 or step == cfg.max_steps:
        row.update(validate(run, loss_fn, state))
    log.write(**row)
    checkpoint_every = cfg.checkpoint_every or cfg.val_every
    due = step % checkpoint_every == 0 or step == cfg.max_steps or state.stopped is not None
    if due and run.procs.main:
        checkpoints.write(run.model, optimizer, state)
    return row, due and run.procs.main


def train(cfg: TrainConfig, *, resume: bool = False, quiet: bool = False, base=None) -> dict:
    """Train, keep the best adapter, score it on the test split; returns results.json's content.
    `base` = (model, tokenizer) already loaded for cfg.model: a copy is trained, so a sweep
    loads its model once rather than once per cell."""
    from tqdm.auto import tqdm

    from ..models import load_model

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
        print(long_examples(data, cfg))

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
    checkpoints = Checkpoints(folder)
    state = resume_state(checkpoints, resume, model, optimizer, cfg, procs.main)
    loss_fn = TokenLoss(procs.place(model))
    run = Run(cfg, model, tokenizer, task, data, procs, folder, quiet)
    log = Log(folder, state.step, procs.main)
    bar = tqdm(
        total=cfg.max_steps,
        initial=state.step,
        desc=f"{cfg.task} {cfg.preset} r{cfg.rank}",
        unit="step",
        disable=quiet or not procs.main,
        dynamic_ncols=True,
    )
    try:
        while state.step < cfg.max_steps and state.stopped is None:
            t0 = time.time()
            loss, n_inputs, n_answers = train_step(run, loss_fn, optimizer, params, state.step)
            dt = time.time() - t0
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr_at(state.step, cfg):.2e}", tok_s=f"{n_inputs / dt:.0f}")
            record_step(run, loss_fn, optimizer, checkpoints, log, state, (loss, n_inputs, n_answers, dt))
            procs.accelerator.wait_for_everyone()
    finally:
        bar.close()
        log.close()

    if not (procs.main or procs.fsdp):  # sharded layers need every process in every forward
        return {}
    results = test_and_record(run, state, started)
    return results if procs.main else {}
