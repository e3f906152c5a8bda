"""Your own data as a task: a file (JSON Lines, CSV or Parquet) or a Hub data set of
prompt/completion rows or chat conversations, checked row by row, split, tokenised with the loss
on the answers only, and scored. `OwnData` satisfies the same `TaskLike` protocol as the paper's
tasks, so training and evaluation take either alike.

Rows are `{"prompt": ..., "completion": ...}` (the completion follows the prompt as it is, then
EOS, as TRL reads that format) or `{"messages": [{"role": ..., "content": ...}, ...]}` (OpenAI's
chat format, rendered with the tokenizer's chat template; the loss is on every assistant turn,
and on nothing else). Without a validation file, a row is held out for validation when the
SHA-256 of its content falls in the first 10 %: the same split on every machine, whatever the
row order.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass, fields
from pathlib import Path

from ..runs import SAMPLES
from ..tokens import chat_ids, prompt_ids
from . import metrics
from .base import HELD_OUT, DataError, Rows, Scorer, numbered_lines, read_bytes, share

ROLES = ("system", "user", "assistant")


@dataclass
class OwnDataOptions:
    """How own data's rows are read and scored: one declaration for `tiedlora train` and
    `tiedlora eval` (their configs inherit it), so a file trains and scores alike."""

    prompt_field: str = "prompt"
    """With --data: the column holding the prompt."""
    completion_field: str = "completion"
    """With --data: the column holding the completion."""
    messages_field: str = "messages"
    """With --data: the column holding a conversation."""
    metric: str | None = None
    """With --data: also score generated answers against the references: exact_match, f1, rougeL or bleu."""

    def own_options(self) -> dict:
        """These options by name, as `task_for` and `OwnData` take them."""
        return {f.name: getattr(self, f.name) for f in fields(OwnDataOptions)}


METRICS = ("exact_match", "f1", "rougeL", "bleu")
FORMS = (
    'one object per row: {"prompt": str, "completion": str} or '
    '{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]} with an assistant turn'
)


class OwnData:
    """A data set of the user's own as a task (`TaskLike`): split into train and validation
    (`load`), tokenised with the loss on the answers (`encode`), tested on the validation rows by
    loss and perplexity, the chosen metric on generated answers, and `samples` generations kept
    beside the results (`test`, `predictions_file`)."""

    name = "own"

    def __init__(
        self,
        source: str,
        *,
        validation: str | None = None,
        split: str = "train",
        prompt_field: str = "prompt",
        completion_field: str = "completion",
        messages_field: str = "messages",
        metric: str | None = None,
        samples: int = 5,
    ):
        if metric is not None and metric not in METRICS:
            raise DataError(
                f"--metric {metric!r}: choose one of {', '.join(METRICS)} (or none: loss and perplexity only)."
            )
        self.source, self.validation, self.split, self.metric = source, validation, split, metric
        self.samples = samples  # without a metric, answers are generated for this many rows only
        self.fields = {"prompt": prompt_field, "completion": completion_field, "messages": messages_field}
        self._rows: dict[str, Rows] = {}

    def load(self, split: str, source: str | Path | None = None) -> Rows:
        """ "train" or "validation" ("test" is the validation rows: own data has no third split);
        `source` is the paper's tasks' option and unused: the rows come from the file or Hub data set."""
        split = "validation" if split == "test" else split
        if split not in ("train", "validation"):
            raise DataError(f"own data has the splits train and validation, not {split!r}.")
        if not self._rows:
            self._rows = self._splits()
        return self._rows[split]

    def eval_rows(self, split: str, source: str | Path | None = None) -> Rows:
        """What `tiedlora eval --data` scores: every row, unsplit (the Hub split read is the one given
        when made)."""
        return self.all_rows()

    def all_rows(self) -> Rows:
        """Every row of the source, unsplit (what `tiedlora eval --data` scores)."""
        rows, where = read_rows(self.source, self.split, self.fields)
        return Rows(
            rows,
            {
                "task": "own",
                "split": "all",
                "source": str(self.source),
                "location": where,
                "rule": "every row",
                "rows": len(rows),
            },
        )

    def _splits(self) -> dict[str, Rows]:
        rows, where = read_rows(self.source, self.split, self.fields)
        if self.validation is not None:
            held, held_where = read_rows(self.validation, "validation", self.fields)
            rule = f"train: {where}; validation: {held_where}"
            parts = {"train": rows, "validation": held}
        else:
            share_pct = round(100 * HELD_OUT)
            rule = f"{where}, split by sha256 of each row: validation = the first {share_pct}%, train = the rest"
            in_validation = [held_out(r) for r in rows]
            parts = {
                "train": [r for r, v in zip(rows, in_validation) if not v],
                "validation": [r for r, v in zip(rows, in_validation) if v],
            }
        for split, part in parts.items():
            if not part:
                raise DataError(f"{where}: the {split} split is empty ({rule}); give more rows or --validation FILE.")
        return {
            split: Rows(
                part,
                {
                    "task": "own",
                    "split": split,
                    "source": str(self.source),
                    "location": where,
                    "rule": rule,
                    "rows": len(part),
                },
            )
            for split, part in parts.items()
        }

    def encode(self, tokenizer, row: dict, chat: bool = False) -> dict[str, list[int]]:
        """input_ids and labels; labels are -100 except on the completion (and its EOS), or on
        every assistant turn of a conversation."""
        if "messages" in row:
            return encode_messages(tokenizer, row["messages"])
        if chat:
            return encode_messages(
                tokenizer,
                [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}],
            )
        context = prompt_ids(tokenizer, row["prompt"])
        answer = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        return {"input_ids": context + answer, "labels": [-100] * len(context) + answer}

    def prompt_ids(self, tokenizer, row: dict, chat: bool = False) -> list[int]:
        """What the model is asked, to generate the answer: the prompt, or the conversation up to its last "
        "assistant turn."""
        if "messages" in row:
            last = max(i for i, m in enumerate(row["messages"]) if m["role"] == "assistant")
            return chat_ids(tokenizer, row["messages"][:last])
        return prompt_ids(tokenizer, row["prompt"], chat)

    def reference(self, row: dict) -> str:
        if "messages" in row:
            return [m for m in row["messages"] if m["role"] == "assistant"][-1]["content"]
        return row["completion"]

    def score(self, predictions: list[str], rows: list[dict]) -> dict:
        """The chosen metric on 0-100 (exact match and F1 after SQuAD's normalisation, ROUGE-L, BLEU)."""
        references = [self.reference(r) for r in rows]
        if self.metric in ("exact_match", "f1"):
            scores = metrics.squad(predictions, [[r] for r in references])
            return {self.metric: scores[self.metric], **scores}
        if self.metric == "rougeL":
            return {"rougeL": metrics.rouge(predictions, [[r] for r in references])["rougeL"]}
        if self.metric == "bleu":
            return metrics.bleu(predictions, references)
        return {}

    def test(self, scorer: Scorer, rows: list[dict]) -> dict:
        """The loss per answer token and its perplexity on `rows` always; the metric on answers
        generated for every row, or without one generations for the first `samples` rows only;
        then "predictions". Rows longer than the scorer's `max_length` are cut or dropped from the
        loss as in training."""
        loss = scorer.loss(self, rows)
        # without a metric, `score` gives nothing: the generations are samples
        scored = scorer.scores(self, rows if self.metric else rows[: self.samples])
        predictions = scored.pop("predictions")
        return {**scored, "loss": loss, "perplexity": math.exp(loss), "predictions": predictions}

    def predictions_file(
        self, tokenizer, rows: list[dict], predictions: list[str], chat: bool = False
    ) -> tuple[str, list[dict]]:
        """samples.jsonl: each generated answer beside what the model was asked and the reference."""
        return SAMPLES, [
            {
                "prompt": tokenizer.decode(self.prompt_ids(tokenizer, row, chat)),
                "reference": self.reference(row),
                "prediction": p,
            }
            for row, p in zip(rows, predictions)
        ]

    def choices(self, row: dict) -> tuple[str, list[str], int]:
        raise DataError("own data is not multiple choice: score it by generation, without --loglik.")


def encode_messages(tokenizer, messages: list[dict]) -> dict[str, list[int]]:
    """A conversation in the tokenizer's chat template with labels on the assistant turns: each
    turn's tokens are what the template adds for it after the generation prompt before it."""
    full = chat_ids(tokenizer, messages, add_generation_prompt=False)
    labels = [-100] * len(full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = chat_ids(tokenizer, messages[:i]) if i else []
        through = chat_ids(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if full[: len(before)] != before or full[: len(through)] != through:
            raise DataError(
                f"The tokenizer's chat template renders a conversation's turns differently in context, so the "
                f"assistant turns cannot be found (turn {i}); use prompt/completion rows instead."
            )
        labels[len(before) : len(through)] = full[len(before) : len(through)]
    return {"input_ids": full, "labels": labels}


def read_rows(source: str, split: str, fields: dict) -> tuple[list[dict], str]:
    """Every row of a file or Hub data set, checked and in the normal form ({"prompt",
    "completion"} or {"messages"}), and where they came from."""
    path = Path(source)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".jsonl", ".json"):
            numbered, unit = numbered_lines(read_bytes(path), str(path), FORMS), "line"
        elif suffix == ".csv":
            numbered, unit = read_csv(path), "line"
        elif suffix == ".parquet":
            numbered, unit = list(enumerate(read_parquet(path), 1)), "row"
        else:
            raise DataError(f"{path}: read .jsonl, .csv or .parquet files; rename it if it is one of those.")
        where = str(path)
    elif path.exists() or path.suffix or "/" not in source:
        raise DataError(
            f"--data {source!r} is not a file (.jsonl, .csv, .parquet) nor a Hub data set name like org/name."
        )
    else:
        numbered, unit, where = list(enumerate(read_hub(source, split), 1)), "row", f"Hub {source}, split {split}"
    if not numbered:
        raise DataError(f"{where}: no rows; expected {FORMS}.")
    return [check_row(row, fields, f"{where}, {unit} {n}") for n, row in numbered], where


def held_out(row: dict) -> bool:
    """Is this (checked) row in the validation split when no validation file is given? By the
    SHA-256 of its content: the same answer on every machine, whatever the row order."""
    return share({"row": json.dumps(row, sort_keys=True)}, ("row",)) < HELD_OUT


def check_row(row, fields: dict, where: str) -> dict:
    """The row in normal form, or one DataError naming where it is, the field and the form expected."""
    if not isinstance(row, dict):
        raise DataError(f"{where}: a {type(row).__name__}, not an object; expected {FORMS}.")
    if row.get(fields["messages"]) not in (None, ""):  # an empty CSV cell: no conversation in this row
        messages = row[fields["messages"]]
        if isinstance(messages, str):  # a CSV cell holds the conversation as JSON
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise DataError(
                    f"{where}: field {fields['messages']!r} is not a JSON list ({e.msg}); expected {FORMS}."
                ) from None
        if not isinstance(messages, list) or not messages:
            raise DataError(
                f"{where}: field {fields['messages']!r} must be a non-empty list of messages; expected {FORMS}."
            )
        for i, m in enumerate(messages):
            field = f"{fields['messages']}[{i}]"
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise DataError(
                    f'{where}: {field} must be {{"role": one of {", ".join(ROLES)}, "content": a string}}, '
                    f"got {str(m)[:80]}."
                )
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(
                f"{where}: field {fields['messages']!r} has no assistant turn, so nothing to learn; expected {FORMS}."
            )
        return {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]}
    for name in ("prompt", "completion"):
        field = fields[name]
        if field not in row:
            raise DataError(f"{where}: no field {field!r}; expected {FORMS}.")
        if not isinstance(row[field], str):
            raise DataError(
                f"{where}: field {field!r} is a {type(row[field]).__name__}, not a string; expected {FORMS}."
            )
    if not row[fields["completion"]]:
        raise DataError(f"{where}: field {fields['completion']!r} is empty, so nothing to learn; expected {FORMS}.")
    return {"prompt": row[fields["prompt"]], "completion": row[fields["completion"]]}


def read_csv(path: Path) -> list[tuple[int, dict]]:
    """(line, row) of each record after the header; a quoted cell may span lines."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DataError(f"{path}: not UTF-8; expected a CSV file with a header row.") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read it ({e.strerror}).") from None
    reader = csv.DictReader(io.StringIO(text))
    try:
        return [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise DataError(f"{path}, line {reader.line_num}: not CSV ({e}).") from None


def read_parquet(path: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(f"{path}: reading Parquet needs pyarrow: pip install pyarrow.") from None
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # noqa: BLE001 - pyarrow raises many kinds for a damaged file
        raise DataError(f"{path}: not a readable Parquet file ({type(e).__name__}: {e}).") from None


def read_hub(name: str, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"--data {name}: a Hub data set needs the datasets package: pip install 'tiedlora[hub]'."
        ) from None
    try:
        return [dict(r) for r in datasets.load_dataset(name, split=split)]
    except Exception as e:  # noqa: BLE001 - the Hub, the network and the data set can each fail many ways
        raise DataError(
            f"--data {name}: could not load split {split!r} from the Hub ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else ''})."
        ) from None
