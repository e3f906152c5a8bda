"""The training harness end to end on a tiny random Llama with SmolLM2's tokenizer."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tiedlora import TiedLoraError
from tiedlora.cli import main
from tiedlora.loss import TokenLoss
from tiedlora.train import Diverged, TrainConfig, lr_at, micro_batches, step_batches, train

from conftest import latest_step, record_steps, small_run

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}


def options(tiny_folder, out, **extra):
    return small_run(tiny_folder, out, **{"test_rows": 3, "max_new_tokens": 4, "eval_batch_size": 4, **extra})


def flags(tiny_folder, out, **extra):
    return [
        (f"--{k}" if v else f"--no_{k}") if isinstance(v, bool) else f"--{k}={v}"
        for k, v in options(tiny_folder, out, **extra).items()
    ]


def adapter_tensors(folder):
    return load_file(folder / "adapter.safetensors")


def test_learning_rate_is_warmup_then_cosine():
    cfg = TrainConfig(lr=1e-3, warmup_steps=10, max_steps=110)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(5e-4) and lr_at(110, cfg) == pytest.approx(0.0)


def test_data_order_covers_each_epoch_once_and_splits_evenly():
    cfg = TrainConfig(batch_size=4, micro_batch_size=1, seed=3)
    seen = [i for step in range(5) for i in step_batches(20, cfg, step)]
    assert sorted(seen) == list(range(20)) and step_batches(20, cfg, 5) != step_batches(20, cfg, 0)
    examples = [{"input_ids": [0] * n} for n in range(20)]
    shares = [micro_batches(list(range(7)), examples, cfg, 2, r) for r in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 4
    assert sorted(i for s in shares for chunk in s for i in chunk) == list(range(7))


def test_token_loss_equals_the_model_loss(tiny_folder):
    from tiedlora.models import load_model

    model, _ = load_model(str(tiny_folder))
    ids = torch.randint(0, 1000, (2, 12))
    labels = ids.clone()
    labels[:, :5] = -100
    labels[1, 10:] = -100
    mask = (labels != -100).long() | 1
    n = int((labels[:, 1:] != -100).sum())
    expected = model(input_ids=ids, attention_mask=mask, labels=labels).loss * n
    torch.testing.assert_close(TokenLoss(model)(ids, mask, labels), expected, rtol=1e-5, atol=1e-4)


def test_train_eval_merge_export_cycle(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *flags(tiny_folder, run, val_metric=True), "--quiet"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["task"] == "squad" and results["config"] == "tl6" and results["steps"] == 6
    # tl6 r4 on every group by default: tied A (r x d_in) and B (d_out x r), u (r) and v (d_out) in each of 2 layers
    group = {"qkv": (32, 64), "o": (32, 32), "mlp_in": (32, 128), "mlp_out": (64, 32)}
    assert results["params"] == sum(4 * d_in + d_out * 4 + 2 * (4 + d_out) for d_in, d_out in group.values()) == 2208
    assert list(results["metrics"]) == ["exact_match", "f1"]
    assert results["data"]["train"]["rule"] and results["data"]["test_rows_used"] == 3
    assert set(results["versions"]) == {"tiedlora", "torch", "transformers", "python"}
    with (run / "log.csv").open() as f:
        log = list(csv.DictReader(f))
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4, 5, 6]
    assert [r["val_loss"] != "" for r in log] == [False, True, False, True, False, True]
    assert [r["val_metric"] != "" for r in log] == [False, True, False, True, False, True]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tensorboard").iterdir())
    capsys.readouterr()

    assert main(["eval", "--adapter", str(run), "--task", "squad", "--limit", "2", "--max_new_tokens", "3"]) == 0
    scored = json.loads(capsys.readouterr().out)
    assert scored["rows"] == 2 and list(scored["metrics"]) == ["exact_match", "f1"]
    assert (
        main(["eval", "--adapter", str(run), "--task", "squad", "--limit", "2", "--max_new_tokens", "3", "--base"]) == 0
    )
    assert json.loads(capsys.readouterr().out)["adapter"] is None

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tiedlora.runs import open_adapter

    adapted, _, _ = open_adapter(str(run), None)
    ids = torch.randint(0, 1000, (2, 10))
    with torch.no_grad():
        expected = adapted(ids).logits
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        assert (merged(ids).logits - expected).abs().max() < 1e-4
    assert main(["export", "--adapter", str(run), "--out", str(tmp_path / "peft")]) == 0
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_folder), tmp_path / "peft")
    with torch.no_grad():
        assert (peft_model(ids).logits - expected).abs().max() < 1e-4
    assert main(["generate", "--adapter", str(run), "--max_new_tokens", "3", "Hello"]) == 0


def test_resume_after_kill_ends_with_the_same_adapter(tiny_folder, tmp_path, monkeypatch, capsys):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    options = dict(max_steps=8, checkpoint_every=2, dropout=0.1, test_rows=1)
    assert main(["train", *flags(tiny_folder, whole, **options), "--quiet"]) == 0

    child = subprocess.Popen(
        [sys.executable, "-m", "tiedlora", "train", *flags(tiny_folder, killed, **options), "--quiet"],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 240
    while not (killed / "checkpoint" / "latest").is_file() and time.time() < deadline and child.poll() is None:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert not (killed / "results.json").exists(), "the run finished before it could be killed"
    start = latest_step(killed)
    assert 0 < start < 8
    steps = record_steps(monkeypatch)
    capsys.readouterr()
    assert main(["train", *flags(tiny_folder, killed, **options), "--resume", "--quiet"]) == 0
    assert steps == list(range(start, 8))  # from the step checkpoint/latest names, none redone
    assert f"resuming at step {start} of 8 from {killed / 'checkpoint' / f'step-{start}'}" in capsys.readouterr().out

    for sub in ("checkpoint/step-8", "best"):
        a, b = adapter_tensors(whole / sub), adapter_tensors(killed / sub)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), sub
    with (whole / "log.csv").open() as f, (killed / "log.csv").open() as g:
        assert [r["loss"] for r in csv.DictReader(f)] == [r["loss"] for r in csv.DictReader(g)]


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_processes_match_one_process(tiny_folder, tmp_path, engine):
    one, two = tmp_path / "one", tmp_path / "two"
    # fp32: under bf16 autocast (--precision auto on a CPU with native bf16) the two sums of
    # gradients round apart by more than these tolerances
    options = dict(max_steps=3, batch_size=6, micro_batch_size=2, val_every=3, test_rows=1, precision="fp32")
    assert main(["train", *flags(tiny_folder, one, **options), "--quiet"]) == 0
    options["fsdp"] = engine == "fsdp"
    # --standalone: torchrun picks a free port for its rendezvous itself, rather than a fixed 29500
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "tiedlora",
            "train",
            *flags(tiny_folder, two, **options),
            "--quiet",
        ],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with (one / "log.csv").open() as f, (two / "log.csv").open() as g:
        losses = [(float(a["loss"]), float(b["loss"])) for a, b in zip(csv.DictReader(f), csv.DictReader(g))]
    assert len(losses) == 3 and all(a == pytest.approx(b, rel=1e-5) for a, b in losses)
    assert json.loads((two / "results.json").read_text())["engine"] == engine
    a, b = adapter_tensors(one / "best"), adapter_tensors(two / "best")
    assert all(torch.allclose(a[k], b[k], rtol=1e-4, atol=1e-6) for k in a)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_checkpoint(tiny_folder, tmp_path, monkeypatch):
    forward = TokenLoss.forward
    calls = []

    def poisoned(self, *args, **kwargs):
        calls.append(self.training)
        loss = forward(self, *args, **kwargs)
        return loss * float("nan") if sum(calls) > 6 else loss  # training steps 1-3 use 2 micro batches each

    monkeypatch.setattr(TokenLoss, "forward", poisoned)
    run = tmp_path / "run"
    with pytest.raises(Diverged, match="the training loss became nan at step 4 .* the last good checkpoint stays in"):
        train(TrainConfig(**options(tiny_folder, run)), quiet=True)
    assert (run / "checkpoint" / "latest").read_text() == "step-2"
    assert adapter_tensors(run / "checkpoint" / "step-2")


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(task="squadd"), "No task 'squadd'; the tasks are squad"),
        (dict(preset="tl9"), "Unknown preset 'tl9'"),
        (dict(model="no/such-model-here"), "Could not load --model 'no/such-model-here'"),
        (dict(lr=-1), "--lr -1.0 must be a positive number"),
        (dict(precision="fp16"), "--precision 'fp16': choose auto"),
    ],
)
def test_bad_options_are_one_clear_line(tiny_folder, tmp_path, capsys, change, message):
    assert main(["train", *flags(tiny_folder, tmp_path / "run", **change), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_config_naming_a_preset_says_preset(tiny_folder, tmp_path, capsys):
    """`--config` reads YAML for every command; the preset, which train once took as --config, is --preset."""
    assert main(["train", *flags(tiny_folder, tmp_path / "run"), "--config", "tl6"]) == 2
    assert "the configuration is --preset tl6" in capsys.readouterr().err


def test_run_folder_guards(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *flags(tiny_folder, run, max_steps=2), "--quiet"]) == 0
    assert main(["train", *flags(tiny_folder, run, max_steps=2), "--quiet"]) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert main(["train", *flags(tiny_folder, run, max_steps=2, rank=8), "--resume", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--resume with a different config than" in err and "rank: 4 -> 8" in err
    assert main(["train", *flags(tiny_folder, run, max_steps=2, precision="bf16"), "--resume", "--quiet"]) == 2
    assert "precision: 'auto' -> 'bf16'" in capsys.readouterr().err
    # a run written before an option existed ran at its default, so it resumes
    written = json.loads((run / "run.json").read_text())
    del written["config"]["precision"]
    (run / "run.json").write_text(json.dumps(written))
    assert main(["train", *flags(tiny_folder, run, max_steps=2), "--resume", "--quiet"]) == 0
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert main(["train", *flags(tiny_folder, tmp_path / "other"), "--quiet"]) == 2
    assert "is not empty and holds no tiedlora run" in capsys.readouterr().err


def test_config_errors_without_the_cli():
    with pytest.raises(TiedLoraError, match="--early_stop_on 'bleu'"):
        TrainConfig(early_stop_on="bleu")


class Echo:
    """A task of neither kind (not one of the paper's, not own data): repeat the last word."""

    name = "echo"

    def load(self, split, source="bundled"):
        from tiedlora.tasks import Rows

        rows = [{"q": f"Say {w}:", "a": f" {w}"} for w in ("red", "green", "blue", "black", "white", "grey") * 4]
        return Rows(rows, {"task": "echo", "split": split, "rows": len(rows)})

    def eval_rows(self, split, source="bundled"):
        return self.load(split, source)

    def encode(self, tokenizer, row, chat=False):
        from tiedlora.tasks import encode

        return encode(tokenizer, row["q"], row["a"], chat)

    def prompt_ids(self, tokenizer, row, chat=False):
        from tiedlora.tasks import prompt_ids

        return prompt_ids(tokenizer, row["q"], chat)

    def score(self, predictions, rows):
        return {"said": 100 * sum(p == r["a"] for p, r in zip(predictions, rows)) / len(rows)}

    def test(self, scorer, rows):
        return {**scorer.scores(self, rows), "echo_loss": scorer.loss(self, rows)}

    def predictions_file(self, tokenizer, rows, predictions, chat=False):
        return "echo.jsonl", [{"said": p} for p in predictions]

    def choices(self, row):
        raise NotImplementedError


def test_training_and_evaluation_take_any_task_of_the_protocol(tiny_folder, tmp_path, monkeypatch):
    """Neither asks where a task's rows came from: a third kind of task is trained, recorded and
    evaluated by its own name, test and predictions file."""
    from tiedlora.evaluate import EvalConfig, evaluate_adapter
    from tiedlora.tasks import TaskLike

    assert isinstance(Echo(), TaskLike)
    monkeypatch.setattr(TrainConfig, "task_data", lambda self: Echo())
    monkeypatch.setattr(EvalConfig, "task_data", lambda self: Echo())
    run = tmp_path / "run"
    results = train(TrainConfig(**options(tiny_folder, run, max_steps=2, val_every=2)), quiet=True)
    assert results["task"] == "echo" and list(results["metrics"]) == ["said", "echo_loss"]
    assert results["data"]["test"] == {"task": "echo", "split": "test", "rows": 24}
    assert json.loads((run / "results.json").read_text())["metrics"] == results["metrics"]
    kept = [json.loads(line) for line in (run / "echo.jsonl").read_text().splitlines()]
    assert len(kept) == 3 and set(kept[0]) == {"said"}
    assert not (run / "predictions.jsonl").exists() and not (run / "samples.jsonl").exists()
    scored = evaluate_adapter(EvalConfig(task="squad", adapter=str(run), limit=4, max_new_tokens=3))
    assert (scored["task"], scored["rows"], list(scored["metrics"])) == ("echo", 4, ["said", "echo_loss"])


@pytest.mark.parametrize("native", [False, True])
def test_precision_auto_follows_the_hardware_and_bf16_trains_under_autocast(tiny_folder, tmp_path, monkeypatch, native):
    """auto is bf16 autocast where the CPU has native bf16 (AVX512-BF16, AMX), fp32 where bf16 would
    be emulated (many times slower); bf16 forces autocast. results.json records what ran."""
    import tiedlora.train.processes

    monkeypatch.setattr(tiedlora.train.processes, "native_bf16", lambda device: native)
    seen = []
    forward = TokenLoss.forward

    def spy(self, *args, **kwargs):
        seen.append(torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(TokenLoss, "forward", spy)
    runs = {}
    for precision in ("auto", "bf16", "fp32"):
        seen.clear()
        cfg = TrainConfig(**options(tiny_folder, tmp_path / precision, max_steps=2, precision=precision))
        runs[precision] = train(cfg, quiet=True)
        used = "bf16" if precision == "bf16" or (precision == "auto" and native) else "fp32"
        assert seen.count(True) == (4 if used == "bf16" else 0)  # 2 steps of 2 micro batches; validation stays fp32
        assert runs[precision]["precision"] == used and runs[precision]["recipe"]["precision"] == precision
    a, b = (adapter_tensors(tmp_path / p / "best") for p in ("fp32", "bf16"))
    assert all(torch.isfinite(b[k]).all() for k in b) and any(not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads the CPU's flags from Linux's /proc/cpuinfo")
def test_native_bf16_agrees_with_the_cpu_flags():
    from tiedlora.train import native_bf16

    with open("/proc/cpuinfo") as f:
        flags = next(line for line in f if line.startswith("flags")).split()
    assert native_bf16(torch.device("cpu")) == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_a_run_folder_recording_config_resumes_as_preset(tiny_folder, tmp_path):
    """Run folders written before `--config` was named `--preset` record the preset as "config":
    they still resume (the options compare equal under today's names) and end as a fresh run does."""
    out = tmp_path / "old"
    options = small_run(tiny_folder, out, max_steps=4)
    whole = train(TrainConfig(**options), quiet=True)
    run = json.loads((out / "run.json").read_text())
    run["config"]["config"] = run["config"].pop("preset")
    (out / "run.json").write_text(json.dumps(run))
    (out / "results.json").unlink()  # resumed from its last checkpoint, then scored again
    resumed = train(TrainConfig(**options), resume=True, quiet=True)
    assert resumed["steps"] == 4 and resumed["metrics"] == pytest.approx(whole["metrics"], rel=1e-5)
    with pytest.raises(TiedLoraError, match="named 'preset' now"):
        main_jobs = tmp_path / "jobs.jsonl"
        main_jobs.write_text(json.dumps({"name": "a", "data": "x.jsonl", "config": "tl6"}) + "\n")
        from tiedlora.train.jobs_file import check_job, read_jobs

        check_job(read_jobs(main_jobs)[0][0])
