import pytest

import tiedlora
from tiedlora import TiedLoraConfig
from tiedlora.models import parameter_table

from conftest import SHAPES, tiny_model


def formula(name, d, d_out, L, r):
    """Table 1's formulas with the q/k/v group's output size d_out in place of 3d (GQA)."""
    return {
        "lora": L * (d * r + d_out * r),
        "vera": L * (r + d_out),
        "tl1": d * r,
        "tl2": d * r + L * (r + d_out),
        "tl3": d_out * r,
        "tl4": (L + d_out) * r,
        "tl5": d * r + d_out * r,
        "tl6": d * r + d_out * r + L * (r + d_out),
    }[name]


@pytest.mark.parametrize("name", sorted(tiedlora.PRESETS))
@pytest.mark.parametrize("rank", [1, 4])
def test_counts_equal_table_1(kind, name, rank):
    d, d_out, L = SHAPES[kind]
    model = tiedlora.apply(tiny_model(kind), TiedLoraConfig.preset(name, rank=rank))
    assert tiedlora.trainable_parameters(model) == formula(name, d, d_out, L, rank)
    # and the optimizer sees exactly those numbers, each tensor once
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.numel() for p in trainable) == formula(name, d, d_out, L, rank)


def test_layer_subset_counts():
    d, d_out, L = SHAPES["llama"]
    one = tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("lora", rank=4, layers=[1]))
    assert tiedlora.trainable_parameters(one) == formula("lora", d, d_out, 1, 4)
    tl6 = tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=4, layers=[0, 2]))
    assert tiedlora.trainable_parameters(tl6) == formula("tl6", d, d_out, 2, 4)


def test_more_groups_count_their_own_shapes():
    d, d_out, L = SHAPES["llama"]
    model = tiedlora.apply(
        tiny_model("llama"), TiedLoraConfig.preset("tl5", rank=2, targets=["qkv", "o", "mlp_in", "mlp_out"])
    )
    # each group ties its own A (r x d_in) and B (d_out x r): qkv 64->128, o 64->64, gate+up 64->192, down 96->64
    assert tiedlora.trainable_parameters(model) == 2 * ((64 + 128) + (64 + 64) + (64 + 192) + (96 + 64))


# The paper's Table 2 P% (trainable / LoRA's), LLaMA-2 7B at r = 8 and GPT-2B-001 at r = 4.
LLAMA2_7B_R8 = {"lora": 100.0, "vera": 9.4, "tl1": 0.8, "tl2": 10.2, "tl3": 2.3, "tl4": 2.3, "tl5": 3.1, "tl6": 12.5}


def test_paper_table_2_llama2_7b():
    rows = {r["config"]: r for r in parameter_table("llama2-7b", 8)}
    assert rows["lora"]["params"] == 4_194_304 and rows["tl5"]["params"] == 131_072
    assert {name: round(r["percent_of_lora"], 1) for name, r in rows.items()} == LLAMA2_7B_R8
    for name, r in rows.items():
        assert r["params"] == formula(name, 4096, 3 * 4096, 32, 8)


def test_paper_table_2_gpt_2b_001():
    rows = {r["config"]: r for r in parameter_table("gpt-2b-001", 4)}
    assert round(rows["vera"]["percent_of_lora"], 1) == 18.8
    assert round(rows["tl6"]["percent_of_lora"], 1) == 22.9
    assert rows["lora"]["params"] == 4 * 24 * 2048 * 4
