"""Hostile and damaged adapter files and data rows: each gets one TiedLoraError (or DataError)
naming the file and what is wrong, before any tensor reaches a model; and an adapter folder is
written as a unit. docs/RELIABILITY.md counts these cases."""

import csv
import errno
import hashlib
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import tiedlora
from tiedlora import TiedLoraConfig, TiedLoraError
from tiedlora.adapter_file import CONFIG, TENSORS, read_adapter
from tiedlora.cli import main
from tiedlora.multi import MultiAdapterModel
from tiedlora.serve.vllm_plugin import ExportCache
from tiedlora.tasks import DataError, get
from tiedlora.train import Checkpoints, TrainConfig, train

from conftest import randomize, record_steps, small_run, tiny_model


@pytest.fixture
def saved(tmp_path):
    folder = tmp_path / "adapter"
    tiedlora.save(
        randomize(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=4)), trainable_only=True),
        folder,
    )
    return folder


def rewrite(folder, meta=None, tensors=None):
    """Change the config or the tensors, keeping the recorded sha256 true to the tensors."""
    if tensors is not None:
        save_file(tensors, folder / TENSORS)
    meta = meta if meta is not None else json.loads((folder / CONFIG).read_text())
    if isinstance(meta, dict) and isinstance(meta.get("tensors"), dict):
        meta["tensors"]["sha256"] = hashlib.sha256((folder / TENSORS).read_bytes()).hexdigest()
    (folder / CONFIG).write_text(json.dumps(meta))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A server over the tiny Llama whose adapters root holds every test's tmp_path."""
    from fastapi.testclient import TestClient

    from tiedlora.serve.app import Served, create_app
    from tiedlora.serve.engine import Engine

    root = tmp_path_factory.getbasetemp()
    engine = Engine(MultiAdapterModel(tiny_model("llama")), tokenizer=None)
    with TestClient(create_app(Served(engine, None, "tiny", root))) as client:
        yield client, root
    engine.close()


def both_readers_refuse(folder, words, server):
    """tiedlora.load, MultiAdapterModel.add, the vLLM plugin's export cache and the server's
    POST /v1/adapters give the same error (the server's naming its adapters root, not its path)."""
    with pytest.raises(TiedLoraError, match=words) as by_load:
        tiedlora.load(tiny_model("llama"), folder)
    with pytest.raises(TiedLoraError, match=words) as by_add:
        MultiAdapterModel(tiny_model("llama")).add("x", folder)
    assert str(by_load.value) == str(by_add.value)
    client, root = server
    cache = ExportCache(folder.parent, folder.parent / "vllm-cache", skeleton=lambda _: tiny_model("llama"))
    with pytest.raises(TiedLoraError, match=words) as by_plugin:
        cache.resolve("tiny", folder.name)
    assert str(by_plugin.value) == str(by_load.value)
    assert not any((folder.parent / "vllm-cache").iterdir())  # nothing exported
    r = client.post("/v1/adapters", json={"name": "x", "path": str(folder.relative_to(root))})
    assert r.status_code == 400 and r.json()["error"] == {  # the same, but for the server's own path
        "message": str(by_load.value).replace(str(root), "<adapters>"),
        "type": "invalid_request_error",
        "param": "path",
        "code": None,
    }


def test_deeply_nested_json_and_huge_integers_are_refused(saved, server):
    (saved / CONFIG).write_text("[" * 100_000 + "]" * 100_000)
    both_readers_refuse(saved, "is not valid JSON \\(RecursionError", server)
    (saved / CONFIG).write_text('{"format": "tiedlora", "format_version": ' + "9" * 5000 + "}")
    both_readers_refuse(saved, "is not valid JSON \\(ValueError: Exceeds the limit", server)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf"), 1e38])
def test_non_finite_or_absurd_tensors_are_refused_by_name(saved, value, server):
    tensors = load_file(saved / TENSORS)
    tensors["qkv.layers.1.v"][3] = value
    rewrite(saved, tensors=tensors)
    both_readers_refuse(saved, "tensor qkv.layers.1.v holds NaN, infinite or absurd values", server)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t: t.clear(), "holds tensors \\['qkv.A', 'qkv.B'"),  # empty: frozen values must not be regenerated
        (lambda t: t.update(extra=torch.zeros(2)), "holds tensors \\['extra'\\] that do not match"),
        (lambda t: t.update({"qkv.A": t["qkv.A"].long()}), "tensor qkv.A is torch.int64"),
        (lambda t: t.update({"qkv.A": t["qkv.A"] > 0}), "tensor qkv.A is torch.bool"),
        (
            lambda t: t.update({"qkv.A": t["qkv.A"][:, :-1].contiguous()}),
            "expected a float tensor of shape \\(4, 64\\)",
        ),
    ],
)
def test_tensor_files_that_do_not_match_their_config_are_refused(saved, change, words, server):
    tensors = load_file(saved / TENSORS)
    change(tensors)
    rewrite(saved, tensors=tensors)
    both_readers_refuse(saved, words, server)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda m: m["config"].update(alpha=1e300), "alpha=1e\\+300 must be a positive number up to 1e\\+06"),
        (lambda m: m["config"]["u"].update(init=1e30), "init=1e\\+30 is not an initialisation"),
        (lambda m: m.update(format_version=999), "format_version 999; this tiedlora reads version 1: upgrade"),
        (lambda m: m.update(format_version=True), "format_version True"),
        (lambda m: m["config"].update(layers=[99]), "layers=\\[99\\] names layers \\[99\\], but the model has 3"),
        (lambda m: m["config"].update(rank=65), "rank 65 is larger than the 'qkv' projection \\(64 -> 128\\)"),
        (
            lambda m: m["config"].update(
                rank=10**9,
                A={"tied": True, "trainable": False, "init": "kaiming"},
                B={"tied": True, "trainable": False, "init": "kaiming"},
                u={"tied": False, "trainable": False, "init": "ones"},
                v={"tied": False, "trainable": False, "init": "ones"},
            ),
            "rank 1000000000 is larger",
        ),
        (lambda m: m["base_model"].update(groups=[1, 2]), '"base_model" must give "layers"'),
        (lambda m: m["base_model"].update(layers="3"), '"base_model" must give "layers"'),
        (lambda m: m["config"].update(targets=["o"]), '"base_model.groups.o" must give "d_in"'),
        (lambda m: m["base_model"]["groups"]["qkv"].update(d_out=64), '"base_model.groups.qkv" must give'),
        # numbers of any size are bounded before anything is built from them
        (lambda m: m["config"]["u"].update(init=10**400), "init=1000000000.* is not an initialisation"),
        (lambda m: m["config"].update(alpha=10**400), "alpha=1000000000.* must be a positive number"),
        (lambda m: m["base_model"].update(layers=8_000_000), "a count from 1 to 10,000"),
        (lambda m: m["base_model"]["groups"]["qkv"].update(d_in=10**12), "of positive sizes \\(at most 4,194,304\\)"),
        # member names the model would never resolve, and members other than the ones recorded
        (
            lambda m: m["config"].update(targets={"qkv": ["self_attn.__class__", "..", "self_attn.v_proj"]}),
            "without private parts such as '__class__'",
        ),
        (
            lambda m: m["config"].update(targets={"qkv": ["self_attn.v_proj", "self_attn.k_proj", "self_attn.q_proj"]}),
            "targets names the modules \\['self_attn.v_proj'",
        ),
    ],
)
def test_configs_that_do_not_fit_their_base_are_refused(saved, change, words, server):
    meta = json.loads((saved / CONFIG).read_text())
    change(meta)
    rewrite(saved, meta)
    both_readers_refuse(saved, words, server)


def test_a_huge_tensor_file_is_refused_by_its_size_before_it_is_read(saved, monkeypatch, server):
    with open(saved / TENSORS, "r+b") as f:
        f.truncate(6 << 30)  # 6 GB, sparse: nothing is written
    meta = json.loads((saved / CONFIG).read_text())
    (saved / CONFIG).write_text(json.dumps(meta))
    read = []
    real = type(saved).read_bytes
    monkeypatch.setattr(type(saved), "read_bytes", lambda self: read.append(self.name) or real(self))
    both_readers_refuse(saved, "is 6,442,450,944 bytes, more than its config's tensors can take", server)
    assert TENSORS not in read


@pytest.mark.parametrize("name", [CONFIG, TENSORS])
def test_files_that_are_links_are_refused(saved, tmp_path, name, server):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (saved / name).rename(outside / name)
    (saved / name).symlink_to(outside / name)
    both_readers_refuse(saved, f"{name} is a link; an adapter folder holds its own files", server)


def test_an_adapter_folder_is_replaced_as_a_unit(saved, monkeypatch):
    """A save that dies between the two files leaves the old adapter whole, never new tensors with an old config."""
    import tiedlora.atomic as atomic

    before = read_adapter(saved)
    model = randomize(
        tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=4)), seed=9, trainable_only=True
    )
    real = atomic.write_atomic

    def dies_at_the_config(path, data):
        if path.name == CONFIG:
            raise SystemExit("killed")
        real(path, data)

    monkeypatch.setattr(atomic, "write_atomic", dies_at_the_config)
    with pytest.raises(SystemExit):
        tiedlora.save(model, saved)
    monkeypatch.undo()
    after = read_adapter(saved)
    assert after.meta == before.meta and all(torch.equal(after.tensors[k], before.tensors[k]) for k in before.tensors)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["adapter"]  # no temporary folder left
    tiedlora.save(model, saved)
    assert all(
        torch.equal(read_adapter(saved).tensors[k], p)
        for k, p in tiedlora.adapter_parameters(model).items()
        if p.requires_grad
    )


def test_save_into_a_folder_with_other_files_keeps_them(saved):
    (saved / "tokenizer.json").write_text("{}")
    tiedlora.save(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=4)), saved)
    assert (saved / "tokenizer.json").read_text() == "{}" and read_adapter(saved)


SQUAD = {"context": "Paris is in France.", "question": "Where is Paris?", "answers": {"text": ["France"]}}
HELLASWAG = {"activity_label": "Cooking", "ctx": "He cracks an egg", "endings": ["a", "b", "c", "d"], "label": 2}
GSM8K = {"question": "2 + 2?", "answer": "2 + 2 = 4\n#### 4"}
BAD_ROWS = [  # (task, a good row, the change, the words of its DataError)
    ("squad", SQUAD, {"answers": {"text": []}}, "field answers.text is '\\[\\]', expected a non-empty list"),
    ("squad", SQUAD, {"answers": {"text": 5}}, "field answers.text is '5'"),
    (
        "squad",
        SQUAD,
        {"answers": {"text": "Bruno Mars"}},
        "field answers.text is 'Bruno Mars', expected a non-empty list",
    ),
    ("squad", SQUAD, {"context": None}, "field context is NoneType 'None', expected a string"),
    ("hellaswag", HELLASWAG, {"endings": ["a", "b", "c"]}, "field endings is .*, expected a list of 4 strings"),
    ("hellaswag", HELLASWAG, {"label": "x"}, "field label is 'x', expected the right ending's number, 0 to 3"),
    ("hellaswag", HELLASWAG, {"label": 7}, "field label is 7"),
    ("hellaswag", HELLASWAG, {"label": True}, "field label is True"),
    ("gsm8k", GSM8K, {"answer": "The answer is 4."}, "field answer 'The answer is 4.' does not end in '#### <number>'"),
    ("gsm8k", GSM8K, {"answer": "#### four"}, "field answer '#### four' does not end in"),
    ("iwslt2017-de-en", {"de": "Hallo", "en": "Hello"}, {"de": 5}, "field de is int '5', expected a string"),
    ("dialogsum", {"dialogue": "A: hi", "summary": "They greet."}, {"summary": ["x"]}, "field summary is list"),
]


@pytest.mark.parametrize("task, good, change, words", BAD_ROWS, ids=[f"{b[0]}-{list(b[2])[0]}" for b in BAD_ROWS])
def test_every_task_checks_each_row_and_names_the_line_and_field(tmp_path, task, good, change, words):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({**good, **change}) + "\n")
    with pytest.raises(DataError, match=f"rows.jsonl, line 2: {words}"):
        get(task).load("test", str(path))
    path.write_text(json.dumps(good) + "\n")
    assert get(task).load("test", str(path))  # the good row alone loads


def test_a_line_too_long_to_be_a_row_is_refused_before_it_is_parsed(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(GSM8K) + "\n" + json.dumps({**GSM8K, "question": "x" * (5 << 20)}) + "\n")
    with pytest.raises(DataError, match="rows.jsonl, line 2: 5,242,9.. bytes, more than the 4,194,304 a row may take"):
        get("gsm8k").load("test", str(path))
    assert os.path.getsize(path) > 5 << 20


# Run folders: every file read on resume is checked, a damaged latest checkpoint gives way to
# the one before, and writes that fail (a full disk, a folder that cannot be made) are one line.
def resumable_run(tiny_folder, tmp_path, **extra):
    """A 6-step run killed (here: stopped) after its step-4 checkpoint; checkpoints at 2 and 4 remain."""
    options = small_run(tiny_folder, tmp_path / "run", checkpoint_every=2, **extra)
    whole = train(TrainConfig(**{**options, "out": str(tmp_path / "whole")}), quiet=True)
    train(TrainConfig(**{**options, "max_steps": 4}), quiet=True)
    (tmp_path / "run" / "results.json").unlink()  # as if killed before the end
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    run["config"]["max_steps"] = 6
    (tmp_path / "run" / "run.json").write_text(json.dumps(run))
    return options, whole


@pytest.mark.parametrize(
    "damage, words",
    [
        (lambda step: (step / "state.json").write_text('{"step": 4'), "state.json is damaged: not JSON"),
        (lambda step: (step / "state.json").write_text("[]"), "state.json is damaged: expected the keys"),
        (lambda step: (step / "optimizer.safetensors").write_bytes(b"\x10\x00"), "optimizer.safetensors is damaged"),
        (lambda step: (step / "optimizer.safetensors").unlink(), "optimizer.safetensors does not exist"),
        (
            lambda step: (step / "adapter.safetensors").write_bytes(b"junk"),
            "adapter.safetensors does not match the sha256",
        ),
    ],
)
def test_a_damaged_latest_checkpoint_gives_way_to_the_one_before(
    tiny_folder, tmp_path, capsys, monkeypatch, damage, words
):
    options, whole = resumable_run(tiny_folder, tmp_path)
    damage(tmp_path / "run" / "checkpoint" / "step-4")
    steps = record_steps(monkeypatch)
    capsys.readouterr()
    resumed = train(TrainConfig(**options), resume=True, quiet=True)
    out = capsys.readouterr().out
    assert "resuming at step 2 of 6 from" in out and words in out and "resuming from the checkpoint before" in out
    assert steps == [2, 3, 4, 5] and resumed["metrics"] == whole["metrics"]


def test_no_intact_checkpoint_is_one_error_naming_them(tiny_folder, tmp_path):
    options, _ = resumable_run(tiny_folder, tmp_path)
    for step in ("step-2", "step-4"):
        (tmp_path / "run" / "checkpoint" / step / "state.json").write_text("{")
    with pytest.raises(
        TiedLoraError, match="No intact checkpoint to resume from: .*step-4/state.json is damaged.*step-2"
    ):
        train(TrainConfig(**options), resume=True, quiet=True)


@pytest.mark.parametrize("content", ["{", "{}", "[]", '{"config": 5}'])
def test_a_damaged_run_json_is_named(tiny_folder, tmp_path, capsys, content):
    flags = [f"--{k}={v}" for k, v in small_run(tiny_folder, tmp_path / "run", max_steps=2).items()]
    assert main(["train", *flags, "--quiet"]) == 0
    (tmp_path / "run" / "run.json").write_text(content)
    capsys.readouterr()
    assert main(["train", *flags, "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "run.json is damaged" in err and "Traceback" not in err


def test_latest_must_name_a_checkpoint_of_this_run(tiny_folder, tmp_path):
    options, _ = resumable_run(tiny_folder, tmp_path)
    (tmp_path / "run" / "checkpoint" / "latest").write_text("../../whole/checkpoint/step-6")
    with pytest.raises(TiedLoraError, match="names '../../whole/checkpoint/step-6', not a step-N folder of this run's"):
        train(TrainConfig(**options), resume=True, quiet=True)


def test_garbage_in_the_log_and_stale_temporary_files(tiny_folder, tmp_path, capsys):
    options, _ = resumable_run(tiny_folder, tmp_path)
    run = tmp_path / "run"
    log = run / "log.csv"
    lines = log.read_text().splitlines()
    log.write_text("\n".join([*lines[:2], "\x00\x01garbage,,", *lines[2:]]) + "\n")
    (run / ".log.csv.abc.tmp").write_text("half")
    (run / "checkpoint" / ".step-4.xyz.tmp").mkdir()
    capsys.readouterr()
    train(TrainConfig(**options), resume=True, quiet=True)
    assert f"{log} is damaged at line 3; its rows from there on are dropped." in capsys.readouterr().out
    assert [int(r["step"]) for r in csv.DictReader(log.open())] == [1, 5, 6]  # steps 2-4's rows were after the damage
    assert not list(run.rglob(".*.tmp"))


def test_an_out_that_cannot_be_made_and_a_full_disk_while_logging_are_one_line(
    tiny_folder, tmp_path, capsys, monkeypatch
):
    (tmp_path / "file").write_text("x")
    flags = [f"--{k}={v}" for k, v in small_run(tiny_folder, tmp_path / "file" / "run", max_steps=2).items()]
    assert main(["train", *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Cannot create --out" in err and "Traceback" not in err

    real_open, calls = type(tmp_path).open, []

    def full_disk(self, mode="r", *args, **kwargs):
        if self.name == "log.csv" and mode == "a":
            calls.append(1)
            if len(calls) == 3:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(type(tmp_path), "open", full_disk)
    flags = [f"--{k}={v}" for k, v in small_run(tiny_folder, tmp_path / "run", max_steps=6).items()]
    assert main(["train", *flags, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "Could not write the log in" in err and "No space left on device" in err and "Traceback" not in err
    assert (tmp_path / "run" / "checkpoint" / "latest").read_text() == "step-2"
    assert Checkpoints(tmp_path / "run").latest().name == "step-2"


@pytest.mark.parametrize("preset", ["lora", "vera", "tl1", "tl2", "tl3", "tl4", "tl5"])
def test_a_file_must_hold_what_its_stored_record_says(tmp_path, preset, server):
    """ "stored": "all" over a file of the trained tensors only would regenerate the frozen ones
    silently; "trained" over a file of all of them would ignore some: both are refused."""
    model = randomize(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset(preset, rank=4)), trainable_only=True)
    for stored, include_frozen in (("all", False), ("trained", True)):
        folder = tmp_path / f"{preset}-{stored}"
        tiedlora.save(model, folder, include_frozen=include_frozen)
        meta = json.loads((folder / CONFIG).read_text())
        meta["tensors"]["stored"] = stored
        rewrite(folder, meta)
        both_readers_refuse(folder, "holds tensors .* that do not match its config", server)
