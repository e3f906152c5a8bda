"""API keys and tenants in `tiedlora serve`: 401 without a known key before anything else runs,
each tenant kept to the base model and its own adapters (another tenant's is a 404 exactly as a
name that does not exist), registering and metrics the administrator's alone."""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil

import pytest
from fastapi.testclient import TestClient

from tiedlora.config import TiedLoraError
from tiedlora.serve import keys as keys_module
from tiedlora.serve.keys import Keys
from tiedlora.serve.server import build, open_warning

ADMIN, ACME, ACME2, GLOBEX = (
    "admin-key-0123456789",
    "acme-key-0123456789",
    "acme-second-key-01234",
    "globex-key-01234567",
)


@pytest.fixture(scope="module")
def root(tmp_path_factory, adapter):
    root = tmp_path_factory.mktemp("tenants")
    for name in ("acme/a1", "acme/a2", "globex/g1", "shared"):
        shutil.copytree(adapter, root / name)
    shutil.copytree(adapter, root / "globex" / "broken")
    (root / "globex" / "broken" / "adapter.safetensors").write_bytes(b"not safetensors")
    return root


@pytest.fixture(scope="module")
def tenants_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "tenants.json"
    acme2 = "sha256:" + hashlib.sha256(ACME2.encode()).hexdigest()  # the file need not hold the secret
    path.write_text(json.dumps({"acme": [ACME, acme2], "globex": [GLOBEX]}))
    return path


@pytest.fixture(scope="module")
def client(tiny_folder, root, tenants_file):
    engine, app = build(str(tiny_folder), root, max_tokens_limit=8, api_key=ADMIN, tenants=str(tenants_file))
    with TestClient(app) as client:
        yield client
    engine.close()


def auth(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def ids(client, key) -> list[str]:
    return [m["id"] for m in client.get("/v1/models", headers=auth(key)).json()["data"]]


def ask(client, key, model, **extra):
    body = {"model": model, "prompt": "Hello", "max_tokens": 2, **extra}
    return client.post("/v1/completions", json=body, headers=auth(key))


PROTECTED = [("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics"), ("POST", "/v1/adapters")]
PROTECTED += [("DELETE", "/v1/adapters/acme/a1"), ("GET", "/v1/models/shared")]


def test_no_key_or_a_wrong_key_is_401_before_anything_else(client, tiny_folder, capsys, caplog):
    for headers in ({}, auth("wrong"), {"Authorization": ADMIN}, {"Authorization": "Basic " + ADMIN}, auth("")):
        for method, path in PROTECTED:
            r = client.request(method, path, headers=headers, json={"model": tiny_folder.name, "prompt": "Hi"})
            assert r.status_code == 401, (headers, path, r.text)
            assert (
                r.json()["error"]["code"] == "invalid_api_key"
                and "Authorization: Bearer" in r.json()["error"]["message"]
            )
    # checked before the body is read: a body over the size limit is still a 401, not a 413
    r = client.post("/v1/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
    assert r.status_code == 401
    assert client.get("/health").status_code == 200  # open, for load balancers
    assert "wrong" not in capsys.readouterr().err + caplog.text


def test_two_authorization_headers_are_a_400_whichever_comes_first(client):
    """A proxy that checks the first header and a server that reads the last would disagree on who
    asks: two are refused, before anything else runs, whatever their order or keys."""
    for pair in ((ACME, GLOBEX), (GLOBEX, ACME), (ACME, ACME), ("wrong", ACME)):
        headers = [("authorization", f"Bearer {key}") for key in pair]
        r = client.get("/v1/models", headers=headers)
        assert r.status_code == 400 and "one Authorization header" in r.json()["error"]["message"], (pair, r.text)
    assert client.get("/v1/models", headers=auth(ACME)).status_code == 200


def test_each_tenant_sees_the_base_and_its_own_adapters_only(client, tiny_folder):
    base = tiny_folder.name  # a folder by its own name
    listed = {key: ids(client, key) for key in (ADMIN, ACME, ACME2, GLOBEX)}
    assert listed[ACME] == listed[ACME2] == [base, "acme/a1", "acme/a2"]
    assert listed[GLOBEX] == [base, "globex/broken", "globex/g1"]  # broken is read on its first request
    assert sorted(listed[ADMIN]) == sorted([base, "acme/a1", "acme/a2", "globex/broken", "globex/g1", "shared"])
    assert ask(client, ACME, "acme/a1").status_code == 200 and ask(client, ACME2, "acme/a2").status_code == 200
    assert ask(client, GLOBEX, base).status_code == 200 and ask(client, ADMIN, "globex/g1").status_code == 200
    assert ask(client, GLOBEX, "globex/broken").status_code != 200  # now refused: the registry knows why
    assert "was refused" in ask(client, GLOBEX, "globex/broken").json()["error"]["message"]
    for name in ("globex/g1", "shared", "globex/broken"):
        theirs, missing = ask(client, ACME, name), ask(client, ACME, "acme/nope")
        assert theirs.status_code == missing.status_code == 404
        # the same answer as a name that does not exist: no oracle for "exists, but not yours"
        assert theirs.json() == json.loads(json.dumps(missing.json()).replace("acme/nope", name))
        got, absent = (client.get(f"/v1/models/{n}", headers=auth(ACME)) for n in (name, "acme/nope"))
        assert got.status_code == absent.status_code == 404
        assert got.json() == json.loads(json.dumps(absent.json()).replace("acme/nope", name))
        body = {"model": name, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
        chat = client.post("/v1/chat/completions", headers=auth(ACME), json=body)
        assert chat.status_code == 404 and chat.json()["error"]["message"] == theirs.json()["error"]["message"]


def test_only_the_administrator_registers_unregisters_and_reads_metrics(client, root):
    for key in (ACME, GLOBEX):
        for method, path, body in [
            ("POST", "/v1/adapters", {"name": f"{'acme' if key == ACME else 'globex'}/new", "path": "shared"}),
            ("DELETE", "/v1/adapters/acme/a1", None),
            ("POST", "/v1/load_lora_adapter", {"lora_name": "acme/x", "lora_path": "shared"}),
            ("POST", "/v1/unload_lora_adapter", {"lora_name": "acme/a1"}),
            ("GET", "/metrics", None),
        ]:
            r = client.request(method, path, json=body, headers=auth(key))
            assert r.status_code == 403 and "administrator" in r.json()["error"]["message"], (path, r.text)
    assert client.get("/metrics", headers=auth(ADMIN)).status_code == 200
    r = client.post("/v1/adapters", json={"name": "acme/new", "path": "shared"}, headers=auth(ADMIN))
    assert r.status_code == 200, r.text
    assert "acme/new" in ids(client, ACME) and "acme/new" not in ids(client, GLOBEX)
    assert client.delete("/v1/adapters/acme/new", headers=auth(ADMIN)).status_code == 200


def test_the_official_openai_client_with_keys(tiny_folder, root, tenants_file):
    import openai
    from openai import OpenAI

    engine, app = build(str(tiny_folder), root, max_tokens_limit=8, tenants=str(tenants_file))  # tenants alone
    with TestClient(app) as http:

        def client(key):
            return OpenAI(base_url="http://testserver/v1", api_key=key, http_client=http, max_retries=0)

        assert [m.id for m in client(GLOBEX).models.list()] == [tiny_folder.name, "globex/broken", "globex/g1"]
        assert client(ACME).completions.create(model="acme/a1", prompt="Hi", max_tokens=2).choices[0].text is not None
        with pytest.raises(openai.AuthenticationError):
            client("wrong").models.list()
        with pytest.raises(openai.AuthenticationError):
            client(ADMIN).models.list()  # no --api_key on this server: no administrator
        with pytest.raises(openai.NotFoundError):
            client(GLOBEX).completions.create(model="acme/a1", prompt="Hi", max_tokens=2)
        with pytest.raises(openai.NotFoundError):
            client(GLOBEX).models.retrieve("acme/a1")
    engine.close()


def test_keys_are_compared_in_constant_time_against_every_entry(tenants_file, monkeypatch):
    """Whichever key is presented (the first, the last or none), every stored digest is compared,
    each with hmac.compare_digest, so the time does not say how close a guess came."""
    keys = Keys.from_options(ADMIN, str(tenants_file))
    assert keys is not None
    calls = []
    real = hmac.compare_digest
    monkeypatch.setattr(keys_module.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    for key, tenant in [(ADMIN, None), (ACME, "acme"), (ACME2, "acme"), (GLOBEX, "globex"), ("nope", "-")]:
        calls.clear()
        who = keys.caller(f"Bearer {key}")
        assert (who.tenant if who else "-") == tenant and len(calls) == 4


def test_the_env_key_and_bad_tenants_files(tiny_folder, tmp_path, monkeypatch):
    monkeypatch.setenv("TIEDLORA_API_KEY", ADMIN)
    engine, app = build(str(tiny_folder), tmp_path / "none")
    with TestClient(app) as client:
        assert client.get("/v1/models").status_code == 401
        assert client.get("/v1/models", headers=auth(ADMIN)).status_code == 200
    engine.close()
    bad = tmp_path / "t.json"
    for text, message in [
        ("{", "cannot read it as JSON"),
        ('["acme"]', "must hold a JSON object"),
        ('{"../x": ["k"]}', "must be a folder name"),
        ('{"acme": []}', "non-empty list of keys"),
        ('{"acme": ["sha256:12"]}', "64 lowercase hex digits"),
        ('{"acme": ["k1"], "globex": ["k1"]}', "keys are unique"),
        (json.dumps({"acme": [ADMIN]}), "give the administrator a key of its own"),
    ]:
        bad.write_text(text)
        with pytest.raises(TiedLoraError, match=message) as e:
            Keys.from_options(ADMIN, str(bad))
        assert "k1" not in str(e.value) and ADMIN not in str(e.value)  # keys never in messages


def test_an_open_server_beyond_loopback_says_so_at_start():
    for host, keyed, warned in [("0.0.0.0", False, True), ("::", False, True), ("192.168.1.4", False, True),
                                ("127.0.0.1", False, False), ("localhost", False, False), ("::1", False, False),
                                ("0.0.0.0", True, False)]:  # fmt: skip
        line = open_warning(keyed, host, 8000)
        assert (line is not None and "anyone who reaches" in line and f"{host}:8000" in line) == warned, host
