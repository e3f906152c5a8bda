"""Many tenants trained together (`tiedlora train --jobs`): each tenant's run against the solo
run of the same options, shared forward passes, failures kept to one tenant, resume after a
kill, the Python API and the command line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tiedlora.cli import main
from tiedlora.layer import GroupAdapter
from tiedlora.loss import TokenLoss
from tiedlora.models import load_model
from tiedlora.train import TrainConfig, train
from tiedlora.train.jobs_file import JobSpec, read_jobs
from tiedlora.train.tenants import JointTraining, train_jobs

from conftest import latest_step

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def write_rows(path, n: int, offset: int = 0):
    """Own data of varied lengths: sums asked in words of several lengths."""
    rows = [
        {"prompt": f"Q: {'please ' * (i % 4)}add {i + offset} and {i}. A:", "completion": f" {2 * i + offset}"}
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def job_options(tmp_path) -> dict[str, dict]:
    """Three tenants of different configurations, ranks, data sizes, batches and learning rates."""
    return {
        "acme": dict(data=write_rows(tmp_path / "acme.jsonl", 24), preset="lora", rank=4, batch_size=8, lr=3e-2),
        "globex": dict(data=write_rows(tmp_path / "globex.jsonl", 12, 7), preset="tl5", rank=8, batch_size=4, lr=5e-2),
        "initech": dict(
            data=write_rows(tmp_path / "initech.jsonl", 40, 3), preset="tl6", rank=2, batch_size=12, micro_batch_size=3
        ),
    }


COMMON = dict(max_steps=5, micro_batch_size=2, val_every=2, warmup_steps=2, samples=2, max_new_tokens=3, seed=3)


def solo_options(tiny_folder, out, options) -> dict:
    return {**COMMON, **options, "model": str(tiny_folder), "out": str(out), "precision": "fp32"}


def together(tiny_folder, out, jobs: dict[str, dict], **kwargs) -> dict:
    base = load_model(str(tiny_folder))
    shared = {"model": str(tiny_folder), "precision": "fp32"}
    return train_jobs(
        [JobSpec(n, {**COMMON, **o}) for n, o in jobs.items()], base, out, shared=shared, quiet=True, **kwargs
    )


def losses(folder) -> list[float]:
    lines = (folder / "log.csv").read_text().splitlines()[1:]
    return [float(line.split(",")[1]) for line in lines]


def assert_close_adapters(a_folder, b_folder, tolerance: float = 1e-4) -> float:
    """max |a - b| over the adapter's tensors, checked against tolerance * max |a|."""
    a, b = load_file(a_folder / "adapter.safetensors"), load_file(b_folder / "adapter.safetensors")
    assert a.keys() == b.keys()
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    scale = max(a[k].abs().max().item() for k in a)
    assert worst <= tolerance * scale, (worst, scale)
    return worst / scale


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_each_tenant_trained_together_equals_its_solo_run(tiny_folder, tmp_path, dropout):
    """The central property: 3 tenants (lora r4, tl5 r8, tl6 r2; 24, 12 and 40 rows; batches 8,
    4 and 12) in one batch give each the adapter, losses and run folder of its solo run. The
    differences are float rounding from other rows sharing the matmuls (they do not change
    the math: rows are independent and padding is masked), about 1e-7 of the weights. With
    adapter dropout, each example's masks come from its own run's seed (`layer.drop`), so they are
    the solo run's too, and a tenant trained beside others equals it trained alone."""
    jobs = {name: {**options, "dropout": dropout} for name, options in job_options(tmp_path).items()}
    summary = together(tiny_folder, tmp_path / "joint", jobs)
    assert {n: s["status"] for n, s in summary.items()} == dict.fromkeys(jobs, "succeeded")
    for name, options in jobs.items():
        solo = tmp_path / "solo" / name
        train(TrainConfig(**solo_options(tiny_folder, solo, options)), quiet=True)
        mine = tmp_path / "joint" / name
        assert sorted(p.name for p in mine.iterdir()) == sorted(
            p.name for p in solo.iterdir() if p.name != "tensorboard"
        )
        assert assert_close_adapters(solo / "checkpoint" / "step-5", mine / "checkpoint" / "step-5") < 1e-4
        assert_close_adapters(solo / "best", mine / "best")
        assert losses(mine) == pytest.approx(losses(solo), rel=1e-5)
        assert (
            load_file(solo / "best" / "adapter.safetensors").keys()
            == load_file(mine / "best" / "adapter.safetensors").keys()
        )
        a, b = (json.loads((f / "results.json").read_text()) for f in (solo, mine))
        assert a["metrics"]["loss"] == pytest.approx(b["metrics"]["loss"], rel=1e-5)
        assert (a["params"], a["steps"], a["best_step"]) == (b["params"], b["steps"], b["best_step"])
        configs = [json.loads((f / "run.json").read_text())["config"] for f in (solo, mine)]
        assert [{**c, "out": None} for c in configs[:1]] == [{**c, "out": None} for c in configs[1:]]
    if dropout:
        together(tiny_folder, tmp_path / "alone", {"acme": jobs["acme"]})
        assert_close_adapters(tmp_path / "alone" / "acme" / "best", tmp_path / "joint" / "acme" / "best")


@pytest.mark.parametrize("max_rows", [None, 100])
def test_tenants_share_forward_passes_of_at_most_max_rows(tiny_folder, tmp_path, max_rows):
    """A joint step runs the base model once per micro batch index when the rows fit in one pass:
    3 tenants of 4, 2 and 4 micro batches a step (2, 2 and 3 rows) take 4 passes, not 10. By
    default a pass holds at most the largest micro batch (3 rows), as a solo run's memory."""
    model, tokenizer = load_model(str(tiny_folder))
    rows: list[int] = []
    model.model.register_forward_hook(lambda module, args, output: rows.append(output.last_hidden_state.shape[0]))
    jobs = job_options(tmp_path)
    shared = {"precision": "fp32"}
    joint = JointTraining((model, tokenizer), tmp_path / "joint", shared=shared, max_rows=max_rows, quiet=True)
    for name, options in jobs.items():
        joint.add(JobSpec(name, {**COMMON, **options, "max_steps": 1, "val_every": 10}))
    joint.admit()
    joint.step(joint.active)
    if max_rows is None:
        assert max(rows) == 3 and sum(rows) == 8 + 4 + 12
    else:
        assert rows == [2 + 2 + 3, 2 + 2 + 3, 2 + 3, 2 + 3]


def test_a_packing_tenant_beside_others_equals_its_solo_packed_run(tiny_folder, tmp_path, monkeypatch):
    """A job with --packing lays each micro batch's examples end to end as its solo run does; a
    pass that holds it is packed throughout (the other tenant's examples one to a row, the
    attention kept to each example by positions restarting), and both tenants' losses and
    adapters are their solo runs' (initech packed, acme not)."""
    passes: list[tuple[int, bool]] = []  # (rows, attention mask given) of each training forward
    loss_forward = TokenLoss.forward

    def spy(self, input_ids, attention_mask, labels, position_ids=None, per_row=False):
        if self.training:
            passes.append((input_ids.shape[0], attention_mask is not None))
        return loss_forward(self, input_ids, attention_mask, labels, position_ids, per_row)

    monkeypatch.setattr(TokenLoss, "forward", spy)
    options = job_options(tmp_path)
    jobs = {
        "initech": {**options["initech"], "packing": True, "dropout": 0.1},
        "acme": {**options["acme"], "dropout": 0.1},
    }
    summary = together(tiny_folder, tmp_path / "joint", jobs, max_rows=100)
    assert {n: s["status"] for n, s in summary.items()} == dict.fromkeys(jobs, "succeeded")
    # each of 4 micro batches a step: initech's 3 examples in 1 packed row, acme's 2 in 2 rows
    assert passes == [(1 + 2, False)] * 4 * COMMON["max_steps"]
    for name, job in jobs.items():
        solo = tmp_path / "solo" / name
        train(TrainConfig(**solo_options(tiny_folder, solo, job)), quiet=True)
        assert losses(tmp_path / "joint" / name) == pytest.approx(losses(solo), rel=1e-5)
        assert_close_adapters(solo / "best", tmp_path / "joint" / name / "best")


def test_a_tenants_dropout_trains_after_its_validation(tiny_folder, tmp_path, monkeypatch):
    """Validation and test run on the base routed to one tenant, in eval mode; the frames
    holding the adapters are not the base's submodules, so the routed projections pass the
    base's mode to the adapter's down-projection: every step draws dropout, no validation does."""
    modes: list[bool | str] = []
    project = GroupAdapter.project

    def spy(self, x, training, rows):
        modes.append(training)
        return project(self, x, training, rows)

    monkeypatch.setattr(GroupAdapter, "project", spy)
    options = {**COMMON, **job_options(tmp_path)["globex"], "dropout": 0.3, "val_every": 1, "max_steps": 3}
    train_jobs(
        [JobSpec("globex", options)],
        load_model(str(tiny_folder)),
        tmp_path / "out",
        shared={"precision": "fp32"},
        quiet=True,
        on_step=lambda *_: modes.append("step"),
    )
    steps = "".join("s" if m == "step" else "T" if m else "v" for m in modes).split("s")
    assert len(steps) == 4 and all(re.fullmatch("T+v+", s) for s in steps[:3]), steps  # then the test: v+
    assert re.fullmatch("v+", steps[3]), steps[3]


def test_a_failing_tenant_fails_alone(tiny_folder, tmp_path):
    """Refused data, an unknown option, a duplicate name, a shared option set per job and a loss
    that turns non-finite each fail their own tenant, recorded in its folder and in jobs.json;
    the healthy tenants train to the end, as the joint run without the failing ones does."""
    good = job_options(tmp_path)
    bad_rows = tmp_path / "bad.jsonl"
    bad_rows.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": 3}\n')
    lines = [
        {"name": "acme", **good["acme"]},
        {"name": "broken", "data": str(bad_rows)},
        {"name": "missing", "data": str(tmp_path / "nowhere.jsonl")},
        {"name": "typo", "data": good["acme"]["data"], "rnak": 4},
        {"name": "shared", "data": good["acme"]["data"], "model": "gpt2"},
        {"name": "acme", "data": good["acme"]["data"]},
        {"name": "../escape", "data": good["acme"]["data"]},
        {"name": "diverges", **good["globex"]},
        {"name": "initech", **good["initech"]},
    ]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines) + "not json\n")
    jobs, refused = read_jobs(tmp_path / "jobs.jsonl")
    for job in jobs:
        job.options = {**COMMON, **job.options}

    def poison(report):
        if report.name == "diverges" and report.step == 2:
            model = next(t for t in joint.active if t.name == report.name).run.model
            with torch.no_grad():
                next(p for p in model.parameters() if p.requires_grad).fill_(float("nan"))

    base = load_model(str(tiny_folder))
    joint = JointTraining(
        base, tmp_path / "out", shared={"model": str(tiny_folder), "precision": "fp32"}, quiet=True, on_step=poison
    )
    for key, message in refused.items():
        joint.refuse(key, message)
    for job in jobs:
        joint.add(job)
    summary = joint.run()
    status = {name: s["status"] for name, s in summary.items()}
    assert status == {
        "acme": "succeeded", "initech": "succeeded", "broken": "failed", "missing": "failed", "typo": "failed",
        "shared": "failed", "diverges": "failed", "line 6": "failed", "line 7": "failed", "line 10": "failed",
    }  # fmt: skip
    out = tmp_path / "out"
    assert json.loads((out / "jobs.json").read_text())["tenants"] == json.loads(json.dumps(summary))
    assert "line 2" in summary["broken"]["error"] and "completion" in summary["broken"]["error"]
    assert "unknown option 'rnak'" in summary["typo"]["error"]
    assert "'model'" in summary["shared"]["error"] and "command line" in summary["shared"]["error"]
    assert "taken by an earlier line" in summary["line 6"]["error"]
    assert "non-finite" in summary["diverges"]["error"] or "loss became nan" in summary["diverges"]["error"]
    for name in ("broken", "missing", "typo", "shared", "diverges"):
        assert json.loads((out / name / "error.json").read_text())["error"] == summary[name]["error"]
    assert latest_step(out / "diverges") == 2 and not (out / "diverges" / "results.json").exists()
    assert not (tmp_path / "escape").exists()
    alone = tmp_path / "alone"
    healthy = {n: good[n] for n in ("acme", "initech")}
    together(tiny_folder, alone, healthy)
    for name in healthy:
        assert (out / name / "results.json").is_file()
        assert_close_adapters(alone / name / "best", out / name / "best")


def test_jobs_join_as_others_leave_and_can_be_added_and_cancelled(tiny_folder, tmp_path):
    """With max_active 2 the third job waits for a place; a job added from a callback while
    others train joins; a cancelled one leaves before its next step with its checkpoint kept."""
    jobs = job_options(tmp_path)
    seen: list[tuple[str, int]] = []
    together: dict[int, list[str]] = {}  # joint step -> the tenants in it
    ended: dict[str, str | None] = {}

    def on_step(report):
        name, step = report.name, report.step
        seen.append((name, step))
        together.setdefault(joint.steps, []).append(name)
        assert report.loss > 0 and report.tokens > 0
        if (name, step) == ("acme", 1):
            joint.add(JobSpec("late", {**COMMON, **jobs["globex"], "max_steps": 2}))
        if (name, step) == ("initech", 2):
            joint.cancel("initech")

    base = load_model(str(tiny_folder))
    joint = JointTraining(
        base, tmp_path / "out", shared={"precision": "fp32"}, max_active=2, quiet=True, on_step=on_step,
        on_finish=lambda report: ended.setdefault(report.name, report.error),
    )  # fmt: skip
    for name in ("acme", "initech", "globex"):
        joint.add(JobSpec(name, {**COMMON, **jobs[name]}))
    summary = joint.run()
    assert {n: s["status"] for n, s in summary.items()} == {
        "acme": "succeeded", "initech": "cancelled", "globex": "succeeded", "late": "succeeded"
    }  # fmt: skip
    first = {name: seen.index(next(s for s in seen if s[0] == name)) for name in summary}
    assert first["acme"] == 0 and first["initech"] == 1  # two at once
    assert [s for s in seen if s[0] == "initech"] == [("initech", 1), ("initech", 2)]
    assert first["globex"] > first["initech"] and first["late"] > first["globex"]  # each waited for a free place
    assert max(len(names) for names in together.values()) == 2  # never more than --max_active
    assert latest_step(tmp_path / "out" / "initech") == 2 and ended == dict.fromkeys(summary)
    assert [n for n in summary if (tmp_path / "out" / n / "results.json").is_file()] == ["acme", "globex", "late"]


def test_resume_after_a_kill_continues_every_tenant_from_its_checkpoint(tiny_folder, tmp_path):
    """`tiedlora train --jobs` is SIGKILLed once a tenant has checkpointed; `--resume` starts
    each tenant at its checkpointed step (no step redone) and ends with the adapters of an
    uninterrupted joint run (the same up to rounding: after the kill, tenants may share their
    steps with different partners)."""
    jobs = job_options(tmp_path)
    lines = "".join(
        json.dumps({"name": n, **COMMON, **o, "max_steps": 8, "checkpoint_every": 1}) + "\n" for n, o in jobs.items()
    )
    (tmp_path / "jobs.jsonl").write_text(lines)
    killed = tmp_path / "killed"
    flags = ["--jobs", str(tmp_path / "jobs.jsonl"), f"--model={tiny_folder}", f"--out={killed}", "--precision=fp32"]
    child = subprocess.Popen([sys.executable, "-m", "tiedlora", "train", *flags, "--quiet"], env=ENV)
    deadline = time.time() + 120
    while latest_step(killed / "acme") < 3 and child.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    assert child.poll() is None, "the run ended before it could be killed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    start = {name: latest_step(killed / name) for name in jobs}
    assert 3 <= start["acme"] < 8, start
    steps: list[tuple[str, int]] = []
    resumed, refused = read_jobs(tmp_path / "jobs.jsonl")
    base = load_model(str(tiny_folder))
    shared = {"model": str(tiny_folder), "precision": "fp32"}
    summary = train_jobs(resumed, base, killed, shared=shared, resume=True, quiet=True,
                         on_step=lambda report: steps.append((report.name, report.step)))  # fmt: skip
    assert not refused and {s["status"] for s in summary.values()} == {"succeeded"}, summary
    for name in jobs:
        assert [s for n, s in steps if n == name] == list(range(start[name] + 1, 9)), name
    whole = tmp_path / "whole"
    together(tiny_folder, whole, {n: {**o, "max_steps": 8, "checkpoint_every": 1} for n, o in jobs.items()})
    for name in jobs:
        assert_close_adapters(whole / name / "checkpoint" / "step-8", killed / name / "checkpoint" / "step-8")
        assert losses(killed / name) == pytest.approx(losses(whole / name), rel=1e-5)


def test_the_command_line_trains_jobs_into_run_folders_other_commands_read(tiny_folder, tmp_path, capsys):
    """`tiedlora train --jobs` end to end: options on the command line are every job's
    defaults, each run folder is one `tiedlora eval` reads, and a failed job sets the exit
    status after the others finished."""
    jobs = job_options(tmp_path)
    lines = [{"name": n, **o} for n, o in jobs.items()] + [{"name": "bad", "data": str(tmp_path / "nowhere.jsonl")}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "runs"
    flags = ["--jobs", str(tmp_path / "jobs.jsonl"), f"--model={tiny_folder}", f"--out={out}", "--max_steps=2"]
    flags += ["--max_active=2", "--samples=1", "--max_new_tokens=2", "--quiet"]
    assert main(["train", *flags]) == 2
    printed = capsys.readouterr()
    assert "1 of 4 jobs failed" in printed.err
    summary = json.loads(printed.out)
    assert {n: s["status"] for n, s in summary.items()} == {**dict.fromkeys(jobs, "succeeded"), "bad": "failed"}
    for name in jobs:
        results = json.loads((out / name / "results.json").read_text())
        assert results["steps"] == 2 and results["recipe"]["data"] == jobs[name]["data"]
        assert len((out / name / "samples.jsonl").read_text().splitlines()) == 1
    assert main(["eval", f"--adapter={out / 'globex'}", f"--data={jobs['globex']['data']}", "--samples=0"]) == 0
    assert main(["train", *flags[:4]]) == 2  # the folders hold runs now: --resume, or another --out
    assert "pass --resume" in capsys.readouterr().out


def test_epochs_set_the_steps_from_the_training_rows(tiny_folder, tmp_path):
    """--epochs 3 over 21 training rows in batches of 4: 5 steps an epoch (the remainder is
    skipped, as every epoch skips it), 15 in all, recorded in run.json, and each epoch reads every
    row it reads once; a job takes it too."""
    data = write_rows(tmp_path / "rows.jsonl", 21)
    valid = write_rows(tmp_path / "valid.jsonl", 3, 50)
    options = dict(data=data, validation=valid, epochs=3, batch_size=4, max_steps=2, val_every=100, samples=0)
    out = tmp_path / "solo"
    results = train(TrainConfig(**solo_options(tiny_folder, out, options)), quiet=True)
    assert results["steps"] == 15 and len(losses(out)) == 15
    assert json.loads((out / "run.json").read_text())["config"]["max_steps"] == 15
    summary = together(tiny_folder, tmp_path / "joint", {"acme": {**options, "max_steps": 2}})
    assert summary["acme"]["steps"] == 15
    with pytest.raises(Exception, match="--epochs 0 must be positive"):
        TrainConfig(epochs=0)


def test_jobs_on_a_4bit_base_equal_solo_runs_on_it(tiny_folder, tmp_path, capsys):
    """`--jobs --quantize 4bit`: the base is quantized once (bitsandbytes NF4, here on the CPU)
    and each tenant's adapter equals the solo `--quantize 4bit` run's; run.json says 4bit."""
    jobs = {n: o for n, o in job_options(tmp_path).items() if n != "initech"}
    lines = [{"name": n, **COMMON, **o} for n, o in jobs.items()]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "runs"
    flags = ["--jobs", str(tmp_path / "jobs.jsonl"), f"--model={tiny_folder}", f"--out={out}", "--quantize=4bit"]
    assert main(["train", *flags, "--precision=fp32", "--quiet"]) == 0
    capsys.readouterr()
    for name, options in jobs.items():
        solo = tmp_path / "solo" / name
        train(TrainConfig(**solo_options(tiny_folder, solo, options), quantize="4bit"), quiet=True)
        assert json.loads((out / name / "run.json").read_text())["config"]["quantize"] == "4bit"
        assert_close_adapters(solo / "best", out / name / "best")
        assert losses(out / name) == pytest.approx(losses(solo), rel=1e-5)


SHARDED_JOBS = """
import json, os, sys
from torch.distributed.tensor import DTensor
from tiedlora.layout import find_layers
from tiedlora.models import load_model
from tiedlora.train.jobs_file import read_jobs
from tiedlora.train.tenants import train_jobs

jobs_file, model, out = sys.argv[1:]
base = load_model(model)
shared = {"model": model, "precision": "fp32", "fsdp": True}
status = train_jobs(read_jobs(jobs_file)[0], base, out, shared=shared, quiet=True)
weights = [p for layer in find_layers(base[0]) for p in layer.parameters()]
held = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in weights)
if os.environ["RANK"] == "0":
    print(json.dumps({"status": status, "held": held, "whole": sum(p.numel() for p in weights)}))
"""


def test_jobs_on_two_processes_match_one_process(tiny_folder, tmp_path):
    """`torchrun --nproc_per_node 2 -m tiedlora train --jobs` (adapter dropout 0.1: an example's
    masks do not depend on the process that draws them): each process takes its share of
    every tenant's micro batches and the tenants' gradients are summed over the processes in one
    all-reduce (DDP's arithmetic), so each tenant's losses and adapter are those of one process;
    the main process alone writes the folders. With --fsdp each process holds half of every
    decoder layer's weights (gathered for each forward), and the tenants' runs are the same."""
    jobs = {n: o for n, o in job_options(tmp_path).items() if n != "initech"}
    lines = [{"name": n, **COMMON, **o, "samples": 0, "dropout": 0.1} for n, o in jobs.items()]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    def flags(out):
        return ["--jobs", str(tmp_path / "jobs.jsonl"), f"--model={tiny_folder}", f"--out={out}", "--precision=fp32"]

    assert main(["train", *flags(tmp_path / "one"), "--quiet"]) == 0
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    two = subprocess.run(
        [*torchrun, "-m", "tiedlora", "train", *flags(tmp_path / "two"), "--quiet"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    assert {n: s["status"] for n, s in json.loads(two.stdout).items()} == dict.fromkeys(jobs, "succeeded")
    (tmp_path / "sharded.py").write_text(SHARDED_JOBS)
    sharded = subprocess.run(
        [*torchrun, str(tmp_path / "sharded.py"), str(tmp_path / "jobs.jsonl"), str(tiny_folder), tmp_path / "fsdp"],
        env=ENV, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert sharded.returncode == 0, sharded.stderr[-3000:]
    report = json.loads(sharded.stdout)
    assert {n: s["status"] for n, s in report["status"].items()} == dict.fromkeys(jobs, "succeeded")
    assert report["held"] == report["whole"] // 2, report  # the tiny model's weights split evenly in two
    for name in jobs:
        one_run = tmp_path / "one" / name
        for run in (tmp_path / "two" / name, tmp_path / "fsdp" / name):
            assert losses(run) == pytest.approx(losses(one_run), rel=1e-5)
            assert_close_adapters(one_run / "best", run / "best")
            assert json.loads((run / "results.json").read_text())["steps"] == COMMON["max_steps"]
        assert json.loads((tmp_path / "fsdp" / name / "results.json").read_text())["engine"] == "fsdp"


def test_frames_share_the_base_leaves_and_keep_their_adapters_apart(tiny_folder, tokens):
    """A frame copies only the module tree's inner nodes (its memory is a tenant's main cost):
    every projection, norm and embedding is the base's own object; the adapters put on two frames
    each change that frame's forward alone, and the base's forward not at all."""
    from tiedlora import TiedLoraConfig, apply
    from tiedlora.train.routing import frame_of

    from conftest import randomize

    base = load_model(str(tiny_folder))[0].eval()
    before = base(tokens).logits
    leaves = [m for m in base.modules() if next(m.children(), None) is None]
    frames = [frame_of(base) for _ in range(2)]
    for frame in frames:
        assert [m for m in frame.modules() if next(m.children(), None) is None] == leaves
        assert all(a is b for a, b in zip(frame.modules(), base.modules()) if next(a.children(), None) is None)
        assert not any(a is b for a, b in zip(frame.modules(), base.modules()) if next(a.children(), None) is not None)
    outs = []
    for seed, frame in enumerate(frames):
        randomize(apply(frame, TiedLoraConfig.preset("tl6", rank=4, seed=seed)), seed=seed, trainable_only=True)
        outs.append(frame(tokens).logits)
    assert torch.equal(base(tokens).logits, before)
    assert not torch.allclose(outs[0], before) and not torch.allclose(outs[0], outs[1])


def test_jobs_named_tenant_slash_name_are_served_to_that_tenant_alone(tiny_folder, tmp_path, capsys):
    """`tiedlora train --jobs` with `<tenant>/<name>` jobs writes `<out>/<tenant>/<name>`, which
    `tiedlora serve --adapters <out> --tenants ...` serves to that tenant's keys alone by that name
    (a job's `targets` line included); a name nesting one run folder in another is refused."""
    from fastapi.testclient import TestClient

    from tiedlora.serve.server import build

    jobs = job_options(tmp_path)
    lines = [
        {"name": "acme/support", **jobs["acme"], "targets": ["qkv", "o", "mlp_in", "mlp_out"]},
        {"name": "globex/faq", **jobs["globex"]},
        {"name": "globex/faq/x", **jobs["globex"]},
        {"name": "globex", **jobs["globex"]},
        {"name": "../escape", **jobs["globex"]},
    ]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    read, refused = read_jobs(tmp_path / "jobs.jsonl")
    assert [j.name for j in read] == ["acme/support", "globex/faq"]
    assert "would put one run folder inside the other" in refused["line 4"]
    assert "or <tenant>/<name>" in refused["line 3"] and "or <tenant>/<name>" in refused["line 5"]
    out = tmp_path / "runs"
    flags = ["--jobs", str(tmp_path / "jobs.jsonl"), f"--model={tiny_folder}", f"--out={out}", "--max_steps=2"]
    assert main(["train", *flags, "--samples=0", "--quiet", "--precision=fp32"]) == 2  # the three refused lines
    summary = json.loads(capsys.readouterr().out)
    assert summary["acme/support"]["status"] == summary["globex/faq"]["status"] == "succeeded"
    config = json.loads((out / "acme" / "support" / "best" / "adapter_config.json").read_text())
    assert config["config"]["targets"] == ["qkv", "o", "mlp_in", "mlp_out"]
    keys = tmp_path / "keys.json"
    keys.write_text(json.dumps({"acme": ["acme-key-0123456789"], "globex": ["globex-key-0123456789"]}))
    engine, app = build(str(tiny_folder), out, tenants=str(keys), max_tokens_limit=4)
    try:
        with TestClient(app) as client:
            for tenant, mine, theirs in (
                ("acme", "acme/support", "globex/faq"),
                ("globex", "globex/faq", "acme/support"),
            ):
                auth = {"Authorization": f"Bearer {tenant}-key-0123456789"}
                listed = [m["id"] for m in client.get("/v1/models", headers=auth).json()["data"]]
                assert listed == [tiny_folder.name, mine]
                body = {"prompt": "Hello", "max_tokens": 2}
                assert client.post("/v1/completions", json={"model": mine, **body}, headers=auth).status_code == 200
                other = client.post("/v1/completions", json={"model": theirs, **body}, headers=auth)
                assert other.status_code == 404
    finally:
        engine.close()


def test_a_long_lived_trainer_forgets_ended_jobs(tiny_folder, tmp_path):
    """`keep_ended=False` (the fine-tuning worker): each job's end is reported once (a typed
    FinishReport), then it leaves the trainer's memory: no status, no cancellation kept."""
    jobs = job_options(tmp_path)
    reports: list = []
    joint = JointTraining(
        load_model(str(tiny_folder)), tmp_path / "out", shared={"precision": "fp32"}, quiet=True,
        on_finish=reports.append, keep_ended=False,
    )  # fmt: skip
    for name in ("acme", "globex"):
        joint.add(JobSpec(name, {**COMMON, **jobs[name], "max_steps": 2, "samples": 0}))
    joint.cancel("globex")
    joint.cancel("nobody")  # not a job here: nothing is kept
    joint.run()
    assert sorted((r.name, r.status) for r in reports) == [("acme", "succeeded")]
    assert joint.status == {} and joint.cancelled == set() and joint.active == [] and joint.waiting == []


def test_whatever_a_tenants_data_raises_fails_that_tenant_alone(tiny_folder, tmp_path, monkeypatch):
    """Not only TiedLoraError: a tokenizer's TypeError (as an unpaired surrogate once raised from
    inside the step loop) while a tenant is prepared fails that tenant, and the others train on."""
    import tiedlora.train.tenants as tenants

    real = tenants.load_data

    def load_data(task, tokenizer, cfg):
        if "poison" in cfg.out:
            raise TypeError("TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]]")
        return real(task, tokenizer, cfg)

    monkeypatch.setattr(tenants, "load_data", load_data)
    jobs = job_options(tmp_path)
    summary = together(
        tiny_folder, tmp_path / "out", {"acme": {**jobs["acme"], "max_steps": 2}, "poison": jobs["globex"]}
    )
    assert summary["acme"]["status"] == "succeeded" and summary["poison"]["status"] == "failed"
    assert "TypeError: TextEncodeInput" in summary["poison"]["error"]
    error = json.loads((tmp_path / "out" / "poison" / "error.json").read_text())["error"]
    assert error == summary["poison"]["error"]
