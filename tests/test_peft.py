"""Golden tests against PEFT (a test-only dependency): export, LoRA and VeRA equality."""

import copy
import json

import pytest
import torch
from peft import LoraConfig, PeftModel, VeraConfig, get_peft_model

import tiedlora
from tiedlora import TiedLoraConfig
from tiedlora.model import root

from conftest import randomize, tiny_model


@pytest.mark.parametrize("name, layers", [("tl6", None), ("lora", None), ("vera", [1])])
def test_export_loads_in_peft_with_equal_outputs(kind, tokens, tmp_path, name, layers):
    base = tiny_model(kind)
    model = randomize(tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset(name, rank=4, alpha=8, layers=layers)))
    ours = model(tokens).logits
    tiedlora.export_peft(model, tmp_path)
    peft_model = PeftModel.from_pretrained(base, tmp_path).eval()
    torch.testing.assert_close(peft_model(tokens).logits, ours, rtol=1e-5, atol=1e-5)
    n_modules = sum(len(site.members) for site in root(model).sites)
    assert sum(1 for n, _ in peft_model.named_parameters() if "lora_A" in n) == n_modules


def test_lora_preset_equals_peft_lora_given_the_same_matrices(tokens):
    """Untied, trained A and B with u = v = 1 is LoRA; q, k and v each get the shared A and their rows of B."""
    base = tiny_model("llama")
    ours = randomize(tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset("lora", rank=4)), trainable_only=True)
    peft_model = get_peft_model(
        base, LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"])
    ).eval()
    with torch.no_grad():
        for site in root(ours).sites:
            attn = peft_model.base_model.model.model.layers[site.layer].self_attn
            for (_, member), module in zip(site.members, (attn.q_proj, attn.k_proj, attn.v_proj)):
                module.lora_A["default"].weight.copy_(site.adapter.part("A"))
                module.lora_B["default"].weight.copy_(site.adapter.part("B")[member.rows])
    assert tiedlora.trainable_parameters(ours) < sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    torch.testing.assert_close(peft_model(tokens).logits, ours(tokens).logits, rtol=1e-5, atol=1e-5)


def test_vera_preset_equals_peft_vera_given_the_same_tensors(tokens):
    """On a fused q/k/v (GPT-NeoX), PEFT's VeRA has exactly the vera preset's shapes."""
    base = tiny_model("neox")
    ours = randomize(tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset("vera", rank=4)))
    peft_model = get_peft_model(base, VeraConfig(r=4, target_modules=["query_key_value"])).eval()
    with torch.no_grad():
        vera = peft_model.base_model.model.gpt_neox.layers[0].attention.query_key_value
        vera.vera_A["default"].copy_(ours.tiedlora["qkv"]["A"])
        vera.vera_B["default"].copy_(ours.tiedlora["qkv"]["B"])
        for site in root(ours).sites:
            module = peft_model.base_model.model.gpt_neox.layers[site.layer].attention.query_key_value
            module.vera_lambda_d["default"].copy_(site.adapter.part("u"))
            module.vera_lambda_b["default"].copy_(site.adapter.part("v"))
    peft_trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert tiedlora.trainable_parameters(ours) == peft_trainable
    torch.testing.assert_close(peft_model(tokens).logits, ours(tokens).logits, rtol=1e-5, atol=1e-5)


def saved_activation_bytes(model, tokens):
    """Bytes autograd keeps for backward (each storage once), what training memory grows with."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, labels=tokens)
    return sum(storages.values())


@pytest.mark.parametrize("name", sorted(tiedlora.PRESETS))
def test_no_more_saved_activations_than_peft_lora(tokens, name):
    """v scales B (d_out x r), not the d_out-wide activations, so memory stays at LoRA's."""
    tokens = tokens.repeat(4, 4)  # long enough that activations, not weights, dominate
    base = tiny_model("llama")
    peft_model = get_peft_model(
        copy.deepcopy(base), LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "k_proj", "v_proj"])
    )
    ours = tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset(name, rank=4))
    assert saved_activation_bytes(ours, tokens) <= saved_activation_bytes(peft_model, tokens)


def test_export_uses_short_target_names_only_where_they_are_exact(tmp_path):
    gpt2 = randomize(tiedlora.apply(tiny_model("gpt2"), TiedLoraConfig.preset("tl5", rank=2, targets=["qkv", "o"])))
    tiedlora.export_peft(gpt2, tmp_path / "a")
    # attn.c_proj is adapted, mlp.c_proj is not: "c_proj" alone would catch both
    names = json.loads((tmp_path / "a" / "adapter_config.json").read_text())["target_modules"]
    assert names == ["c_attn"] + [f"transformer.h.{i}.attn.c_proj" for i in range(3)]
    one = tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("lora", rank=2, layers=[2]))
    tiedlora.export_peft(one, tmp_path / "b")
    names = json.loads((tmp_path / "b" / "adapter_config.json").read_text())["target_modules"]
    assert names == [f"model.layers.2.self_attn.{m}_proj" for m in "kqv"]
    everywhere = tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("lora", rank=2))
    tiedlora.export_peft(everywhere, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "adapter_config.json").read_text())["target_modules"] == [
        "k_proj",
        "q_proj",
        "v_proj",
    ]
