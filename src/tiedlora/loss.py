"""The loss that training and evaluation share: next-token cross-entropy on the answer tokens
only (labels -100 elsewhere), and the batches it reads: padded, or packed end to end."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .tokens import pad_batch


def encode_rows(
    task, rows, tokenizer, max_length: int, too_long: str = "cut", chat: bool = False
) -> tuple[list[dict], int]:
    """Tokenised examples, loss on answer tokens, and how many were longer than `max_length`:
    such an example loses the start of its prompt (the answer is what is learnt), or with
    `too_long="drop"` is left out."""
    examples, long = [], 0
    for row in rows:
        e = task.encode(tokenizer, row, chat)
        extra = len(e["input_ids"]) - max_length
        if extra > 0:
            long += 1
            if too_long == "drop":
                continue
            e = {k: v[extra:] for k, v in e.items()}
        examples.append(e)
    return examples, long


def collate(examples: list[dict], pad: int, device) -> dict:
    """A right-padded batch; padding is masked out of attention and of the loss."""
    input_ids, attention_mask = pad_batch([e["input_ids"] for e in examples], pad, False, device)
    labels, _ = pad_batch([e["labels"] for e in examples], -100, False, device)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def pack_rows(examples: list[dict], width: int) -> list[list[dict]]:
    """`examples` in order, grouped into rows of at most `width` tokens (a longer one alone), to
    be laid end to end by `packed_batch`."""
    rows: list[list[dict]] = [[]]
    for e in examples:
        if rows[-1] and sum(len(x["input_ids"]) for x in rows[-1]) + len(e["input_ids"]) > width:
            rows.append([])
        rows[-1].append(e)
    return rows


def packed_batch(rows: list[list[dict]], pad: int, device) -> dict:
    """Rows of examples (`pack_rows`) laid end to end, no attention mask: positions restart at each
    example, from which transformers builds a mask that keeps every example to itself. An
    example's first token predicts nothing across the seam (its label is -100), and a row is filled
    up to the longest with one padding "example" whose labels are -100."""
    length = max(sum(len(e["input_ids"]) for e in row) for row in rows)
    ids, labels, positions = [], [], []
    for row in rows:
        gap = length - sum(len(e["input_ids"]) for e in row)
        filler = [{"input_ids": [pad] * gap, "labels": [-100] * gap}] if gap else []
        ids.append([t for e in row + filler for t in e["input_ids"]])
        labels.append([t for e in row + filler for t in [-100, *e["labels"][1:]]])
        positions.append([p for e in row + filler for p in range(len(e["input_ids"]))])
    tensor = torch.tensor
    return {
        "input_ids": tensor(ids, device=device),
        "labels": tensor(labels, device=device),
        "position_ids": tensor(positions, device=device),
        "attention_mask": None,
    }


class TokenLoss(nn.Module):
    """Summed next-token loss over the answer tokens, with the output head applied only where
    there is a loss: on a 49k-word vocabulary the head is a fifth of the model's work. Used as
    the module that DDP wraps, so its forward is the one that synchronises gradients."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model: Any = model  # a transformers causal LM: its base_model and output head are used

    def forward(self, input_ids, attention_mask, labels, position_ids=None, per_row: bool = False):
        """The loss summed over the batch, or with `per_row` each row's sum (rows of a joint
        batch belong to different tenants, each normalised by its own answer tokens)."""
        hidden = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])
        if not per_row:
            return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
        losses = F.cross_entropy(logits.float(), targets[keep], reduction="none")
        rows = keep.nonzero()[:, 0]
        return losses.new_zeros(len(input_ids)).index_add(0, rows, losses)


def answer_tokens(examples: list[dict]) -> int:
    return sum(sum(1 for t in e["labels"][1:] if t != -100) for e in examples)


@torch.no_grad()
def mean_loss(loss_fn, examples: list[dict], pad: int, batch_size: int, device) -> float:
    """Mean loss per answer token over `examples`, in length-sorted batches."""
    total = 0.0
    ordered = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
    for start in range(0, len(ordered), batch_size):
        chunk = [examples[i] for i in ordered[start : start + batch_size]]
        total += loss_fn(**collate(chunk, pad, device)).item()
    return total / max(1, answer_tokens(examples))
