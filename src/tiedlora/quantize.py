"""Quantized base models, the QLoRA habit: the frozen base in 8 or 4 bits (NF4), the adapter in
fp32 beside it, so a model needs a half to an eighth of its weights' memory while it trains.

bitsandbytes does the quantizing and the matmuls. It is the library people use for this on
GPUs, and since 0.46 it runs the same layers, forward and backward, on the CPU, so one code path
serves both and a CPU-trained adapter meets the same numerics on a GPU. Each decoder layer's
nn.Linear becomes bitsandbytes' Linear8bitLt or Linear4bit, built from the loaded weights; the
embeddings and output head stay as they are. Adapters apply on top as on any model (layout.py
reads the shapes from in_features/out_features), and `merge` refuses quantized weights, which
cannot hold the update exactly: merge into the unquantized base (`tiedlora merge` does).
"""

from __future__ import annotations

from torch import nn

from .config import TiedLoraError
from .layout import find_layers, replace_submodule

BITS = {"8bit": 8, "4bit": 4}


def quantize(model: nn.Module, bits: str) -> nn.Module:
    """Quantize every linear map of `model`'s decoder layers in place to "8bit" or "4bit" (NF4)
    and freeze it; returns the model. Call before tiedlora.apply."""
    if bits not in BITS:
        raise TiedLoraError(
            f"--quantize {bits!r}: choose 8bit or 4bit (NF4), or leave it unset for the full-precision base."
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TiedLoraError("--quantize needs bitsandbytes: pip install 'tiedlora[quantize]'.") from None
    for layer in find_layers(model):
        for name, module in list(layer.named_modules()):
            if type(module) is nn.Linear:
                replace_submodule(layer, name, quantized(module, BITS[bits]))
    return model.requires_grad_(False)


def quantized(linear: nn.Linear, bits: int) -> nn.Module:
    """bitsandbytes' frozen 8-bit or 4-bit copy of `linear`; it quantizes when moved to the
    weight's device. Matmuls run in the weight's dtype (fp32, or bf16 on a bf16 base)."""
    import bitsandbytes as bnb

    weight = linear.weight.data
    has_bias = linear.bias is not None
    q: nn.Module
    if bits == 4:
        q = bnb.nn.Linear4bit(
            linear.in_features, linear.out_features, bias=has_bias, compute_dtype=weight.dtype, quant_type="nf4"
        )
        q.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4")
        # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight in place at its first
        # no-grad forward in eval mode, with bf16 scales: it fails on layers narrower than a block
        # (64 inputs), and where it works, validation would compute with other numbers than
        # training. One layout on every machine instead.
        q.support_avx512bf16_for_cpu = False
    else:
        q = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=has_bias, has_fp16_weights=False)
        q.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    if has_bias:
        q.bias = nn.Parameter(linear.bias.data, requires_grad=False)
    return q.to(weight.device)
