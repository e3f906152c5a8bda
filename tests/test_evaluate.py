"""Tokenising training examples, batched greedy generation and log-likelihood scoring, on a
character-level tokenizer and tiny random models built in memory (no files, no network)."""

import os
import types

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from tiedlora import TiedLoraError, tasks
from tiedlora.evaluate import choice_loglik, evaluate, generate, loglik

from conftest import tiny_model


@pytest.fixture(scope="module")
def tokenizer():
    """Printable ASCII, one token per character (GPT-2's byte-level spelling: space Ġ, newline Ċ),
    99 tokens, so it fits the tiny models' vocabulary of 128."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = ["<pad>", "<eos>", "<unk>", *map(chr, range(33, 127)), "Ġ", "Ċ"]
    tok = Tokenizer(models.BPE({t: i for i, t in enumerate(vocab)}, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


CHAT = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def test_encode_masks_the_prompt_and_ends_with_eos(tokenizer):
    example = tasks.encode(tokenizer, "Q: 2+2?\nA:", "4")
    assert tokenizer.decode(example["input_ids"]) == "Q: 2+2?\nA: 4<eos>"
    n = len("Q: 2+2?\nA:")  # one token per character
    assert example["labels"][:n] == [-100] * n
    assert example["labels"][n:] == example["input_ids"][n:] == [*tokenizer(" 4")["input_ids"], tokenizer.eos_token_id]
    assert example["input_ids"][:n] == tasks.prompt_ids(tokenizer, "Q: 2+2?\nA:")


def test_encode_through_the_chat_template(tokenizer):
    tokenizer.chat_template = CHAT
    try:
        example = tasks.encode(tokenizer, "Q: 2+2?", "4", chat=True)
    finally:
        tokenizer.chat_template = None
    assert tokenizer.decode(example["input_ids"]) == "<user>Q: 2+2?\n<assistant>4<eos>"
    assert [t for t in example["labels"] if t != -100] == [*tokenizer("4")["input_ids"], tokenizer.eos_token_id]
    with pytest.raises(TiedLoraError, match="has no chat template"):
        tasks.encode(tokenizer, "Q", "4", chat=True)


def test_batched_generation_equals_one_prompt_at_a_time(tokenizer):
    """Left padding must not change a greedy answer: prompts of different lengths, in batches of
    three, give what each gives alone."""
    model = tiny_model("llama")
    task = tasks.get("gsm8k")
    rows = task.load("test")[:5]
    prompts = [task.prompt(r)[-40 - 7 * i :] for i, r in enumerate(rows)]  # five lengths
    alone = [generate(model, tokenizer, [p], max_new_tokens=6, batch_size=1)[0] for p in prompts]
    assert generate(model, tokenizer, prompts, max_new_tokens=6, batch_size=3) == alone
    assert len(set(alone)) > 1 and all(a for a in alone)
    result = evaluate(model.train(), tokenizer, task, rows, max_new_tokens=6, batch_size=2)
    assert list(result) == ["exact_match", "predictions"] and len(result["predictions"]) == 5
    assert model.training  # given back in the mode it came in


class Unigram(torch.nn.Module):
    """Every position predicts the same distribution: "a" very likely, every other token e^-10 as likely."""

    def __init__(self, tokenizer):
        super().__init__()
        self.logits = torch.full((128,), -10.0)
        self.logits[tokenizer.convert_tokens_to_ids("a")] = 0.0
        self.device = torch.device("cpu")

    def forward(self, input_ids, attention_mask):
        return types.SimpleNamespace(logits=self.logits.expand(*input_ids.shape, -1))


class Choices:
    """A stand-in multiple-choice task: rows are (endings, label)."""

    def choices(self, row):
        return "ctx", row[0], row[1]


def test_loglik_sum_and_per_character(tokenizer):
    # " a" is 2 tokens, one unlikely (log p about -10): sum -10, per character -5.
    # " aaaaaaaaa b" is 12 tokens, three unlikely: sum -30, per character -2.5.
    # acc picks " a", acc_norm picks the long ending; each is right for one of the two rows.
    endings = [" a", " aaaaaaaaa b"]
    rows = [(endings, 0), (endings, 1)]
    assert choice_loglik(Unigram(tokenizer), tokenizer, Choices(), rows) == {"acc": 50.0, "acc_norm": 50.0}
    assert choice_loglik(Unigram(tokenizer), tokenizer, Choices(), rows[:1]) == {"acc": 100.0, "acc_norm": 0.0}


def test_loglik_batches_agree_with_one_sequence_at_a_time(tokenizer):
    """Right padding in a batch must not change a continuation's log-likelihood."""
    model = tiny_model("llama", seed=3)
    pairs = [
        ("High jump: A boy runs.", " He jumps."),
        ("Q", " a much longer ending, with commas"),
        ("Cooking: she", " stirs."),
    ]
    expected = []
    for context, ending in pairs:
        c, e = tokenizer(context)["input_ids"], tokenizer(ending)["input_ids"]
        logp = model(torch.tensor([c + e])).logits[0].log_softmax(-1)
        expected.append(sum(logp[len(c) + k - 1, t].item() for k, t in enumerate(e)))
    assert loglik(model, tokenizer, pairs, batch_size=2) == pytest.approx(expected, abs=1e-4)
    assert loglik(model, tokenizer, pairs, batch_size=1) == pytest.approx(expected, abs=1e-4)
