"""tiedlora serve over real HTTP: mixed-adapter batches give each request exactly what its adapter
gives alone; streaming, run-time loading, bad requests and a bounded load test."""

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiedlora
from tiedlora import TiedLoraConfig
from tiedlora.cli import main
from tiedlora.serve.server import build

from conftest import randomize

# name under the adapters root -> config: a run folder, a bare adapter folder, a nested one; the
# large alphas make every adapter change the tiny model's greedy text on every prompt
ADAPTERS = {
    "tl6": TiedLoraConfig.preset("tl6", rank=4, alpha=64, seed=1),
    "lora": TiedLoraConfig.preset("lora", rank=2, alpha=6, layers=[1]),
    "more/vera": TiedLoraConfig.preset("vera", rank=8, alpha=64, seed=2),
}
PROMPTS = ["The capital of France is", "Hello", "Once upon a time, in a land far away, there lived", "2 + 2 ="]


def base(folder):
    return AutoModelForCausalLM.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def root(tmp_path_factory, tiny_folder):
    root = tmp_path_factory.mktemp("runs")
    for i, (name, cfg) in enumerate(ADAPTERS.items()):
        model = randomize(tiedlora.apply(base(tiny_folder), cfg), seed=i, trainable_only=True)
        tiedlora.save(model, root / name / "best" if name == "tl6" else root / name)
    (root / "tl6" / "run.json").write_text("{}")
    tiedlora.save(tiedlora.load(base(tiny_folder), root / "tl6" / "best"), root / "tl6" / "checkpoint")  # not served
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{")  # skipped at start, refused at run time
    outside = tmp_path_factory.mktemp("outside")
    tiedlora.save(tiedlora.load(base(tiny_folder), root / "lora"), outside / "lora")
    (root / "link").symlink_to(outside / "lora")
    return root


def wait_until(condition, seconds: float = 60, what: str = "the condition"):
    """Poll `condition` every 10 ms; fail the test, never hang, if it has not held within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        time.sleep(0.01)


class Prefills:
    """Counts the rows of each prefill (a forward without a cache) the engine's model runs."""

    def __init__(self, multi, monkeypatch):
        self.rows: list[int] = []
        forward = multi.forward

        def spy(*args, **kwargs):
            if kwargs.get("past_key_values") is None:
                self.rows.append(kwargs["input_ids"].shape[0])
            return forward(*args, **kwargs)

        monkeypatch.setattr(multi, "forward", spy)


@pytest.fixture(scope="module")
def server(root, tiny_folder):
    engine, app = build(str(tiny_folder), root, max_batch=16, max_prompt_tokens=64, max_tokens_limit=32)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, what="the server's start")
    port = srv.servers[0].sockets[0].getsockname()[1]
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
        yield SimpleNamespace(client=client, engine=engine, model=str(tiny_folder), root=root)
    srv.should_exit = True
    thread.join(timeout=30)
    engine.close()


def expected(tiny_folder, root, adapter, prompt, n):
    """Greedy completion by transformers' generate on a fresh base model with the adapter loaded alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    folder = None if adapter is None else root / adapter / "best" if adapter == "tl6" else root / adapter
    model = base(tiny_folder) if folder is None else tiedlora.load(base(tiny_folder), folder)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def complete(server, model, prompt, **options):
    r = server.client.post("/v1/completions", json={"model": model, "prompt": prompt, **options})
    assert r.status_code == 200, r.text
    return r.json()


def events(server, path, body):
    """The data of each server-sent event, the closing [DONE] checked and dropped."""
    with server.client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


def test_concurrent_mixed_adapters_are_one_batch_and_each_equals_its_adapter_alone(server, tiny_folder, monkeypatch):
    targets = [None, *ADAPTERS]
    cases = [(t, p) for t in targets for p in PROMPTS]
    want = {(t, p): expected(tiny_folder, server.root, t, p, 12) for t, p in cases}
    engine = server.engine
    prefills = Prefills(engine.multi, monkeypatch)
    with ThreadPoolExecutor(len(cases)) as pool:
        with engine.lock:  # the worker holds one request and waits for the lock while the other 15 queue up
            futures = [pool.submit(complete, server, t or server.model, p, max_tokens=12) for t, p in cases]
            wait_until(lambda: engine.queue.qsize() == len(cases) - 1, what="15 queued requests")
        got = {case: f.result(timeout=120) for case, f in zip(cases, futures)}
    assert prefills.rows == [16]  # all 16 decoded as one mixed batch
    for case, out in got.items():
        assert out["choices"][0]["text"] == want[case], case
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 12
        assert out["object"] == "text_completion" and out["model"] == (case[0] or server.model)
    for p in PROMPTS:
        assert len({want[(t, p)] for t in targets}) == len(targets)  # every adapter changes the output


def test_streaming_equals_the_whole_response(server):
    for model in (server.model, "tl6"):
        body = {"model": model, "prompt": PROMPTS[2], "max_tokens": 20}
        whole = complete(server, **body)
        chunks = events(server, "/v1/completions", body)
        assert len(chunks) > 2 and "".join(c["choices"][0]["text"] for c in chunks) == whole["choices"][0]["text"]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length" and chunks[-1]["usage"] == whole["usage"]
    body = {"model": "lora", "messages": [{"role": "user", "content": "Say hi"}], "max_tokens": 10}
    r = server.client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    message = r.json()["choices"][0]["message"]
    assert message["role"] == "assistant" and r.json()["object"] == "chat.completion"
    chunks = events(server, "/v1/chat/completions", body)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == message["content"]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}


def test_stop_strings_cut_the_text_streamed_or_not(server):
    text = complete(server, "tl6", PROMPTS[0], max_tokens=20)["choices"][0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    out = complete(server, "tl6", PROMPTS[0], max_tokens=20, stop=[stop, "never-seen"])
    assert out["choices"][0]["text"] == text[: text.index(stop)] and out["choices"][0]["finish_reason"] == "stop"
    chunks = events(server, "/v1/completions", {"model": "tl6", "prompt": PROMPTS[0], "max_tokens": 20, "stop": stop})
    assert "".join(c["choices"][0]["text"] for c in chunks) == text[: text.index(stop)]


def test_sampling_is_repeatable_with_a_seed(server):
    def sample(seed):
        return complete(server, "more/vera", PROMPTS[1], max_tokens=8, temperature=1.0, top_p=0.9, seed=seed)[
            "choices"
        ][0]["text"]

    assert sample(7) == sample(7) != sample(8)


def test_models_and_adapters_at_run_time(server, tiny_folder):
    names = [m["id"] for m in server.client.get("/v1/models").json()["data"]]
    assert names == [server.model, "lora", "more/vera", "tl6"]  # no checkpoint/, broken/ or link
    r = server.client.post("/v1/adapters", json={"name": "tl6-again", "path": "tl6"})
    assert r.status_code == 200 and r.json()["id"] == "tl6-again"
    assert "tl6-again" in [m["id"] for m in server.client.get("/v1/models").json()["data"]]
    assert complete(server, "tl6-again", PROMPTS[0], max_tokens=6)["choices"][0]["text"] == expected(
        tiny_folder, server.root, "tl6", PROMPTS[0], 6
    )
    assert server.client.delete("/v1/adapters/tl6-again").json() == {
        "id": "tl6-again",
        "object": "model",
        "deleted": True,
    }
    r = server.client.post("/v1/completions", json={"model": "tl6-again", "prompt": "Hi"})
    assert r.status_code == 404 and "tl6-again" in r.json()["error"]["message"]
    assert server.client.delete("/v1/adapters/tl6-again").status_code == 404


BAD = [  # (method, path, body, status, param, words the message must contain)
    ("POST", "/v1/completions", {"model": "nope", "prompt": "Hi"}, 404, "model", "'nope' is neither the base model"),
    ("POST", "/v1/completions", b'{"model": "lora", "prompt": ', 400, None, "not valid JSON"),
    (
        "POST",
        "/v1/completions",
        {"model": "lora", "prompt": 5},
        400,
        "prompt",
        "prompt: Input should be a valid string",
    ),
    (
        "POST",
        "/v1/completions",
        {"model": "lora", "prompt": "Hi", "max_tokens": "many"},
        400,
        "max_tokens",
        "valid integer",
    ),
    ("POST", "/v1/completions", {"model": "lora"}, 400, "prompt", "prompt: Field required"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "word " * 80}, 400, "prompt", "limit of 64"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": ""}, 400, "prompt", "empty"),
    (
        "POST",
        "/v1/completions",
        {"model": "lora", "prompt": "Hi", "max_tokens": 33},
        400,
        "max_tokens",
        "between 1 and 32",
    ),
    (
        "POST",
        "/v1/completions",
        {"model": "lora", "prompt": "Hi", "max_tokens": 0},
        400,
        "max_tokens",
        "between 1 and 32",
    ),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "temperature": -1}, 400, "temperature", "between 0"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "stop": [""]}, 400, "stop", "non-empty"),
    ("POST", "/v1/chat/completions", {"model": "lora", "messages": []}, 400, "messages", "messages is empty"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "lora", "messages": [{"role": "user"}]},
        400,
        "messages.0.content",
        "Field required",
    ),
    ("POST", "/v1/adapters", {"name": "x", "path": "../outside"}, 400, "path", "leads outside the adapters root"),
    ("POST", "/v1/adapters", {"name": "x", "path": "/etc"}, 400, "path", "must be relative"),
    ("POST", "/v1/adapters", {"name": "x", "path": "link"}, 400, "path", "leads outside the adapters root"),
    ("POST", "/v1/adapters", {"name": "x", "path": "missing"}, 400, "path", "neither a run folder"),
    ("POST", "/v1/adapters", {"name": "x", "path": "broken"}, 400, "path", "is not valid JSON"),
    ("POST", "/v1/adapters", {"name": "lora", "path": "lora"}, 409, "name", "'lora' is taken"),
    ("POST", "/v1/adapters", {"name": "x"}, 400, "path", "path: Field required"),
    ("DELETE", "/v1/adapters/nope", None, 404, "name", "No adapter named 'nope'"),
    ("GET", "/v1/nothing", None, 404, None, "Not Found"),
]


@pytest.mark.parametrize("method, path, body, status, param, words", BAD, ids=[f"{b[0]} {b[1]} {b[5]}" for b in BAD])
def test_bad_requests_get_a_clear_error_and_the_server_goes_on(server, method, path, body, status, param, words):
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
    r = server.client.request(method, path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == param and error["type"]
    assert complete(server, "lora", "Hi", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_a_failing_batch_fails_only_its_requests(server, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(server.engine.multi, "forward", boom)
    r = server.client.post("/v1/completions", json={"model": "tl6", "prompt": "Hi"})
    assert r.status_code == 500 and "out of memory (simulated)" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert complete(server, "tl6", "Hi", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_load(server, monkeypatch):
    """200 requests, 16 at a time, over the base model and every adapter: no errors."""
    models = [server.model, *ADAPTERS]
    prefills = Prefills(server.engine.multi, monkeypatch)

    def one(i):
        start = time.perf_counter()
        r = server.client.post(
            "/v1/completions", json={"model": models[i % len(models)], "prompt": PROMPTS[i % 3], "max_tokens": 8}
        )
        return r.status_code, time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(200), timeout=600))
    wall = time.perf_counter() - start
    latencies = sorted(t for _, t in results)
    errors = sum(status != 200 for status, _ in results)
    batches = prefills.rows
    print(
        f"\nload: 200 requests, concurrency 16, errors {errors}, p50 {1000 * statistics.median(latencies):.0f} ms, "
        f"p95 {1000 * latencies[int(0.95 * len(latencies)) - 1]:.0f} ms, {200 / wall:.1f} req/s, "
        f"{len(batches)} batches (mean size {statistics.mean(batches):.1f}, max {max(batches)})"
    )
    assert errors == 0


def test_the_command_serves(root, tiny_folder):
    """`--port 0`: the server binds a free port itself and names it, so no other process can take it in between."""
    command = [
        sys.executable,
        "-m",
        "tiedlora",
        "serve",
        "--model",
        str(tiny_folder),
        "--adapters",
        str(root),
        "--port",
        "0",
    ]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True)
    reader.start()
    try:
        wait_until(
            lambda: any(" on http://" in line for line in lines) or process.poll() is not None, 120, "the address line"
        )
        assert process.poll() is None, "".join(lines)
        port = int(next(line for line in lines if " on http://" in line).rsplit(":", 1)[1].split("/")[0])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            names = [m["id"] for m in client.get("/v1/models").json()["data"]]
            assert names == [str(tiny_folder), "lora", "more/vera", "tl6"]
            r = client.post("/v1/completions", json={"model": "more/vera", "prompt": PROMPTS[0], "max_tokens": 5})
            assert r.json()["choices"][0]["text"] == expected(tiny_folder, root, "more/vera", PROMPTS[0], 5)
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(timeout=30)
    assert any(line.startswith("tiedlora serve: skipped broken") for line in lines)


def test_cli_refuses_a_missing_adapters_folder(tmp_path, capsys):
    assert main(["serve", "--adapters", str(tmp_path / "none")]) == 2
    assert "--adapters" in capsys.readouterr().err
