"""OpenAI's files API in `tiedlora serve --state DIR`: uploads checked row by row as `tiedlora
train --data` checks them, kept per tenant in the SQL store, capped, and there after a restart."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tiedlora.config import TiedLoraError
from tiedlora.serve.config import ServeConfig
from tiedlora.service import build

from conftest import client_for, jsonl

ACME, GLOBEX = "acme-key-0123456789", "globex-key-01234567"
CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
ROWS = [{"prompt": "2+2=", "completion": " 4"}, {"messages": CHAT}]


@pytest.fixture
def served(tiny_folder, tmp_path):
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"acme": [ACME], "globex": [GLOBEX]}))

    def start(**options):
        folders = dict(adapters=str(tmp_path / "adapters"), state=str(tmp_path / "state"))
        config = ServeConfig(
            model=str(tiny_folder), tenants=str(tenants), max_tokens_limit=8, training_processes=0, **folders, **options
        )
        return build(config)

    return start


def test_upload_list_retrieve_content_delete_with_the_openai_client(served):
    import openai

    engine, app = served()
    with TestClient(app) as http:
        acme = client_for(http, ACME)
        made = acme.files.create(file=("acme.jsonl", jsonl(ROWS)), purpose="fine-tune")
        assert made.id.startswith("file-") and made.bytes == len(jsonl(ROWS)) and made.filename == "acme.jsonl"
        assert made.purpose == "fine-tune" and made.status == "processed"
        assert [f.id for f in acme.files.list()] == [made.id]
        assert acme.files.retrieve(made.id).bytes == made.bytes
        assert acme.files.content(made.id).read() == jsonl(ROWS)
        with pytest.raises(openai.BadRequestError, match="fine-tune only"):
            acme.files.create(file=("a.jsonl", jsonl(ROWS)), purpose="assistants")
        assert acme.files.delete(made.id).deleted
        assert acme.files.list().data == []
        with pytest.raises(openai.NotFoundError):
            acme.files.retrieve(made.id)
    engine.close()


def test_a_bad_upload_is_a_400_naming_the_line_and_field_and_nothing_is_stored(served):
    engine, app = served()
    with TestClient(app) as http:
        cases = [
            (jsonl([ROWS[0], {"prompt": "x"}]), "line 2: no field 'completion'"),
            (jsonl([ROWS[0], {"prompt": "x", "completion": 3}]), "line 2: field 'completion' is a int"),
            (
                jsonl([{"messages": [{"role": "user", "content": "Hi"}]}]),
                "line 1: field 'messages' has no assistant turn",
            ),
            (jsonl(ROWS) + b"{not json\n", "line 3: not JSON"),
            (b"\xff\xfe", "not UTF-8"),
            (b"\n\n", "holds no rows"),
        ]
        for content, message in cases:
            head = {"Authorization": f"Bearer {ACME}"}
            r = http.post(
                "/v1/files", headers=head, files={"file": ("d.jsonl", content)}, data={"purpose": "fine-tune"}
            )
            assert r.status_code == 400 and message in r.json()["error"]["message"], (message, r.text)
            assert r.json()["error"]["param"] == "file"
        assert http.get("/v1/files", headers={"Authorization": f"Bearer {ACME}"}).json()["data"] == []
    engine.close()


def test_another_tenants_file_is_a_404_as_if_it_did_not_exist(served):
    engine, app = served()
    with TestClient(app) as http:
        acme, globex = client_for(http, ACME), client_for(http, GLOBEX)
        mine = acme.files.create(file=("a.jsonl", jsonl(ROWS)), purpose="fine-tune").id
        assert globex.files.list().data == []
        head = {"Authorization": f"Bearer {GLOBEX}"}
        missing = "file-000000000000000000000000"
        for method, path in [("GET", "/v1/files/{}"), ("GET", "/v1/files/{}/content"), ("DELETE", "/v1/files/{}")]:
            theirs, absent = (http.request(method, path.format(i), headers=head) for i in (mine, missing))
            assert theirs.status_code == absent.status_code == 404
            assert theirs.json() == json.loads(json.dumps(absent.json()).replace(missing, mine))
        assert http.get("/v1/files").status_code == 401
        assert [f.id for f in acme.files.list()] == [mine]  # globex's delete did nothing
    engine.close()


def test_size_caps_per_file_and_per_tenant(served):
    big = jsonl([{"prompt": "p" * 1000, "completion": "c"}] * 1500)  # 1.5 MB: over max_request_bytes (1 MiB)
    engine, app = served(max_file_bytes=2 << 20, max_tenant_bytes=3 << 20)
    with TestClient(app) as http:
        acme = client_for(http, ACME)
        acme.files.create(file=("a.jsonl", big), purpose="fine-tune")  # uploads may exceed max_request_bytes
        head = {"Authorization": f"Bearer {ACME}"}
        r = http.post("/v1/files", headers=head, files={"file": ("c.jsonl", big + big)}, data={"purpose": "fine-tune"})
        assert r.status_code == 413 and "limit" in r.json()["error"]["message"]
        r = http.post("/v1/files", headers=head, files={"file": ("b.jsonl", big)}, data={"purpose": "fine-tune"})
        assert r.status_code == 200
        r = http.post("/v1/files", headers=head, files={"file": ("d.jsonl", big)}, data={"purpose": "fine-tune"})
        assert r.status_code == 413 and "delete some first" in r.json()["error"]["message"]
        assert client_for(http, GLOBEX).files.create(file=("g.jsonl", big), purpose="fine-tune").bytes == len(big)
    engine.close()


def test_files_survive_a_restart(served):
    engine, app = served()
    with TestClient(app) as http:
        made = client_for(http, ACME).files.create(file=("a.jsonl", jsonl(ROWS)), purpose="fine-tune")
    engine.close()
    engine, app = served()
    with TestClient(app) as http:
        assert client_for(http, ACME).files.content(made.id).read() == jsonl(ROWS)
    engine.close()


def test_a_store_that_cannot_open_names_the_option(tiny_folder, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(TiedLoraError, match="--state"):
        build(ServeConfig(model=str(tiny_folder), state=str(blocker / "state")))
    with pytest.raises(TiedLoraError, match=r"--store postgresql://u:\*\*\*@nowhere.invalid"):
        build(
            ServeConfig(
                model=str(tiny_folder), state=str(tmp_path / "s"), store="postgresql://u:secret@nowhere.invalid/db"
            )
        )


@pytest.mark.parametrize(
    "content",
    [
        b'{"prompt": "a", "completion": " b"}\n\n{"prompt": "c", "completion": " d"}\n',
        b'{"prompt": "a", "completion": " b"}\r\n{"prompt": "c", "completion": " d"}\r\n',
        b'{"prompt": "a", "completion": " b"}\r{"prompt": "c", "completion": " d"}\r',
        '{"prompt": "a\u2028b\u0085", "completion": " c"}\n'.encode(),
        b'{"prompt": "a\\ud800", "completion": " b"}\n',
        b'{"prompt": "a", "completion": " b", "n": ' + b"9" * 5000 + b"}\n",
        b"[" * 100_000 + b"]" * 100_000 + b"\n",
    ],
)
def test_an_upload_is_accepted_exactly_when_training_reads_it(served, tmp_path, content):
    """The upload and `tiedlora train --data` read rows with one reader: what the service accepts
    trains, and what training would refuse is a 400 naming the line at upload."""
    from tiedlora.service.files import FIELDS
    from tiedlora.tasks import DataError
    from tiedlora.tasks.own import read_rows

    path = tmp_path / "rows.jsonl"
    path.write_bytes(content)
    try:
        read_rows(str(path), "train", FIELDS)
        trains, why = True, ""
    except DataError as e:
        trains, why = False, str(e).split(", line ")[1].split(":")[0]
    engine, app = served()
    with TestClient(app) as http:
        head = {"Authorization": f"Bearer {ACME}"}
        files = {"file": ("rows.jsonl", content)}
        reply = http.post("/v1/files", headers=head, files=files, data={"purpose": "fine-tune"})
    engine.close()
    assert (reply.status_code == 200) == trains, reply.text
    if not trains:
        assert reply.status_code == 400 and f"rows.jsonl, line {why}:" in reply.json()["error"]["message"]
