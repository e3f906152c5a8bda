import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, Qwen2Config
from transformers.utils import logging

logging.set_verbosity_error()

# Tiny random models of the four layouts: separate q/k/v with grouped-query attention (Llama,
# Qwen2 with biases), GPT-2's fused Conv1D c_attn, GPT-NeoX's fused query_key_value.
TINY = {
    "llama": lambda: LlamaConfig(
        hidden_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=96,
        vocab_size=128,
    ),
    "qwen2": lambda: Qwen2Config(
        hidden_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        intermediate_size=64,
        vocab_size=128,
    ),
    "gpt2": lambda: GPT2Config(
        n_embd=32, n_layer=3, n_head=4, vocab_size=128, n_positions=64, bos_token_id=0, eos_token_id=0
    ),
    "neox": lambda: GPTNeoXConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=128,
        bos_token_id=0,
        eos_token_id=0,
    ),
}
# (d_in, d_out of the q/k/v group, layers) of each tiny model.
SHAPES = {"llama": (64, 64 + 2 * 32, 3), "qwen2": (48, 48 + 2 * 12, 2), "gpt2": (32, 96, 3), "neox": (32, 96, 2)}


def tiny_model(kind: str, seed: int = 0):
    torch.manual_seed(seed)
    config = TINY[kind]()
    config._attn_implementation = "eager"
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(params=sorted(TINY))
def kind(request):
    return request.param


@pytest.fixture
def tokens():
    return torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))


def randomize(model, seed: int = 0, trainable_only: bool = False):
    """Give adapter tensors random values so no part is a silent zero or one; trainable_only
    keeps the frozen ones as seeded, as after training."""
    import tiedlora

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in tiedlora.adapter_parameters(model).values():
            if p.requires_grad or not trainable_only:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def llama_folder(folder, **shape):
    """A random Llama of `shape` (LlamaConfig's sizes) with the real SmolLM2 tokenizer, saved as a
    model folder any loader reads (transformers, `tiedlora serve`, vLLM)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    from tiedlora.models import SMOLLM2_FILE, smollm2_folder

    tokenizer = AutoTokenizer.from_pretrained(smollm2_folder(), gguf_file=SMOLLM2_FILE)
    torch.manual_seed(0)
    config = LlamaConfig(
        **shape,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A 2-layer Llama (d = 32) with the real SmolLM2 tokenizer, saved as a model folder."""
    shape = dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64
    )
    return llama_folder(tmp_path_factory.mktemp("tiny-llama"), **shape)


@pytest.fixture(scope="module")
def adapter(tmp_path_factory, tiny_folder):
    """A tl6 adapter of the tiny_folder model, its trained parts random (alpha 64: it shows)."""
    import tiedlora
    from tiedlora import TiedLoraConfig

    folder = tmp_path_factory.mktemp("one") / "a"
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    cfg = TiedLoraConfig.preset("tl6", rank=4, alpha=64, seed=1)
    tiedlora.save(randomize(tiedlora.apply(model, cfg), trainable_only=True), folder)
    return folder


def record_steps(monkeypatch) -> list[int]:
    """The global step index of every training step the run takes from now on."""
    import tiedlora.train.loop

    steps, real = [], tiedlora.train.loop.train_step

    def counted(*args):
        steps.append(args[-1])
        return real(*args)

    monkeypatch.setattr(tiedlora.train.loop, "train_step", counted)
    return steps


def latest_step(folder) -> int:
    pointer = folder / "checkpoint" / "latest"
    return int(pointer.read_text().split("-")[1]) if pointer.is_file() else 0


def small_run(tiny_folder, out, **extra) -> dict:
    """The options of a small training run: 6 steps of 4 SQuAD rows in micro batches of 2,
    validating every 2 steps."""
    options = dict(task="squad", preset="tl6", rank=4, model=str(tiny_folder), out=str(out), max_steps=6, batch_size=4)
    options.update(micro_batch_size=2, val_every=2, val_rows=4, train_rows=24, test_rows=2, max_new_tokens=3, lr=1e-2)
    return {**options, "warmup_steps": 2, **extra}


def jsonl(rows) -> bytes:
    """Rows as a JSON-lines file's bytes."""
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def client_for(http, key):
    """The official openai client, talking to a TestClient's app with `key`."""
    from openai import OpenAI

    return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)
