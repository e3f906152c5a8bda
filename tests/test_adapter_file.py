import json
import os

import pytest
import torch
from safetensors.torch import load_file

import tiedlora
from tiedlora import TiedLoraConfig, TiedLoraError
from tiedlora.models import shape_model

from conftest import randomize, tiny_model


@pytest.mark.parametrize("name", ["lora", "vera", "tl2", "tl6"])
def test_save_load_round_trip(kind, tokens, tmp_path, name):
    model = tiedlora.apply(tiny_model(kind), TiedLoraConfig.preset(name, rank=4, seed=3))
    randomize(model, trainable_only=True)  # as after training: frozen tensors keep their seeded values
    tiedlora.save(model, tmp_path)
    fresh = tiedlora.load(tiny_model(kind), tmp_path)
    assert torch.equal(fresh(tokens).logits, model(tokens).logits)
    assert tiedlora.trainable_parameters(fresh) == tiedlora.trainable_parameters(model)


def test_only_trained_tensors_are_stored_and_frozen_ones_regenerate(tmp_path, tokens):
    model = randomize(
        tiedlora.apply(tiny_model("neox"), TiedLoraConfig.preset("vera", rank=4, seed=11)), trainable_only=True
    )
    tiedlora.save(model, tmp_path)
    stored = load_file(tmp_path / "adapter.safetensors")
    assert sorted(stored) == sorted(k for k, p in tiedlora.adapter_parameters(model).items() if p.requires_grad)
    assert all(k.endswith((".u", ".v")) for k in stored)
    fresh = tiedlora.load(tiny_model("neox"), tmp_path)
    for key, p in tiedlora.adapter_parameters(fresh).items():
        assert torch.equal(p, tiedlora.adapter_parameters(model)[key]), key
    assert torch.equal(fresh(tokens).logits, model(tokens).logits)

    tiedlora.save(model, tmp_path / "all", include_frozen=True)
    assert sorted(load_file(tmp_path / "all" / "adapter.safetensors")) == sorted(tiedlora.adapter_parameters(model))


def test_config_records_base_shapes_version_and_hash(tmp_path):
    model = tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl5", rank=4))
    tiedlora.save(model, tmp_path)
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["library_version"] == tiedlora.__version__
    assert meta["base_model"]["layers"] == 3 and meta["base_model"]["model_type"] == "llama"
    assert meta["base_model"]["groups"]["qkv"] == {
        "members": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"],
        "d_in": 64,
        "d_out": [64, 32, 32],
    }
    assert len(meta["tensors"]["sha256"]) == 64 and meta["config"]["name"] == "tl5"
    assert sorted(os.listdir(tmp_path)) == ["adapter.safetensors", "adapter_config.json"]  # no temporary files left


def test_written_files_and_folders_get_the_modes_open_and_mkdir_give(tmp_path):
    """Atomic writes go through temporary files (mode 0600) and folders (0700); what they leave
    must be readable by whoever could read a file written plainly, a server running as another user."""
    (tmp_path / "plain.txt").write_text("x")
    (tmp_path / "plain").mkdir()
    file_mode, folder_mode = ((tmp_path / n).stat().st_mode & 0o777 for n in ("plain.txt", "plain"))
    model = tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl5", rank=4))
    tiedlora.save(model, tmp_path / "adapter")
    assert (tmp_path / "adapter").stat().st_mode & 0o777 == folder_mode
    assert {(p.stat().st_mode & 0o777) for p in (tmp_path / "adapter").iterdir()} == {file_mode}


def test_tl5_on_llama2_7b_is_256_kib_in_bf16(tmp_path):
    """The paper's headline: tl5 at r = 8 on LLaMA-2 7B is 131,072 parameters; PEFT's LoRA ~8 MiB."""
    sizes = {}
    for name in ("tl5", "lora"):
        model = tiedlora.apply(shape_model("llama2-7b"), TiedLoraConfig.preset(name, rank=8), device="cpu")
        tiedlora.save(model, tmp_path / name, dtype=torch.bfloat16)
        sizes[name] = (tmp_path / name / "adapter.safetensors").stat().st_size
    assert 256 * 1024 < sizes["tl5"] < 257 * 1024
    assert 8 * 1024**2 < sizes["lora"] < 8 * 1024**2 + 64 * 1024


def saved(tmp_path, kind="llama", name="tl6"):
    model = randomize(tiedlora.apply(tiny_model(kind), TiedLoraConfig.preset(name, rank=4)), trainable_only=True)
    tiedlora.save(model, tmp_path)
    return tmp_path


def rehash(folder):
    import hashlib

    meta = json.loads((folder / "adapter_config.json").read_text())
    meta["tensors"]["sha256"] = hashlib.sha256((folder / "adapter.safetensors").read_bytes()).hexdigest()
    (folder / "adapter_config.json").write_text(json.dumps(meta))


def edit_config(folder, change):
    meta = json.loads((folder / "adapter_config.json").read_text())
    change(meta)
    (folder / "adapter_config.json").write_text(json.dumps(meta))


def test_load_onto_another_base_model_names_expected_and_found(tmp_path):
    folder = saved(tmp_path, "llama")
    target = tiny_model("qwen2")
    with pytest.raises(
        TiedLoraError,
        match="was made for another base model: a .llama. model of 3 layers, where this one is a .qwen2. model of 2",
    ):
        tiedlora.load(target, folder)
    assert not hasattr(target, "tiedlora")  # nothing half-applied


def test_load_onto_a_different_adapter_config(tmp_path):
    folder = saved(tmp_path, "llama", "tl6")
    model = tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl5", rank=4))
    with pytest.raises(TiedLoraError, match="another config than the one on this model"):
        tiedlora.load(model, folder)


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda f: f.write_bytes(f.read_bytes()[:-10]), "does not match the sha256"),
        (
            lambda f: f.write_bytes(f.read_bytes()[:100] + bytes([f.read_bytes()[100] ^ 1]) + f.read_bytes()[101:]),
            "does not match the sha256",
        ),
        (lambda f: f.unlink(), "adapter.safetensors does not exist"),
    ],
)
def test_tampered_or_truncated_tensors(tmp_path, damage, message):
    folder = saved(tmp_path)
    damage(folder / "adapter.safetensors")
    with pytest.raises(TiedLoraError, match=message):
        tiedlora.load(tiny_model("llama"), folder)


def test_pickle_renamed_safetensors_is_never_unpickled(tmp_path):
    folder = saved(tmp_path)

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    torch.save({"x": Boom()}, folder / "adapter.safetensors")
    rehash(folder)
    with pytest.raises(TiedLoraError, match="is not a valid safetensors file"):
        tiedlora.load(tiny_model("llama"), folder)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.parametrize(
    "tensors, message",
    [
        ({"qkv.A": torch.zeros(4, 64)}, "holds tensors .* that do not match its config"),
        (None, "tensor qkv.A is torch.float32 \\(5, 64\\), expected a float tensor of shape \\(4, 64\\)"),
    ],
)
def test_wrong_tensors(tmp_path, tensors, message):
    from safetensors.torch import save_file

    folder = saved(tmp_path)
    stored = load_file(folder / "adapter.safetensors")
    stored.update({"qkv.A": torch.zeros(5, 64)} if tensors is None else {})
    save_file(tensors if tensors is not None else stored, folder / "adapter.safetensors")
    rehash(folder)
    with pytest.raises(TiedLoraError, match=message):
        tiedlora.load(tiny_model("llama"), folder)


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m["config"].update(rnak=4), "Unknown config keys \\['rnak'\\]"),
        (lambda m: m["config"].update(rank=-1), "rank=-1 must be a positive integer"),
        (lambda m: m.update(format="peft"), "is not a tiedlora adapter config"),
        (lambda m: m.update(extra=1), "has keys .* expected"),
        (lambda m: m["tensors"].update(stored="some"), 'must give "stored"'),
    ],
)
def test_bad_config_files(tmp_path, change, message):
    folder = saved(tmp_path)
    edit_config(folder, change)
    with pytest.raises(TiedLoraError, match=message):
        tiedlora.load(tiny_model("llama"), folder)


def test_missing_and_unparsable_config(tmp_path):
    with pytest.raises(TiedLoraError, match="adapter_config.json does not exist"):
        tiedlora.load(tiny_model("llama"), tmp_path / "nowhere")
    folder = saved(tmp_path)
    (folder / "adapter_config.json").write_bytes(b"{\xff not json")
    with pytest.raises(TiedLoraError, match="is not valid JSON"):
        tiedlora.load(tiny_model("llama"), folder)


def test_symlinked_tensor_file_is_refused(tmp_path):
    folder = saved(tmp_path / "a")
    outside = tmp_path / "outside.safetensors"
    (folder / "adapter.safetensors").rename(outside)
    (folder / "adapter.safetensors").symlink_to(outside)
    with pytest.raises(TiedLoraError, match="adapter.safetensors is a link; an adapter folder holds its own files"):
        tiedlora.load(tiny_model("llama"), folder)


def test_load_into_a_merged_model_is_refused(tmp_path):
    folder = saved(tmp_path)
    model = tiedlora.merge(tiedlora.load(tiny_model("llama"), folder))
    with pytest.raises(TiedLoraError, match="unmerge"):
        tiedlora.load(model, folder)


def test_frozen_tensors_follow_the_seed():
    a = [
        tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("vera", rank=4, seed=s)).tiedlora["qkv"]["A"]
        for s in (1, 1, 2)
    ]
    assert torch.equal(a[0], a[1]) and not torch.equal(a[0], a[2])
