"""Faults and hostile input: kills, full disks, fuzzed configs and headers, numerical faults.
docs/RELIABILITY.md reports what these tried and found."""

import errno
import hashlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

import tiedlora
from tiedlora import TiedLoraConfig, TiedLoraError
from tiedlora.adapter_file import read_config
from tiedlora.cli import main
from tiedlora.train import TrainConfig, train

from conftest import latest_step, randomize, record_steps, small_run, tiny_model

ENV = {**os.environ, "HF_HUB_OFFLINE": "1"}
KILLS = 5


def run_flags(tiny_folder, out):
    """40 steps, a checkpoint every step, so kills often land inside a checkpoint write."""
    return [
        "--task=squad",
        "--preset=tl6",
        "--rank=4",
        f"--model={tiny_folder}",
        f"--out={out}",
        "--max_steps=40",
        "--batch_size=4",
        "--micro_batch_size=2",
        "--val_every=5",
        "--val_rows=4",
        "--train_rows=24",
        "--test_rows=2",
        "--max_new_tokens=3",
        "--lr=1e-2",
        "--warmup_steps=2",
        "--checkpoint_every=1",
        "--dropout=0.1",
        "--quiet",
    ]


CHECKPOINT_FILES = {"adapter.safetensors", "adapter_config.json", "optimizer.safetensors", "state.json"}


def assert_no_torn_files(folder):
    """Every file under its final name is whole: JSON parses, safetensors loads, and each
    adapter's tensors match the hash in its config; every checkpoint folder holds all its files."""
    for step in folder.glob("checkpoint/step-*"):
        assert {p.name for p in step.iterdir()} == CHECKPOINT_FILES, step
    for path in folder.rglob("*"):
        if not path.is_file() or path.name.startswith("."):
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            load_file(path)
        if path.name == "adapter_config.json" and path.parent.name.startswith("step-"):
            assert (
                hashlib.sha256((path.parent / "adapter.safetensors").read_bytes()).hexdigest()
                == read_config(path.parent)["tensors"]["sha256"]
            )


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_exact(tiny_folder, tmp_path, monkeypatch):
    """Each life of the run is killed at a random moment once it has passed a new checkpoint:
    within a step, between steps or inside a checkpoint write (one is written every step)."""
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert main(["train", *run_flags(tiny_folder, whole)]) == 0
    delays = random.Random(0)
    for _ in range(KILLS):
        before = latest_step(killed)
        child = subprocess.Popen(
            [sys.executable, "-m", "tiedlora", "train", *run_flags(tiny_folder, killed), "--resume"],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.time() + 120
        while latest_step(killed) <= before and child.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(delays.uniform(0, 0.1))
        assert child.poll() is None, "the run ended before it could be killed"
        child.send_signal(signal.SIGKILL)
        child.wait()
        assert_no_torn_files(killed)
    start = latest_step(killed)
    assert 0 < start < 40
    steps = record_steps(monkeypatch)
    assert main(["train", *run_flags(tiny_folder, killed), "--resume"]) == 0
    assert steps == list(range(start, 40))  # the last life starts where checkpoint/latest says
    a, b = load_file(whole / "best" / "adapter.safetensors"), load_file(killed / "best" / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    a, b = (load_file(f / "checkpoint" / "step-40" / "adapter.safetensors") for f in (whole, killed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (
        json.loads((whole / "results.json").read_text())["metrics"]
        == json.loads((killed / "results.json").read_text())["metrics"]
    )


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EIO])
def test_write_errors_keep_the_previous_checkpoint(tiny_folder, tmp_path, monkeypatch, code):
    run = tmp_path / "run"
    options = small_run(tiny_folder, run)
    real_fsync, writes = os.fsync, []

    def failing_fsync(fd):
        writes.append(fd)
        if len(writes) > 12:  # step 2's checkpoint and best/ succeed, step 4's writes fail
            raise OSError(code, os.strerror(code))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(
        TiedLoraError, match=f"Could not write .*: {os.strerror(code)}; the file there before, if any, is unchanged"
    ):
        train(TrainConfig(**options), quiet=True)
    monkeypatch.setattr(os, "fsync", real_fsync)
    latest = (run / "checkpoint" / "latest").read_text()
    assert latest == "step-2"
    model = tiedlora.load(tiny_model_from(tiny_folder), run / "checkpoint" / latest)
    assert tiedlora.trainable_parameters(model) > 0
    assert not [p for p in run.rglob("*.tmp")]  # no temporary file left behind either


def tiny_model_from(folder):
    from tiedlora.models import load_model

    return load_model(str(folder))[0]


# Fuzzing: whatever a stranger's file holds, the answer is a TiedLoraError, never another exception.
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(10**20), 10**20) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
CONFIG_KEYS = ["rank", "A", "B", "u", "v", "alpha", "seed", "layers", "targets", "dropout", "name", "extra"]
part_like = st.fixed_dictionaries({}, optional={"tied": json_values, "trainable": json_values, "init": json_values})
config_like = st.dictionaries(st.sampled_from(CONFIG_KEYS), json_values | part_like, max_size=8)


@settings(max_examples=3000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=config_like | json_values)
def test_fuzz_config_dicts(data):
    try:
        cfg = TiedLoraConfig.from_dict(data)
    except TiedLoraError:
        return
    assert TiedLoraConfig.from_dict(cfg.to_dict()) == cfg


@pytest.fixture(scope="module")
def saved_adapter(tmp_path_factory):
    folder = tmp_path_factory.mktemp("adapter")
    tiedlora.save(
        randomize(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=4)), trainable_only=True),
        folder,
    )
    return folder


@settings(
    max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(blob=st.binary(max_size=300) | json_values.map(lambda v: json.dumps(v).encode()))
def test_fuzz_config_files(saved_adapter, tmp_path_factory, blob):
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "adapter_config.json").write_bytes(blob)
    (folder / "adapter.safetensors").write_bytes((saved_adapter / "adapter.safetensors").read_bytes())
    with pytest.raises(TiedLoraError):
        tiedlora.load(tiny_model("llama"), folder)


def header(meta: dict, body: bytes = b"") -> bytes:
    text = json.dumps(meta).encode()
    return struct.pack("<Q", len(text)) + text + body


safetensors_headers = st.one_of(
    st.binary(max_size=200),
    st.builds(lambda n, rest: struct.pack("<Q", n) + rest, st.integers(0, 2**64 - 1), st.binary(max_size=64)),
    st.builds(
        lambda name, dtype, shape, start, end: header(
            {name: {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}}, b"\0" * 64
        ),
        st.sampled_from(["qkv.A", "qkv.B", "x"]),
        st.sampled_from(["F32", "BF16", "I64", "U8", "F64", "XX"]),
        st.lists(st.integers(0, 2**40), max_size=3),
        st.integers(0, 2**40),
        st.integers(0, 2**40),
    ),
)


@settings(
    max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow]
)
@given(blob=safetensors_headers)
def test_fuzz_tensor_files(saved_adapter, tmp_path_factory, blob):
    """Hostile tensor files whose hash is made to match: headers claiming huge sizes, wrong
    dtypes and shapes, garbage. The config is valid, so only the tensors file is on trial."""
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "adapter.safetensors").write_bytes(blob)
    meta = json.loads((saved_adapter / "adapter_config.json").read_text())
    meta["tensors"]["sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(TiedLoraError):
        tiedlora.load(tiny_model("llama"), folder)


# The fuzzers above mostly die early (in JSON, the safetensors parser, the config's first check).
# These start from a valid adapter and change a few fields, keys, shapes or dtypes, so most
# inputs reach the later checks (key sets, shapes, dtypes, layers, targets, the base model) and
# `apply` itself; derandomized, so CI tries the same cases every run.
VALID_CONFIG = TiedLoraConfig.preset("tl6", rank=4).to_dict()
part_values = st.fixed_dictionaries(
    {
        "tied": st.booleans(),
        "trainable": st.booleans(),
        "init": st.sampled_from(["kaiming", "zeros", "ones"]) | st.floats(allow_nan=True),
    }
)
field_values = {  # values of each field's own type, near its valid range
    "rank": st.integers(-2, 80),
    "alpha": st.none() | st.floats(-10, 1e40),
    "seed": st.integers(-1, 2**64),
    "layers": st.none() | st.lists(st.integers(-1, 5), max_size=4),
    "targets": st.lists(st.sampled_from(["qkv", "o", "mlp_in", "mlp_out", "x"]), max_size=3)
    | st.dictionaries(
        st.sampled_from(["qkv", "g", "1"]),
        st.lists(st.sampled_from(["self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "nope"]), max_size=3),
        max_size=2,
    ),
    "dropout": st.floats(-0.5, 1.5),
    "name": st.text(max_size=5),
    **{part: part_values for part in ("A", "B", "u", "v")},
}


@st.composite
def mutated_configs(draw):
    """A valid config with one or two fields changed: to a value of the field's type three times
    in four, else to any JSON value."""
    keys = draw(st.lists(st.sampled_from(sorted(field_values)), min_size=1, max_size=2, unique=True))
    return {**VALID_CONFIG, **{k: draw(field_values[k] if draw(st.integers(0, 3)) else json_values) for k in keys}}


DEEP = settings(
    max_examples=600,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@DEEP
@given(data=mutated_configs())
def test_fuzz_valid_shaped_configs_then_apply(data):
    """Near-valid configs: each builds and applies to a model, or gives a TiedLoraError."""
    from hypothesis import event

    try:
        cfg = TiedLoraConfig.from_dict(data)
    except TiedLoraError:
        event("refused by the config")
        return
    try:
        tiedlora.apply(tiny_model("llama"), cfg)
        event("applied")
    except TiedLoraError:
        event("refused by apply")


def mutate(meta: dict, path: tuple, value):
    """A deep copy of meta with the value at `path` (keys) replaced."""
    meta = json.loads(json.dumps(meta))
    here = meta
    for key in path[:-1]:
        here = here[key]
    here[path[-1]] = value
    return meta


META_PATHS = [
    ("format",),
    ("format_version",),
    ("library_version",),
    ("config",),
    ("base_model",),
    ("tensors",),
    ("tensors", "stored"),
    ("tensors", "sha256"),
    ("base_model", "layers"),
    ("base_model", "model_type"),
    ("base_model", "groups"),
    ("base_model", "groups", "qkv"),
    ("base_model", "groups", "qkv", "d_in"),
    ("base_model", "groups", "qkv", "members"),
    *[("config", k) for k in VALID_CONFIG],
]


@DEEP
@given(
    changes=st.lists(
        st.tuples(st.sampled_from(META_PATHS), json_values | st.integers(0, 8) | st.sampled_from(["all", "trained"])),
        min_size=1,
        max_size=3,
    )
)
def test_fuzz_adapter_configs_with_a_valid_tensor_file(saved_adapter, tmp_path_factory, changes):
    """adapter_config.json as written, with a few values changed to other (mostly valid) JSON;
    the tensors file is the real one: the answer is the adapter loaded, or a TiedLoraError."""
    meta = json.loads((saved_adapter / "adapter_config.json").read_text())
    for path, value in changes:
        meta = mutate(meta, path, value) if isinstance(meta, dict) and all_dicts(meta, path) else meta
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    (folder / "adapter.safetensors").write_bytes((saved_adapter / "adapter.safetensors").read_bytes())
    from hypothesis import event

    try:
        tiedlora.load(tiny_model("llama"), folder)
        event("loaded")
    except TiedLoraError as e:
        event(f"refused: {str(e).replace(str(folder), '<folder>')[:45]}")


def all_dicts(meta, path) -> bool:
    for key in path[:-1]:
        if not isinstance(meta, dict) or key not in meta:
            return False
        meta = meta[key]
    return isinstance(meta, dict)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]


@st.composite
def tensor_files(draw, valid: dict):
    """A valid safetensors file holding the adapter's keys, each with its own shape and a float
    dtype; then, each with chance 1/3, one key dropped, one key added, one shape changed, one
    dtype changed."""
    keys = sorted(valid)
    tensors = {k: valid[k].clone() for k in keys}
    if draw(st.integers(0, 2)) == 0:
        del tensors[draw(st.sampled_from(keys))]
    if draw(st.integers(0, 2)) == 0:
        tensors[draw(st.sampled_from(["qkv.layers.7.u", "qkv.C", "o.A", "qkv.layers.0.A"]))] = torch.randn(3)
    if tensors and draw(st.integers(0, 2)) == 0:
        key = draw(st.sampled_from(sorted(tensors)))
        shape = tuple(tensors[key].shape)
        tensors[key] = torch.randn(
            draw(st.sampled_from([(*shape, 1), shape[::-1], (0,), tuple(d + 1 for d in shape), ()]))
        )
    float_dtype = draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.float64]))
    tensors = {k: t.to(float_dtype) for k, t in tensors.items()}
    if tensors and draw(st.integers(0, 2)) == 0:
        key = draw(st.sampled_from(sorted(tensors)))
        tensors[key] = tensors[key].to(draw(st.sampled_from(DTYPES)))
    return tensors


@DEEP
@given(data=st.data())
def test_fuzz_valid_tensor_files_with_wrong_keys_shapes_and_dtypes(saved_adapter, tmp_path_factory, data):
    """Well-formed tensor files (their hash made to match) that reach the key, shape and dtype
    checks: each loads with exactly the file's values, or gives a TiedLoraError."""
    from hypothesis import event
    from safetensors.torch import save

    valid = load_file(saved_adapter / "adapter.safetensors")
    tensors = data.draw(tensor_files(valid))
    blob = save(tensors)
    folder = tmp_path_factory.mktemp("fuzz")
    (folder / "adapter.safetensors").write_bytes(blob)
    meta = json.loads((saved_adapter / "adapter_config.json").read_text())
    meta["tensors"]["sha256"] = hashlib.sha256(blob).hexdigest()
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    try:
        model = tiedlora.load(tiny_model("llama"), folder)
    except TiedLoraError as e:
        event(f"refused: {str(e).replace(str(folder), '<folder>')[:45]}")
        return
    event("loaded")
    params = tiedlora.adapter_parameters(model)  # loaded: the file is one `save` could have written
    assert set(tensors) == {k for k, p in params.items() if p.requires_grad}
    for key, t in tensors.items():
        assert t.is_floating_point() and t.shape == params[key].shape, key
        assert torch.equal(params[key].detach(), t.to(params[key].dtype)), key


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8])
def test_integer_tensors_are_refused(saved_adapter, tmp_path, dtype):
    folder = tmp_path / "a"
    folder.mkdir()
    tensors = {k: v.to(dtype) for k, v in load_file(saved_adapter / "adapter.safetensors").items()}
    save_file(tensors, folder / "adapter.safetensors")
    meta = json.loads((saved_adapter / "adapter_config.json").read_text())
    meta["tensors"]["sha256"] = hashlib.sha256((folder / "adapter.safetensors").read_bytes()).hexdigest()
    (folder / "adapter_config.json").write_text(json.dumps(meta))
    with pytest.raises(TiedLoraError, match="expected a float tensor"):
        tiedlora.load(tiny_model("llama"), folder)


def test_a_diverging_learning_rate_is_reported(tiny_folder, tmp_path):
    """An absurd learning rate: training must stop on the non-finite loss, naming the step."""
    options = small_run(
        tiny_folder,
        tmp_path / "run",
        preset="lora",
        max_steps=40,
        micro_batch_size=4,
        val_every=40,
        lr=1e12,
        warmup_steps=1,
        alpha=1e6,
    )
    with pytest.raises(TiedLoraError, match=r"the training loss became (nan|inf) at step \d+"):
        train(TrainConfig(**options), quiet=True)


def test_no_pickle_loader_in_the_package():
    """Checks of trust: tensors are read with safetensors only, nowhere with torch.load or pickle."""
    import pathlib

    source = pathlib.Path(tiedlora.__file__).parent
    for path in source.rglob("*.py"):
        text = path.read_text()
        assert "torch.load(" not in text and "import pickle" not in text and "pickle.load" not in text, path


def test_a_base_model_with_pickled_weights_is_refused(tiny_folder, tmp_path):
    """A `.bin` is a pickle, and unpickling a stranger's file can run code: only safetensors load."""
    import shutil

    from transformers import AutoModelForCausalLM

    from tiedlora.models import load_model

    folder = tmp_path / "pickled"
    shutil.copytree(tiny_folder, folder)
    (folder / "model.safetensors").unlink()
    torch.save(
        AutoModelForCausalLM.from_pretrained(tiny_folder).state_dict(), folder / "pytorch_model.bin"
    )  # the pickle format
    assert (folder / "pytorch_model.bin").is_file() and not (folder / "model.safetensors").exists()
    with pytest.raises(TiedLoraError, match="pickled .bin files are refused"):
        load_model(str(folder))
    assert load_model(str(tiny_folder))[0] is not None  # safetensors still load


# A training process that SIGKILLs itself at one write of step 4's checkpoint, or half-way
# through removing the first old checkpoint (one file gone): no finally block, no atexit
# handler, no flush runs, as when the machine loses power there.
DIE_AT_WRITE = """
import os, shutil, signal, sys
from tiedlora.cli import main
target, real_replace, real_rmtree = sys.argv[1], os.replace, shutil.rmtree
def replace(src, dst):
    if os.path.basename(dst) == target and "step-4" in str(dst) + open(src, "rb").read(64).decode("latin-1"):
        os.kill(os.getpid(), signal.SIGKILL)
    real_replace(src, dst)
def rmtree(path, *args, **kwargs):
    if target == "removal" and os.path.isfile(os.path.join(path, "state.json")):
        os.unlink(os.path.join(path, "state.json"))
        os.kill(os.getpid(), signal.SIGKILL)
    real_rmtree(path, *args, **kwargs)
os.replace, shutil.rmtree = replace, rmtree
sys.exit(main(["train", *sys.argv[2:]]))
"""


@pytest.mark.parametrize("target", ["adapter.safetensors", "optimizer.safetensors", "latest", "removal"])
def test_death_inside_a_checkpoint_write_then_resume_is_exact(tiny_folder, tmp_path, monkeypatch, target):
    """A real process dies in the middle of step 4's checkpoint, at each of its writes in turn,
    or while step 2's is removed after step 6's; the resumed run starts from the newest whole
    checkpoint and ends as the uninterrupted one."""
    options = small_run(tiny_folder, tmp_path / "whole", dropout=0.1)
    train(TrainConfig(**options), quiet=True)
    flags = [f"--{k}={v}" for k, v in {**options, "out": tmp_path / "killed"}.items()]
    died = subprocess.run(
        [sys.executable, "-c", DIE_AT_WRITE, target, *flags, "--quiet"],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert died.returncode == -signal.SIGKILL, died.stderr[-2000:]
    start = 6 if target == "removal" else 2
    assert latest_step(tmp_path / "killed") == start
    assert_no_torn_files(tmp_path / "killed")
    steps = record_steps(monkeypatch)
    train(TrainConfig(**{**options, "out": str(tmp_path / "killed")}), resume=True, quiet=True)
    assert steps == list(range(start, 6))
    assert not list((tmp_path / "killed").rglob(".*.tmp"))  # what the kill left half-removed is gone
    for sub in ("best", "checkpoint/step-6"):
        a, b = (load_file(tmp_path / f / sub / "adapter.safetensors") for f in ("whole", "killed"))
        assert all(torch.equal(a[k], b[k]) for k in a), sub


def small_config(tiny_folder, out, **extra) -> TrainConfig:
    return TrainConfig(**small_run(tiny_folder, out, **{"max_steps": 4, **extra}))


def test_prompts_longer_than_the_context_lose_their_start_and_say_so_once(tiny_folder, tmp_path, capsys):
    train(small_config(tiny_folder, tmp_path / "run", max_length=48), quiet=True)
    out = capsys.readouterr().out
    assert out.count("training examples exceed --max_length 48; their prompts were cut from the start.") == 1


def test_an_infinite_gradient_stops_training_at_its_step(tiny_folder, tmp_path, monkeypatch):
    from tiedlora.loss import TokenLoss
    from tiedlora.train import Diverged

    forward, calls = TokenLoss.forward, []

    def poison(self, *args, **kwargs):
        loss = forward(self, *args, **kwargs)
        calls.append(self.training)
        if sum(calls) == 5:  # step 3's first micro batch: a finite loss whose gradient is infinite
            self.model.tiedlora["qkv"]["A"].register_hook(lambda g: g * float("inf"))
        return loss

    monkeypatch.setattr(TokenLoss, "forward", poison)
    with pytest.raises(
        Diverged, match="a gradient became non-finite \\(loss [0-9.]+\\) at step 3 .* the last good checkpoint stays in"
    ):
        train(small_config(tiny_folder, tmp_path / "run"), quiet=True)
    assert latest_step(tmp_path / "run") == 2
