"""The five tasks: metrics against hand-computed values, loaders on the bundled samples, split
rules, bad input, and the Hub path with a stand-in `datasets` module (no network)."""

import inspect
import json
import math
import os
import shutil
import sys
import types
from decimal import Decimal
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest

from tiedlora import tasks
from tiedlora.tasks import DataError, metrics
from tiedlora.tasks.base import BUNDLED

ROOT = Path(__file__).resolve().parents[2]


# Metrics, by hand.


def test_squad_normalisation_drops_case_punctuation_articles_and_extra_spaces():
    assert metrics.squad_normalize("The  Cat's, a HAT!") == "cats hat"
    assert metrics.squad_normalize("an apple and the pear") == "apple and pear"
    assert metrics.squad_normalize("theatre") == "theatre"  # "the" only as a word


def test_squad_exact_match_and_f1_take_the_best_gold_answer():
    # Row 1: tokens {cat, sat} against {cat, sat, on, mat}: P = 1, R = 1/2, F1 = 2/3, EM 0.
    # Row 2: the second gold answer matches after normalisation: EM 1, F1 1.
    scores = metrics.squad(
        ["the cat sat", "Denver Broncos"], [["a cat sat on the mat"], ["Broncos", "Denver Broncos!"]]
    )
    assert scores["exact_match"] == 50.0
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 1) / 2)


def test_rouge_of_known_strings():
    # LCS "the cat on the mat" = 5 of 6 tokens each side; bigrams in common: the-cat, on-the, the-mat = 3 of 5.
    scores = metrics.rouge(["the cat sat on the mat"], [["the cat was on the mat"]])
    assert list(scores) == ["rougeL", "rouge1", "rouge2"]
    assert scores["rougeL"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge1"] == pytest.approx(100 * 5 / 6)
    assert scores["rouge2"] == pytest.approx(60.0)


def test_rouge_stems_and_takes_the_best_reference():
    # Stemming makes "cats running" and "cat runs" the same two tokens; the worse reference is ignored.
    assert metrics.rouge(["cats running"], [["dogs bark", "cat runs"]])["rougeL"] == pytest.approx(100.0)


def test_corpus_bleu_of_a_two_sentence_corpus():
    # Matches over the corpus: 1-grams 6+3 of 10, 2-grams 5+2 of 8, 3-grams 4+1 of 6, 4-grams 3+0 of 4;
    # hypothesis and reference both 10 tokens long, so no brevity penalty.
    scores = metrics.bleu(["the cat sat on the mat", "a b c d"], ["the cat sat on the mat", "a b c e"])
    assert scores["bleu"] == pytest.approx(100 * (9 / 10 * 7 / 8 * 5 / 6 * 3 / 4) ** 0.25)


def test_bleu_brevity_penalty():
    # Every n-gram matches, but 6 tokens against 7: BP = exp(1 - 7/6).
    assert metrics.bleu(["the cat sat on the mat"], ["the cat sat on the mat today"])["bleu"] == pytest.approx(
        100 * math.exp(-1 / 6)
    )


@pytest.mark.parametrize(
    "text, number",
    [
        ("so she pays 1,234 dollars", Decimal(1234)),
        ("it is -5 degrees", Decimal(-5)),
        ("3.50", Decimal("3.5")),
        ("from 10-20 apples", Decimal(20)),
        ("1,2,3", Decimal(3)),
        ("#### $1,000,000.", Decimal(1000000)),
        ("x=-0.25", Decimal("-0.25")),
        ("no number", None),
    ],
)
def test_last_number(text, number):
    assert metrics.last_number(text) == number


def test_gsm8k_exact_match_compares_final_numbers():
    predictions = ["... so she pays 1,234", "The answer is -3.50.", "72 apples and 8 pears", ""]
    answers = ["1000+234=<<1000+234=1234>>1234\n#### 1234", "#### -3.5", "#### 72", "#### 0"]
    assert metrics.gsm8k(predictions, answers) == {"exact_match": 50.0}


@pytest.mark.parametrize(
    "text, index", [("2", 2), ("The answer is 3.", 3), ("Ending 1: he runs", 1), ("23", None), ("", None), ("4", None)]
)
def test_hellaswag_choice_is_the_first_digit_0_to_3(text, index):
    assert metrics.choice(text) == index


def test_hellaswag_accuracy():
    assert metrics.accuracy(["1", "Answer: 2", "none", "0"], [1, 3, 0, "0"]) == {"accuracy": 50.0}


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_perfect_predictions_score_100_and_empty_ones_0(name):
    task = tasks.get(name)
    rows = task.load("test")
    perfect, empty = task.score([task.target(r) for r in rows], rows), task.score([""] * len(rows), rows)
    assert list(perfect) == list(empty) and len(perfect) >= 1
    assert all(v == pytest.approx(100.0) for v in perfect.values()), perfect
    assert all(v == 0.0 for v in empty.values()), empty


def test_headline_metric_comes_first():
    heads = {
        name: next(iter(task.score([task.target(r) for r in task.load("test")], task.load("test"))))
        for name, task in tasks.TASKS.items()
    }
    assert heads == {
        "squad": "exact_match",
        "dialogsum": "rougeL",
        "hellaswag": "accuracy",
        "iwslt2017-de-en": "bleu",
        "gsm8k": "exact_match",
    }


def test_score_needs_one_prediction_per_row():
    task = tasks.get("gsm8k")
    rows = task.load("test")
    with pytest.raises(DataError, match="2 predictions for 100 rows"):
        task.score(["1", "2"], rows)
    with pytest.raises(DataError):
        task.score([], [])


def protocol_members() -> dict:
    """TaskLike's members: its methods' parameters after self, and None for its attributes."""
    methods = {n: v for n, v in vars(tasks.TaskLike).items() if inspect.isfunction(v) and not n.startswith("_")}
    members = {n: list(inspect.signature(f).parameters)[1:] for n, f in methods.items()}
    return members | {n: None for n in tasks.TaskLike.__annotations__}


@pytest.mark.parametrize("name", [*tasks.TASKS, "own"])
def test_the_papers_tasks_and_own_data_satisfy_the_task_protocol(name, tmp_path):
    """Training and evaluation take a `TaskLike`: every member there, with the same parameters."""
    task = tasks.OwnData(str(tmp_path / "d.jsonl")) if name == "own" else tasks.get(name)
    assert isinstance(task, tasks.TaskLike) and task.name == name
    members = protocol_members()
    assert {"name", "load", "encode", "prompt_ids", "score", "test", "predictions_file", "eval_rows"} <= set(members)
    for member, parameters in members.items():
        if parameters is None:
            assert isinstance(getattr(task, member), str), member
        else:
            assert list(inspect.signature(getattr(task, member)).parameters) == parameters, member


def test_task_for_makes_own_data_or_a_papers_task(tmp_path):
    own = tasks.task_for("squad", str(tmp_path / "d.jsonl"), metric="f1", samples=2, prompt_field="q")
    assert isinstance(own, tasks.OwnData) and (own.metric, own.samples, own.fields["prompt"]) == ("f1", 2, "q")
    assert tasks.task_for("gsm8k") is tasks.get("gsm8k")
    with pytest.raises(DataError, match="No task given"):
        tasks.task_for(None)
    with pytest.raises(DataError, match="No task 'nope'"):
        tasks.task_for("nope")


# Prompts and targets.


def test_templates_are_documented_verbatim():
    docs = (ROOT / "docs" / "tasks.md").read_text(encoding="utf-8")
    for name, template in tasks.TEMPLATES.items():
        assert template in docs, name
    assert tasks.prompts.CHOICE_CONTEXT in docs


def test_prompts_and_targets_fill_in_the_row():
    row = {"activity_label": "High jump", "ctx": "A boy runs. the boy", "endings": ["e0", "e1", "e2", "e3"], "label": 2}
    prompt = tasks.get("hellaswag").prompt(row)
    assert "High jump: A boy runs. the boy\n0: e0\n1: e1\n2: e2\n3: e3\nAnswer:" in prompt
    assert tasks.get("hellaswag").target(row) == "2"
    test_row = {"dialogue": "#Person1#: hi", "summary1": "s1", "summary2": "s2", "summary3": "s3"}
    assert tasks.get("dialogsum").target(test_row) == "s1"
    assert tasks.get("dialogsum").references(test_row) == ["s1", "s2", "s3"]
    assert tasks.get("squad").target({"answers": {"text": ["Denver Broncos", "Broncos"]}}) == "Denver Broncos"


# Loading: sources and split rules.

# Rows per split from the bundled samples; pinned so a change to the split rule shows.
BUNDLED_ROWS = {
    "squad": (152, 21, 27),
    "dialogsum": (100, 50, 50),
    "hellaswag": (171, 16, 13),
    "iwslt2017-de-en": (314, 37, 49),
    "gsm8k": (181, 19, 100),
}


@pytest.mark.parametrize("name", list(tasks.TASKS))
def test_bundled_splits(name):
    task = tasks.get(name)
    loaded = [task.load(split) for split in tasks.SPLITS]
    assert tuple(map(len, loaded)) == BUNDLED_ROWS[name]
    for split, rows in zip(tasks.SPLITS, loaded):
        assert rows.info["task"] == name and rows.info["split"] == split and rows.info["source"] == "bundled"
        assert (
            rows.info["location"] == str(BUNDLED / task.folder) and rows.info["rows"] == len(rows) and rows.info["rule"]
        )


@pytest.mark.parametrize(
    "name, pooled",
    [
        ("squad", ["validation"]),
        ("hellaswag", ["validation"]),
        ("iwslt2017-de-en", ["validation", "test"]),
        ("gsm8k", ["train"]),
    ],
)
def test_derived_splits_never_share_a_group_and_lose_no_row(name, pooled):
    task = tasks.get(name)
    source = [
        json.loads(line) for s in pooled for line in (BUNDLED / task.folder / f"{s}.jsonl").read_text().splitlines()
    ]
    derived = [task.load(s) for s in (tasks.SPLITS if name != "gsm8k" else ("train", "validation"))]
    keys = [{tuple(r[f] for f in task.group) for r in rows} for rows in derived]
    assert all(not (a & b) for i, a in enumerate(keys) for b in keys[i + 1 :])
    assert sorted(map(json.dumps, (r for rows in derived for r in rows))) == sorted(map(json.dumps, source))
    assert "sha256" in derived[0].info["rule"]


def test_a_data_root_a_task_folder_and_a_file_are_sources(tmp_path):
    task = tasks.get("squad")
    shutil.copytree(BUNDLED, tmp_path / "data")
    assert task.load("test", tmp_path / "data") == task.load("test")  # a root with a folder per task
    assert task.load("test", str(tmp_path / "data" / "squad")) == task.load("test")  # a task's folder
    whole = task.load("test", tmp_path / "data" / "squad" / "validation.jsonl")  # one file, as given
    assert len(whole) == 200 and whole.info["rule"] == "the file as given, no split rule"


def test_a_folder_with_train_uses_the_official_mapping(tmp_path):
    # SQuAD with a train file: test is the official validation split, validation the paper's 4,800 held-out rows.
    rows = [{"context": f"c{i}", "question": "q", "answers": {"text": ["a"], "answer_start": [0]}} for i in range(4810)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    shutil.copy(BUNDLED / "squad" / "validation.jsonl", tmp_path / "validation.jsonl")
    squad = tasks.get("squad")
    train, validation, test = (squad.load(s, tmp_path) for s in tasks.SPLITS)
    assert (len(train), len(validation), len(test)) == (10, 4800, 200)
    assert not {r["context"] for r in train} & {r["context"] for r in validation}
    assert "4800" in validation.info["rule"] and test.info["rule"] == "official validation split"
    assert squad.load("validation", tmp_path) == validation  # seeded: the same rows every time


# Bad input: one clear error naming the file, the line and the fields.


def _write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


GOOD = b'{"question": "q", "answer": "#### 1"}\n'


@pytest.mark.parametrize(
    "data, line, says",
    [
        (GOOD + b'{"question": "q", "answer": \n', 2, "not JSON"),
        (GOOD + GOOD + b'{"question": "caf\xe9", "answer": "#### 1"}\n', 3, "not UTF-8"),
        (GOOD + b'{"question": "q"}\n', 2, "no answer"),
        (GOOD + b"\n" + b'{"question": "q"}\n', 3, "no answer"),  # a blank line is skipped, and counted
        (b'["question", "answer"]\n', 1, "no question, answer"),
    ],
)
def test_a_bad_line_names_file_line_and_fields(tmp_path, data, line, says):
    path = _write(tmp_path / "gsm8k" / "test.jsonl", data)
    _write(tmp_path / "gsm8k" / "train.jsonl", GOOD)
    with pytest.raises(DataError) as e:
        tasks.get("gsm8k").load("test", tmp_path)
    assert f"{path}, line {line}: {says}" in str(e.value)
    assert "question, answer" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_an_empty_file_or_split_is_an_error(tmp_path):
    _write(tmp_path / "train.jsonl", GOOD)
    _write(tmp_path / "test.jsonl", b"")
    with pytest.raises(
        DataError, match=r"test\.jsonl: no rows; expected one JSON object per row with fields question, answer"
    ):
        tasks.get("gsm8k").load("test", tmp_path)
    # One row cannot fill three offline splits: the two empty ones say so.
    _write(tmp_path / "one" / "validation.jsonl", b'{"de": "Hallo", "en": "Hello"}\n')
    sizes = []
    for split in tasks.SPLITS:
        try:
            sizes.append(len(tasks.get("iwslt2017-de-en").load(split, tmp_path / "one")))
        except DataError as e:
            assert "is empty (offline split: validation pooled" in str(e)
            sizes.append(0)
    assert sorted(sizes) == [0, 0, 1]


def test_missing_file_unknown_split_source_and_task(tmp_path):
    _write(tmp_path / "train.jsonl", GOOD)
    with pytest.raises(DataError, match=r"test\.jsonl: cannot read it"):
        tasks.get("gsm8k").load("test", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=f"{tmp_path / 'empty'} has none of train.jsonl, validation.jsonl, test.jsonl"):
        tasks.get("gsm8k").load("test", tmp_path / "empty")
    with pytest.raises(DataError, match="no split 'dev'"):
        tasks.get("gsm8k").load("dev")
    with pytest.raises(DataError, match="is not 'bundled', 'hub', a folder or a .jsonl file"):
        tasks.get("gsm8k").load("test", tmp_path / "nowhere")
    with pytest.raises(DataError, match="the tasks are squad, dialogsum, hellaswag, iwslt2017-de-en, gsm8k"):
        tasks.get("mnli")


# The Hub, through a stand-in `datasets` module.


@pytest.fixture
def hub(monkeypatch):
    """A fake `datasets` whose load_dataset serves `hub.splits[split]` and records its calls."""
    fake = types.SimpleNamespace(splits={}, calls=[])

    def load_dataset(split, **kwargs):
        fake.calls.append({**kwargs, "split": split})
        return fake.splits[split]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    return fake


def test_hub_squad_uses_the_papers_rule(hub):
    hub.splits = {
        "train": [
            {
                "id": str(i),
                "title": "t",
                "context": f"c{i}",
                "question": "q",
                "answers": {"text": ["a"], "answer_start": [0]},
            }
            for i in range(4900)
        ],
        "validation": [
            {
                "id": "v",
                "title": "t",
                "context": "c",
                "question": "q",
                "answers": {"text": ["a", "b"], "answer_start": [0, 0]},
            }
        ],
    }
    squad = tasks.get("squad")
    train, validation, test = (squad.load(s, "hub") for s in tasks.SPLITS)
    assert (len(train), len(validation), len(test)) == (100, 4800, 1)
    assert not {r["id"] for r in train} & {r["id"] for r in validation}
    assert test.info["source"] == "hub" and test.info["location"] == "path=rajpurkar/squad"
    assert hub.calls[-1] == {"path": "rajpurkar/squad", "split": "validation"}


def test_hub_rows_are_brought_to_the_local_layout(hub):
    hub.splits = {
        "test": [{"id": f"test_0_{k}", "dialogue": "d0", "summary": f"s{k}", "topic": "t"} for k in (1, 2, 3)]
        + [{"id": "test_1_1", "dialogue": "d1", "summary": "x", "topic": "t"}]
    }
    assert list(tasks.get("dialogsum").load("test", "hub")) == [
        {"id": "test_0_1", "dialogue": "d0", "summary1": "s1", "summary2": "s2", "summary3": "s3"},
        {"id": "test_1_1", "dialogue": "d1", "summary1": "x"},
    ]
    hub.splits = {
        "validation": [
            {
                "activity_label": "Jumping",
                "ctx": "[header] How to jump [title] Bend your knees.",
                "endings": ["[step] Jump.", "Sit.", "Run.", "Fly."],
                "label": "3",
            }
        ]
    }
    (row,) = tasks.get("hellaswag").load("test", "hub")
    assert row == {
        "activity_label": "Jumping",
        "ctx": "How to jump. Bend your knees.",
        "endings": ["Jump.", "Sit.", "Run.", "Fly."],
        "label": 3,
    }
    hub.splits = {"train": [{"translation": {"de": "Hallo", "en": "Hello"}}]}
    assert list(tasks.get("iwslt2017-de-en").load("train", "hub")) == [{"de": "Hallo", "en": "Hello"}]
    assert hub.calls[-1] == {
        "path": "IWSLT/iwslt2017",
        "data_dir": "iwslt2017-de-en",
        "revision": "refs/convert/parquet",
        "split": "train",
    }


def test_hub_rows_are_checked_too(hub):
    hub.splits = {"test": [{"question": "q", "answer": "#### 1"}, {"question": "q"}]}
    with pytest.raises(DataError, match=r"Hub path=openai/gsm8k, name=main, split test, row 2: no answer"):
        tasks.get("gsm8k").load("test", "hub")


def test_hub_without_datasets_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'tiedlora\[hub\]'"):
        tasks.get("gsm8k").load("test", "hub")
