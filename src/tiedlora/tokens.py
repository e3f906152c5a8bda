"""How a prompt becomes tokens, the one place training, evaluation and serving share: the pad
token, a conversation in the chat template, the tokens before an answer, and batches of token
lists padded to one length.

Batches for generation are left-padded, so every row's next token sits in the last column;
positions count from each row's first real token, so padding changes nothing.
"""

from __future__ import annotations

import torch

from .config import TiedLoraError


def pad_id(tokenizer) -> int:
    """The tokenizer's pad token, or EOS where it has none (GPT-2, Llama)."""
    return tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id


def chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """The tokens of a conversation in the tokenizer's chat template, by default ready for the
    assistant's next turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise TiedLoraError(
            f"Chat prompts need a chat template, and the tokenizer {type(tokenizer).__name__} has no chat template; "
            "use chat=False (plain prompts, or prompt/completion rows)."
        )
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def prompt_ids(tokenizer, prompt: str, chat: bool = False) -> list[int]:
    """The tokens before the answer: the prompt, or with `chat` the prompt as the user turn.
    Training and generation both call this, so the model is asked exactly as it was taught."""
    return chat_ids(tokenizer, [{"role": "user", "content": prompt}]) if chat else tokenizer(prompt)["input_ids"]


def pad_batch(seqs: list[list[int]], pad: int, left: bool, device) -> tuple[torch.Tensor, torch.Tensor]:
    """input_ids and attention_mask of token lists padded to one length."""
    width = max(map(len, seqs))
    ids = [[pad] * (width - len(s)) + s if left else s + [pad] * (width - len(s)) for s in seqs]
    mask = [[0] * (width - len(s)) + [1] * len(s) if left else [1] * len(s) + [0] * (width - len(s)) for s in seqs]
    return torch.tensor(ids, device=device), torch.tensor(mask, device=device)
