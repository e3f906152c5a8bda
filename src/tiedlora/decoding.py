"""Decoding, in one place: how a prompt becomes tokens, batches of greedy completions for
evaluation (transformers' generate does that), and the step loop the server runs, where each
row has its own sampling options, seed and stop strings and its text streams out as it grows.

Batches are left-padded, so every row's next token sits in the last column; positions count
from each row's first real token, so padding changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

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


@dataclass
class Sampling:
    """One request's decoding options, OpenAI's meanings: temperature 0 is greedy, else nucleus
    sampling over the smallest set of tokens reaching `top_p`, seeded when `seed` is given."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


class Sequence:
    """One row being decoded: its prompt, its tokens so far, how much of its text was emitted,
    and why it finished ("stop", "length", "cancelled"; None while running)."""

    def __init__(self, prompt: list[int], sampling: Sampling):
        self.prompt, self.sampling = prompt, sampling
        self.tokens: list[int] = []
        self.sent = 0
        self.finish: str | None = None
        self.cancelled = False  # set from outside (the client went away): the row ends at the next step
        self.generator: torch.Generator | None = None

    def seed(self, device) -> None:
        """A generator of its own, so a seeded request samples the same text in any batch."""
        if self.sampling.temperature > 0:
            self.generator = torch.Generator(device)
            if self.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.sampling.seed)

    def add(self, token: int, tokenizer) -> str:
        """Take the next token and return the text that can be emitted now, holding back an
        unfinished character and any ending that could still grow into a stop string."""
        stop = self.sampling.stop
        if self.cancelled:
            self.finish = "cancelled"
            return ""
        if token == tokenizer.eos_token_id:
            self.finish = "stop"
        else:
            self.tokens.append(token)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in stop if s in text]
        if hits:
            text, self.finish = text[: min(hits)], "stop"
        elif self.finish is None and len(self.tokens) >= self.sampling.max_tokens:
            self.finish = "length"
        if self.finish is None:
            text = text.rstrip("\ufffd")
            held = max([n for s in stop for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
            text = text[: len(text) - held]
        delta = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return delta


def pick(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """Each row's next token: greedy, or nucleus sampling with the row's own generator."""
    tokens = logits.argmax(-1)
    for i, seq in enumerate(seqs):
        if seq.generator is None or seq.finish is not None:
            continue
        probs = (logits[i] / seq.sampling.temperature).softmax(-1)
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < seq.sampling.top_p  # the smallest set reaching top_p
        tokens[i] = order[torch.multinomial(sorted_probs * keep, 1, generator=seq.generator)]
    return tokens


@torch.no_grad()
def decode(model, tokenizer, seqs: list[Sequence], emit: Callable[[Sequence, str], None], **model_kwargs) -> None:
    """Decode `seqs` together with a KV cache until every one has finished: a left-padded
    prefill, then one token per row per step. `emit(seq, text)` receives each row's new text as
    it is produced, and is called once more, with what is left, when the row finishes.
    `model_kwargs` go to every forward (the multi-adapter model's `adapter_ids`)."""
    device = next(model.parameters()).device
    for seq in seqs:
        seq.seed(device)
    input_ids, mask = pad_batch([s.prompt for s in seqs], pad_id(tokenizer), True, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(
        input_ids=input_ids,
        attention_mask=mask,
        position_ids=positions,
        use_cache=True,
        logits_to_keep=1,
        **model_kwargs,
    )
    while True:
        tokens = pick(out.logits[:, -1].float(), seqs)
        for seq, token in zip(seqs, tokens.tolist()):
            if seq.finish is None:
                text = seq.add(token, tokenizer)
                if text or seq.finish is not None:
                    emit(seq, text)
        if all(s.finish is not None for s in seqs):
            return
        mask = torch.cat([mask, mask.new_ones(len(seqs), 1)], dim=1)
        positions = positions[:, -1:] + 1
        out = model(
            input_ids=tokens[:, None],
            attention_mask=mask,
            position_ids=positions,
            past_key_values=out.past_key_values,
            use_cache=True,
            **model_kwargs,
        )
