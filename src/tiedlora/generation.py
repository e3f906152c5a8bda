"""Evaluation's generation: batches of greedy completions by transformers' generate, each answer
ending at EOS or after `max_new_tokens`. (The server decodes its own way: serve/batch.py.)"""

from __future__ import annotations

import torch

from .tokens import pad_batch, pad_id, prompt_ids


def generate(
    model,
    tokenizer,
    prompts: list[str],
    max_new_tokens: int = 500,
    batch_size: int = 8,
    chat: bool = False,
    progress: bool = True,
) -> list[str]:
    """Greedy completions of `prompts`, in their order (see `generate_ids`)."""
    ids = [prompt_ids(tokenizer, p, chat) for p in prompts]
    return generate_ids(model, tokenizer, ids, max_new_tokens, batch_size, progress)


@torch.no_grad()
def generate_ids(
    model, tokenizer, ids: list[list[int]], max_new_tokens: int = 500, batch_size: int = 8, progress: bool = True
) -> list[str]:
    """Greedy completions of tokenised prompts, in their order, by transformers' generate.
    Batches are filled longest prompt first so they waste little on padding. Decoding stops at
    EOS or `max_new_tokens`; no other stop string is assumed. The model runs in eval mode and is
    given back in the mode it came in."""
    from tqdm.auto import tqdm
    from transformers import GenerationConfig

    pad = pad_id(tokenizer)
    greedy = GenerationConfig(
        do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id, pad_token_id=pad
    )
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    answers = [""] * len(ids)
    training = model.training
    model.eval()
    with tqdm(total=len(ids), desc="generate", unit="row", disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            input_ids, mask = pad_batch([ids[i] for i in rows], pad, True, model.device)
            out = model.generate(input_ids=input_ids, attention_mask=mask, generation_config=greedy)
            for i, new in zip(rows, out[:, input_ids.shape[1] :]):
                answers[i] = tokenizer.decode(new, skip_special_tokens=True).strip()
            bar.update(len(rows))
    model.train(training)
    return answers
