"""The server's adapter registry: folders registered from their configs only, tensors read on
the first request, a bounded resident set with LRU eviction and pinning, bad folders dropped
alone, and a server without any adapters folder."""

import contextlib
import shutil
import threading
import time

import pytest
from fastapi.testclient import TestClient
from transformers import AutoModelForCausalLM

import tiedlora
from tiedlora import TiedLoraConfig
from tiedlora.adapter_file import TENSORS
from tiedlora.serve import registry
from tiedlora.serve.server import build


def many(root, adapter, n):
    for i in range(n):
        shutil.copytree(adapter, root / f"a{i:03d}")
    return root


class Reads:
    """Counts the tensor files the registry reads (read_adapter with tensors) and the configs."""

    def __init__(self, monkeypatch):
        self.tensors = self.configs = 0
        read = registry.read_adapter

        def spy(folder, tensors=True):
            if tensors:
                self.tensors += 1
            else:
                self.configs += 1
            return read(folder, tensors)

        monkeypatch.setattr(registry, "read_adapter", spy)


@contextlib.contextmanager
def serving(tiny_folder, root, **options):
    """(engine, client); the engine closes first, answering any request still waiting, so a
    failing test never hangs on the client's exit."""
    engine, app = build(str(tiny_folder), root, max_tokens_limit=32, **options)
    with TestClient(app) as client:
        try:
            yield engine, client
        finally:
            engine.close()


def slow_steps(engine, monkeypatch, pause: float) -> None:
    """Every forward of the engine's model sleeps `pause` first, so a test can act while rows run."""
    forward = engine.multi.forward

    def slow(*args, **kwargs):
        time.sleep(pause)
        return forward(*args, **kwargs)

    monkeypatch.setattr(engine.multi, "forward", slow)


def complete(client, model, **options):
    return client.post("/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 3, **options})


def resident(engine):
    return list(engine.registry.recent)


def test_start_up_reads_configs_only_and_loads_on_the_first_request_evicting_the_least_recent(
    tiny_folder, adapter, tmp_path, monkeypatch
):
    reads = Reads(monkeypatch)
    with serving(tiny_folder, many(tmp_path, adapter, 300), max_resident=2) as (engine, client):
        assert (reads.configs, reads.tensors) == (300, 0)
        assert len(client.get("/v1/models").json()["data"]) == 301
        want = complete(client, "a000").json()["choices"][0]["text"]
        assert reads.tensors == 1 and resident(engine) == ["a000"]
        for name in ("a001", "a000", "a002"):  # a001 is now the least recently used: it goes
            assert complete(client, name).json()["choices"][0]["text"] == want
        assert resident(engine) == ["a000", "a002"] and reads.tensors == 3
        metrics = client.get("/metrics").text
        assert "tiedlora_adapter_loads_total 3.0" in metrics and "tiedlora_adapter_evictions_total 1.0" in metrics
        assert "tiedlora_resident_adapters 2.0" in metrics and "tiedlora_registered_adapters 300.0" in metrics


def test_pinned_adapters_are_never_evicted(tiny_folder, adapter, tmp_path):
    with serving(tiny_folder, many(tmp_path, adapter, 4), max_resident=2, pin=["a003"]) as (engine, client):
        assert resident(engine) == ["a003"]
        for name in ("a000", "a001", "a002"):
            assert complete(client, name).status_code == 200
        assert resident(engine) == ["a003", "a002"]
        r = client.post("/v1/adapters", json={"name": "p", "path": "a000", "pin": True})  # no place would be left
        assert r.status_code == 400 and "at most max_resident - 1 (1) may be" in r.json()["error"]["message"]
        assert "p" not in engine.adapters and resident(engine) == ["a003", "a002"]
        assert complete(client, "a000").status_code == 200 and resident(engine) == ["a003", "a000"]


def test_rows_wait_for_room_when_every_resident_adapter_is_busy(tiny_folder, adapter, tmp_path, monkeypatch):
    with serving(tiny_folder, many(tmp_path, adapter, 2), max_resident=1) as (engine, client):
        slow_steps(engine, monkeypatch, 0.01)
        results = {}

        def ask(name):
            results[name] = complete(client, name, max_tokens=20)

        threads = [threading.Thread(target=ask, args=(n,), daemon=True) for n in ("a000", "a001")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert [r.status_code for r in results.values()] == [200, 200]
        assert [r.json()["usage"]["completion_tokens"] for r in results.values()] == [20, 20]


def test_a_bad_folder_is_dropped_on_its_first_request_and_the_others_go_on(tiny_folder, adapter, tmp_path):
    root = many(tmp_path, adapter, 2)
    (root / "a001" / TENSORS).write_bytes(b"garbage")  # its config is fine: registered, refused when read
    (root / "bad-config").mkdir()
    (root / "bad-config" / "adapter_config.json").write_text("{")  # refused at start-up
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    tiedlora.save(tiedlora.apply(model, TiedLoraConfig.preset("tl6", rank=8)), root / "rank" / "big")
    with serving(tiny_folder, root, max_rank=6) as (engine, client):  # the others are rank 4
        assert [m["id"] for m in client.get("/v1/models").json()["data"]][1:] == ["a000", "a001"]  # not rank/big
        r = complete(client, "a001")
        assert r.status_code == 404 and "does not match the sha256" in r.json()["error"]["message"]
        assert [m["id"] for m in client.get("/v1/models").json()["data"]][1:] == ["a000"]
        r = complete(client, "a001")
        assert r.status_code == 404 and "was refused" in r.json()["error"]["message"]
        assert complete(client, "a000").status_code == 200
        r = client.post("/v1/adapters", json={"name": "big", "path": "rank/big"})
        assert r.status_code == 400 and "more than this server's max_rank of 6" in r.json()["error"]["message"]


def test_without_an_adapters_folder_the_base_model_is_served_and_adapters_come_later(
    tiny_folder, adapter, tmp_path, capsys
):
    root = tmp_path / "later"
    with serving(tiny_folder, root) as (engine, client):
        assert "serving" in capsys.readouterr().err
        assert [m["id"] for m in client.get("/v1/models").json()["data"]] == [tiny_folder.name]
        assert complete(client, tiny_folder.name).status_code == 200
        shutil.copytree(adapter, root / "new")
        assert client.post("/v1/adapters", json={"name": "new", "path": "new"}).status_code == 200
        assert complete(client, "new").status_code == 200


def test_a_folder_name_that_is_not_unicode_is_skipped(tiny_folder, adapter, tmp_path, capsys):
    root = many(tmp_path, adapter, 1)
    shutil.copytree(adapter, tmp_path / "bad-\udcff")  # the byte 0xff, as os.fsdecode gives it
    with serving(tiny_folder, root) as (engine, client):
        assert "is not valid Unicode" in capsys.readouterr().err
        assert [m["id"] for m in client.get("/v1/models").json()["data"]][1:] == ["a000"]


def test_an_adapter_unloaded_while_a_request_uses_it_finishes_that_request(tiny_folder, adapter, tmp_path, monkeypatch):
    with serving(tiny_folder, many(tmp_path, adapter, 1)) as (engine, client):
        slow_steps(engine, monkeypatch, 0.02)
        result = {}
        thread = threading.Thread(target=lambda: result.update(r=complete(client, "a000", max_tokens=20)), daemon=True)
        thread.start()
        deadline = time.monotonic() + 30
        while not engine.batch.rows and time.monotonic() < deadline:
            time.sleep(0.005)
        assert client.delete("/v1/adapters/a000").status_code == 200
        thread.join(timeout=60)
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 20
        assert complete(client, "a000").status_code == 404 and resident(engine) == []


def test_readers_see_an_immutable_snapshot_and_every_change_is_made_by_the_worker(
    tiny_folder, adapter, tmp_path, monkeypatch
):
    """The handlers read the registry through `view`, a snapshot that no later change alters and
    that cannot be written; the changes themselves (HTTP's and vLLM's endpoints, and a folder
    refused on its first request) are all made on the engine's worker thread."""
    root = many(tmp_path, adapter, 2)
    (root / "a001" / TENSORS).write_bytes(b"garbage")  # refused when first read
    threads = []
    for method in ("register", "unregister", "acquire"):
        real = getattr(registry.Registry, method)

        def spy(self, *args, _real=real, **kwargs):
            threads.append(threading.current_thread().name)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(registry.Registry, method, spy)
    with serving(tiny_folder, root) as (engine, client):
        before = engine.view
        assert client.post("/v1/adapters", json={"name": "b", "path": "a000"}).status_code == 200
        assert client.delete("/v1/adapters/a000").status_code == 200
        assert client.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": "a000"}).status_code == 200
        assert client.post("/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
        assert complete(client, "a001").status_code == 404
        assert list(before.folders) == ["a000", "a001"] and not before.refused  # as it was
        after = engine.view
        assert list(after.folders) == ["c"] and list(after.refused) == ["a001"]
        with pytest.raises(TypeError):
            after.folders["x"] = root  # type: ignore[index]
        assert after is engine.view  # reading changes nothing
    assert threads and set(threads) == {"tiedlora-engine"}, threads


def test_one_serve_config_reaches_the_engine_the_model_and_the_app(tiny_folder, tmp_path):
    import inspect

    from tiedlora import TiedLoraError
    from tiedlora.serve.config import ServeConfig

    assert inspect.signature(tiedlora.MultiAdapterModel).parameters["max_rank"].default == ServeConfig().max_rank
    with pytest.raises(TiedLoraError, match="--max_batch, .* and --max_rank must be at least 1"):
        build(str(tiny_folder), tmp_path, max_batch=0)
    options = dict(max_batch=3, max_rank=5, prefill_tokens=7, max_resident=9, max_request_bytes=999)
    with serving(tiny_folder, tmp_path, **options) as (engine, client):
        config = client.app.state.served.config
        assert config is engine.config and {k: getattr(config, k) for k in options} == options
        assert (engine.max_batch, engine.batch.chunk, engine.registry.max_resident) == (3, 7, 9)
        assert engine.multi.max_rank == 5 and config.max_prompt_tokens == ServeConfig().max_prompt_tokens
        r = client.post("/v1/completions", content=b" " * 1000, headers={"content-type": "application/json"})
        assert r.status_code == 413
