"""Where a task's rows come from, and which rows make its train, validation and test splits.

A source is the Hub (`"hub"`, through the optional `datasets` package), the samples bundled with
the package (`"bundled"`), a folder of `<split>.jsonl` files, a folder holding such a folder per
task (like `../shared/data`), or one `.jsonl` file. Every load returns `Rows`, whose `info` says
which source and which split rule made them, so a run can record both. The rules are in
docs/tasks.md.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from ..config import TiedLoraError
from ..runs import PREDICTIONS
from ..tokens import prompt_ids
from .prompts import TEMPLATES, encode

SPLITS = ("train", "validation", "test")
BUNDLED = Path(__file__).parent / "data"
SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F]")  # JSON's escape of U+D800..U+DFFF (JSON writes \u, never \U)
MAX_LINE_BYTES = 4 << 20  # the longest row of the five data sets is a few kB; a 100 MB line is not a row
# The offline split, for sources without a train split: a row goes to the first split whose
# bound its group's share is under, so 80/10/10.
OFFLINE = {"train": 0.8, "validation": 0.9, "test": 1.0}
# The share of train rows held out as validation where a task has no labelled validation split,
# and of own data's rows where no validation file is given.
HELD_OUT = 0.1


class DataError(TiedLoraError):
    """Unusable task data: the message names the file (or Hub split), the line and the fields expected."""


class Rows(list):
    """A split's rows (dicts), plus `info`: task, split, source, location, rule and row count.
    A slice is a plain list."""

    def __init__(self, rows: list[dict], info: dict):
        super().__init__(rows)
        self.info = info


def share(row: dict, group: tuple[str, ...]) -> float:
    """Where the row's group lands in [0, 1). Rows of one group (a paragraph, a sentence pair)
    land together, so a split rule built on it never puts one group in two splits; sha256, not
    hash(), so the split is the same on every machine and Python."""
    key = "\x1f".join(str(row[field]) for field in group)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _has(row, field: str) -> bool:
    for part in field.split("."):
        if not isinstance(row, dict) or part not in row:
            return False
        row = row[part]
    return True


def _expected(fields: tuple[str, ...]) -> str:
    return f"expected one JSON object per row with fields {', '.join(fields)}"


def check(rows: list, fields: tuple[str, ...], where: str, unit: str, problem=None, numbers=None) -> list[dict]:
    """Stop at the first unusable row, naming it: a KeyError deep inside a metric helps nobody,
    and a value of the wrong form trains on nonsense without a word. A field "a|b" needs either
    of a, b; "a.b" needs key b inside a; `problem(row)` says what else is wrong, or None."""
    if not rows:
        raise DataError(f"{where}: no rows; {_expected(fields)}.")
    for n, row in zip(numbers or range(1, len(rows) + 1), rows):  # `numbers`: each row's line, blank lines skipped
        missing = [f for f in fields if not any(_has(row, alt) for alt in f.split("|"))]
        if missing:
            raise DataError(f"{where}, {unit} {n}: no {', '.join(missing)}; {_expected(fields)}.")
        why = problem(row) if problem else None
        if why:
            raise DataError(f"{where}, {unit} {n}: {why}.")
    return rows


def value(row: dict, field: str):
    """The value at a dotted field ("answers.text")."""
    for part in field.split("."):
        row = row[part]
    return row


def not_text(row: dict, fields) -> str | None:
    """The first of `fields` present in `row` whose value is not a string of text, described."""
    for field in fields:
        if _has(row, field) and not isinstance(value(row, field), str):
            return f"field {field} is {_shown(value(row, field))}, expected a string"
    return None


def _shown(v) -> str:
    return f"{type(v).__name__} {str(v)[:40]!r}"


def numbered_lines(data: bytes, where: str, expected: str) -> list[tuple[int, Any]]:
    """(line number, value) of each line of JSON Lines: the one reader of rows, for `tiedlora
    train --data`, the paper's files and the fine-tuning service's uploads alike, so what one
    accepts the others read the same. Lines end in \n (a \r before it is dropped; no other line
    break splits a line, as JSON strings may hold U+2028 or U+0085); blank lines are skipped.
    Parsing is bounded: a line longer than any row needs (MAX_LINE_BYTES), nested past Python's
    recursion limit, holding an integer of more digits than Python converts, or an unpaired
    surrogate escape ("\ud800", which is no text a tokenizer reads) is refused, naming it."""
    rows = []
    for n, line in enumerate(data.split(b"\n"), 1):
        line = line.removesuffix(b"\r")
        if not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            raise DataError(
                f"{where}, line {n}: {len(line):,} bytes, more than the {MAX_LINE_BYTES:,} a row may take; "
                "split or shorten it."
            )
        try:
            value = json.loads(line.decode("utf-8"))
            if SURROGATE_ESCAPE.search(line):  # only then can a string hold one: not every row is written again
                json.dumps(value, ensure_ascii=False).encode("utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{where}, line {n}: not UTF-8; {expected}.") from None
        except UnicodeEncodeError:
            raise DataError(
                f"{where}, line {n}: holds an unpaired surrogate escape (\\ud800 to \\udfff), which is no text; "
                f"{expected}."
            ) from None
        except json.JSONDecodeError as e:
            raise DataError(f"{where}, line {n}: not JSON ({e.msg}); {expected}.") from None
        except RecursionError:
            raise DataError(f"{where}, line {n}: nested too deeply to be a row; {expected}.") from None
        except ValueError as e:  # an integer past Python's digit limit for str -> int
            raise DataError(f"{where}, line {n}: {e}; {expected}.") from None
        rows.append((n, value))
    return rows


def read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}).") from None


def read_jsonl(path: Path, fields: tuple[str, ...], problem=None) -> list[dict]:
    numbered = numbered_lines(read_bytes(path), str(path), _expected(fields))
    return check([v for _, v in numbered], fields, str(path), "line", problem, [n for n, _ in numbered])


class Scorer(Protocol):
    """What a task's `test` asks of the model being scored (`evaluate.Scorer`: a model with its
    decoding and loss options)."""

    def scores(self, task: TaskLike, rows: list[dict]) -> dict:
        """`task.score` of answers generated greedily for `rows`, then "predictions": those answers."""
        ...

    def loss(self, task: TaskLike, rows: list[dict]) -> float:
        """The mean loss per answer token of `task.encode`'s examples of `rows`."""
        ...


@runtime_checkable
class TaskLike(Protocol):
    """What training and evaluation use of a task, and all they use: the paper's tasks (`Task`)
    and the user's own rows (`OwnData`, tasks/own.py) both satisfy it, so neither asks where a
    task's rows came from."""

    name: str  # recorded as the "task" of results.json and of `tiedlora eval`'s scores

    def load(self, split: str, source: str | Path = "bundled") -> Rows:
        """The rows a run trains on ("train"), validates on ("validation") and tests on ("test")."""
        ...

    def eval_rows(self, split: str, source: str | Path = "bundled") -> Rows:
        """The rows `tiedlora eval --split` scores."""
        ...

    def encode(self, tokenizer, row: dict, chat: bool = False) -> dict[str, list[int]]:
        """input_ids and labels of a training example (labels -100 except on the answer)."""
        ...

    def prompt_ids(self, tokenizer, row: dict, chat: bool = False) -> list[int]:
        """The tokens the model is asked, to generate its answer."""
        ...

    def score(self, predictions: list[str], rows: list[dict]) -> dict:
        """Scores of generated answers on 0-100, the headline first."""
        ...

    def test(self, scorer: Scorer, rows: list[dict]) -> dict:
        """The test scores of `rows` that a run records and `tiedlora eval` prints, then "predictions"."""
        ...

    def predictions_file(
        self, tokenizer, rows: list[dict], predictions: list[str], chat: bool = False
    ) -> tuple[str, list[dict]]:
        """The run folder's file that keeps `test`'s predictions, and its lines."""
        ...

    def choices(self, row: dict) -> tuple[str, list[str], int]:
        """For `tiedlora eval --loglik`: the context, the continuations to compare and the right one."""
        ...


class Task:
    """One of the paper's tasks. A subclass names its data and fields and defines `target`
    and `metric`; the prompt is its template in prompts.py."""

    name: str
    folder: str  # the task's folder under a data root (the bundled one, ../shared/data)
    fields: tuple[str, ...]  # what each row needs, as `check` reads them
    group: tuple[str, ...]  # fields whose values must never straddle two splits
    hub: dict  # datasets.load_dataset arguments
    official: tuple[str, ...] = SPLITS  # the labelled official splits
    held_out: int = 0  # the paper's rule (SQuAD): validation = this many seed-0 sampled train rows

    def prompt(self, row: dict) -> str:
        return TEMPLATES[self.name].format(**row)

    def problem(self, row: dict) -> str | None:
        """What makes a row (with every field there) unusable, or None: by default a field
        that is not text."""
        return not_text(row, [alt for f in self.fields for alt in f.split("|")])

    def encode(self, tokenizer, row: dict, chat: bool = False) -> dict[str, list[int]]:
        """The row as a training example: its prompt, then its target, the loss on the target."""
        return encode(tokenizer, self.prompt(row), self.target(row), chat)

    def prompt_ids(self, tokenizer, row: dict, chat: bool = False) -> list[int]:
        """The tokens the model is asked, to generate its answer."""
        return prompt_ids(tokenizer, self.prompt(row), chat)

    def target(self, row: dict) -> str:
        raise NotImplementedError

    def metric(self, predictions: list[str], rows: list[dict]) -> dict:
        raise NotImplementedError

    def row_statistics(self, predictions: list[str], rows: list[dict]) -> list[list[float]]:
        """Per row, numbers whose sum over any sample of rows gives that sample's headline
        (`of_statistics`), so a bootstrap resamples rows without scoring them again. For
        metrics that average over rows, a row's own headline."""
        return [[next(iter(self.score([p], [r]).values()))] for p, r in zip(predictions, rows)]

    def of_statistics(self, sums, rows: int) -> float:
        """The headline of `rows` rows (counted with repeats) whose `row_statistics` sum to `sums`."""
        return float(sums[0]) / rows

    def choices(self, row: dict) -> tuple[str, list[str], int]:
        """For multiple-choice tasks: the context, the continuations to compare and the right one."""
        raise DataError(f"{self.name} is not multiple choice: score it by generation, without --loglik.")

    def test(self, scorer: Scorer, rows: list[dict]) -> dict:
        """The headline metric (and the others) of answers generated for every row, then "predictions"."""
        return scorer.scores(self, rows)

    def predictions_file(
        self, tokenizer, rows: list[dict], predictions: list[str], chat: bool = False
    ) -> tuple[str, list[dict]]:
        """predictions.jsonl: each test row's answer, in the order of the rows (`tiedlora report`
        rescores them for its intervals)."""
        return PREDICTIONS, [{"prediction": p} for p in predictions]

    def from_hub(self, rows: list[dict]) -> list[dict]:
        """The Hub copy in the layout of the official files, which the local sources keep."""
        return rows

    def score(self, predictions: list[str], rows: list[dict]) -> dict:
        """Scores on 0-100, the headline metric first."""
        if not rows or len(predictions) != len(rows):
            raise DataError(
                f"{self.name}: {len(predictions)} predictions for {len(rows)} rows; need one per row, at least one."
            )
        return self.metric(predictions, rows)

    def eval_rows(self, split: str, source: str | Path = "bundled") -> Rows:
        """The split `tiedlora eval --split` scores."""
        return self.load(split, source)

    def load(self, split: str, source: str | Path = "bundled") -> Rows:
        if split not in SPLITS:
            raise DataError(f"{self.name}: no split {split!r}; use one of {', '.join(SPLITS)}.")
        if source not in ("hub", "bundled") and Path(source).is_file():
            rows, rule, location = (
                read_jsonl(Path(source), self.fields, self.problem),
                "the file as given, no split rule",
                source,
            )
        else:
            read, have, location = self._hub() if source == "hub" else self._folder(source)
            rows, rule = self._split(split, read, have)
        if not rows:
            raise DataError(f"{self.name}: the {split} split of {location} is empty ({rule}).")
        info = {
            "task": self.name,
            "split": split,
            "source": str(source),
            "location": str(location),
            "rule": rule,
            "rows": len(rows),
        }
        return Rows(rows, info)

    def _folder(self, source: str | Path):
        """(read a split, the splits there, where): `source` may also be a root with a folder per task."""
        path = BUNDLED / self.folder if source == "bundled" else Path(source)
        path = path / self.folder if (path / self.folder).is_dir() else path
        if not path.is_dir():
            raise DataError(f"{self.name}: source {str(source)!r} is not 'bundled', 'hub', a folder or a .jsonl file.")

        have = [s for s in SPLITS if (path / f"{s}.jsonl").is_file()]
        if not have:
            raise DataError(f"{self.name}: {path} has none of {', '.join(f'{s}.jsonl' for s in SPLITS)}.")

        def read(s):
            return read_jsonl(path / f"{s}.jsonl", self.fields, self.problem)

        return read, have, path

    def _split(self, split: str, read, have: list[str]) -> tuple[list[dict], str]:
        """The rows of `split` and the rule that chose them (docs/tasks.md, "Splits")."""
        if "train" not in have:
            pool = [row for s in have for row in read(s)]
            rows = [r for r in pool if next(s for s, bound in OFFLINE.items() if share(r, self.group) < bound) == split]
            return (
                rows,
                f"offline split: {' + '.join(have)} pooled, 80/10/10 to train/validation/test by sha256 of "
                f"{'+'.join(self.group)}",
            )
        test = "test" if "test" in self.official else "validation"
        if split == "test":
            return read(test), f"official {test} split"
        if "validation" in self.official and test == "test":
            return read(split), f"official {split} split"
        train = read("train")
        if self.held_out:
            if len(train) <= self.held_out:
                raise DataError(
                    f"{self.name}: train has {len(train)} rows; the paper's rule holds out {self.held_out} "
                    "of them for validation."
                )
            picked = set(random.Random(0).sample(range(len(train)), self.held_out))
            held = [i in picked for i in range(len(train))]
            rule = f"{self.held_out} train rows (seed-0 sample, the paper's rule)"
        else:
            held = [share(r, self.group) < HELD_OUT for r in train]
            rule = f"train rows with sha256 of {'+'.join(self.group)} in the first {round(100 * HELD_OUT)}%"
        keep = split == "validation"
        rows = [r for r, h in zip(train, held) if h == keep]
        return rows, (f"validation = {rule}" if keep else f"official train split minus the validation rows ({rule})")

    def _hub(self):
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"{self.name}: source 'hub' needs the datasets package: pip install 'tiedlora[hub]'."
            ) from None
        location = ", ".join(f"{k}={v}" for k, v in self.hub.items())

        def read(s):
            rows = self.from_hub([dict(r) for r in datasets.load_dataset(**self.hub, split=s)])
            return check(rows, self.fields, f"Hub {location}, split {s}", "row", self.problem)

        return read, list(self.official), location
