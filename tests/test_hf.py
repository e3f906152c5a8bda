"""The transformers Trainer and TRL's SFTTrainer training a tiedlora model: checkpoints hold the
adapter (tiedlora's format) and the optimizer state but no base weights, a resumed run continues
exactly, and the output folder loads with tiedlora.load and serves."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

import tiedlora
from tiedlora.hf import TiedLoraTrainer
from tiedlora.tasks import OwnData

EXAMPLES = Path(__file__).parent.parent / "examples"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
BASE_FILES = {"model.safetensors", "pytorch_model.bin", "model.safetensors.index.json"}


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "rows.jsonl"
    path.write_text(
        "".join(json.dumps({"prompt": f"What is {i} plus {i}? ", "completion": str(2 * i)}) + "\n" for i in range(40))
    )
    return path


class StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        control.should_training_stop = state.global_step >= self.step


class Steps(TrainerCallback):
    def __init__(self):
        self.begun = []

    def on_step_begin(self, args, state, control, **kwargs):
        self.begun.append(state.global_step)


def trainer(tiny_folder, rows, out, cls=TiedLoraTrainer, callbacks=()):
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    model = tiedlora.apply(
        AutoModelForCausalLM.from_pretrained(tiny_folder), tiedlora.TiedLoraConfig.preset("tl6", rank=4)
    )
    own = OwnData(str(rows))
    examples = [own.encode(tokenizer, r) for r in own.load("train")]
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        save_steps=3,
        seed=0,
        report_to=[],
        use_cpu=True,
        lr_scheduler_type="cosine",
        warmup_steps=1,
        disable_tqdm=True,
    )
    return cls(
        model=model,
        args=args,
        train_dataset=examples,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        processing_class=tokenizer,
        callbacks=list(callbacks),
    )


def sizes(folder: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}


def test_checkpoints_hold_the_adapter_and_optimizer_but_no_base_weights(tiny_folder, rows, tmp_path):
    trainer(tiny_folder, rows, tmp_path / "plain", cls=Trainer).train()  # the unpatched Trainer, for comparison
    t = trainer(tiny_folder, rows, tmp_path / "ours")
    t.train()
    plain, ours = sizes(tmp_path / "plain" / "checkpoint-3"), sizes(tmp_path / "ours" / "checkpoint-3")
    assert "model.safetensors" in plain
    assert not BASE_FILES & set(ours)
    assert {"adapter.safetensors", "adapter_config.json", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(
        ours
    )
    tokenizer_files = {"tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}
    assert sum(v for k, v in ours.items() if k not in tokenizer_files) < 64_000 < plain["model.safetensors"]
    on_disk = load_file(tmp_path / "ours" / "checkpoint-6" / "adapter.safetensors")
    trained = {k: p for k, p in tiedlora.adapter_parameters(t.model).items() if p.requires_grad}
    assert on_disk.keys() == trained.keys() and all(torch.equal(on_disk[k], trained[k].detach()) for k in trained)


def test_the_head_only_loss_equals_the_trainers_own(tiny_folder, rows, tmp_path):
    """Our compute_loss (the output head only where labels are) against Trainer's (full logits),
    on one padded batch: the same value and gradients, with the accumulated batch's token count
    (num_items_in_batch) and without it."""
    ours = trainer(tiny_folder, rows, tmp_path / "ours")
    theirs = Trainer(model=ours.model, args=ours.args, data_collator=ours.data_collator)
    inputs = ours.data_collator(ours.train_dataset[:5])
    for n in (None, torch.tensor(123)):
        losses, grads = [], []
        for t in (theirs, ours):
            ours.model.zero_grad()
            loss = t.compute_loss(ours.model, dict(inputs), num_items_in_batch=n)
            loss.backward()
            losses.append(loss.item())
            grads.append(
                {k: p.grad.clone() for k, p in tiedlora.adapter_parameters(ours.model).items() if p.grad is not None}
            )
        assert losses[0] == pytest.approx(losses[1], rel=1e-5) and grads[0].keys() == grads[1].keys()
        assert all(torch.allclose(grads[0][k], grads[1][k], rtol=1e-4, atol=1e-7) for k in grads[0])


@pytest.mark.parametrize("accumulate", [1, 2])
def test_training_with_the_head_only_loss_follows_the_trainers_own(tiny_folder, rows, tmp_path, accumulate):
    """3 steps of each, with and without gradient accumulation: the same adapter up to rounding."""
    runs = []
    for cls in (Trainer, TiedLoraTrainer):
        t = trainer(tiny_folder, rows, tmp_path / cls.__name__, cls=cls)
        t.args.max_steps, t.args.save_strategy, t.args.gradient_accumulation_steps = 3, "no", accumulate
        t.train()
        runs.append(tiedlora.adapter_parameters(t.model))
    assert all(torch.allclose(runs[0][k], runs[1][k], rtol=1e-4, atol=1e-6) for k in runs[0])


def test_resume_from_checkpoint_continues_exactly(tiny_folder, rows, tmp_path):
    whole = trainer(tiny_folder, rows, tmp_path / "whole")
    whole.train()
    trainer(tiny_folder, rows, tmp_path / "cut", callbacks=[StopAt(3)]).train()
    assert not (tmp_path / "cut" / "checkpoint-6").exists()
    steps = Steps()
    resumed = trainer(tiny_folder, rows, tmp_path / "cut", callbacks=[steps])
    resumed.train(resume_from_checkpoint=str(tmp_path / "cut" / "checkpoint-3"))
    assert steps.begun == [3, 4, 5]  # from the checkpoint's step, none redone
    a, b = tiedlora.adapter_parameters(whole.model), tiedlora.adapter_parameters(resumed.model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_output_folder_loads_and_serves(tiny_folder, rows, tmp_path):
    from tiedlora.serve.server import build

    t = trainer(tiny_folder, rows, tmp_path / "runs" / "mine")
    t.train()
    t.save_model(str(tmp_path / "runs" / "mine"))
    ids = torch.randint(0, 1000, (2, 7))
    with torch.no_grad():
        expected = t.model.eval()(ids).logits
        loaded = tiedlora.load(AutoModelForCausalLM.from_pretrained(tiny_folder), tmp_path / "runs" / "mine")(
            ids
        ).logits
    torch.testing.assert_close(loaded, expected)
    engine, _ = build(str(tiny_folder), tmp_path / "runs")
    try:
        assert engine.adapters == ["mine"]
    finally:
        engine.close()


@pytest.mark.parametrize("example", ["hf_trainer.py", "trl_sft.py"])
def test_the_examples_train_checkpoint_and_resume(tiny_folder, rows, tmp_path, example):
    """Each example as a user runs it: 4 steps, a checkpoint every 2; then 2 more steps from the last one."""

    def run(*extra):
        command = [
            sys.executable,
            str(EXAMPLES / example),
            "--model",
            str(tiny_folder),
            "--data",
            str(rows),
            "--out",
            str(tmp_path / "out"),
            "--save_steps",
            "2",
            *extra,
        ]
        done = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]

    run("--max_steps", "4")
    for step in (2, 4):
        files = set(sizes(tmp_path / "out" / f"checkpoint-{step}"))
        assert {"adapter.safetensors", "adapter_config.json", "optimizer.pt"} <= files and not BASE_FILES & files
    run("--max_steps", "6", "--resume", "true")
    state = json.loads((tmp_path / "out" / "checkpoint-6" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and [h["step"] for h in state["log_history"] if "loss" in h][0] == 1
    model = tiedlora.load(AutoModelForCausalLM.from_pretrained(tiny_folder), tmp_path / "out")
    v = [p for k, p in tiedlora.adapter_parameters(model).items() if k.endswith(".v")]
    assert v and all(p.abs().max() > 0 for p in v)  # tl6 starts at v = 0: it trained
