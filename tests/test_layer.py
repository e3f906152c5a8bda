import copy

import pytest
import torch
from torch import nn

import tiedlora
from tiedlora import Part, TiedLoraConfig
from tiedlora.layer import GroupAdapter, drop, tensor_key
from tiedlora.model import root

from conftest import randomize, tiny_model

ZERO_START = ["lora", "vera", "tl2", "tl3", "tl4", "tl5", "tl6"]


@pytest.mark.parametrize("name", ZERO_START)
def test_zero_start_presets_begin_at_the_base_model(kind, tokens, name):
    base = tiny_model(kind)
    expected = base(tokens).logits
    model = tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset(name, rank=4))
    assert torch.equal(model(tokens).logits, expected)


def test_tl1_as_printed_moves_and_its_zero_start_variant_does_not(tokens):
    base = tiny_model("llama")
    expected = base(tokens).logits
    printed = tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset("tl1", rank=4))
    assert (printed(tokens).logits - expected).abs().max() > 1e-3
    zero = tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset("tl1", rank=4, init={"A": "zeros"}))
    assert torch.equal(zero(tokens).logits, expected)


def test_forward_is_the_equation():
    """z = W x + b + (alpha/r) diag(v) B diag(u) A x, row by row over q, k, v."""
    model = tiny_model("qwen2")  # q/k/v with biases and grouped-query attention
    cfg = TiedLoraConfig.preset("tl6", rank=4, alpha=8)
    layer = tiedlora.apply(model, cfg).model.layers[1].self_attn
    randomize(model)
    ad = layer.tiedlora_qkv
    A, B, u, v = (ad.part(p).detach() for p in "ABuv")
    x = torch.randn(5, 48)
    full = torch.cat([m.base(x) for m in (layer.q_proj, layer.k_proj, layer.v_proj)], dim=-1)
    full = full + 2.0 * ((x @ A.T) * u) @ (B.T * v.unsqueeze(0))
    got = torch.cat([layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)], dim=-1)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)


def test_down_projection_runs_once_per_layer(tokens, monkeypatch):
    model = randomize(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=4)))
    calls = []
    original = GroupAdapter.part
    monkeypatch.setattr(GroupAdapter, "part", lambda self, name: calls.append(name) or original(self, name))
    model(tokens)
    assert calls.count("A") == 3  # one A x per layer, shared by q, k and v
    assert calls.count("B") == 9  # one up-projection per member
    assert all(site.adapter.shared.empty for site in root(model).sites)


class Attention(nn.Module):
    """Attention that never calls its v projection: the group's third member."""

    def __init__(self, d: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):
        return self.q_proj(x) + self.k_proj(x)


class Stack(nn.Module):
    def __init__(self, d: int = 8, n: int = 2):
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"attn": Attention(d)}) for _ in range(n))

    def forward(self, x):
        for layer in self.layers:
            x = layer["attn"](x)
        return x


def test_a_member_never_called_does_not_keep_the_input_or_its_graph_alive():
    """q and k share h = (u * A) x; v is never called, so nothing would drop a use-counted cache."""
    import gc
    import weakref

    model = tiedlora.apply(
        Stack(), TiedLoraConfig.preset("tl6", rank=2, targets={"qkv": ["attn.q_proj", "attn.k_proj", "attn.v_proj"]})
    )
    x = torch.randn(3, 8, requires_grad=True)
    model(x).sum().backward()
    alive = weakref.ref(x)
    del x
    gc.collect()
    assert alive() is None
    assert all(site.adapter.shared.empty for site in root(model).sites)
    tiedlora.remove(model)
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("name", sorted(tiedlora.PRESETS))
def test_gradients_reach_exactly_the_trainable_parts(kind, tokens, name):
    model = randomize(tiedlora.apply(tiny_model(kind), TiedLoraConfig.preset(name, rank=4)))
    model(tokens, labels=tokens).loss.backward()
    cfg = root(model).config
    for key, p in tiedlora.adapter_parameters(model).items():
        part = cfg.parts[key.rsplit(".", 1)[1]]
        assert p.requires_grad == part.trainable, key
        if part.trainable:
            assert p.grad is not None and p.grad.abs().sum() > 0, key
        else:
            assert p.grad is None, key
    base = [n for n, p in model.named_parameters() if "tiedlora" not in n]
    assert base and all(not p.requires_grad and p.grad is None for n, p in model.named_parameters() if n in base)


def test_tied_tensor_is_one_parameter(tokens):
    model = tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl5", rank=4))
    layers = model.model.layers
    a0, a2 = layers[0].self_attn.tiedlora_qkv.part("A"), layers[2].self_attn.tiedlora_qkv.part("A")
    assert a0 is a2 is model.tiedlora["qkv"]["A"]
    keys = [k for k in model.state_dict() if k.endswith(".A") or k.endswith(".B")]
    assert keys == ["tiedlora.qkv.A", "tiedlora.qkv.B"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    assert len(optimizer.param_groups[0]["params"]) == 2


def test_tied_gradient_is_the_sum_over_layers(tokens):
    """Tying = one tensor whose gradient accumulates every layer's: compare with per-layer copies."""
    tied = randomize(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=4)))
    untied_cfg = TiedLoraConfig.preset("tl6", rank=4, A=Part(tied=False), B=Part(tied=False))
    untied = tiedlora.apply(tiny_model("llama"), untied_cfg)
    with torch.no_grad():
        for site_t, site_u in zip(root(tied).sites, root(untied).sites):
            for p in "ABuv":
                site_u.adapter.part(p).copy_(site_t.adapter.part(p))
    for m in (tied, untied):
        m(tokens, labels=tokens).loss.backward()
    for p in "AB":
        summed = sum(site.adapter.part(p).grad for site in root(untied).sites)
        torch.testing.assert_close(tied.tiedlora["qkv"][p].grad, summed, rtol=1e-5, atol=1e-7)


def test_dropout_only_when_asked(tokens):
    plain = randomize(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=4)))
    assert all(site.adapter.dropout == 0 for site in root(plain).sites)
    before = plain.eval()(tokens).logits
    assert torch.equal(plain.train()(tokens).logits, before)  # no dropout in training either
    dropped = randomize(tiedlora.apply(tiny_model("llama"), TiedLoraConfig.preset("tl6", rank=4, dropout=0.5)))
    dropped.train()
    torch.manual_seed(0)
    a = dropped(tokens).logits
    dropped.eval()
    assert not torch.allclose(a, dropped(tokens).logits)


def test_an_examples_dropout_masks_are_its_own():
    """With row seeds (as the trainer sets them), an example's mask is a function of its seed and
    the site alone: the same beside another example, padded further, or packed after another in
    one row; another site or seed draws another mask; and the kept entries are scaled by 1/(1-p)."""
    key = tensor_key("qkv", "dropout", 0)
    x, other = torch.randn(1, 5, 16) + 3, torch.randn(1, 7, 16)
    alone = drop(x, 0.5, key, [[(11, 5)]])
    padded = torch.cat([torch.cat([x, torch.zeros(1, 2, 16)], 1), other])
    beside = drop(padded, 0.5, key, [[(11, 5)], [(12, 7)]])
    assert torch.equal(beside[0, :5], alone[0])
    packed = drop(torch.cat([other, x], 1), 0.5, key, [[(12, 7), (11, 5)]])
    assert torch.equal(packed[0, 7:], alone[0]) and torch.equal(packed[0, :7], beside[1])
    assert not torch.equal(drop(x, 0.5, tensor_key("qkv", "dropout", 1), [[(11, 5)]]), alone)
    assert not torch.equal(drop(x, 0.5, key, [[(13, 5)]]), alone)
    kept = alone != 0
    assert 0.3 < kept.float().mean() < 0.7 and torch.allclose(alone[kept], 2 * x[kept])


def test_bf16_base_with_fp32_adapter(tokens):
    model = tiedlora.apply(tiny_model("llama").to(torch.bfloat16), TiedLoraConfig.preset("tl6", rank=4))
    assert tiedlora.adapter_parameters(model)["qkv.A"].dtype == torch.float32
    randomize(model)(tokens, labels=tokens).loss.backward()
    assert model.tiedlora["qkv"]["A"].grad.dtype == torch.float32
