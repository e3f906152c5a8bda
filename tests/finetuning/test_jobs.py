"""OpenAI's fine-tuning API in `tiedlora serve --state DIR`: jobs created, followed and cancelled
with the official `openai` client, trained by a training process beside the server, their
adapters served by name the moment they succeed; each tenant kept to its own jobs and models."""

from __future__ import annotations

import functools
import glob
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import load as load_tensors

from tiedlora.serve.config import ServeConfig
from tiedlora.service import build
from tiedlora.service.store import Store, jobs, models

from conftest import client_for, jsonl

ACME, GLOBEX, ADMIN = "acme-key-0123456789", "globex-key-01234567", "admin-key-0123456789"
ROWS = [{"prompt": f"{a}+{b}=", "completion": f" {a + b}"} for a in range(6) for b in range(4)]  # 24 rows
HYPER = {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 5}


@pytest.fixture
def served(tiny_folder, tmp_path):
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"acme": [ACME], "globex": [GLOBEX]}))

    def start(state="state", **options):
        folders = dict(adapters=str(tmp_path / "adapters"), state=str(tmp_path / state))
        keys = dict(tenants=str(tenants), api_key=ADMIN)
        options = {"train_precision": "fp32", "job_lease_s": 2.0, **options}
        return build(ServeConfig(model=str(tiny_folder), max_tokens_limit=8, **keys, **folders, **options))

    return start


def wait_for(check, timeout: float = 180.0, every: float = 0.25):
    """`check()`'s first true value; fails after `timeout` seconds."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"still waiting after {timeout} s")


def ended(client, job_id):
    job = client.fine_tuning.jobs.retrieve(job_id)
    return job if job.status in ("succeeded", "failed", "cancelled") else None


def create(client, file_id, **extra):
    return client.fine_tuning.jobs.create(
        model=extra.pop("model", None) or client.models.list().data[0].id,
        training_file=file_id,
        hyperparameters=extra.pop("hyperparameters", HYPER),
        seed=extra.pop("seed", 7),
        **extra,
    )


def test_a_fine_tune_with_the_openai_client_from_upload_to_completion(served, tiny_folder, tmp_path, monkeypatch):
    """Upload, create, poll, then at once a completion on the new model (the publisher's
    periodic pass is off here: the request itself has the model registered); events (paged),
    checkpoints; its adapter equals the one a solo `tiedlora train --data` run with the job's
    options makes."""
    from tiedlora.service.publish import Publisher
    from tiedlora.train import TrainConfig, train

    monkeypatch.setattr(Publisher, "keep", lambda self, stop: None)
    engine, app = served()
    with TestClient(app) as http:
        acme = client_for(http, ACME)
        base = acme.models.list().data[0].id
        upload = acme.files.create(file=("sums.jsonl", jsonl(ROWS)), purpose="fine-tune")
        job = create(acme, upload.id, suffix="sums", extra_body={"adapter": {"config": "tl5", "rank": 4}})
        assert job.status == "queued" and job.id.startswith("ftjob-") and job.hyperparameters.n_epochs == 2
        done = wait_for(lambda: ended(acme, job.id))
        assert done.status == "succeeded", done.error
        reply = acme.completions.create(model=done.fine_tuned_model, prompt="3+1=", max_tokens=4)
        assert reply.model == done.fine_tuned_model and reply.usage.completion_tokens >= 1
        assert done.fine_tuned_model == f"ft:{base}:acme:sums:{job.id}" and done.trained_tokens > 0

        events = [e for page in iter_pages(acme.fine_tuning.jobs.list_events, job.id, 3) for e in page]
        messages = [e.message for e in reversed(events)]  # newest first, as OpenAI's
        assert messages[:4] == [
            "Created fine-tuning job",
            f"Validating training file: {upload.id}",
            "Files validated, moving job to queued state",
            "Fine-tuning job started",
        ]
        assert messages[-1] == "The job has successfully completed", messages
        steps = [e.data for e in reversed(events) if e.type == "metrics"]
        total = steps[-1]["total_steps"]
        assert total == 2 * (22 // 4) and steps[-1]["step"] == total  # 24 rows, 2 held out for validation
        assert "valid_loss" in steps[-1] and all(s["train_loss"] > 0 for s in steps)
        checkpoints = acme.fine_tuning.jobs.checkpoints.list(job.id).data
        assert [c.step_number for c in checkpoints] == [10, 5]
        assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-10"

        assert done.fine_tuned_model in [m.id for m in acme.models.list()]
        options = json.loads(Store.open(tmp_path / "state").job(None, job.id)["options"])  # type: ignore[index]
    engine.close()

    served_tensors = stored_adapter(tmp_path / "state", job.id)
    data = tmp_path / "sums.jsonl"
    data.write_bytes(jsonl(ROWS))
    solo = tmp_path / "solo"
    train(TrainConfig(**options, data=str(data), model=str(tiny_folder), out=str(solo), precision="fp32"), quiet=True)
    alone = load_tensors((solo / "best" / "adapter.safetensors").read_bytes())
    assert served_tensors.keys() == alone.keys()
    scale = max(t.abs().max().item() for t in alone.values())
    assert scale > 0 and max((served_tensors[k] - alone[k]).abs().max().item() for k in alone) <= 1e-5 * scale


def iter_pages(list_call, job_id, limit):
    """Every page of a list, by `after` and `limit` as the client sends them."""
    after = None
    for _ in range(100):  # a list that never ends is a failure, not a hang
        page = list_call(job_id, limit=limit, **({"after": after} if after else {}))
        yield page.data
        assert len(page.data) <= limit
        if not page.has_more:
            return
        after = page.data[-1].id
    raise AssertionError("more than 100 pages: `after` does not move the list on")


def stored_adapter(state, job_id) -> dict[str, torch.Tensor]:
    store = Store.open(state)
    from sqlalchemy import select

    with store.engine.connect() as db:
        row = db.execute(select(models.c.tensors).where(models.c.job_id == job_id)).one()
    return load_tensors(row[0])


def test_another_tenants_jobs_files_and_models_do_not_exist_for_it(served):
    import openai

    engine, app = served(max_running_jobs=2)
    with TestClient(app) as http:
        acme, globex = client_for(http, ACME), client_for(http, GLOBEX)
        upload = acme.files.create(file=("a.jsonl", jsonl(ROWS)), purpose="fine-tune")
        mine = create(acme, upload.id, hyperparameters={"n_epochs": 1, "batch_size": 8})
        done = wait_for(lambda: ended(acme, mine.id))
        assert done.status == "succeeded", done.error
        missing, ft_missing = "ftjob-000000000000000000000000", done.fine_tuned_model.replace(mine.id, "ftjob-0")

        head = {"Authorization": f"Bearer {GLOBEX}"}
        for method, path in [
            ("GET", "/v1/fine_tuning/jobs/{}"),
            ("GET", "/v1/fine_tuning/jobs/{}/events"),
            ("GET", "/v1/fine_tuning/jobs/{}/checkpoints"),
            ("POST", "/v1/fine_tuning/jobs/{}/cancel"),
        ]:
            theirs, absent = (http.request(method, path.format(i), headers=head) for i in (mine.id, missing))
            assert theirs.status_code == absent.status_code == 404, (path, theirs.text)
            assert theirs.json() == json.loads(json.dumps(absent.json()).replace(missing, mine.id))
        assert globex.fine_tuning.jobs.list().data == []
        assert [j.id for j in acme.fine_tuning.jobs.list()] == [mine.id]
        for model in (done.fine_tuned_model, ft_missing):
            with pytest.raises(openai.NotFoundError):
                globex.completions.create(model=model, prompt="1+1=", max_tokens=2)
            with pytest.raises(openai.NotFoundError):
                globex.models.retrieve(model)
        assert done.fine_tuned_model not in [m.id for m in globex.models.list()]
        with pytest.raises(openai.BadRequestError, match="no such file") as theirs_file:
            create(globex, upload.id)
        with pytest.raises(openai.BadRequestError, match="no such file") as no_file:
            create(globex, "file-000000000000000000000000")
        assert str(theirs_file.value).replace(upload.id, "X") == str(no_file.value).replace(
            "file-000000000000000000000000", "X"
        )
        assert http.get("/v1/fine_tuning/jobs").status_code == 401
        assert http.get("/v1/fine_tuning/jobs", headers={"Authorization": "Bearer wrong"}).status_code == 401
        r = http.post("/v1/adapters", headers=head, json={"name": "globex/x", "path": "x"})
        assert r.status_code == 403
        admin = client_for(http, ADMIN)
        assert [j.id for j in admin.fine_tuning.jobs.list()] == [mine.id]  # the administrator sees every job
        assert admin.completions.create(model=done.fine_tuned_model, prompt="1+1=", max_tokens=2).choices
    engine.close()


def test_checks_limits_pagination_and_cancel_while_queued(served):
    """No training process: jobs stay queued, so cancelling, paging and the queue limit are seen
    without training; every bad option is a 400 naming it."""
    import openai

    engine, app = served(training_processes=0, max_queued_jobs=3)
    with TestClient(app) as http:
        acme = client_for(http, ACME)
        upload = acme.files.create(file=("a.jsonl", jsonl(ROWS)), purpose="fine-tune")
        bad = [
            (dict(hyperparameters={"n_epochs": 0}), "hyperparameters.n_epochs"),
            (dict(hyperparameters={"batch_size": 1000}), "hyperparameters.batch_size"),
            (dict(hyperparameters={"learning_rate_multiplier": -1}), "hyperparameters.learning_rate_multiplier"),
            (dict(method={"type": "dpo"}), "method.type"),
            (dict(extra_body={"adapter": {"config": "tl9"}}), "adapter"),
            (dict(extra_body={"adapter": {"rank": 0}}), "adapter.rank"),
            (dict(model="gpt-4o-mini"), "model"),
            (dict(suffix="no spaces"), "suffix"),
            (dict(extra_body={"hyperparams": {"n_epochs": 2}}), "hyperparams"),  # misspelt: refused, not ignored
            (dict(hyperparameters={"n_epoch": 2}), "hyperparameters.n_epoch"),
        ]
        for options, param in bad:
            with pytest.raises(openai.BadRequestError) as e:
                create(acme, upload.id, **options)
            assert e.value.param == param, (options, e.value)
        few = acme.files.create(file=("few.jsonl", jsonl(ROWS[:12])), purpose="fine-tune").id
        with pytest.raises(openai.BadRequestError, match="none of its 12 rows falls in the tenth held out") as e:
            create(acme, few)  # each row's hash keeps all 12 for training: no validation rows
        assert e.value.param == "validation_file"
        first = create(acme, few, validation_file=upload.id)
        assert first.status == "queued" and acme.fine_tuning.jobs.cancel(first.id).status == "cancelled"
        made = [create(acme, upload.id).id for _ in range(3)]
        with pytest.raises(openai.RateLimitError, match="3 jobs waiting"):
            create(acme, upload.id)
        pages = list(iter_pages(lambda _, **kw: acme.fine_tuning.jobs.list(**kw), None, 2))
        assert [[j.id for j in page] for page in pages] == [made[::-1][:2], [made[0], first.id]]
        cancelled = acme.fine_tuning.jobs.cancel(made[0])
        assert cancelled.status == "cancelled" and cancelled.finished_at is not None
        with pytest.raises(openai.BadRequestError, match="already cancelled"):
            acme.fine_tuning.jobs.cancel(made[0])
        assert create(acme, upload.id).status == "queued"  # room again in the queue
        with pytest.raises(openai.BadRequestError, match="after"):
            acme.fine_tuning.jobs.list(after="ftjob-nope")
    engine.close()


def test_two_tenants_jobs_train_together_and_cancel_stops_a_running_one(served, tmp_path):
    engine, app = served(max_running_jobs=3)
    with TestClient(app) as http:
        acme, globex = client_for(http, ACME), client_for(http, GLOBEX)
        a = create(acme, acme.files.create(file=("a.jsonl", jsonl(ROWS)), purpose="fine-tune").id)
        held_out = globex.files.create(file=("v.jsonl", jsonl(ROWS[:4])), purpose="fine-tune").id
        g = create(globex, globex.files.create(file=("g.jsonl", jsonl(ROWS[4:16])), purpose="fine-tune").id,
                   validation_file=held_out)  # fmt: skip
        long = create(acme, acme.files.create(file=("l.jsonl", jsonl(ROWS)), purpose="fine-tune").id,
                      hyperparameters={"n_epochs": 50, "batch_size": 1})  # fmt: skip
        wait_for(lambda: acme.fine_tuning.jobs.retrieve(long.id).trained_tokens)
        cancelled = acme.fine_tuning.jobs.cancel(long.id)
        assert cancelled.status == "cancelled"
        done_a, done_g = wait_for(lambda: ended(acme, a.id)), wait_for(lambda: ended(globex, g.id))
        assert done_a.status == done_g.status == "succeeded", (done_a.error, done_g.error)
        assert done_a.created_at <= done_g.finished_at and done_g.created_at <= done_a.finished_at
        started = {j.id: first_step(c, j.id) for c, j in ((acme, a), (globex, g), (acme, long))}
        assert max(started.values()) - min(started.values()) < 2.0, started  # claimed together, one batch
        time.sleep(2)  # the training process has let the cancelled job go by now: its log grows no more
        log = tmp_path / "state" / "runs" / long.id / "log.csv"
        steps = len(log.read_text().splitlines())
        time.sleep(2)
        assert len(log.read_text().splitlines()) == steps < 50 * 24
        assert acme.fine_tuning.jobs.retrieve(long.id).status == "cancelled"
        assert not acme.fine_tuning.jobs.retrieve(long.id).fine_tuned_model
    engine.close()


def first_step(client, job_id) -> float:
    """When the job's first step was reported (its events are newest first)."""
    events = client.fine_tuning.jobs.list_events(job_id, limit=100).data
    return min(e.created_at for e in events if e.message == "Fine-tuning job started")


def test_a_training_process_that_dies_fails_its_jobs_and_serving_goes_on(served, tmp_path):
    engine, app = served()
    with TestClient(app) as http:
        acme = client_for(http, ACME)
        upload = acme.files.create(file=("a.jsonl", jsonl(ROWS)), purpose="fine-tune")
        job = create(acme, upload.id, hyperparameters={"n_epochs": 50, "batch_size": 1})
        wait_for(lambda: acme.fine_tuning.jobs.retrieve(job.id).trained_tokens)
        pid = training_pid()
        os.kill(pid, signal.SIGKILL)
        done = wait_for(lambda: ended(acme, job.id))
        assert done.status == "failed" and done.error.code == "training_process_died"
        assert "killed: out of memory?" in done.error.message
        events = acme.fine_tuning.jobs.list_events(job.id, limit=100).data
        assert not [m for m in [done.error.message, *(e.message for e in events)] if str(tmp_path) in m]  # no path
        assert http.get("/health").status_code == 200
        base = acme.models.list().data[0].id
        assert acme.completions.create(model=base, prompt="1+1=", max_tokens=2).choices
        again = create(acme, upload.id, hyperparameters={"n_epochs": 1, "batch_size": 8})  # a new process takes it
        assert wait_for(lambda: ended(acme, again.id)).status == "succeeded"
        assert wait_for(lambda: training_pid()) != pid
    engine.close()


def training_pid() -> int | None:
    """The training process this test's server started (its parent is this process)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                command = f.read()
        except OSError:
            continue
        if parent == os.getpid() and b"tiedlora.service.worker" in command:
            return int(entry)
    return None


def start_server(tiny_folder, tmp_path, state: str) -> tuple[subprocess.Popen, int, list[str]]:
    """`tiedlora serve --state` as a user starts it, on a free port; (process, port, its stderr lines)."""
    tenants = tmp_path / "tenants.json"
    tenants.write_text(json.dumps({"acme": [ACME]}))
    command = [sys.executable, "-m", "tiedlora", "serve", "--model", str(tiny_folder), "--port", "0"]
    command += ["--adapters", str(tmp_path / "adapters"), "--state", str(tmp_path / state), "--tenants", str(tenants)]
    command += ["--train_precision", "fp32", "--job_lease_s", "1"]
    process = subprocess.Popen(command, env={**os.environ, "HF_HUB_OFFLINE": "1"}, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()  # type: ignore[arg-type]
    wait_for(lambda: any(" on http://" in line for line in lines) or process.poll() is not None, 120)
    assert process.poll() is None, "".join(lines)
    port = int(next(line for line in lines if " on http://" in line).rsplit(":", 1)[1].split("/")[0])
    return process, port, lines


def test_a_server_killed_mid_job_resumes_it_from_its_checkpoint_to_the_same_adapter(tiny_folder, tmp_path):
    """SIGKILL the server (its training process ends with it) after the job's first checkpoint;
    started again, the server's new training process takes the job up once its lease lapses, from
    that checkpoint (not from step 0), and it ends with the adapter an uninterrupted run makes."""
    from openai import OpenAI

    hyper = {"n_epochs": 6, "batch_size": 1}  # 6 x 22 steps (2 of the 24 rows validate), a checkpoint every 22

    def client(port):
        return OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key=ACME, max_retries=0)

    process, port, _ = start_server(tiny_folder, tmp_path, "killed")
    try:
        acme = client(port)
        upload = acme.files.create(file=("a.jsonl", jsonl(ROWS)), purpose="fine-tune")
        job = create(acme, upload.id, hyperparameters=hyper)
        wait_for(lambda: acme.fine_tuning.jobs.checkpoints.list(job.id).data, every=0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(30)
    finally:
        process.kill()

    process, port, _ = start_server(tiny_folder, tmp_path, "killed")
    try:
        acme = client(port)
        done = wait_for(lambda: ended(acme, job.id))
        assert done.status == "succeeded", done.error
        events = acme.fine_tuning.jobs.list_events(job.id, limit=100).data
        resumed = [e.data["step"] for e in events if e.message.startswith("Resumed by another training process")]
        checkpointed = [c.step_number for c in acme.fine_tuning.jobs.checkpoints.list(job.id, limit=100).data]
        assert resumed and resumed[0] > 0 and resumed[0] in checkpointed, [e.message for e in events]
        assert acme.completions.create(model=done.fine_tuned_model, prompt="1+2=", max_tokens=2).choices
    finally:
        process.terminate()
        process.wait(60)

    process, port, _ = start_server(tiny_folder, tmp_path, "whole")
    try:
        acme = client(port)
        upload = acme.files.create(file=("a.jsonl", jsonl(ROWS)), purpose="fine-tune")
        whole = create(acme, upload.id, hyperparameters=hyper)
        assert wait_for(lambda: ended(acme, whole.id)).status == "succeeded"
    finally:
        process.terminate()
        process.wait(60)
    resumed_tensors = stored_adapter(tmp_path / "killed", job.id)
    whole_tensors = stored_adapter(tmp_path / "whole", whole.id)
    assert resumed_tensors.keys() == whole_tensors.keys()
    assert all(torch.equal(resumed_tensors[k], whole_tensors[k]) for k in whole_tensors)


@pytest.fixture(scope="module")
def postgres():
    """A PostgreSQL server of its own, on a Unix socket in a temporary folder (Debian's
    postgresql package; `.ci/run` installs it): its URL."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb")) or [shutil.which("initdb") or ""]
    if not found[-1]:
        if os.environ.get("CI"):
            pytest.fail("PostgreSQL is not installed: .ci/run installs Debian's postgresql package.")
        pytest.skip("no PostgreSQL server here: apt-get install postgresql")
    bindir = Path(found[-1]).parent
    folder = Path(tempfile.mkdtemp(prefix="tiedlora-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        as_postgres = ["runuser", "-u", "postgres", "--"]
        user = pwd.getpwnam("postgres")
        os.chmod(folder, 0o755)
        os.chown(folder, user.pw_uid, user.pw_gid)
    data = folder / "data"
    run = functools.partial(subprocess.run, check=True, capture_output=True, timeout=120)
    run([*as_postgres, str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tiedlora", "--no-sync"])
    options = f"-k {folder} -c listen_addresses='' -c fsync=off"
    run(
        [*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(folder / "log"), "-w", "start"]
    )
    try:
        yield f"postgresql+psycopg://tiedlora@/postgres?host={folder}"
    finally:
        run([*as_postgres, str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop"])
        shutil.rmtree(folder, ignore_errors=True)


def queued_job(n: int) -> dict:
    return dict(id=f"ftjob-{n:04d}", tenant="acme", model="m", training_file="file-x", validation_file=None,
                suffix=None, seed=0, hyperparameters="{}", options="{}", status="queued", created_at=0)  # fmt: skip


@pytest.mark.parametrize("database", ["postgresql", "sqlite"])
def test_two_training_processes_never_claim_one_job(database, request, tmp_path):
    """Two workers, each with its own connections, claim 200 queued jobs one at a time, at once:
    every job is claimed exactly once (FOR UPDATE SKIP LOCKED on PostgreSQL; the claimable check
    repeated in the UPDATE everywhere)."""
    url = request.getfixturevalue("postgres") if database == "postgresql" else f"sqlite:///{tmp_path / 'db'}"
    first = Store(url)
    with first.engine.begin() as db:
        db.execute(jobs.delete())
    for n in range(200):
        first.add_job(queued_job(n))
    stores = [first, Store(url)]
    claimed: dict[str, list[str]] = {"w0": [], "w1": []}
    start = threading.Barrier(2)

    def claim_all(worker: str, store: Store) -> None:
        store.held_by(worker)  # connected before the race starts
        start.wait()
        while got := store.claim(worker, 1, lease=60.0, model="m"):
            claimed[worker] += [job["id"] for job in got]

    threads = [threading.Thread(target=claim_all, args=(w, s)) for w, s in zip(claimed, stores)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sorted(claimed["w0"] + claimed["w1"]) == [f"ftjob-{n:04d}" for n in range(200)]
    assert claimed["w0"] and claimed["w1"], "one worker took every job: they did not claim at once"
    assert first.held_by("w0") and sorted(first.held_by("w0")) == sorted(claimed["w0"])


def test_two_servers_share_one_postgresql(served, postgres):
    """Two servers on one store, each with its training process: every job trains once, and a model
    one server's process made serves from the other."""
    with Store(postgres).engine.begin() as db:
        db.execute(jobs.delete())
    (engine_a, app_a), (engine_b, app_b) = served("a", store=postgres), served("b", store=postgres)
    with TestClient(app_a) as http_a, TestClient(app_b) as http_b:
        a, b = client_for(http_a, ACME), client_for(http_b, ACME)
        upload = a.files.create(file=("a.jsonl", jsonl(ROWS)), purpose="fine-tune")
        made = [create(c, upload.id, hyperparameters={"n_epochs": 1, "batch_size": 8}).id for c in (a, b, a, b)]
        done = [wait_for(lambda j=j: ended(a, j)) for j in made]
        assert [d.status for d in done] == ["succeeded"] * 4, [d.error for d in done]
        for job in made:
            started = [e for e in b.fine_tuning.jobs.list_events(job, limit=100).data if "started" in e.message]
            assert len(started) == 1
        trainers = {Store(postgres).job(None, j)["worker"] for j in made}  # type: ignore[index]
        for d in done:
            assert b.completions.create(model=d.fine_tuned_model, prompt="1+1=", max_tokens=2).choices
            assert a.completions.create(model=d.fine_tuned_model, prompt="1+1=", max_tokens=2).choices
    engine_a.close()
    engine_b.close()
    assert len(trainers) >= 1


def test_a_jobs_errors_name_its_files_by_id_never_a_server_path(tmp_path):
    """What the trainer says of a job's data copy or run folder reaches its tenant with the file's id
    and the words for the folder, not where they lie on the server."""
    from tiedlora.service.worker import Worker

    worker = Worker.__new__(Worker)
    worker.state = tmp_path / "state"
    job = {"id": "ftjob-1", "training_file": "file-a", "validation_file": "file-b"}
    data = tmp_path / "state" / "data" / "ftjob-1"
    said = worker.told(
        job,
        f"{data / 'data.jsonl'} line 3: bad; {data / 'validation.jsonl'} is empty; see "
        f"{tmp_path / 'state' / 'runs' / 'ftjob-1' / 'checkpoint'} and {tmp_path / 'state' / 'x'}",
    )
    assert said == (
        "training_file file-a line 3: bad; validation_file file-b is empty; see the job's run folder/checkpoint "
        "and <state>/x"
    )
