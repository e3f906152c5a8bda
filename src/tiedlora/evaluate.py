"""Scoring a model on a task as the paper does: greedy decoding of at most 500 new tokens, each
answer ending at EOS (`generate`, from generation.py); the loss on the answer tokens (own data);
HellaSwag's cheaper log-likelihood scorer; and `tiedlora eval` (`EvalConfig`, `evaluate_adapter`).
The model runs in eval mode and is given back in the mode it came in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from .config import TiedLoraError
from .generation import generate, generate_ids
from .loss import TokenLoss, encode_rows, mean_loss
from .models import SMOLLM2, load_model
from .runs import open_adapter, write_json
from .tasks import TaskLike, task_for
from .tasks.own import OwnDataOptions
from .tokens import pad_batch, pad_id

__all__ = ["EvalConfig", "Scorer", "choice_loglik", "evaluate", "evaluate_adapter", "generate", "loglik"]


@dataclass
class Scorer:
    """A model and the options it is scored with: greedy decoding (`scores`) and the loss on the
    answer tokens (`loss`; examples longer than `max_length` are cut or dropped as in training).
    Which of the two a task's test is, the task says (`TaskLike.test`)."""

    model: Any
    tokenizer: Any
    max_new_tokens: int = 500
    batch_size: int = 8  # prompts per generation batch, and examples per loss batch
    chat: bool = False
    progress: bool = True
    max_length: int = 1024
    too_long: str = "cut"

    def scores(self, task: TaskLike, rows: list[dict]) -> dict:
        """`task.score` of the answers generated for `rows`, headline first, then "predictions"."""
        ids = [task.prompt_ids(self.tokenizer, r, self.chat) for r in rows]
        predictions = generate_ids(self.model, self.tokenizer, ids, self.max_new_tokens, self.batch_size, self.progress)
        return {**task.score(predictions, rows), "predictions": predictions}

    def loss(self, task: TaskLike, rows: list[dict]) -> float:
        """The mean loss per answer token of `rows` as `task` encodes them for training."""
        examples, _ = encode_rows(task, rows, self.tokenizer, self.max_length, self.too_long, self.chat)
        training = self.model.training
        loss = mean_loss(
            TokenLoss(self.model).eval(), examples, pad_id(self.tokenizer), self.batch_size, self.model.device
        )
        self.model.train(training)
        return loss


def evaluate(
    model,
    tokenizer,
    task,
    rows: list[dict],
    max_new_tokens: int = 500,
    batch_size: int = 8,
    chat: bool = False,
    progress: bool = True,
) -> dict:
    """The scores of `task` (one of the paper's, or own data) on `rows`, headline first, then
    "predictions": the generated answers."""
    return Scorer(model, tokenizer, max_new_tokens, batch_size, chat, progress).scores(task, rows)


@torch.no_grad()
def loglik(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8) -> list[float]:
    """The summed log-probability of each continuation given its context, from right-padded batches."""
    ids = [(tokenizer(c)["input_ids"], tokenizer(e, add_special_tokens=False)["input_ids"]) for c, e in pairs]
    out = []
    training = model.training
    model.eval()
    for start in tqdm(range(0, len(ids), batch_size), desc="log-likelihood", unit="batch"):
        batch = ids[start : start + batch_size]
        input_ids, mask = pad_batch([c + e for c, e in batch], 0, False, model.device)
        logprobs = model(input_ids=input_ids, attention_mask=mask).logits.float().log_softmax(-1)
        for row, (c, e) in zip(logprobs, batch):
            # The logits at position t predict token t + 1.
            out.append(row[torch.arange(len(c) - 1, len(c) + len(e) - 1), torch.tensor(e)].sum().item())
    model.train(training)
    return out


def choice_loglik(model, tokenizer, task: TaskLike, rows: list[dict], batch_size: int = 8) -> dict:
    """Multiple choice by likelihood, as lm-evaluation-harness scores HellaSwag: "acc" picks the
    ending with the highest summed log-probability after the context, "acc_norm" the highest
    per character of the ending. Both on 0-100. `task` needs `choices(row)` (HellaSwag has it)."""
    items = [task.choices(r) for r in rows]
    scores = loglik(model, tokenizer, [(c, e) for c, endings, _ in items for e in endings], batch_size)
    acc = acc_norm = 0
    for _, endings, label in items:
        ll, scores = scores[: len(endings)], scores[len(endings) :]
        acc += max(range(len(ll)), key=lambda k: ll[k]) == label
        acc_norm += max(range(len(ll)), key=lambda k: ll[k] / len(endings[k])) == label
    return {"acc": 100 * acc / len(rows), "acc_norm": 100 * acc_norm / len(rows)}


@dataclass
class EvalConfig(OwnDataOptions):
    """Every option of `tiedlora eval`."""

    task: str | None = None
    """The task (or --data)."""
    data: str | None = None
    """Your own data, every row scored: a .jsonl, .csv or .parquet file, or a Hub data set name."""
    adapter: str | None = None
    """A run folder (runs/x) or an adapter folder."""
    split: str = "test"
    """train, validation or test (with --data and a Hub data set: its split)."""
    limit: int | None = None
    """Score only the first N rows."""
    model: str | None = None
    """The base model (default: the run's, or smollm2-135m)."""
    base: bool = False
    """Score the base model without the adapter."""
    max_new_tokens: int = 500
    """Greedy decoding stops at EOS or after this many tokens."""
    batch_size: int = 16
    """Prompts per generation batch."""
    loglik: bool = False
    """HellaSwag: score choices by log-likelihood instead."""
    source: str | None = None
    """Data source (default: the run's, or bundled)."""
    chat: bool = False
    """Use the chat template."""
    max_length: int = 1024
    """With --data: longer examples lose the start of their prompt in the loss."""
    samples: int = 5
    """With --data and no --metric: generate answers for this many rows."""
    out: str | None = None
    """Also write the scores to this JSON file."""

    def __post_init__(self):
        if (self.task is None) == (self.data is None):
            raise TiedLoraError("eval needs one of --task (a paper task) or --data (your own rows).")
        if self.adapter is None and not self.base:
            raise TiedLoraError(
                "eval needs --adapter runs/x (or an adapter folder), or --base to score the model alone."
            )

    def task_data(self) -> TaskLike:
        """The task scored; with --data, --split names the Hub split read (test: its train split)."""
        return task_for(
            self.task,
            self.data,
            split="train" if self.split == "test" else self.split,
            **self.own_options(),
            samples=self.samples,
        )


def evaluate_adapter(cfg: EvalConfig) -> dict:
    """`tiedlora eval`: the adapter (a run folder's best/, or an adapter folder; or the base model
    alone) scored by its task's test (`TaskLike.test`) or by log-likelihood, on the first `limit`
    of the task's evaluation rows; written to `out` if given, and returned."""
    if cfg.adapter is None:
        model, tokenizer = load_model(cfg.model or SMOLLM2)
        run = None
    else:
        model, tokenizer, run = open_adapter(cfg.adapter, cfg.model, cfg.base)
    task = cfg.task_data()
    rows = task.eval_rows(cfg.split, cfg.source if cfg.source else (run or {}).get("source", "bundled"))
    picked = rows[: cfg.limit]
    if cfg.loglik:
        scores = choice_loglik(model, tokenizer, task, picked)
    else:
        scorer = Scorer(model, tokenizer, cfg.max_new_tokens, cfg.batch_size, cfg.chat, max_length=cfg.max_length)
        scores = task.test(scorer, picked)
    scores.pop("predictions", None)
    result = {
        "task": task.name,
        "split": cfg.split,
        "rows": len(picked),
        "adapter": None if cfg.base else cfg.adapter,
        "data": rows.info,
        "metrics": scores,
    }
    if cfg.out:
        write_json(Path(cfg.out), result)
    return result
