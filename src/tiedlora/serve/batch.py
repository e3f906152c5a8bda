"""The server's continuous batch: rows join and leave at every step, each with its own sampling
options, seed, stop strings and KV cache, and its text streams out as it grows. The batch is
left-padded, so every row's next token sits in the last column; positions count from each row's
first real token, so padding changes nothing.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

# per token: it, its logprob and the top alternatives; the prompt's first token, scored by nothing, has None and None
Logprobs = list[tuple[int, float | None, list[tuple[int, float]] | None]]


@dataclass
class Sampling:
    """One request's decoding options, OpenAI's meanings: temperature 0 is greedy, else nucleus
    sampling over the smallest set of tokens reaching `top_p`, seeded when `seed` is given;
    `logprobs` asks for each token's log-probability and that many top alternatives;
    `prompt_logprobs` (echo with logprobs) for the prompt's tokens too, before the generated
    ones, and then `max_tokens` may be 0: the prompt is scored, nothing is generated."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    logprobs: int | None = None
    prompt_logprobs: bool = False


class StopMatch:
    """Where the text first holds a stop string, found in one pass as the text grows (one
    Knuth-Morris-Pratt automaton per string), so a long stop string or a long answer costs
    time linear in the text, not its square; `held` is how much of the end could still grow
    into a stop string, the text to keep back from the client for now."""

    def __init__(self, stops: list[str]):
        self.stops = stops
        self.failure = [self.failure_of(s) for s in stops]
        self.state = [0] * len(stops)  # per string: the longest prefix of it that ends the text read
        self.read = 0

    @staticmethod
    def failure_of(s: str) -> list[int]:
        """failure[k]: the longest proper prefix of s[: k + 1] that is also its suffix."""
        failure, k = [0] * len(s), 0
        for i in range(1, len(s)):
            while k and s[i] != s[k]:
                k = failure[k - 1]
            if s[i] == s[k]:
                k += 1
            failure[i] = k
        return failure

    def feed(self, text: str) -> int | None:
        """Read `text` past what was read before; where the first stop string found starts, or None."""
        for at in range(self.read, len(text)):
            char = text[at]
            for i, s in enumerate(self.stops):
                k = self.state[i]
                while k and s[k] != char:
                    k = self.failure[i][k - 1]
                k = k + 1 if s[k] == char else 0
                if k == len(s):
                    self.read = at + 1
                    return at + 1 - len(s)
                self.state[i] = k
        self.read = len(text)
        return None

    @property
    def held(self) -> int:
        return max(self.state, default=0)


class Sequence:
    """One row being decoded: its prompt, its tokens so far (with their log-probabilities when
    asked), the text emitted, and why it finished ("stop", "length", "cancelled", "error"; None
    while running)."""

    def __init__(self, prompt: list[int], sampling: Sampling):
        self.prompt, self.sampling = prompt, sampling
        self.tokens: list[int] = []
        self.logprobs: Logprobs = []
        self.text = ""
        self.finish: str | None = None
        self.error: str | None = None
        self.cancelled = False  # set from outside (the client went away): the row ends at the next step
        self.generator: torch.Generator | None = None
        self.stops = StopMatch(sampling.stop)

    def seed(self, device) -> None:
        """A generator of its own, so a seeded request samples the same text in any batch."""
        if self.sampling.temperature > 0:
            self.generator = torch.Generator(device)
            if self.sampling.seed is None:
                self.generator.seed()
            else:
                self.generator.manual_seed(self.sampling.seed)

    def fail(self, why: str) -> None:
        self.finish, self.error = "error", why

    def add(self, token: int, tokenizer) -> str:
        """Take the next token and return the text that can be emitted now, holding back an
        unfinished character and any ending that could still grow into a stop string."""
        if token == tokenizer.eos_token_id:
            self.finish = "stop"
        else:
            self.tokens.append(token)
        text = tokenizer.decode(self.tokens, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        if self.finish is None:
            text = text.rstrip("\ufffd")
        at = self.stops.feed(text)
        if at is not None:
            text, self.finish = text[:at], "stop"
        elif self.finish is None and len(self.tokens) >= self.sampling.max_tokens:
            self.finish = "length"
        end = len(text) if self.finish is not None else len(text) - self.stops.held
        delta = text[len(self.text) : max(end, len(self.text))]
        self.text += delta
        return delta


def pick(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """Each row's next token: greedy, or nucleus sampling with the row's own generator. A row
    whose scores are not finite, or whose sampling fails, ends with an error; the others go on.
    Sampling shifts the scores by their maximum before dividing by the temperature, in float64,
    so any temperature above 0 gives a distribution (a tiny one is greedy); the mass before the
    most likely token is exactly 0, so any top_p above 0 (in float64: 5e-324) keeps that one."""
    finite = torch.isfinite(logits).all(-1).tolist()
    tokens = logits.argmax(-1).tolist()
    wanted = [s.sampling.logprobs for s in seqs if s.sampling.logprobs is not None]
    scores = logits.float().log_softmax(-1) if wanted else None
    top = scores.topk(max(wanted), -1) if scores is not None and max(wanted) > 0 else None
    for i, seq in enumerate(seqs):
        if seq.finish is not None:
            continue
        if not finite[i]:
            seq.fail("the model's scores for this request are not finite (NaN or infinite); its adapter is broken")
            continue
        try:
            if seq.generator is not None:
                z = logits[i].double()
                probs = ((z - z.max()) / seq.sampling.temperature).softmax(-1)
                sorted_probs, order = probs.sort(descending=True)
                keep = sorted_probs.cumsum(-1) - sorted_probs < seq.sampling.top_p  # the smallest set reaching top_p
                tokens[i] = int(order[torch.multinomial(sorted_probs * keep, 1, generator=seq.generator)])
            if seq.sampling.logprobs is not None and scores is not None:
                k = seq.sampling.logprobs
                alternatives = [] if top is None else list(zip(top.indices[i, :k].tolist(), top.values[i, :k].tolist()))
                seq.logprobs.append((tokens[i], float(scores[i, tokens[i]]), alternatives))
        except (RuntimeError, ValueError) as e:
            seq.fail(f"sampling failed for this request ({type(e).__name__}: {e})")
    return tokens


def score_prompt(seq: Sequence, logits: torch.Tensor, done: int, stop: int) -> None:
    """Add to `seq.logprobs` the log-probabilities of the prompt's tokens that the logits of its
    positions `done` to `stop - 1` (one prefill chunk) predict: position k predicts token k + 1,
    so a chunk's last position scores the next chunk's first token, and the prompt's last
    position is left to `pick`, which scores the first generated token. The first token, which
    nothing predicts, has None. Non-finite scores fail the row, as in `pick`."""
    if done == 0:
        seq.logprobs.append((seq.prompt[0], None, None))
    targets = seq.prompt[done + 1 : stop + 1]
    if not targets:
        return
    logits = logits[: len(targets)]
    if not bool(torch.isfinite(logits).all()):
        seq.fail("the model's scores for this request's prompt are not finite (NaN or infinite); its adapter is broken")
        return
    scores = logits.log_softmax(-1)
    chosen = scores.gather(-1, torch.tensor(targets, device=scores.device)[:, None])[:, 0].tolist()
    k = seq.sampling.logprobs or 0
    top = scores.topk(k, -1) if k > 0 else None
    ids, values = ([], []) if top is None else (top.indices.tolist(), top.values.tolist())
    for i, (token, logprob) in enumerate(zip(targets, chosen)):
        seq.logprobs.append((token, logprob, list(zip(ids[i], values[i])) if top is not None else []))


Emit = Callable[[Sequence, str], None]


class Batch:
    """Continuous batching: the rows decoding together, each with its own KV cache, joined into
    one left-padded batch cache (transformers' DynamicCache, its tensors concatenated along the
    batch) so every step is one forward for all of them, whatever their lengths.

    A new row is prefilled alone, its prompt in chunks of at most `chunk` tokens, at most
    `budget` prompt tokens between two decode steps, so a long prompt never stalls the running
    rows for long; once its prompt is read it picks its first token and joins the batch. A row
    asking for its prompt's logprobs has them from the logits of the same prefill, chunk by
    chunk (only such a prefill keeps the logits of every position, not the last one alone). A row
    leaves the batch as soon as it finishes, and the cache's columns only padding fill are cut.
    `emit(seq, text)` receives each row's new text, and is called once more when it finishes.
    `row_kwargs(rows)` are extra forward arguments for those rows (the multi-adapter model's
    `adapter_ids`). A failing prefill fails its row alone; a failing decode step its rows."""

    def __init__(self, model, tokenizer, emit: Emit, row_kwargs: Callable[[list], dict] | None = None, chunk=256):
        self.model, self.tokenizer, self.emit = model, tokenizer, emit
        self.row_kwargs = row_kwargs or (lambda rows: {})
        self.chunk = chunk
        self.device = next(model.parameters()).device
        self.rows: list[Sequence] = []
        self.next_tokens: list[int] = []
        self.cache: Any = None  # a transformers DynamicCache
        self.mask: torch.Tensor | None = None  # rows x cache columns: 1 where a column is the row's
        self.pending: deque[Sequence] = deque()  # prefilling, first one first
        self.partial: dict[int, tuple[Any, int]] = {}  # id(seq) -> (its cache so far, prompt tokens read)

    def __len__(self) -> int:
        return len(self.rows) + len(self.pending)

    def add(self, seq: Sequence) -> None:
        seq.seed(self.device)
        self.pending.append(seq)

    @torch.no_grad()
    def prefill(self, budget: int) -> None:
        """Read up to `budget` prompt tokens of the waiting rows, first come first."""
        while self.pending and budget > 0:
            seq = self.pending[0]
            cache, done = self.partial.pop(id(seq), (None, 0))
            if seq.cancelled:
                self.pending.popleft()
                self.end(seq, "cancelled")
                continue
            stop = min(len(seq.prompt), done + min(self.chunk, budget))
            try:
                out = self.model(
                    input_ids=torch.tensor([seq.prompt[done:stop]], device=self.device),
                    attention_mask=torch.ones(1, stop, dtype=torch.long, device=self.device),
                    position_ids=torch.arange(done, stop, device=self.device)[None],
                    past_key_values=cache,
                    use_cache=True,
                    logits_to_keep=0 if seq.sampling.prompt_logprobs else 1,  # 0: every position's
                    **self.row_kwargs([seq]),
                )
                if seq.sampling.prompt_logprobs:
                    score_prompt(seq, out.logits[0].float(), done, stop)
            except Exception as e:  # noqa: BLE001 - whatever broke, only this row fails
                self.pending.popleft()
                seq.fail(f"its prefill failed ({type(e).__name__}: {e})")
                self.end(seq)
                continue
            if seq.finish is not None:  # its prompt's scores are not finite
                self.pending.popleft()
                self.end(seq)
                continue
            budget -= stop - done
            if stop < len(seq.prompt):
                self.partial[id(seq)] = (out.past_key_values, stop)
                continue
            self.pending.popleft()
            if seq.sampling.max_tokens == 0:  # the prompt scored, nothing to generate
                self.end(seq, "length")
                continue
            token = self.take(seq, pick(out.logits[:, -1].float(), [seq])[0])
            if seq.finish is None:
                self.join(seq, out.past_key_values, token)

    def take(self, seq: Sequence, token: int) -> int:
        """Give `seq` its token (unless picking it failed) and emit what it produced."""
        text = ""
        if seq.finish is None:
            try:
                text = seq.add(token, self.tokenizer)
            except Exception as e:  # noqa: BLE001 - a stop-string or detokenizer fault ends this row only
                seq.fail(f"its text could not be decoded ({type(e).__name__}: {e})")
        if text or seq.finish is not None:
            self.emit(seq, text)
        return token

    def end(self, seq: Sequence, finish: str | None = None) -> None:
        seq.finish = seq.finish or finish
        self.emit(seq, "")

    def join(self, seq: Sequence, cache, token: int) -> None:
        """Put a prefilled row in the batch: both caches left-padded to the longer, then stacked."""
        own = torch.ones(1, cache.get_seq_length(), dtype=torch.long, device=self.device)
        if self.cache is None or self.mask is None:
            self.cache, self.mask = cache, own
        else:
            width = max(self.mask.shape[1], own.shape[1])
            self.mask = torch.cat([left_pad(self.mask, width), left_pad(own, width)])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([left_pad(mine.keys, width), left_pad(theirs.keys, width)])
                mine.values = torch.cat([left_pad(mine.values, width), left_pad(theirs.values, width)])
        self.rows.append(seq)
        self.next_tokens.append(token)

    @torch.no_grad()
    def step(self) -> None:
        """One token for every running row, then the finished rows leave."""
        for seq in self.rows:
            if seq.cancelled and seq.finish is None:
                self.end(seq, "cancelled")
        self.keep([i for i, s in enumerate(self.rows) if s.finish is None])
        if not self.rows or self.mask is None:
            return
        self.mask = torch.cat([self.mask, self.mask.new_ones(len(self.rows), 1)], dim=1)
        positions = torch.tensor([[len(s.prompt) + len(s.tokens) - 1] for s in self.rows], device=self.device)
        try:
            out = self.model(
                input_ids=torch.tensor(self.next_tokens, device=self.device)[:, None],
                attention_mask=self.mask,
                position_ids=positions,
                past_key_values=self.cache,
                use_cache=True,
                **self.row_kwargs(self.rows),
            )
            tokens = pick(out.logits[:, -1].float(), self.rows)
        except Exception as e:  # noqa: BLE001 - the rows of this step fail; the batch starts afresh
            for seq in self.rows:
                seq.fail(f"generation failed ({type(e).__name__}: {e})")
                self.end(seq)
            self.keep([])
            return
        self.cache = out.past_key_values
        self.next_tokens = [self.take(seq, token) for seq, token in zip(self.rows, tokens)]
        self.keep([i for i, s in enumerate(self.rows) if s.finish is None])

    def keep(self, indices: list[int]) -> None:
        """Only these rows stay; the cache's leading columns that no row uses any more are cut."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        self.next_tokens = [self.next_tokens[i] for i in indices]
        if not indices or self.mask is None:
            self.cache = self.mask = None
            return
        at = torch.tensor(indices, device=self.device)
        mask = self.mask[at]
        start = int(mask.any(0).long().argmax())
        self.mask = mask[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[at, :, start:]
            layer.values = layer.values[at, :, start:]

    def run(self) -> None:
        """Decode until every row added has finished (no row joins meanwhile)."""
        while len(self):
            self.prefill(1 << 62)
            self.step()


def left_pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """`t` with zeros before its columns (the last dimension of a mask, the time one of keys and
    values) up to `width`."""
    time_dim = 1 if t.dim() == 2 else 2
    gap = width - t.shape[time_dim]
    if gap == 0:
        return t
    shape = list(t.shape)
    shape[time_dim] = gap
    return torch.cat([t.new_zeros(shape), t], dim=time_dim)
