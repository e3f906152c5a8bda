"""What the trainer makes, the server serves: adapters of every projection group (q/k/v, o, the
MLP's input and output) and of large ranks, beside one another in one batch, on a full or a 4-
and 8-bit base; each request's log-probabilities (prompt and answer, `echo` with `logprobs`)
those of a plain forward of `tiedlora.load` on the same base; and the base's public name, never
a server path."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager

import pytest
import torch
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiedlora
from tiedlora import TiedLoraConfig
from tiedlora.quantize import quantize
from tiedlora.serve.server import build

from conftest import randomize

GROUPS = ["qkv", "o", "mlp_in", "mlp_out"]
ADAPTERS = {  # rank buckets 8, 32 and 16; every group, two groups, one
    "every": TiedLoraConfig.preset("tl6", rank=4, alpha=32, seed=1, targets=GROUPS),
    "wide": TiedLoraConfig.preset("lora", rank=20, alpha=40, targets=["qkv", "o"], layers=[1]),
    "mlp": TiedLoraConfig.preset("vera", rank=12, alpha=48, seed=2, targets=["mlp_in"]),
}
# bitsandbytes' 8-bit matmul on the CPU casts its input to fp16 and quantizes it per call, so a
# token's scores move with how many tokens the call holds (a prefill, a decode step): 1.4e-3 here,
# where the adapters change them by more than 1e-2
TOLERANCE = {None: 1e-4, "4bit": 1e-4, "8bit": 5e-3}
PROMPT = "Once upon a time, in a land far away, there lived"


def base(folder, bits=None):
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return quantize(model, bits) if bits else model


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("groups")
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        tiedlora.save(randomize(tiedlora.apply(base(tiny_folder), cfg), seed=i, trainable_only=True), root / name)
    return root


@contextmanager
def serving(tiny_folder, root, **options):
    engine, app = build(str(tiny_folder), root, max_tokens_limit=8, **options)
    try:
        with TestClient(app) as client:
            yield engine, client
    finally:
        engine.close()


def together(engine, client, bodies: list[dict]) -> list[dict]:
    """The requests admitted in one step (the worker held until every one has arrived), so their
    decode steps share one batch; each one's response."""
    out: list[dict] = [{}] * len(bodies)
    listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
    assert {b["model"] for b in bodies} <= listed, f"not served: {sorted({b['model'] for b in bodies} - listed)}"

    def send(i: int) -> None:
        r = client.post("/v1/completions", json=bodies[i])
        assert r.status_code == 200, r.text
        out[i] = r.json()

    with engine.lock:
        threads = [threading.Thread(target=send, args=(i,)) for i in range(len(bodies))]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(engine.waiting) + engine.inbox.qsize() < len(bodies):  # taken in by the worker, or not yet
            assert time.monotonic() < deadline, "the requests did not reach the engine within 60 s"
            time.sleep(0.01)
    for t in threads:
        t.join(120)
    return out


def reference(model, tokenizer, text: str) -> tuple[list[int], torch.Tensor]:
    """(the prompt's token ids and 3 greedy ones, log_softmax of a plain forward over them)."""
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=3, do_sample=False, attention_mask=None)
        full = out[0].tolist()
        return full, model(torch.tensor([full])).logits[0].float().log_softmax(-1)


def check_logprobs(choice: dict, full: list[int], scores: torch.Tensor, tolerance: float = 1e-4) -> float:
    """The response's token logprobs against the reference's (the first token has none); the largest gap."""
    got = choice["logprobs"]["token_logprobs"]
    assert len(got) == len(full) and got[0] is None
    want = [float(scores[k - 1, full[k]]) for k in range(1, len(full))]
    gap = max(abs(a - b) for a, b in zip(got[1:], want))
    assert gap <= tolerance, (gap, got[1:], want)
    return gap


@pytest.mark.parametrize("bits", [None, "8bit", "4bit"])
def test_every_group_served_in_one_batch_equals_tiedlora_load(tiny_folder, root, bits):
    if bits:
        pytest.importorskip("bitsandbytes")
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    body = {"prompt": PROMPT, "max_tokens": 3, "logprobs": 1, "echo": True}
    with serving(tiny_folder, root, quantize=bits) as (engine, client):
        names = [*ADAPTERS, tiny_folder.name, "every"]
        replies = together(engine, client, [{**body, "model": name} for name in names])
    plain = base(tiny_folder, bits)
    for name, reply in zip(names, replies):
        model = plain if name == tiny_folder.name else tiedlora.load(base(tiny_folder, bits), root / name)
        full, scores = reference(model, tokenizer, PROMPT)
        check_logprobs(reply["choices"][0], full, scores, TOLERANCE[bits])
        if name != tiny_folder.name:  # the adapter changes the model: the comparison can tell them apart
            _, bare = reference(plain, tokenizer, PROMPT)
            assert (bare - scores).abs().max() > 1e-2


def test_the_base_is_served_by_its_public_name_and_no_path_reaches_a_client(tiny_folder, root, tmp_path):
    (root.parent / "damaged").mkdir(exist_ok=True)
    with serving(tiny_folder, root, served_model_name="acme-base") as (engine, client):
        assert [m["id"] for m in client.get("/v1/models").json()["data"]][0] == "acme-base"
        r = client.post("/v1/completions", json={"model": str(tiny_folder), "prompt": "Hi", "max_tokens": 2})
        assert r.status_code == 404 and str(tiny_folder) not in r.text
        assert client.post("/v1/completions", json={"model": "acme-base", "prompt": "Hi", "max_tokens": 2}).is_success
        (root / "every" / "adapter.safetensors").rename(tmp_path / "moved")  # registered, then gone
        try:
            r = client.post("/v1/completions", json={"model": "every", "prompt": "Hi", "max_tokens": 2})
        finally:
            (tmp_path / "moved").rename(root / "every" / "adapter.safetensors")
        assert r.status_code == 404 and "every/adapter.safetensors does not exist" in r.text
        r = client.post("/v1/adapters", json={"name": "x", "path": "nowhere"})
        assert r.status_code == 400 and "<adapters>" in r.text
        for text in (r.text, client.get("/v1/models/every").text):
            assert str(root) not in text and str(tiny_folder) not in text
    with serving(tiny_folder, root) as (engine, client):  # no name given: a folder is named by its own name
        assert [m["id"] for m in client.get("/v1/models").json()["data"]][0] == tiny_folder.name
