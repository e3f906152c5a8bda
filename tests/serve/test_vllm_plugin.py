"""The vLLM plugin: tiedlora adapters resolved by name, read by the one reader, exported
losslessly to PEFT LoRA once each in a bounded cache; and vLLM's CPU build serving them with the
same greedy answers as the adapter alone. The hostile folders of tests/quality/test_hostile.py go
through this plugin's reader too."""

import os
import signal
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

import tiedlora
from tiedlora import TiedLoraConfig, TiedLoraError
from tiedlora.serve.vllm_plugin import ExportCache

from conftest import llama_folder, randomize, tiny_model

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"


def save_adapter(folder, preset, seed, model=None):
    model = model if model is not None else tiny_model("llama")
    cfg = TiedLoraConfig.preset(preset, rank=4 if model.config.hidden_size < 128 else 8, seed=seed)
    tiedlora.save(randomize(tiedlora.apply(model, cfg), seed=seed, trainable_only=True), folder)


@pytest.fixture
def adapters(tmp_path):
    for i, preset in enumerate(["tl6", "tl5", "lora"]):
        save_adapter(tmp_path / "adapters" / preset, preset, seed=i)
    return tmp_path / "adapters"


def test_the_export_is_the_adapter_losslessly_and_made_once(adapters, tmp_path):
    cache = ExportCache(adapters, tmp_path / "cache", skeleton=lambda _: tiny_model("llama"))
    with ThreadPoolExecutor(8) as pool:  # eight requests for one adapter at once
        folders = list(pool.map(lambda _: cache.resolve("tiny", "tl6"), range(8)))
    assert len(set(folders)) == 1 and cache.exports == 1
    for name in ("tl5", "lora"):
        cache.resolve("tiny", name)
    assert cache.exports == 3
    for name in ("tl6", "tl5", "lora"):
        tiedlora.export_peft(tiedlora.load(tiny_model("llama"), adapters / name), tmp_path / "direct" / name)
        want = load_file(tmp_path / "direct" / name / "adapter_model.safetensors")
        got = load_file(cache.resolve("tiny", name) / "adapter_model.safetensors")
        assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    assert cache.exports == 3  # asked again: served from the cache


def test_the_default_skeleton_needs_no_weights(tiny_folder, tmp_path):
    """The base built on the meta device from its config gives the export a real model gives."""
    from transformers import AutoModelForCausalLM

    save_adapter(tmp_path / "adapters" / "a", "tl6", seed=4, model=AutoModelForCausalLM.from_pretrained(tiny_folder))
    got = load_file(
        ExportCache(tmp_path / "adapters", tmp_path / "cache").resolve(str(tiny_folder), "a")
        / "adapter_model.safetensors"
    )
    real = tiedlora.load(AutoModelForCausalLM.from_pretrained(tiny_folder), tmp_path / "adapters" / "a")
    want = load_file(tiedlora.export_peft(real, tmp_path / "direct") / "adapter_model.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_least_recently_used_exports_are_evicted_past_the_bound(adapters, tmp_path):
    probe = ExportCache(adapters, tmp_path / "probe", skeleton=lambda _: tiny_model("llama"))
    one = sum(f.stat().st_size for f in probe.resolve("tiny", "tl6").iterdir())
    cache = ExportCache(
        adapters, tmp_path / "cache", max_bytes=2 * one + one // 2, skeleton=lambda _: tiny_model("llama")
    )
    tl6, tl5 = cache.resolve("tiny", "tl6"), cache.resolve("tiny", "tl5")
    cache.resolve("tiny", "tl6")  # tl6 used again: tl5 is now the oldest
    lora = cache.resolve("tiny", "lora")
    assert tl6.is_dir() and lora.is_dir() and not tl5.exists()
    assert cache.exports == 3
    cache.resolve("tiny", "tl5")  # exported again, and tl6 goes
    assert cache.exports == 4 and not tl6.exists()
    restarted = ExportCache(adapters, tmp_path / "cache", skeleton=lambda _: tiny_model("llama"))
    restarted.resolve("tiny", "lora")
    assert restarted.exports == 0  # what an earlier life exported is reused


def test_a_missing_or_escaping_name_is_refused(adapters, tmp_path):
    cache = ExportCache(adapters, tmp_path / "cache", skeleton=lambda _: tiny_model("llama"))
    with pytest.raises(TiedLoraError, match="is neither a run folder"):
        cache.resolve("tiny", "nope")
    with pytest.raises(TiedLoraError, match="leads outside the adapters root"):
        cache.resolve("tiny", "../adapters/../..")


# vLLM's CPU build, in the venv `make` builds for it.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tmp_path_factory):
    """vLLM's OpenAI server with the tiedlora plugin over a tiny Llama (head size 64, which vLLM's
    CPU attention supports) with peaked logits, so that greedy choices are not near-ties; its
    adapters folder holds 8 adapters of 3 configurations, 100 more, and a hostile one."""
    if not VLLM_PYTHON.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{VLLM_PYTHON} is missing: `make test` builds it.")
        pytest.skip("no .venv-vllm: `make test` builds it")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("vllm")
    shape = dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    llama_folder(root / "base", **shape, intermediate_size=256, initializer_range=0.2, max_position_embeddings=256)
    tokenizer = AutoTokenizer.from_pretrained(root / "base")
    base = lambda: AutoModelForCausalLM.from_pretrained(root / "base").eval()  # noqa: E731
    for i, preset in enumerate(["tl6", "tl5", "lora"] * 3):
        if i < 8:
            save_adapter(root / "adapters" / f"{preset}-{i}", preset, seed=i, model=base())
    for i in range(100):
        save_adapter(root / "adapters" / "many" / f"a{i:03d}", "tl5", seed=100 + i, model=base())
    save_adapter(root / "adapters" / "hostile", "tl6", seed=9, model=base())
    tensors = load_file(root / "adapters" / "hostile" / "adapter.safetensors")
    tensors["qkv.layers.1.v"][0] = float("nan")
    from safetensors.torch import save_file

    save_file(tensors, root / "adapters" / "hostile" / "adapter.safetensors")  # and its sha256 no longer matches

    port = free_port()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "VLLM_PLUGINS": "tiedlora",
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",
        "TIEDLORA_VLLM_ADAPTERS": str(root / "adapters"),
        "TIEDLORA_VLLM_CACHE": str(root / "cache"),
    }
    command = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(root / "base")]
    command += ["--dtype", "float32", "--max-model-len", "256", "--enable-lora", "--max-lora-rank", "8"]
    command += ["--max-loras", "4", "--port", str(port), "--gpu-memory-utilization", "0.15"]
    log = open(root / "vllm.log", "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM exited with {process.returncode}:\n{(root / 'vllm.log').read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM did not start in 600 s:\n{(root / 'vllm.log').read_text()[-3000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        yield url, root, base, tokenizer
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
        log.close()


def complete(url, model, prompt_ids, max_tokens=8):
    body = {"model": model, "prompt": prompt_ids, "max_tokens": max_tokens, "temperature": 0, "return_token_ids": True}
    return httpx.post(f"{url}/v1/completions", json=body, timeout=120)


def test_vllm_serves_each_adapter_as_the_adapter_alone(vllm_server):
    url, root, base, tokenizer = vllm_server
    prompts = [tokenizer("Question: who wrote the book?\nAnswer:").input_ids, tokenizer("The capital of").input_ids]
    for name in sorted(p.name for p in (root / "adapters").iterdir() if "-" in p.name):
        model = tiedlora.load(base(), root / "adapters" / name)
        for ids in prompts:
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, pad_token_id=0)
            want = out[0, len(ids) :].tolist()
            r = complete(url, name, ids)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["token_ids"] == want, name


def test_a_hostile_or_missing_adapter_is_vllms_404_with_tiedloras_message(vllm_server):
    url, *_ = vllm_server
    r = complete(url, "hostile", [1, 2, 3])
    assert r.status_code == 404 and "does not match the sha256" in r.json()["error"]["message"]
    r = complete(url, "no-such-adapter", [1, 2, 3])
    assert r.status_code == 404 and "is neither a run folder" in r.json()["error"]["message"]


def test_a_hundred_adapters_resolve_in_one_servers_life(vllm_server):
    url, root, *_ = vllm_server
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: complete(url, f"many/a{i:03d}", [1, 2, 3], max_tokens=1), range(100)))
    assert [r.status_code for r in answers] == [200] * 100
    assert len(list((root / "cache").iterdir())) >= 100  # one export each, all still in the 4 GB cache
