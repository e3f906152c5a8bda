"""One home for the adapter's math: the module, the PEFT export and the multi-adapter banks all
take each layer's factors (diag(u) A, (alpha/r) diag(v) B) from `GroupAdapter.factors`, and those
equal the equation computed here from the raw parts."""

import pytest
import torch
from safetensors.torch import load_file

import tiedlora
from tiedlora import PRESETS, TiedLoraConfig
from tiedlora.model import root
from tiedlora.multi import MultiAdapterModel

from conftest import randomize, tiny_model

TARGETS = ("qkv", "o")
LAYERS = [0, 2]  # of the tiny Llama's 3: layer 1 stays the base model's


def config(name: str) -> TiedLoraConfig:
    return TiedLoraConfig.preset(name, rank=4, alpha=6, layers=LAYERS, targets=list(TARGETS), seed=3)


@pytest.fixture(params=sorted(PRESETS))
def adapted(request, tmp_path):
    """A tiny Llama adapted by one preset, its trained parts random, saved and exported."""
    model = randomize(tiedlora.apply(tiny_model("llama"), config(request.param)), seed=5, trainable_only=True)
    tiedlora.save(model, tmp_path / "adapter")
    tiedlora.export_peft(model, tmp_path / "peft")
    return model, tmp_path


def test_factors_are_the_equation(adapted):
    model, _ = adapted
    scale = 6 / 4
    for site in root(model).sites:
        a = site.adapter
        for _, member in site.members:
            down, up = a.factors(member.rows)
            torch.testing.assert_close(down, torch.diag(a.part("u")) @ a.part("A"), rtol=0, atol=1e-6)
            want_up = scale * torch.diag(a.part("v")[member.rows]) @ a.part("B")[member.rows]
            torch.testing.assert_close(up, want_up, rtol=0, atol=1e-6)
            x = torch.randn(3, down.shape[1])
            torch.testing.assert_close(member(x) - member.base(x), x @ down.T @ up.T, rtol=1e-5, atol=1e-6)


def test_the_export_writes_the_factors(adapted):
    model, folder = adapted
    exported = load_file(folder / "peft" / "adapter_model.safetensors")
    assert len(exported) == 2 * sum(len(site.members) for site in root(model).sites)
    for site in root(model).sites:
        for path, member in site.members:
            down, up = site.adapter.factors(member.rows)
            assert torch.equal(exported[f"base_model.model.{path}.lora_A.weight"], down)
            assert torch.equal(exported[f"base_model.model.{path}.lora_B.weight"], up)


def test_the_banks_hold_the_factors(adapted):
    model, folder = adapted
    multi = MultiAdapterModel(tiny_model("llama"))
    adapter_id = multi.add("one", folder / "adapter")
    seen = {}

    def record(*_):  # the rows each bank gathered for this call, as its layers read them
        seen.update({g: (multi.bank(g).rows_a.clone(), multi.bank(g).rows_b.clone()) for g in TARGETS})

    multi.model.register_forward_pre_hook(record)
    with torch.no_grad():
        multi(torch.zeros(1, 2, dtype=torch.long), adapter_ids=[adapter_id])
    sites = {(site.layer, site.group.name): site for site in root(model).sites}
    for group in TARGETS:
        rows_a, rows_b = seen[group]
        for layer in range(3):
            site = sites.get((layer, group))
            if site is None:  # not adapted: the bank's zero row
                assert not rows_a[0, layer].any() and not rows_b[0, layer].any()
                continue
            assert not rows_a[0, layer, 4:].any() and not rows_b[0, layer, :, 4:].any()  # rank 4 in the bank of 8
            for _, member in site.members:
                down, up = site.adapter.factors(member.rows)
                torch.testing.assert_close(rows_a[0, layer, :4], down, rtol=0, atol=1e-7)
                torch.testing.assert_close(rows_b[0, layer, member.rows, :4], up, rtol=0, atol=1e-7)
