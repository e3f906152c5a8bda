"""Scoring a model on a task as the paper does: greedy decoding of at most 500 new tokens, each
answer ending at EOS (`generate`, from decoding.py); and HellaSwag's cheaper log-likelihood
scorer. The model runs in eval mode and is given back in the mode it came in."""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .decoding import generate, generate_ids, pad_batch, pad_id
from .tasks import Task

__all__ = ["choice_loglik", "evaluate", "generate", "loglik"]


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
    ids = [task.prompt_ids(tokenizer, r, chat) for r in rows]
    predictions = generate_ids(model, tokenizer, ids, max_new_tokens, batch_size, progress)
    return {**task.score(predictions, rows), "predictions": predictions}


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


def choice_loglik(model, tokenizer, task: Task, rows: list[dict], batch_size: int = 8) -> dict:
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


def evaluate_own(
    model,
    tokenizer,
    task,
    rows: list[dict],
    max_new_tokens: int = 500,
    batch_size: int = 8,
    chat: bool = False,
    samples: int = 5,
    progress: bool = True,
    max_length: int = 1024,
    too_long: str = "cut",
) -> dict:
    """Own data: the loss per answer token and its perplexity on `rows` always; the metric the
    data was given (`task.metric`) on answers generated for every row, or else generations for
    the first `samples` rows only; then "predictions". Rows longer than `max_length` are cut
    or dropped from the loss as in training."""
    from .loss import TokenLoss, encode_rows, mean_loss

    examples, _ = encode_rows(task, rows, tokenizer, max_length, too_long, chat)
    training = model.training
    loss_fn = TokenLoss(model).eval()
    loss = mean_loss(loss_fn, examples, pad_id(tokenizer), batch_size, model.device)
    model.train(training)
    scored = evaluate(
        model, tokenizer, task, rows if task.metric else rows[:samples], max_new_tokens, batch_size, chat, progress
    )  # without a metric, the task scores nothing: the generations are samples
    predictions = scored.pop("predictions")
    return {**scored, "loss": loss, "perplexity": math.exp(loss), "predictions": predictions}
