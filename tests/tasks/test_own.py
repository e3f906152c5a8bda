"""Own data (`--data`): both row formats from JSON Lines, CSV and Parquet, one clear error per bad
row, the split, the loss on the answers only, packing without cross-talk, and the run end to end."""

import csv
import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from tiedlora.cli import main
from tiedlora.loss import TokenLoss, collate, pack_rows, packed_batch
from tiedlora.tasks import DataError
from tiedlora.tasks.own import OwnData, encode_messages

from conftest import small_run

CHAT = [
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
    {"role": "assistant", "content": "Ciao"},
]


def prompt_rows(n=40):
    return [{"prompt": f"What is {i} plus {i}? ", "completion": str(2 * i)} for i in range(n)]


def chat_rows(n=40):
    return [
        {"messages": [{"role": "user", "content": f"Say {i}."}, {"role": "assistant", "content": f"{i}"}]}
        for i in range(n)
    ]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_folder):
    return AutoTokenizer.from_pretrained(tiny_folder)


def test_both_formats_from_jsonl_csv_and_parquet_read_alike(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = prompt_rows(3) + [{"messages": CHAT}]
    write_jsonl(tmp_path / "d.jsonl", rows)
    with (tmp_path / "d.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, ["prompt", "completion", "messages"])
        writer.writeheader()
        writer.writerows(
            [{**r, "messages": ""} for r in rows[:3]] + [{"prompt": "", "completion": "", "messages": json.dumps(CHAT)}]
        )
    pq.write_table(
        pa.Table.from_pylist([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows[:3]]),
        tmp_path / "d.parquet",
    )
    own = {suffix: OwnData(str(tmp_path / f"d.{suffix}")).all_rows() for suffix in ("jsonl", "csv", "parquet")}
    assert list(own["jsonl"]) == rows
    assert list(own["csv"][:3]) == rows[:3] and own["csv"][3] == {"messages": CHAT}
    assert list(own["parquet"]) == rows[:3]


def test_column_names_are_options(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", [{"q": "2+2=", "a": "4"}, {"chat": CHAT}])
    rows = OwnData(str(tmp_path / "d.jsonl"), prompt_field="q", completion_field="a", messages_field="chat").all_rows()
    assert list(rows) == [{"prompt": "2+2=", "completion": "4"}, {"messages": CHAT}]


BAD = [  # (the third line of a file, the words its DataError must contain)
    ('{"prompt": "a", "completion": 5}', "line 3: field 'completion' is a int, not a string"),
    ('{"prompt": "a"}', "line 3: no field 'completion'"),
    ('{"prompt": "a", "completion": ""}', "line 3: field 'completion' is empty"),
    ('{"messages": "hello"}', "line 3: field 'messages' is not a JSON list"),
    ('{"messages": []}', "line 3: field 'messages' must be a non-empty list"),
    (
        '{"messages": [{"role": "robot", "content": "x"}]}',
        'line 3: messages[0] must be {"role": one of system, user, assistant',
    ),
    ('{"messages": [{"role": "user", "content": 3}]}', "line 3: messages[0] must be"),
    ('{"messages": [{"role": "user", "content": "x"}]}', "line 3: field 'messages' has no assistant turn"),
    ("[1, 2]", "line 3: a list, not an object"),
    ('{"prompt": "a", "completion": "b"', "line 3: not JSON"),
]


@pytest.mark.parametrize("line, words", BAD, ids=[b[1][8:40] for b in BAD])
def test_every_bad_row_is_one_error_naming_the_file_line_and_field(tmp_path, line, words):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "completion": "b"}\n' * 2 + line + "\n")
    with pytest.raises(DataError, match=f"{path}, {words}".replace("[", "\\[").replace("{", "\\{").replace("(", "\\(")):
        OwnData(str(path)).all_rows()


def test_bad_csv_and_parquet_rows_and_sources(tmp_path):
    (tmp_path / "d.csv").write_text('prompt,completion\n"a","b"\n"c",\n')
    with pytest.raises(DataError, match="d.csv, line 3: field 'completion' is empty"):
        OwnData(str(tmp_path / "d.csv")).all_rows()
    (tmp_path / "d.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(DataError, match="not a readable Parquet file"):
        OwnData(str(tmp_path / "d.parquet")).all_rows()
    (tmp_path / "d.txt").write_text("x")
    with pytest.raises(DataError, match="read .jsonl, .csv or .parquet files"):
        OwnData(str(tmp_path / "d.txt")).all_rows()
    with pytest.raises(DataError, match="is not a file .* nor a Hub data set name"):
        OwnData(str(tmp_path / "missing.jsonl")).all_rows()
    with pytest.raises(DataError, match="--metric 'accuracy'"):
        OwnData("x.jsonl", metric="accuracy")


def test_the_hash_split_is_ten_percent_and_ignores_row_order(tmp_path):
    rows = prompt_rows(400)
    a = OwnData(str(write_jsonl(tmp_path / "a.jsonl", rows)))
    b = OwnData(str(write_jsonl(tmp_path / "b.jsonl", rows[::-1])))
    held = [r["prompt"] for r in a.load("validation")]
    assert sorted(held) == sorted(r["prompt"] for r in b.load("validation"))
    assert 20 <= len(held) <= 60 and len(a.load("train")) == 400 - len(held)
    assert not set(held) & {r["prompt"] for r in a.load("train")}
    assert "sha256" in a.load("train").info["rule"] and a.load("test") == a.load("validation")
    c = OwnData(str(tmp_path / "a.jsonl"), validation=str(write_jsonl(tmp_path / "v.jsonl", rows[:3])))
    assert list(c.load("validation")) == rows[:3] and len(c.load("train")) == 400


def test_the_loss_is_on_the_completion_and_its_eos_only(tokenizer):
    e = OwnData("-").encode(tokenizer, {"prompt": "Two plus two is", "completion": " four."})
    answer = [t for t, label in zip(e["input_ids"], e["labels"]) if label != -100]
    assert e["labels"] == [-100] * (len(e["input_ids"]) - len(answer)) + answer
    assert tokenizer.decode(answer) == " four." + tokenizer.eos_token


def test_the_loss_is_on_every_assistant_turn_and_nothing_else(tokenizer):
    e = encode_messages(tokenizer, CHAT)
    text = tokenizer.decode(e["input_ids"])
    assert text == tokenizer.apply_chat_template(CHAT, tokenize=False)
    spans, current = [], []
    for t, label in zip(e["input_ids"], e["labels"]):
        if label != -100:
            assert label == t
            current.append(t)
        elif current:
            spans.append(tokenizer.decode(current))
            current = []
    spans += [tokenizer.decode(current)] if current else []
    assert spans == ["Hello!<|im_end|>\n", "Ciao<|im_end|>\n"]


def test_generation_prompts_and_references(tokenizer):
    own = OwnData("-")
    asked = tokenizer.decode(own.prompt_ids(tokenizer, {"messages": CHAT}))
    assert asked.endswith("<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n") and "Ciao" not in asked
    assert own.reference({"messages": CHAT}) == "Ciao" and own.reference({"prompt": "a", "completion": "b"}) == "b"


def test_packed_examples_do_not_see_each_other(tiny_folder, tokenizer):
    """The summed loss of a packed row equals the sum of each example's loss alone."""
    model = AutoModelForCausalLM.from_pretrained(tiny_folder).eval()
    own = OwnData("-")
    examples = [own.encode(tokenizer, r) for r in prompt_rows(5)] + [encode_messages(tokenizer, CHAT)]
    loss = TokenLoss(model)
    with torch.no_grad():
        alone = sum(loss(**collate([e], 0, "cpu")).item() for e in examples)
        packed = packed_batch(pack_rows(examples, 1024), 0, "cpu")
        assert packed["input_ids"].shape[0] == 1
        together = loss(**packed).item()
        rows = packed_batch(pack_rows(examples, 40), 0, "cpu")  # narrower rows: several, padded with a filler sequence
        assert rows["input_ids"].shape[0] > 1
        several = loss(**rows).item()
    assert together == pytest.approx(alone, rel=1e-4) and several == pytest.approx(alone, rel=1e-4)


@pytest.mark.parametrize("too_long", ["cut", "drop"])
def test_rows_too_long_are_cut_or_dropped_and_counted(tiny_folder, tmp_path, capsys, too_long):
    rows = prompt_rows(30) + [{"prompt": "word " * 200 + str(i), "completion": "end"} for i in range(12)]
    data = write_jsonl(tmp_path / "d.jsonl", rows)
    flags = [
        f"--{k}={v}"
        for k, v in small_run(tiny_folder, tmp_path / "run", max_steps=2, val_every=2).items()
        if k not in ("task", "train_rows", "test_rows")
    ]
    assert main(["train", *flags, f"--data={data}", "--max_length=64", f"--too_long={too_long}", "--quiet"]) == 0
    out = capsys.readouterr().out
    fate = "they were left out (--too_long drop)" if too_long == "drop" else "their prompts were cut from the start"
    long_in_train = sum(1 for r in OwnData(str(data)).load("train") if r["prompt"].startswith("word"))
    total = len(OwnData(str(data)).load("train"))
    assert long_in_train > 0 and f"{long_in_train} of {total} training examples exceed --max_length 64; {fate}." in out


@pytest.mark.parametrize("rows", [prompt_rows, chat_rows], ids=["prompt-completion", "messages"])
def test_train_and_eval_on_own_data(tiny_folder, tmp_path, capsys, rows):
    data = write_jsonl(tmp_path / "d.jsonl", rows())
    run = tmp_path / "run"
    flags = [
        f"--{k}={v}"
        for k, v in small_run(tiny_folder, run, max_steps=4).items()
        if k not in ("task", "train_rows", "test_rows")
    ]
    assert main(["train", *flags, f"--data={data}", "--metric=exact_match", "--samples=3", "--packing", "--quiet"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "own"
    metrics = results["metrics"]
    assert list(metrics) == ["exact_match", "f1", "loss", "perplexity"]
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"])) and metrics["loss"] > 0
    assert results["data"]["train"]["task"] == "own" and "sha256" in results["data"]["train"]["rule"]
    assert results["recipe"]["data"] == str(data) and results["recipe"]["packing"] is True
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    held = list(OwnData(str(data)).load("validation"))
    assert len(samples) == len(held) and {"prompt", "reference", "prediction"} == set(samples[0])
    assert [s["reference"] for s in samples] == [OwnData("-").reference(r) for r in held]
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--data", str(data), "--max_new_tokens=3", "--limit=6"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["rows"] == 6 and list(scored["metrics"]) == ["loss", "perplexity"]


def test_a_hub_data_set_by_name_with_its_split_and_columns(monkeypatch, tmp_path):
    """The Hub cannot be reached from here: a stand-in `datasets` answers load_dataset(name, split=...)."""
    import sys
    import types

    asked = []

    def load_dataset(name, split):
        asked.append((name, split))
        return [{"q": f"question {i}", "a": f"answer {i}"} for i in range(30)] + [{"q": "x", "a": 3}]

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    own = OwnData("org/my-data", split="dev", prompt_field="q", completion_field="a")
    with pytest.raises(DataError, match="Hub org/my-data, split dev, row 31: field 'a' is a int, not a string"):
        own.all_rows()
    assert asked == [("org/my-data", "dev")]


def test_eval_refuses_what_it_cannot_score_in_one_line(tiny_folder, tmp_path, capsys):
    data = str(write_jsonl(tmp_path / "d.jsonl", prompt_rows(4)))
    cases = [
        (["--task=squad", f"--data={data}", "--base"], "eval needs one of --task (a paper task) or --data"),
        (["--base"], "eval needs one of --task (a paper task) or --data"),
        ([f"--data={data}"], "eval needs --adapter runs/x (or an adapter folder), or --base"),
        ([f"--data={data}", "--base", f"--model={tiny_folder}", "--loglik"], "own data is not multiple choice"),
    ]
    for flags, words in cases:
        assert main(["eval", *flags]) == 2, flags
        err = capsys.readouterr().err  # after any "Loading weights" bar
        assert err.splitlines()[-1].startswith(f"tiedlora eval: {words}") and "Traceback" not in err, err


ROW = '{"prompt": "Q", "completion": " A"}'


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"prompt": "x\\ud800", "completion": " y"}', "line 2: holds an unpaired surrogate escape"),
        ("[" * 100_000 + "]" * 100_000, "line 2: nested too deeply to be a row"),
        ('{"prompt": "x", "completion": " y", "n": ' + "9" * 5000 + "}", "line 2: Exceeds the limit"),
        ('{"prompt": "' + "x" * (4 << 20) + '", "completion": " y"}', "line 2: 4,194,3"),
        (b"\xff\xfe".decode("latin-1"), "line 2: not UTF-8"),
        ('{"prompt": "x",', "line 2: not JSON"),
    ],
)
def test_the_row_reader_refuses_what_no_row_is_naming_the_line(tmp_path, line, message):
    """One reader (`numbered_lines`) for --data and the service's uploads: bounded parsing, each
    refusal a DataError naming the line, never a RecursionError or a tokenizer's TypeError later."""
    path = tmp_path / "rows.jsonl"
    path.write_bytes((ROW + "\n" + line + "\n").encode("utf-8" if "\xff" not in line else "latin-1"))
    with pytest.raises(DataError, match=message):
        OwnData(str(path)).load("train")


def test_the_row_reader_splits_on_newlines_alone_and_skips_blank_lines(tmp_path):
    """Blank lines and CRLF ends are fine; U+2028 and U+0085 inside a string (what json.dumps with
    ensure_ascii=False writes) are text, not line breaks; a refusal names the real line number."""
    rows = [{"prompt": f"Q{i}\u2028\u0085", "completion": f" A{i}"} for i in range(30)]
    text = "\r\n\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n"
    path = tmp_path / "rows.jsonl"
    path.write_text(text, encoding="utf-8", newline="")
    data = OwnData(str(path))
    read = list(data.load("train")) + list(data.load("validation"))
    assert sorted(r["prompt"] for r in read) == sorted(r["prompt"] for r in rows)
    path.write_text(text + '{"prompt": 3}\n', encoding="utf-8", newline="")
    with pytest.raises(DataError, match="line 61"):
        OwnData(str(path)).load("train")
