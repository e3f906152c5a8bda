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
from contextlib import contextmanager
from dataclasses import replace
from types import SimpleNamespace

import httpx
import pytest
import torch
import uvicorn
from transformers import AutoModelForCausalLM, AutoTokenizer

import tiedlora
from tiedlora import TiedLoraConfig
from tiedlora.evaluate import loglik
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
    (root / "loop").symlink_to(root / "loop")
    return root


def wait_until(condition, seconds: float = 60, what: str = "the condition"):
    """Poll `condition` every 10 ms; fail the test, never hang, if it has not held within `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {seconds} s"
        time.sleep(0.01)


class Steps:
    """Records the rows of every forward the engine's model runs (prefills: one row, many
    columns; decode steps: one column), and with `pause` sleeps in each decode step, so that a
    test can act while rows are running; `done` counts the decode steps finished, `seconds` times
    each one."""

    def __init__(self, multi, monkeypatch, pause: float = 0.0):
        self.prefills: list[int] = []
        self.steps: list[int] = []
        self.seconds: list[float] = []
        self.done = 0
        forward = multi.forward

        def spy(*args, **kwargs):
            ids = kwargs["input_ids"]
            if ids.shape[1] == 1 and kwargs.get("past_key_values") is not None:
                start = time.perf_counter()
                self.steps.append(ids.shape[0])
                time.sleep(pause)
                out = forward(*args, **kwargs)
                self.seconds.append(time.perf_counter() - start)
                self.done += 1
                return out
            self.prefills.append(ids.shape[1])
            return forward(*args, **kwargs)

        monkeypatch.setattr(multi, "forward", spy)


@contextmanager
def serving(root, tiny_folder, **options):
    """A server over real HTTP on a free port, with the test limits (and `options`, ServeConfig's)."""
    options = {"max_batch": 16, "max_prompt_tokens": 64, "max_tokens_limit": 32, **options}
    engine, app = build(str(tiny_folder), root, **options)
    # idle connections stay open while a test computes its references, so a client never reuses one the server closed
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", timeout_keep_alive=600))
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    wait_until(lambda: srv.started, what="the server's start")
    port = srv.servers[0].sockets[0].getsockname()[1]
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            yield SimpleNamespace(client=client, engine=engine, app=app, model=tiny_folder.name, root=root)
    finally:
        srv.should_exit = True
        thread.join(timeout=30)
        engine.close()


@pytest.fixture(scope="module")
def server(root, tiny_folder):
    with serving(root, tiny_folder) as s:
        yield s


def alone(tiny_folder, root, adapter):
    """A fresh base model with the adapter (None: none) loaded alone, by tiedlora.load."""
    folder = None if adapter is None else root / adapter / "best" if adapter == "tl6" else root / adapter
    return base(tiny_folder) if folder is None else tiedlora.load(base(tiny_folder), folder)


def expected(tiny_folder, root, adapter, prompt, n):
    """Greedy completion by transformers' generate on a fresh base model with the adapter loaded alone."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    folder = None if adapter is None else root / adapter / "best" if adapter == "tl6" else root / adapter
    model = base(tiny_folder) if folder is None else tiedlora.load(base(tiny_folder), folder)
    return tokenizer.decode(greedy(model, tokenizer(prompt)["input_ids"], n), skip_special_tokens=True)


def greedy(model, prompt: list[int], n: int) -> list[int]:
    """The n tokens transformers' generate adds to `prompt`, greedily."""
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False)
    return out[0, len(prompt) :].tolist()


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


def test_concurrent_mixed_adapters_share_each_step_and_each_equals_its_adapter_alone(server, tiny_folder, monkeypatch):
    targets = [None, *ADAPTERS]
    cases = [(t, p) for t in targets for p in PROMPTS]
    want = {(t, p): expected(tiny_folder, server.root, t, p, 12) for t, p in cases}
    engine = server.engine
    steps = Steps(engine.multi, monkeypatch)
    with ThreadPoolExecutor(len(cases)) as pool:
        with engine.lock:  # the worker waits for the lock while the 16 requests arrive
            futures = [pool.submit(complete, server, t or server.model, p, max_tokens=12) for t, p in cases]
            wait_until(lambda: engine.inbox.qsize() + len(engine.waiting) == len(cases), what="16 queued requests")
        got = {case: f.result(timeout=120) for case, f in zip(cases, futures)}
    assert max(steps.steps) == 16  # all 16 decoded together, whatever their adapter
    for case, out in got.items():
        assert out["choices"][0]["text"] == want[case], case
        assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 12
        assert out["object"] == "text_completion" and out["model"] == (case[0] or server.model)
    for p in PROMPTS:
        assert len({want[(t, p)] for t in targets}) == len(targets)  # every adapter changes the output


def test_requests_join_and_leave_the_running_batch_and_each_equals_its_adapter_alone(server, tiny_folder, monkeypatch):
    """Rows arrive while others run, with other lengths and adapters: each still gets exactly
    what its adapter gives alone (the caches are joined, padded and cut correctly)."""
    targets = [None, *ADAPTERS]
    cases = [(targets[i % 4], PROMPTS[(i * 3) % 4], 4 + (i * 5) % 17) for i in range(10)]
    want = [expected(tiny_folder, server.root, t, p, n) for t, p, n in cases]
    steps = Steps(server.engine.multi, monkeypatch, pause=0.02)
    with ThreadPoolExecutor(len(cases)) as pool:
        futures = []
        for t, p, n in cases:
            futures.append(pool.submit(complete, server, t or server.model, p, max_tokens=n))
            time.sleep(0.05)
        got = [f.result(timeout=120)["choices"][0]["text"] for f in futures]
    assert got == want
    assert len(set(steps.steps)) > 3  # the batch grew and shrank


def test_a_short_request_sent_after_a_long_one_finishes_first(server, monkeypatch):
    Steps(server.engine.multi, monkeypatch, pause=0.03)
    done = {}

    def long():
        complete(server, "tl6", PROMPTS[2], max_tokens=32)
        done["long"] = time.monotonic()

    thread = threading.Thread(target=long)
    thread.start()
    wait_until(lambda: len(server.engine.batch.rows) == 1, what="the long request's decoding")
    out = complete(server, "lora", PROMPTS[0], max_tokens=2)
    done["short"] = time.monotonic()
    thread.join(timeout=60)
    assert out["usage"]["completion_tokens"] == 2 and done["short"] < done["long"]


def test_a_poisoned_row_fails_alone_and_extreme_sampling_options_are_safe(server, monkeypatch):
    """The lora adapter's rows get NaN scores; the rows beside them, one with a temperature of
    1e-45 and one with a top_p of 1e-300, answer as greedy decoding does."""
    multi = server.engine.multi
    forward = multi.forward

    def poisons_lora(*args, adapter_ids=None, **kwargs):
        out = forward(*args, adapter_ids=adapter_ids, **kwargs)
        poisoned = [i for i, a in enumerate(adapter_ids) if a == multi.id_of("lora")] if "lora" in multi.names else []
        out.logits[poisoned] = float("nan")
        return out

    monkeypatch.setattr(multi, "forward", poisons_lora)
    greedy = complete(server, "tl6", PROMPTS[1], max_tokens=8)["choices"][0]["text"]
    bodies = [
        {"model": "lora", "prompt": PROMPTS[1], "max_tokens": 8},
        {"model": "tl6", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1e-45},
        {"model": "tl6", "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1, "top_p": 1e-300},
        {"model": "lora", "prompt": PROMPTS[2], "max_tokens": 8, "temperature": 1.5, "seed": 3},
    ]
    with ThreadPoolExecutor(len(bodies)) as pool:
        replies = list(pool.map(lambda b: server.client.post("/v1/completions", json=b), bodies))
    for r in replies[::3]:
        assert r.status_code == 500 and "not finite" in r.json()["error"]["message"], r.text
    assert [r.json()["choices"][0]["text"] for r in replies[1:3]] == [greedy, greedy]


def test_streaming_equals_the_whole_response(server):
    for model in (server.model, "tl6"):
        body = {"model": model, "prompt": PROMPTS[2], "max_tokens": 20, "stream_options": {"include_usage": True}}
        whole = complete(server, **body)
        chunks = events(server, "/v1/completions", body)
        assert len(chunks) > 2 and "".join(c["choices"][0]["text"] for c in chunks[:-1]) == whole["choices"][0]["text"]
        assert chunks[-2]["choices"][0]["finish_reason"] == "length" and all("usage" not in c for c in chunks[:-1])
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
        assert all(c["id"] == chunks[0]["id"] for c in chunks)
    body = {"model": "tl6", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6}
    whole = server.client.post("/v1/chat/completions", json=body).json()
    chunks = events(server, "/v1/chat/completions", body)
    assert whole["object"] == "chat.completion" and chunks[0]["object"] == "chat.completion.chunk"
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == whole["choices"][0]["message"]["content"]


def test_stop_strings_cut_the_text_streamed_or_not(server):
    full = complete(server, "tl6", PROMPTS[2], max_tokens=20)["choices"][0]["text"]
    stop = full[5:8]
    cut = full[: full.index(stop)]
    body = {"model": "tl6", "prompt": PROMPTS[2], "max_tokens": 20, "stop": [stop, "\x00never"]}
    whole = complete(server, **body)["choices"][0]
    assert whole["text"] == cut and whole["finish_reason"] == "stop"
    assert "".join(c["choices"][0]["text"] for c in events(server, "/v1/completions", body)) == cut
    long_stop = complete(server, "tl6", PROMPTS[2], max_tokens=20, stop=["x" * 1000])["choices"][0]
    assert long_stop["text"] == full and long_stop["finish_reason"] == "length"


def test_sampling_is_repeatable_with_a_seed(server):
    def sample(seed, **options):
        out = complete(server, "tl6", PROMPTS[1], max_tokens=16, temperature=1.5, seed=seed, **options)
        return [c["text"] for c in out["choices"]]

    assert sample(7) == sample(7) and sample(7) != sample(8)
    two = sample(7, n=2)
    assert two[0] == sample(7)[0] and two[1] == sample(8)[0]  # choice i is seeded seed + i


def test_n_prompt_lists_token_ids_echo_and_max_completion_tokens(server, tiny_folder):
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    want = [expected(tiny_folder, server.root, "tl6", p, 5) for p in PROMPTS[:2]]
    out = complete(server, "tl6", PROMPTS[:2], max_tokens=5, n=2)
    assert [c["index"] for c in out["choices"]] == [0, 1, 2, 3]
    assert [c["text"] for c in out["choices"]] == [want[0], want[0], want[1], want[1]]
    assert out["usage"] == {
        "prompt_tokens": 2 * 0 + sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS[:2]),
        "completion_tokens": 20,
        "total_tokens": out["usage"]["total_tokens"],
    }
    ids = tokenizer(PROMPTS[0])["input_ids"]
    assert complete(server, "tl6", ids, max_tokens=5)["choices"][0]["text"] == want[0]
    assert complete(server, "tl6", [ids, ids], max_tokens=5)["choices"][1]["text"] == want[0]
    echoed = complete(server, "tl6", PROMPTS[0], max_tokens=5, echo=True)["choices"][0]["text"]
    assert echoed == tokenizer.decode(ids, skip_special_tokens=True) + want[0]
    streamed = events(server, "/v1/completions", {"model": "tl6", "prompt": PROMPTS[0], "max_tokens": 5, "echo": True})
    assert "".join(c["choices"][0]["text"] for c in streamed) == echoed
    chat = {"model": "tl6", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 9}
    r = server.client.post("/v1/chat/completions", json={**chat, "max_completion_tokens": 2})
    assert r.json()["usage"]["completion_tokens"] == 2
    parts = {
        **chat,
        "messages": [{"role": "user", "content": [{"type": "text", "text": "H"}, {"type": "text", "text": "i"}]}],
    }
    assert (
        server.client.post("/v1/chat/completions", json=parts).json()["choices"]
        == server.client.post("/v1/chat/completions", json=chat).json()["choices"]
    )


def test_logprobs_are_the_models_own(server, tiny_folder):
    """Each token's logprob and its top alternatives, against log_softmax of the adapter's scores
    computed here by a plain forward over the prompt and the answer."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    model = tiedlora.load(base(tiny_folder), server.root / "tl6" / "best")
    out = complete(server, "tl6", PROMPTS[0], max_tokens=4, logprobs=3)["choices"][0]
    prompt = tokenizer(PROMPTS[0])["input_ids"]
    answer = tokenizer(out["text"], add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        scores = model(torch.tensor([prompt + answer])).logits[0, len(prompt) - 1 : -1].double().log_softmax(-1)
    lp = out["logprobs"]
    assert lp["tokens"] == [tokenizer.decode([t]) for t in answer]
    assert lp["token_logprobs"] == pytest.approx([float(scores[i, t]) for i, t in enumerate(answer)], abs=1e-4)
    for i, top in enumerate(lp["top_logprobs"]):
        best = scores[i].topk(3)
        assert list(top) == [tokenizer.decode([t]) for t in best.indices.tolist()]
        assert list(top.values()) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(answer))]
    chat = {"model": "tl6", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 3}
    content = server.client.post("/v1/chat/completions", json={**chat, "logprobs": True, "top_logprobs": 2}).json()
    entries = content["choices"][0]["logprobs"]["content"]
    assert len(entries) == 3 and all(len(e["top_logprobs"]) == 2 for e in entries)
    assert all(e["top_logprobs"][0]["logprob"] == pytest.approx(e["logprob"]) for e in entries)  # greedy: the best


def plain_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log_softmax of a plain forward over `ids`: row k scores token k + 1."""
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def test_echo_with_logprobs_scores_the_prompt_then_the_answer(server, tiny_folder):
    """echo with logprobs: the prompt's tokens first, the first one's logprob and top_logprobs
    null, then the generated ones, each against log_softmax of a plain forward of the adapter
    alone; max_tokens 0 scores the prompt alone; streamed, the same."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    model = alone(tiny_folder, server.root, "tl6")
    prompt = tokenizer(PROMPTS[2])["input_ids"]
    ids = prompt + greedy(model, prompt, 3)
    reference = plain_logprobs(model, ids)
    out = complete(server, "tl6", PROMPTS[2], max_tokens=3, logprobs=2, echo=True)
    choice, lp = out["choices"][0], out["choices"][0]["logprobs"]
    assert choice["text"] == tokenizer.decode(prompt, skip_special_tokens=True) + tokenizer.decode(ids[len(prompt) :])
    assert choice["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 3
    assert lp["tokens"] == [tokenizer.decode([t]) for t in ids]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    assert lp["token_logprobs"][1:] == pytest.approx(
        [float(reference[k - 1, ids[k]]) for k in range(1, len(ids))], abs=1e-4
    )
    for k in range(1, len(ids)):
        best = reference[k - 1].topk(2)
        assert list(lp["top_logprobs"][k]) == [tokenizer.decode([t]) for t in best.indices.tolist()]
        assert list(lp["top_logprobs"][k].values()) == pytest.approx(best.values.tolist(), abs=1e-4)
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(len(ids))]
    scored = complete(server, "tl6", PROMPTS[2], max_tokens=0, logprobs=2, echo=True)
    only = scored["choices"][0]
    assert only["text"] == tokenizer.decode(prompt, skip_special_tokens=True) and only["finish_reason"] == "length"
    assert scored["usage"] == {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": len(prompt)}
    assert only["logprobs"]["tokens"] == lp["tokens"][: len(prompt)]
    assert only["logprobs"]["token_logprobs"][0] is None
    assert only["logprobs"]["token_logprobs"][1:] == pytest.approx(lp["token_logprobs"][1 : len(prompt)], abs=1e-6)
    streamed = events(
        server, "/v1/completions", {"model": "tl6", "prompt": PROMPTS[2], "max_tokens": 3, "logprobs": 2, "echo": True}
    )
    parts = [c["choices"][0] for c in streamed]
    assert "".join(p["text"] for p in parts) == choice["text"]
    assert [x for p in parts if p["logprobs"] for x in p["logprobs"]["token_logprobs"]] == lp["token_logprobs"]
    none = complete(server, "tl6", prompt, max_tokens=1, logprobs=0, echo=True)["choices"][0]["logprobs"]
    assert none["top_logprobs"] == [None] + [{}] * len(prompt)


# (context, continuation) pairs as a log-likelihood task sends them; one context is long enough
# for several prefill chunks of 4 tokens
PAIRS = [
    ("The capital of France is", " Paris"),
    ("Once upon a time, in a land far away, there lived", " a king who had three daughters"),
    ("2 + 2 =", " 4"),
    ("Question: what colour is the sky on a clear day? Answer:", " blue"),
]


def lm_eval_parse(out: dict, ctxlens: list[int]) -> list[tuple[float, bool]]:
    """lm-evaluation-harness's LocalCompletionsAPI.parse_logprobs, as it reads a response: the
    summed logprobs of the continuation (the echoed tokens after the context, the one generated
    dropped) and whether each of them is the top alternative."""
    res = []
    for choice, ctxlen in zip(sorted(out["choices"], key=lambda c: c["index"]), ctxlens):
        logprobs = choice["logprobs"]["token_logprobs"][ctxlen:-1]
        tops = choice["logprobs"]["top_logprobs"][ctxlen:-1]
        res.append((sum(logprobs), all(lp == max(top.values()) for lp, top in zip(logprobs, tops))))
    return res


def test_lm_eval_local_completions_scores_equal_loglik_for_each_adapter(root, tiny_folder, monkeypatch):
    """lm-evaluation-harness's local-completions model with tokenized requests: its exact body (a
    batch of token-id prompts, echo, logprobs 1, max_tokens 1), sent for the base model and three
    adapters at once to a server that reads prompts in chunks of 4 tokens. The summed
    continuation logprob it parses equals tiedlora.evaluate.loglik of the adapter alone, its
    is-greedy flag the plain forward's argmax, every prompt token's logprob the plain forward's."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_folder)
    targets = [None, *ADAPTERS]
    pairs, models = {}, {}
    for target in targets:
        models[target] = model = alone(tiny_folder, root, target)
        context = tokenizer(PAIRS[0][0])["input_ids"]  # and the adapter's own greedy continuation
        ids = greedy(model, context, 3)
        pairs[target] = [*PAIRS, (PAIRS[0][0], tokenizer.decode(ids))]
    encoded = {
        t: [(tokenizer(c)["input_ids"], tokenizer(e, add_special_tokens=False)["input_ids"]) for c, e in pairs[t]]
        for t in targets
    }
    with serving(root, tiny_folder, prefill_tokens=4) as chunked:
        steps = Steps(chunked.engine.multi, monkeypatch)

        def request(target):
            body = {
                "model": target or chunked.model,
                "prompt": [c + e for c, e in encoded[target]],
                "temperature": 0,
                "max_tokens": 1,
                "logprobs": 1,
                "seed": 1234,
                "echo": True,
            }
            r = chunked.client.post("/v1/completions", json=body)
            assert r.status_code == 200, r.text
            return r.json()

        with ThreadPoolExecutor(len(targets)) as pool:
            outs = dict(zip(targets, pool.map(request, targets)))
    assert max(steps.prefills) <= 4 and max(len(c + e) for c, e in encoded[None]) > 8  # prompts read in chunks
    greedy_seen = set()
    for target in targets:
        model, out = models[target], outs[target]
        ours = lm_eval_parse(out, [len(c) for c, _ in encoded[target]])
        want = loglik(model, tokenizer, pairs[target])
        for (total, is_greedy), wanted, (c, e), choice in zip(ours, want, encoded[target], out["choices"]):
            ids = c + e
            reference = plain_logprobs(model, ids)
            print(f"{target or 'base'}: summed logprob {total:.6f} (loglik {wanted:.6f}), is_greedy {is_greedy}")
            assert total == pytest.approx(wanted, abs=1e-4)
            assert is_greedy == all(int(reference[k - 1].argmax()) == ids[k] for k in range(len(c), len(ids)))
            greedy_seen.add(is_greedy)
            lp = choice["logprobs"]
            assert len(lp["token_logprobs"]) == len(ids) + 1 and lp["token_logprobs"][0] is None
            assert lp["token_logprobs"][1 : len(ids)] == pytest.approx(
                [float(reference[k - 1, ids[k]]) for k in range(1, len(ids))], abs=1e-4
            )
    assert greedy_seen == {True, False}  # both answers of the flag are checked


def test_the_official_openai_client(server):
    from openai import OpenAI

    client = OpenAI(base_url=str(server.client.base_url).rstrip("/") + "/v1", api_key="none", max_retries=0)
    assert [m.id for m in client.models.list()][:2] == [server.model, "lora"]
    assert client.models.retrieve("more/vera").id == "more/vera"
    text = client.completions.create(model="tl6", prompt=PROMPTS[0], max_tokens=5).choices[0].text
    assert text == complete(server, "tl6", PROMPTS[0], max_tokens=5)["choices"][0]["text"]
    messages = [{"role": "user", "content": "Hi"}]
    reply = client.chat.completions.create(
        model="tl6",
        messages=messages,
        max_completion_tokens=4,
        n=2,
        seed=1,
        temperature=1.0,
        logprobs=True,
        top_logprobs=1,
    )
    assert len(reply.choices) == 2 and reply.usage.completion_tokens == 8
    assert len(reply.choices[0].logprobs.content) == 4
    stream = client.chat.completions.create(model="tl6", messages=messages, max_tokens=4, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        == client.chat.completions.create(model="tl6", messages=messages, max_tokens=4).choices[0].message.content
    )
    import openai

    with pytest.raises(openai.BadRequestError, match="presence_penalty is not supported"):
        client.completions.create(model="tl6", prompt="Hi", presence_penalty=0.5)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_models_and_adapters_at_run_time(server, tiny_folder):
    names = [m["id"] for m in server.client.get("/v1/models").json()["data"]]
    assert names == [server.model, "lora", "more/vera", "tl6"]  # no checkpoint/, broken/ or link
    assert server.client.get("/v1/models/more/vera").json()["parent"] == server.model
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
    # vLLM's endpoints and bodies, an absolute path inside the root included
    r = server.client.post("/v1/load_lora_adapter", json={"lora_name": "v", "lora_path": str(server.root / "lora")})
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'v' added successfully."
    assert complete(server, "v", PROMPTS[3], max_tokens=4)["choices"][0]["text"] == expected(
        tiny_folder, server.root, "lora", PROMPTS[3], 4
    )
    assert server.client.post("/v1/unload_lora_adapter", json={"lora_name": "v"}).status_code == 200
    assert server.client.get("/v1/models/v").status_code == 404


def test_a_registration_waits_for_the_worker_without_holding_up_the_event_loop(server, monkeypatch):
    """While the worker is held mid-step, a registration waits for it (it is the worker's to
    make), and the event loop goes on answering meanwhile: no handler takes a lock or waits for
    a step."""
    import tiedlora.serve.app

    read, done = tiedlora.serve.app.read_adapter, threading.Event()

    def spy(*args, **kwargs):
        try:
            return read(*args, **kwargs)
        finally:
            done.set()

    monkeypatch.setattr(tiedlora.serve.app, "read_adapter", spy)
    with ThreadPoolExecutor(1) as pool:
        with server.engine.lock:  # the worker cannot finish its step, nor make any change
            pending = pool.submit(server.client.post, "/v1/adapters", json={"name": "held", "path": "lora"})
            assert done.wait(30), "the adapter was not read within 30 s"
            for _ in range(3):  # answered at once, from the registry's snapshot, while the registration waits
                r = server.client.get("/v1/models", timeout=10)
                assert r.status_code == 200 and "held" not in [m["id"] for m in r.json()["data"]]
            assert not pending.done()
        assert pending.result(timeout=60).status_code == 200
    assert "held" in server.engine.adapters
    assert server.client.delete("/v1/adapters/held").status_code == 200


def test_adapters_registered_and_unregistered_in_a_loop_while_16_clients_stream(server, tiny_folder, monkeypatch):
    """One thread registers and unregisters adapters (OpenAI's and vLLM's endpoints by turns, now
    and then asking one for a completion) while 16 clients stream completions over the base model
    and three adapters: no error, every answer what its adapter gives alone, and no client's tokens
    stall: between two chunks of a stream, at most one decode step more passes than the chunk
    has tokens, plus one step of margin for a thread that the 2-core machine runs late.

    The stall is counted in decode steps (finished ones, read by the client as each chunk
    arrives), not seconds; each step sleeps 50 ms so the counting is exact unless a thread is
    late by more than a step."""
    targets = [None, "tl6", "lora", "more/vera"]
    cases = [(targets[i % 4], PROMPTS[i // 4]) for i in range(16)]
    want = {case: expected(tiny_folder, server.root, *case, 16) for case in cases}
    paths = ["tl6", "lora", "more/vera"]
    churn_want = {p: expected(tiny_folder, server.root, p, PROMPTS[3], 4) for p in paths}
    steps = Steps(server.engine.multi, monkeypatch, pause=0.05)
    finished = threading.Event()
    churn = {"registered": 0, "asked": 0}

    def stream(case) -> list[tuple[list, int]]:
        """Each request's text, and the (steps done, tokens) of each of its chunks, and their arrival times."""
        answers = []
        for _ in range(3):
            body = {"model": case[0] or server.model, "prompt": case[1], "max_tokens": 16, "logprobs": 0}
            chunks, text = [], ""
            with server.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                assert r.status_code == 200, r.read()
                for line in r.iter_lines():
                    if not line or line == "data: [DONE]":
                        continue
                    arrived, done = time.perf_counter(), steps.done
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk, chunk
                    choice = chunk["choices"][0]
                    text += choice["text"]
                    chunks.append((done, len(choice["logprobs"]["tokens"]), arrived))
            answers.append((text, chunks))
        return answers

    def register_in_a_loop():
        i = 0
        while not finished.is_set() and i < 1000:
            name, path, vllm = f"churn-{i}", paths[i % 3], i % 2 == 1
            if vllm:
                r = server.client.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            else:
                r = server.client.post("/v1/adapters", json={"name": name, "path": path})
            assert r.status_code == 200, r.text
            churn["registered"] += 1
            assert name in [m["id"] for m in server.client.get("/v1/models").json()["data"]]
            if i % 16 == 0:  # a new adapter in a freed slot is that adapter
                assert complete(server, name, PROMPTS[3], max_tokens=4)["choices"][0]["text"] == churn_want[path]
                churn["asked"] += 1
            if vllm:
                r = server.client.post("/v1/unload_lora_adapter", json={"lora_name": name})
            else:
                r = server.client.delete(f"/v1/adapters/{name}")
            assert r.status_code == 200, r.text
            assert server.client.get(f"/v1/models/{name}").status_code == 404
            i += 1

    with ThreadPoolExecutor(17) as pool:
        churning = pool.submit(register_in_a_loop)
        wait_until(lambda: churn["registered"] or churning.done(), 60, "the first registration")
        clients = [pool.submit(stream, case) for case in cases]
        try:
            answers = {case: c.result(timeout=300) for case, c in zip(cases, clients)}
        finally:
            finished.set()
        churning.result(timeout=120)
    stalls, gaps = [], []
    for case, replies in answers.items():
        for text, chunks in replies:
            assert text == want[case], case
            for (before, _, t0), (after, tokens, t1) in zip(chunks, chunks[1:]):
                stalls.append(after - before - tokens)
                gaps.append((t1 - t0) / max(tokens, 1))
    step = statistics.median(steps.seconds)
    print(
        f"\nchurn: {churn['registered']} registrations ({churn['asked']} asked), {16 * 3} streams served, "
        f"{len(steps.seconds)} decode steps, median step {1000 * step:.0f} ms; longest stall {max(stalls)} steps, "
        f"longest gap between tokens {1000 * max(gaps):.0f} ms ({max(gaps) / step:.1f} steps)"
    )
    assert churn["registered"] >= 10  # the loop kept registering while the clients streamed
    assert max(stalls) <= 2


S = "\\ud800"  # a lone surrogate, as JSON writes it
BAD = [  # (method, path, body, status, param, words the message must contain)
    ("POST", "/v1/completions", {"model": "nope", "prompt": "Hi"}, 404, "model", "'nope' is neither the base model"),
    ("POST", "/v1/completions", b'{"model": "lora", "prompt": ', 400, None, "not valid JSON"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": 5.5}, 400, "prompt", "prompt: Input should be a valid"),
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
    ("POST", "/v1/completions", {"model": "lora", "prompt": []}, 400, "prompt", "empty list"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": [1, 10**9]}, 400, "prompt", "token ids must be between"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": [[1], [-1]]}, 400, "prompt", "token ids must be between"),
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
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "top_p": 0}, 400, "top_p", "in (0, 1]"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "stop": [""]}, 400, "stop", "1 to 1000 characters"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "stop": "x" * 1001}, 400, "stop", "1 to 1000 char"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "n": 0}, 400, "n", "n is 0"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "n": -1}, 400, "n", "n is -1"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "n": 65}, 400, "n", "must be 1 to 64"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "logprobs": 21}, 400, "logprobs", "between 0 and 20"),
    (
        "POST",
        "/v1/completions",
        {"model": "lora", "prompt": "Hi", "max_tokens": 0, "echo": True},
        400,
        "max_tokens",
        "with echo and logprobs",
    ),
    (
        "POST",
        "/v1/completions",
        {"model": "lora", "prompt": "Hi", "max_tokens": -1, "echo": True, "logprobs": 1},
        400,
        "max_tokens",
        "between 0 and 32",
    ),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "best_of": 3}, 400, "best_of", "not supported"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "suffix": "x"}, 400, "suffix", "not supported"),
    (
        "POST",
        "/v1/completions",
        {"model": "lora", "prompt": "Hi", "logit_bias": {"5": 9}},
        400,
        "logit_bias",
        "not sup",
    ),
    (
        "POST",
        "/v1/completions",
        {"model": "lora", "prompt": "Hi", "frequency_penalty": 1},
        400,
        "frequency_penalty",
        "not",
    ),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "top_k": 5}, 400, "top_k", "not supported"),
    ("POST", "/v1/completions", {"model": "lora", "prompt": "Hi", "wibble": 1}, 400, "wibble", "not supported"),
    (
        "POST",
        "/v1/completions",
        {"model": "lora", "prompt": "Hi", "stream_options": {"x": 1}},
        400,
        "stream_options.x",
        "Extra",
    ),
    ("POST", "/v1/chat/completions", {"model": "lora", "messages": []}, 400, "messages", "messages is empty"),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "lora", "messages": [{"content": "Hi"}]},
        400,
        "messages.0.role",
        "Field required",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "lora", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
        "only text parts",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "lora", "messages": [{"role": "user", "content": "Hi"}], "tools": [{}]},
        400,
        "tools",
        "not supported",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "lora", "messages": [{"role": "user", "content": "Hi"}], "response_format": {"type": "json_object"}},
        400,
        "response_format",
        "not supported",
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"model": "lora", "messages": [{"role": "user", "content": "Hi"}], "top_logprobs": 2},
        400,
        "top_logprobs",
        "with logprobs true",
    ),
    ("POST", "/v1/adapters", {"name": "x", "path": "../outside"}, 400, "path", "leads outside the adapters root"),
    ("POST", "/v1/adapters", {"name": "x", "path": "/etc"}, 400, "path", "leads outside the adapters root"),
    ("POST", "/v1/adapters", {"name": "x", "path": "link"}, 400, "path", "leads outside the adapters root"),
    ("POST", "/v1/adapters", {"name": "x", "path": "missing"}, 400, "path", "neither a run folder"),
    ("POST", "/v1/adapters", {"name": "x", "path": "broken"}, 400, "path", "is not valid JSON"),
    ("POST", "/v1/adapters", {"name": "x", "path": "a\x00b"}, 400, "path", "not a usable path"),
    ("POST", "/v1/adapters", {"name": "x", "path": "a" * 5000}, 400, "path", "not a usable path"),
    ("POST", "/v1/adapters", {"name": "x", "path": "loop"}, 400, "path", "not a usable path"),
    ("POST", "/v1/adapters", {"name": "lora", "path": "lora"}, 409, "name", "'lora' is taken"),
    ("POST", "/v1/adapters", {"name": "x"}, 400, "path", "path: Field required"),
    ("POST", "/v1/load_lora_adapter", {"lora_name": "x"}, 400, "lora_path", "lora_path is required"),
    ("DELETE", "/v1/adapters/nope", None, 404, "name", "No adapter named 'nope'"),
    ("GET", "/v1/models/nope", None, 404, "model", "'nope' does not exist"),
    ("GET", "/v1/nothing", None, 404, None, "Not Found"),
    # invalid Unicode: JSON's escapes for a lone surrogate, in a prompt, a message, a stop string, a name, a path
    ("POST", "/v1/completions", f'{{"model": "lora", "prompt": "a{S}"}}'.encode(), 400, "prompt", "lone surrogate"),
    (
        "POST",
        "/v1/completions",
        f'{{"model": "lora", "prompt": "a", "stop": "{S}"}}'.encode(),
        400,
        "stop",
        "surrogate",
    ),
    (
        "POST",
        "/v1/chat/completions",
        f'{{"model": "lora", "messages": [{{"role": "user", "content": "{S}"}}]}}'.encode(),
        400,
        "messages.0.content",
        "lone surrogate",
    ),
    ("POST", "/v1/adapters", f'{{"name": "{S}", "path": "lora"}}'.encode(), 400, "name", "lone surrogate"),
    ("POST", "/v1/adapters", f'{{"name": "x", "path": "{S}"}}'.encode(), 400, "path", "lone surrogate"),
]


@pytest.mark.parametrize("method, path, body, status, param, words", BAD, ids=[f"{b[0]} {b[1]} {b[5]}" for b in BAD])
def test_bad_requests_get_a_clear_error_and_the_server_goes_on(server, method, path, body, status, param, words):
    content = body if isinstance(body, bytes) else None if body is None else json.dumps(body)
    r = server.client.request(method, path, content=content, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] and error["param"] == param and error["type"], error
    assert complete(server, "lora", "Hi", max_tokens=2)["usage"]["completion_tokens"] == 2


def test_neutral_values_of_unimplemented_options_are_accepted(server):
    neutral = {"logit_bias": {}, "presence_penalty": 0, "frequency_penalty": 0.0, "suffix": None, "best_of": 1}
    plain = complete(server, "lora", "Hi", max_tokens=3)["choices"][0]["text"]
    assert complete(server, "lora", "Hi", max_tokens=3, user="me", **neutral)["choices"][0]["text"] == plain


def test_a_prompt_past_the_models_context_is_refused(server, monkeypatch):
    monkeypatch.setattr(server.app.state.served, "context", 20)
    r = server.client.post("/v1/completions", json={"model": "lora", "prompt": "word " * 10, "max_tokens": 16})
    assert r.status_code == 400 and "exceed the model's context of 20 tokens" in r.json()["error"]["message"]
    assert complete(server, "lora", "word " * 10, max_tokens=8)["usage"]["completion_tokens"] == 8


def test_large_bodies_are_refused_before_they_are_read(server, monkeypatch):
    served = server.app.state.served  # its config is read by the middleware at each request
    monkeypatch.setattr(served, "config", replace(served.config, max_request_bytes=1000))
    big = json.dumps({"model": "lora", "prompt": "x" * (2 << 20)})
    r = server.client.post("/v1/completions", content=big, headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds as the body arrives
        yield b'{"model": "lora", "prompt": "'
        for _ in range(64):
            yield b"x" * 65536
        yield b'"}'

    r = server.client.post("/v1/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "limit of" in r.json()["error"]["message"]


def test_prompts_are_tokenised_off_the_event_loop(server, monkeypatch):
    served = server.app.state.served
    threads = []
    tokenizer = served.tokenizer

    class Spy:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def __len__(self):
            return len(tokenizer)

        def __call__(self, *args, **kwargs):
            threads.append(threading.current_thread().name)
            return tokenizer(*args, **kwargs)

    monkeypatch.setattr(served, "tokenizer", Spy())
    complete(server, "lora", "Hi", max_tokens=1)
    assert threads and all(name.startswith("tiedlora-tokenize") for name in threads)


def test_decoding_stops_when_the_client_goes_away(server, monkeypatch):
    steps = Steps(server.engine.multi, monkeypatch, pause=0.05)
    metric = 'tiedlora_requests_total{finish="cancelled",model="tl6"}'

    def cancelled():
        line = [x for x in server.client.get("/metrics").text.splitlines() if x.startswith(metric)]
        return float(line[0].split()[-1]) if line else 0.0

    before = cancelled()
    body = {"model": "tl6", "prompt": PROMPTS[2], "max_tokens": 32}
    with pytest.raises(httpx.ReadTimeout):
        server.client.post("/v1/completions", json=body, timeout=0.3)
    with server.client.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert next(r.iter_lines()).startswith("data: ")  # then the client closes the connection
    wait_until(lambda: cancelled() == before + 2 and not len(server.engine.batch), 10, "both rows cancelled")
    assert len(steps.steps) < 40  # not the 2 x 32 steps the requests asked for


def test_a_failing_step_fails_only_its_requests(server, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(server.engine.multi, "forward", boom)
    r = server.client.post("/v1/completions", json={"model": "tl6", "prompt": "Hi"})
    assert r.status_code == 500 and "out of memory (simulated)" in r.json()["error"]["message"]
    monkeypatch.undo()
    assert complete(server, "tl6", "Hi", max_tokens=3)["usage"]["completion_tokens"] == 3


def test_metrics(server):
    from prometheus_client.parser import text_string_to_metric_families

    def families():
        text = server.client.get("/metrics")
        assert text.headers["content-type"].startswith("text/plain")
        return {f.name: f for f in text_string_to_metric_families(text.text)}

    def value(family, name, **labels):
        return sum(
            s.value for s in family.samples if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    before = families()
    outs = [complete(server, "more/vera", p, max_tokens=5) for p in PROMPTS]
    after = families()
    diff = lambda f, n, **kw: value(after[f], n, **kw) - value(before[f], n, **kw)  # noqa: E731
    assert diff("tiedlora_requests", "tiedlora_requests_total", model="more/vera", finish="length") == 4
    assert diff("tiedlora_generation_tokens", "tiedlora_generation_tokens_total", model="more/vera") == 20
    prompt_tokens = sum(o["usage"]["prompt_tokens"] for o in outs)
    assert diff("tiedlora_prompt_tokens", "tiedlora_prompt_tokens_total", model="more/vera") == prompt_tokens
    ttft = "tiedlora_time_to_first_token_seconds"
    assert diff(ttft, ttft + "_count") == 4
    itl = "tiedlora_inter_token_latency_seconds"
    assert diff(itl, itl + "_count") == 16  # 4 gaps in each 5-token answer
    for gauge in ("tiedlora_running_rows", "tiedlora_waiting_rows", "tiedlora_resident_adapters"):
        assert gauge in after
    assert value(after["tiedlora_registered_adapters"], "tiedlora_registered_adapters") == len(server.engine.adapters)


def test_load(server, monkeypatch):
    """200 requests, 16 at a time, over the base model and every adapter: no errors."""
    models = [server.model, *ADAPTERS]
    steps = Steps(server.engine.multi, monkeypatch)

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
    print(
        f"\nload: 200 requests, concurrency 16, errors {errors}, p50 {1000 * statistics.median(latencies):.0f} ms, "
        f"p95 {1000 * latencies[int(0.95 * len(latencies)) - 1]:.0f} ms, {200 / wall:.1f} req/s, "
        f"{len(steps.steps)} decode steps (mean rows {statistics.mean(steps.steps):.1f}, max {max(steps.steps)})"
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
        "--pin",
        "[tl6]",
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
            assert names == [tiny_folder.name, "lora", "more/vera", "tl6"]  # a folder by its name: no server path
            r = client.post("/v1/completions", json={"model": "more/vera", "prompt": PROMPTS[0], "max_tokens": 5})
            assert r.json()["choices"][0]["text"] == expected(tiny_folder, root, "more/vera", PROMPTS[0], 5)
            metrics = client.get("/metrics").text
            assert "tiedlora_resident_adapters 2.0" in metrics  # tl6 pinned at start, more/vera on its request
    finally:
        process.terminate()
        process.wait(timeout=30)
        reader.join(timeout=30)
    assert any(line.startswith("tiedlora serve: skipped broken") for line in lines)
