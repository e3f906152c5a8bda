import pytest
import torch
from torch import nn

import tiedlora
from tiedlora import TiedLoraConfig, TiedLoraError

from conftest import tiny_model


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Module()
        self.mix.left, self.mix.right = nn.Linear(8, 8), nn.Linear(8, 4)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return x + torch.cat([self.mix.left(x), self.mix.right(x)], -1)[..., :8]


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def test_no_attention_projections_lists_what_it_found():
    with pytest.raises(TiedLoraError) as e:
        tiedlora.apply(Odd(), TiedLoraConfig.preset("tl6", rank=2))
    assert "Found no 'qkv' projections in Block; its linear modules are ['mix.left', 'mix.right']" in str(e.value)
    assert "targets={'qkv':" in str(e.value)


def test_explicit_targets_adapt_any_model():
    model = tiedlora.apply(Odd(), TiedLoraConfig.preset("tl6", rank=2, targets={"qkv": ["mix.left", "mix.right"]}))
    assert tiedlora.trainable_parameters(model) == 8 * 2 + 12 * 2 + 2 * (2 + 12)
    model(torch.randn(3, 8)).sum().backward()


@pytest.mark.parametrize(
    "targets, message",
    [
        ({"qkv": ["mix.left", "mix.middle"]}, "Target 'mix.middle' of group 'qkv' is missing in layer 0"),
        ({"qkv": ["mix", "mix.left"]}, "Target 'mix' of group 'qkv' is a Module, not nn.Linear or Conv1D"),
        ({"qkv": ["mix.left", "norm"]}, "is a LayerNorm, not nn.Linear"),
    ],
)
def test_bad_explicit_targets(targets, message):
    with pytest.raises(TiedLoraError, match=message):
        tiedlora.apply(Odd(), TiedLoraConfig.preset("lora", rank=2, targets=targets))


def test_no_layer_list():
    with pytest.raises(TiedLoraError, match="has no nn.ModuleList of decoder layers"):
        tiedlora.apply(nn.Linear(4, 4), TiedLoraConfig.preset("lora", rank=2))


def test_rank_larger_than_the_projection():
    with pytest.raises(
        TiedLoraError, match="rank=65 is larger than the 'qkv' projection \\(64 -> 128\\): use rank <= 64"
    ):
        tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=65))


def test_layers_out_of_range():
    with pytest.raises(TiedLoraError, match="layers=\\[1, 7\\] names layers \\[7\\], but the model has 3 \\(0 to 2\\)"):
        tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("lora", rank=2, layers=[1, 7]))


def test_apply_twice_and_no_adapter():
    model = tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("lora", rank=2))
    with pytest.raises(TiedLoraError, match="already carries a Tied-LoRA adapter: call tiedlora.remove"):
        tiedlora.apply(model, TiedLoraConfig.preset("tl6", rank=2))
    with pytest.raises(TiedLoraError, match="carries no Tied-LoRA adapter"):
        tiedlora.merge(tiny_model("llama"))
    with pytest.raises(TiedLoraError, match="config must be a tiedlora.TiedLoraConfig"):
        tiedlora.apply(tiny_model("llama"), {"rank": 8})


def test_errors_are_value_errors():
    assert issubclass(TiedLoraError, ValueError)
