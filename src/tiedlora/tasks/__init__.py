"""The paper's five tasks (section 4.2): `get("gsm8k")` gives a task with `load(split, source)`,
`prompt(row)`, `target(row)` and `score(predictions, rows)`. Sources and split rules are in
base.py, templates in prompts.py, metrics in metrics.py; docs/tasks.md describes them all.
The user's own rows are a task too (`OwnData`, own.py); both satisfy `TaskLike`, what training
and evaluation use, and `task_for` makes either from a run's or an evaluation's options."""

from __future__ import annotations

import re
from typing import Any

from ..tokens import prompt_ids
from . import metrics
from .base import SPLITS, DataError, Rows, Scorer, Task, TaskLike, not_text
from .own import OwnData
from .prompts import CHOICE_CONTEXT, TEMPLATES, encode

__all__ = [
    "SPLITS",
    "TASKS",
    "TEMPLATES",
    "DataError",
    "OwnData",
    "Rows",
    "Scorer",
    "Task",
    "TaskLike",
    "encode",
    "get",
    "prompt_ids",
    "task_for",
]


class Squad(Task):
    name = folder = "squad"
    fields = ("context", "question", "answers.text")
    group = ("context",)
    hub = {"path": "rajpurkar/squad"}
    official = ("train", "validation")  # the test split has no answers: validation is the test
    held_out = 4800

    def target(self, row):
        return row["answers"]["text"][0]

    def problem(self, row):
        answers = row["answers"]["text"]
        if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a for a in answers):
            return f"field answers.text is {str(answers)[:40]!r}, expected a non-empty list of answer strings"
        return not_text(row, ("context", "question"))

    def metric(self, predictions, rows):
        return metrics.squad(predictions, [r["answers"]["text"] for r in rows])


class DialogSum(Task):
    name = folder = "dialogsum"
    fields = ("dialogue", "summary|summary1")  # train and validation: summary; test: summary1..3
    group = ("dialogue",)
    hub = {"path": "knkarthick/dialogsum"}

    @staticmethod
    def references(row):
        return [row[k] for k in ("summary", "summary1", "summary2", "summary3") if k in row]

    def target(self, row):
        return self.references(row)[0]

    def metric(self, predictions, rows):
        return metrics.rouge(predictions, [self.references(r) for r in rows])

    def from_hub(self, rows):
        """The Hub copy repeats a test dialogue once per reference summary; merge those into one
        row with summary1..3, as in the official file, so every source is scored alike."""
        merged: dict[str, dict] = {}
        for r in rows:
            row = merged.setdefault(r["dialogue"], {"id": r["id"], "dialogue": r["dialogue"]})
            row[f"summary{len(row) - 1}"] = r["summary"]
        return list(merged.values())


def _clean(text: str) -> str:
    """Drop the WikiHow markup ([header], [title], ...) of the Hub copy as lm-evaluation-harness
    does, close to the clean-up the staged copy went through, so both read alike."""
    text = text.replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ").strip()


class HellaSwag(Task):
    name = folder = "hellaswag"
    fields = ("activity_label", "ctx", "endings", "label")
    group = ("ctx",)
    hub = {"path": "Rowan/hellaswag"}
    official = ("train", "validation")  # the test split has no labels: validation is the test

    def target(self, row):
        return str(row["label"])

    def problem(self, row):
        endings, label = row["endings"], row["label"]
        if not isinstance(endings, list) or len(endings) != 4 or not all(isinstance(e, str) for e in endings):
            return f"field endings is {str(endings)[:40]!r}, expected a list of 4 strings"
        if isinstance(label, bool) or str(label) not in ("0", "1", "2", "3"):
            return f"field label is {label!r}, expected the right ending's number, 0 to 3"
        return not_text(row, ("activity_label", "ctx"))

    def metric(self, predictions, rows):
        return metrics.accuracy(predictions, [r["label"] for r in rows])

    def choices(self, row) -> tuple[str, list[str], int]:
        """The context, the continuations the log-likelihood scorer compares, and the right one."""
        return CHOICE_CONTEXT.format(**row), [" " + e for e in row["endings"]], int(row["label"])

    def from_hub(self, rows):
        return [
            {
                "activity_label": r["activity_label"],
                "ctx": _clean(r["ctx"]),
                "endings": [_clean(e) for e in r["endings"]],
                "label": int(r["label"]),
            }
            for r in rows
        ]


class Iwslt(Task):
    name, folder = "iwslt2017-de-en", "iwslt2017_de_en"
    fields = ("de", "en")
    group = ("de", "en")
    # The Hub repository is a loading script, which datasets>=4 refuses: read its parquet export.
    hub = {"path": "IWSLT/iwslt2017", "data_dir": "iwslt2017-de-en", "revision": "refs/convert/parquet"}

    def target(self, row):
        return row["en"]

    def metric(self, predictions, rows):
        return metrics.bleu(predictions, [r["en"] for r in rows])

    def row_statistics(self, predictions, rows):
        return metrics.bleu_statistics(predictions, [r["en"] for r in rows])

    def of_statistics(self, sums, rows):
        return metrics.bleu_of_statistics(sums)

    def from_hub(self, rows):
        return [r["translation"] for r in rows]


class Gsm8k(Task):
    name = folder = "gsm8k"
    fields = ("question", "answer")
    group = ("question",)
    hub = {"path": "openai/gsm8k", "name": "main"}
    official = ("train", "test")

    def target(self, row):
        return row["answer"]

    def problem(self, row):
        why = not_text(row, ("question", "answer"))
        if why:
            return why
        if "####" not in row["answer"] or metrics.last_number(row["answer"].split("####")[-1]) is None:
            return f"field answer {row['answer'][-40:]!r} does not end in '#### <number>', the final answer"
        return None

    def metric(self, predictions, rows):
        return metrics.gsm8k(predictions, [r["answer"] for r in rows])


TASKS: dict[str, Task] = {t.name: t for t in (Squad(), DialogSum(), HellaSwag(), Iwslt(), Gsm8k())}


def get(name: str) -> Task:
    try:
        return TASKS[name]
    except KeyError:
        raise DataError(f"No task {name!r}; the tasks are {', '.join(TASKS)}.") from None


def task_for(task: str | None, data: str | None = None, **own: Any) -> TaskLike:
    """The one place a task is made from options, for `tiedlora train` and `tiedlora eval` alike:
    the user's own rows when `data` is given (read with `own`, OwnData's options), else the paper's
    task named `task`."""
    if data is not None:
        return OwnData(data, **own)
    if task is None:
        raise DataError(f"No task given; the tasks are {', '.join(TASKS)}, or your own data (--data).")
    return get(task)
