"""Quantized bases (bitsandbytes, on this CPU): the base in 8 or 4 bits, the adapter in fp32 on top
of it, computing the paper's equation; gradients reach the adapter; merge refuses, the CLI merges
into the unquantized base and says so."""

import json

import pytest
import torch
from torch import nn

import tiedlora
from tiedlora import TiedLoraConfig, TiedLoraError
from tiedlora.cli import main
from tiedlora.model import root
from tiedlora.quantize import quantize

from conftest import randomize, small_run, tiny_model

pytest.importorskip("bitsandbytes")


def weight_bytes(model) -> int:
    return sum(p.numel() * p.element_size() for layer in model.model.layers for p in layer.parameters())


@pytest.mark.parametrize("bits, shrink, error", [("8bit", 3.5, 0.02), ("4bit", 6.0, 0.2)])
def test_the_base_shrinks_and_stays_close(tokens, bits, shrink, error):
    full, q = tiny_model("llama"), quantize(tiny_model("llama"), bits)
    assert weight_bytes(full) / weight_bytes(q) > shrink
    assert not any(p.requires_grad for p in q.parameters())
    assert all(
        type(m).__name__ in ("Linear8bitLt", "Linear4bit") for m in q.model.layers.modules() if isinstance(m, nn.Linear)
    )
    assert isinstance(q.lm_head, nn.Linear) and q.lm_head.weight.dtype == torch.float32  # the head stays as it was
    with torch.no_grad():
        gap = (q(tokens).logits - full(tokens).logits).abs().max().item()
    assert 0 < gap < error


@pytest.mark.parametrize("bits", ["8bit", "4bit"])
def test_an_adapter_on_a_quantized_base_computes_the_equation_and_trains(tokens, bits):
    model = randomize(
        tiedlora.apply(quantize(tiny_model("llama"), bits), TiedLoraConfig.preset("tl6", rank=4, alpha=8))
    )
    site = root(model).sites[1]
    x = torch.randn(2, 5, 64)
    for (_, member), rows in zip(site.members, [slice(0, 64), slice(64, 96), slice(96, 128)]):
        p = {k: site.adapter.part(k).detach() for k in "ABuv"}
        expected = member.base(x) + 2.0 * ((x @ (p["u"][:, None] * p["A"]).T) @ (p["v"][rows, None] * p["B"][rows]).T)
        torch.testing.assert_close(member(x), expected, rtol=1e-4, atol=1e-5)
    model(tokens, labels=tokens).loss.backward()
    trained = [p for p in tiedlora.adapter_parameters(model).values() if p.requires_grad]
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    with tiedlora.disabled(model), torch.no_grad():
        alone = model(tokens).logits
    with torch.no_grad():
        assert torch.equal(alone, quantize(tiny_model("llama"), bits)(tokens).logits)


def test_validation_computes_as_training_does(tokens):
    """A 4-bit base gives the same logits in eval mode without gradients (validation) as in
    training mode, on every CPU (bitsandbytes would repack the weights on AVX512-BF16 ones)."""
    model = quantize(tiny_model("llama"), "4bit")
    with torch.no_grad():
        training = model.train()(tokens).logits
        validating = model.eval()(tokens).logits
        assert torch.equal(validating, model.train()(tokens).logits)
    assert torch.equal(training, validating)


def test_merge_refuses_quantized_weights_and_changes_nothing():
    model = randomize(tiedlora.apply(quantize(tiny_model("llama"), "4bit"), TiedLoraConfig.preset("lora", rank=2)))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(TiedLoraError, match="quantized .*holds torch.uint8.* merge into the unquantized base"):
        tiedlora.merge(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_train_on_a_4bit_base_then_eval_and_merge(tiny_folder, tmp_path, capsys):
    run = tmp_path / "run"
    flags = [f"--{k}={v}" for k, v in small_run(tiny_folder, run, max_steps=2).items()]
    assert main(["train", *flags, "--quantize=4bit", "--quiet"]) == 0
    results = json.loads((run / "results.json").read_text())
    assert results["recipe"]["quantize"] == "4bit"
    capsys.readouterr()
    assert main(["eval", "--adapter", str(run), "--task", "squad", "--limit", "2", "--max_new_tokens", "3"]) == 0
    assert main(["merge", "--adapter", str(run), "--out", str(tmp_path / "merged")]) == 0
    assert "trained on a 4bit base (--quantize); it is merged into the unquantized base" in capsys.readouterr().out
    assert main(["train", *flags, "--quantize=3bit", "--quiet"]) == 2
    assert "--quantize '3bit': choose 8bit or 4bit" in capsys.readouterr().err
