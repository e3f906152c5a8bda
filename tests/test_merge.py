import copy

import pytest
import torch

import tiedlora
from tiedlora import TiedLoraConfig, TiedLoraError
from tiedlora.layer import AdaptedLinear

from conftest import randomize, tiny_model


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "tiedlora" not in n}


@pytest.mark.parametrize("name", ["lora", "vera", "tl1", "tl4", "tl6"])
def test_merge_equals_unmerged_and_unmerge_restores(kind, tokens, name):
    model = randomize(tiedlora.apply(tiny_model(kind), TiedLoraConfig.preset(name, rank=4, alpha=6)))
    before, w0 = model(tokens).logits, weights(model)
    tiedlora.merge(model)
    merged = model(tokens).logits
    assert (merged - before).abs().max() < 1e-5
    assert any(not torch.equal(w, w0[n]) for n, w in weights(model).items())
    w1 = weights(model)
    tiedlora.merge(model)  # idempotent
    assert all(torch.equal(w, w1[n]) for n, w in weights(model).items())
    tiedlora.unmerge(model)
    tiedlora.unmerge(model)  # idempotent
    for n, w in weights(model).items():
        torch.testing.assert_close(w, w0[n], rtol=0, atol=1e-6)
    assert (model(tokens).logits - before).abs().max() < 1e-5


def test_merge_covers_a_layer_subset_only(tokens):
    model = randomize(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("lora", rank=4, layers=[1])))
    w0 = weights(model)
    tiedlora.merge(model)
    changed = sorted(n for n, w in weights(model).items() if not torch.equal(w, w0[n]))
    assert changed == [f"model.layers.1.self_attn.{m}_proj.base.weight" for m in "kqv"]


def test_disabled_is_the_base_model_exactly(kind, tokens):
    base = tiny_model(kind)
    expected = base(tokens).logits
    model = randomize(tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset("tl6", rank=4)))
    adapted = model(tokens).logits
    assert not torch.allclose(adapted, expected)
    with tiedlora.disabled(model):
        assert torch.equal(model(tokens).logits, expected)
    assert torch.equal(model(tokens).logits, adapted)
    tiedlora.merge(model)
    with pytest.raises(TiedLoraError, match="call tiedlora.unmerge\\(model\\) first"):
        with tiedlora.disabled(model):
            pass


def test_remove_restores_the_original_model(kind, tokens):
    base = tiny_model(kind)
    expected, keys = base(tokens).logits, list(base.state_dict())
    model = randomize(tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset("tl6", rank=4)))
    adapted = model(tokens).logits
    tiedlora.remove(model)
    assert list(model.state_dict()) == keys and not hasattr(model, "tiedlora")
    assert not any(isinstance(m, AdaptedLinear) for m in model.modules())
    assert (model(tokens).logits - expected).abs().max() < 1e-6

    folded = randomize(tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset("tl6", rank=4)))
    tiedlora.remove(folded, merge_weights=True)
    assert list(folded.state_dict()) == keys
    assert (folded(tokens).logits - adapted).abs().max() < 1e-5
