"""The server's decoding loop on its own: stop strings found in one pass (against a naive
search), sampling that is safe for every accepted option and faults that end one row, and the
continuous batch, where rows joining and leaving at any step each get what transformers'
generate gives them alone."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiedlora.serve.batch import Batch, Sampling, Sequence, StopMatch, pick


def naive(text: str, stops: list[str]) -> tuple[int | None, int]:
    """Where the first stop string to be completed starts (None: none yet), and the longest end
    of the text that is a proper beginning of a stop string."""
    for end in range(1, len(text) + 1):
        for s in stops:
            if text[:end].endswith(s):
                return end - len(s), 0
    held = max([n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
    return None, held


@pytest.mark.parametrize("seed", range(300))
def test_stop_strings_are_found_in_one_pass_as_a_naive_search_finds_them(seed):
    rng = random.Random(seed)
    stops = ["".join(rng.choice("ab") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 4))]
    text = "".join(rng.choice("abc") for _ in range(rng.randint(0, 30)))
    match, read = StopMatch(stops), 0
    while read < len(text):
        read = min(len(text), read + rng.randint(1, 4))
        found = match.feed(text[:read])
        want, held = naive(text[:read], stops)
        if found is not None or want is not None:
            assert found == want, (stops, text[:read])
            break
        assert match.held == held, (stops, text[:read])


def logits_of(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 5


@pytest.mark.parametrize("temperature, top_p", [(1e-45, 1.0), (5e-324, 1.0), (1.0, 1e-300), (2.0, 5e-324)])
def test_extreme_temperatures_and_top_p_sample_the_most_likely_token(temperature, top_p):
    logits = logits_of(4)
    seqs = [Sequence([1], Sampling(4, temperature, top_p, seed=i)) for i in range(4)]
    for seq in seqs:
        seq.seed("cpu")
    assert pick(logits, seqs) == logits.argmax(-1).tolist()
    assert all(seq.finish is None for seq in seqs)


def test_a_row_with_non_finite_scores_fails_alone():
    logits = logits_of(3)
    logits[1, 7] = float("nan")
    logits[2, 3] = float("inf")
    seqs = [Sequence([1], Sampling(4, t, 0.9, seed=0)) for t in (0.0, 0.0, 1.0)]
    for seq in seqs:
        seq.seed("cpu")
    tokens = pick(logits, seqs)
    assert tokens[0] == int(logits[0].argmax()) and seqs[0].finish is None
    assert [s.finish for s in seqs[1:]] == ["error", "error"]
    assert all("not finite" in (s.error or "") for s in seqs[1:])


def test_logprobs_are_the_log_softmax_and_its_top_alternatives():
    logits = logits_of(2)
    seqs = [Sequence([1], Sampling(4, logprobs=3)), Sequence([1], Sampling(4))]
    tokens = pick(logits, seqs)
    reference = torch.log_softmax(logits.double(), -1)
    token, logprob, top = seqs[0].logprobs[0]
    assert token == tokens[0] and logprob == pytest.approx(float(reference[0, token]), abs=1e-5)
    best = reference[0].topk(3)
    assert [t for t, _ in top] == best.indices.tolist()
    assert [lp for _, lp in top] == pytest.approx(best.values.tolist(), abs=1e-5)
    assert seqs[1].logprobs == []


@pytest.fixture(scope="module")
def lm(tiny_folder):
    return AutoModelForCausalLM.from_pretrained(tiny_folder).eval(), AutoTokenizer.from_pretrained(tiny_folder)


def alone(lm, prompt: list[int], n: int) -> list[int]:
    model, tokenizer = lm
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return [t for t in out[0, len(prompt) :].tolist() if t != tokenizer.eos_token_id]


def test_rows_joining_and_leaving_at_any_step_each_get_what_they_get_alone(lm):
    model, tokenizer = lm
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 20000) for _ in range(rng.randint(1, 40))] for _ in range(10)]
    lengths = [rng.randint(1, 12) for _ in prompts]
    finished: list[Sequence] = []
    batch = Batch(model, tokenizer, lambda seq, text: finished.append(seq) if seq.finish else None, chunk=7)
    seqs = [Sequence(p, Sampling(n)) for p, n in zip(prompts, lengths)]
    joins = {0: [0, 1], 2: [2], 3: [3, 4, 5], 7: [6], 8: [7, 8], 15: [9]}  # step -> rows added before it
    widths = []
    for step in range(60):
        for i in joins.get(step, []):
            batch.add(seqs[i])
        batch.prefill(11)  # some prompts take several steps to read, in chunks of 7
        batch.step()
        widths.append(None if batch.mask is None else batch.mask.shape[1])
    assert len(finished) == len(seqs) and not len(batch)
    for seq, prompt, n in zip(seqs, prompts, lengths):
        assert seq.tokens == alone(lm, prompt, n)
        assert seq.finish == "length"
    assert widths[-1] is None and max(w for w in widths if w) < max(map(len, prompts)) + max(lengths) + 1


def test_a_failing_prefill_fails_its_row_alone(lm, monkeypatch):
    model, tokenizer = lm
    forward = model.forward

    def fails_for_long_prompts(*args, **kwargs):
        if kwargs["input_ids"].shape[1] > 5:
            raise RuntimeError("out of memory (simulated)")
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", fails_for_long_prompts)
    batch = Batch(model, tokenizer, lambda seq, text: None)
    good, bad = Sequence([400, 500], Sampling(3)), Sequence(list(range(300, 310)), Sampling(3))
    for seq in (good, bad):
        batch.add(seq)
    batch.run()
    assert good.finish == "length" and good.tokens == alone(lm, [400, 500], 3)
    assert bad.finish == "error" and "out of memory (simulated)" in (bad.error or "")


def test_prompt_logprobs_come_from_the_chunked_prefill_and_equal_a_plain_forward(lm):
    """Rows asking for their prompt's logprobs (echo with logprobs) get them from the prefill, read
    in chunks of 7 tokens at most 5 a step: the first token None, every other token's the log_softmax
    of a plain forward at the position before it, then the generated tokens'; max_tokens 0 scores
    the prompt and generates nothing; a row not asking gets only its generated tokens'."""
    model, tokenizer = lm
    rng = random.Random(1)
    lengths, max_tokens = (1, 2, 7, 8, 23), (2, 0, 3, 0, 1)
    prompts = [[rng.randrange(100, 20000) for _ in range(n)] for n in lengths]
    batch = Batch(model, tokenizer, lambda seq, text: None, chunk=7)
    seqs = [Sequence(p, Sampling(n, logprobs=2, prompt_logprobs=True)) for p, n in zip(prompts, max_tokens)]
    plain = Sequence(prompts[4], Sampling(2, logprobs=2))
    for seq in [*seqs, plain]:
        batch.add(seq)
    while len(batch):
        batch.prefill(5)
        batch.step()
    for seq, prompt, n in zip(seqs, prompts, max_tokens):
        ids = prompt + seq.tokens
        assert len(seq.tokens) == n and seq.finish == "length"
        with torch.no_grad():
            reference = model(torch.tensor([ids])).logits[0].float().log_softmax(-1)
        assert len(seq.logprobs) == len(ids) and seq.logprobs[0] == (prompt[0], None, None)
        for k, (token, logprob, top) in enumerate(seq.logprobs[1:], 1):
            best = reference[k - 1].topk(2)
            assert token == ids[k] and logprob == pytest.approx(float(reference[k - 1, token]), abs=1e-4)
            assert [t for t, _ in top or []] == best.indices.tolist()
            assert [lp for _, lp in top or []] == pytest.approx(best.values.tolist(), abs=1e-4)
    assert [t for t, _, _ in plain.logprobs] == plain.tokens and len(plain.tokens) == 2
