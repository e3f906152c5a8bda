"""The fine-tuning service's state, in a SQL database through SQLAlchemy: a SQLite file under
`--state DIR` by default (nothing to install), or any SQLAlchemy URL (`--store`, e.g. PostgreSQL)
that several servers share. Files, events and the fine-tuned adapters keep their content in the
database, so every server and worker sharing it reads the same bytes. Every query a request makes
names the tenant: another tenant's row is, to a caller, a row that does not exist.

Training processes claim queued jobs in one UPDATE whose subquery takes the rows with
`FOR UPDATE SKIP LOCKED` where the database has it (PostgreSQL), and whose WHERE checks again
that each is still claimable, so two processes never run one job. A claimed job's process
renews its heartbeat; a `running` job whose heartbeat is older than the lease (its process died
with its server) is claimable again, and resumes from its last checkpoint.
"""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

from sqlalchemy import (
    BigInteger,
    Column,
    Float,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    and_,
    create_engine,
    delete,
    event,
    func,
    insert,
    or_,
    select,
    update,
)
from sqlalchemy.engine import Engine

from ..config import TiedLoraError
from ..runs import renamed

metadata = MetaData()

files = Table(
    "files",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("tenant", String(64), nullable=False, index=True),  # "" for the administrator
    Column("filename", String(255), nullable=False),
    Column("purpose", String(32), nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("rows", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("content", LargeBinary, nullable=False),
)

FILE_FIELDS = ("id", "tenant", "filename", "purpose", "bytes", "rows", "created_at")

jobs = Table(
    "jobs",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # creation order, for pages and claims
    Column("id", String(64), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False, index=True),
    Column("model", String(256), nullable=False),
    Column("training_file", String(64), nullable=False),
    Column("validation_file", String(64)),
    Column("suffix", String(64)),
    Column("seed", BigInteger, nullable=False),
    Column("hyperparameters", Text, nullable=False),  # JSON: n_epochs, batch_size, learning_rate_multiplier
    Column("options", Text, nullable=False),  # JSON: the job's `tiedlora train` options but its data
    Column("status", String(32), nullable=False, index=True),
    Column("created_at", BigInteger, nullable=False),
    Column("started_at", BigInteger),
    Column("finished_at", BigInteger),
    Column("trained_tokens", BigInteger),
    Column("fine_tuned_model", String(512)),
    Column("error", Text),  # JSON: code, message, param
    Column("worker", String(128)),  # the training process holding it
    Column("heartbeat", Float),  # when that process last said it holds it
    Column("attempts", Integer, nullable=False, default=0),
)

events = Table(
    "events",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("created_at", BigInteger, nullable=False),
    Column("level", String(16), nullable=False),
    Column("message", Text, nullable=False),
    Column("type", String(16), nullable=False),
    Column("data", Text),  # JSON
)

checkpoints = Table(
    "checkpoints",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("id", String(64), nullable=False, unique=True),
    Column("job_id", String(64), nullable=False, index=True),
    Column("step", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("metrics", Text, nullable=False),  # JSON
)

models = Table(
    "models",
    metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),  # servers register the ones after what they have
    Column("name", String(512), nullable=False, unique=True),
    Column("job_id", String(64), nullable=False, unique=True),
    Column("tenant", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("tensors", LargeBinary, nullable=False),  # the adapter's two files: adapter.safetensors
    Column("config", Text, nullable=False),  # and adapter_config.json
)

STORE_ENV = "TIEDLORA_STORE"  # how a training process gets the store's URL (not in its arguments: ps shows those)
ENDED = ("succeeded", "failed", "cancelled")


def new_id(prefix: str) -> str:
    """OpenAI's id shape: a prefix and random characters (unguessable, so ids say nothing)."""
    return f"{prefix}-{secrets.token_hex(12)}"


class Store:
    """The database and the queries the service makes of it."""

    def __init__(self, url: str):
        self.url = url
        try:
            sqlite = url.startswith("sqlite")
            # SQLite: writers wait for each other (the server and its training process share the file)
            self.engine: Engine = create_engine(url, connect_args={"timeout": 60} if sqlite else {})
            if sqlite:
                event.listen(self.engine, "connect", write_ahead_log)
            metadata.create_all(self.engine)
        except Exception as e:  # a bad URL or an unreachable database: SQLAlchemy raises many kinds
            raise TiedLoraError(f"--store {safe_url(url)}: cannot open the database ({type(e).__name__}).") from None

    @classmethod
    def open(cls, state: str | Path, url: str | None = None) -> Store:
        """`url`, or a SQLite file in the folder `state`; the folder is created either way (run
        folders and the adapters made live there)."""
        folder = Path(state)
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TiedLoraError(f"--state {folder}: cannot create it ({e.strerror or e}).") from None
        return cls(url if url is not None else f"sqlite:///{folder.resolve() / 'tiedlora.db'}")

    def add_file(self, tenant: str, filename: str, purpose: str, content: bytes, rows: int) -> dict:
        row = dict(id=new_id("file"), tenant=tenant, filename=filename, purpose=purpose, bytes=len(content))
        row.update(rows=rows, created_at=int(time.time()), content=content)
        with self.engine.begin() as db:  # one transaction: the file is there whole, or not at all
            db.execute(insert(files).values(**row))
        return {k: row[k] for k in FILE_FIELDS}

    def file(self, tenant: str, file_id: str, content: bool = False) -> dict | None:
        columns = [files.c[k] for k in FILE_FIELDS] + ([files.c.content] if content else [])
        with self.engine.connect() as db:
            found = db.execute(select(*columns).where(files.c.id == file_id, files.c.tenant == tenant)).first()
        return dict(found._mapping) if found is not None else None

    def files(self, tenant: str, purpose: str | None = None) -> list[dict]:
        query = select(*[files.c[k] for k in FILE_FIELDS]).where(files.c.tenant == tenant)
        if purpose is not None:
            query = query.where(files.c.purpose == purpose)
        with self.engine.connect() as db:
            return [dict(r._mapping) for r in db.execute(query.order_by(files.c.created_at.desc(), files.c.id))]

    def tenant_bytes(self, tenant: str) -> int:

        with self.engine.connect() as db:
            return int(
                db.execute(
                    select(func.coalesce(func.sum(files.c.bytes), 0)).where(files.c.tenant == tenant)
                ).scalar_one()
            )

    def delete_file(self, tenant: str, file_id: str) -> bool:
        with self.engine.begin() as db:
            return db.execute(delete(files).where(files.c.id == file_id, files.c.tenant == tenant)).rowcount > 0

    # fine-tuning jobs: what requests ask

    def add_job(self, job: dict) -> dict:
        with self.engine.begin() as db:
            db.execute(insert(jobs).values(**job, attempts=0))
        return self.job(job["tenant"], job["id"])  # type: ignore[return-value]

    def job(self, tenant: str | None, job_id: str) -> dict | None:
        """The job, if `tenant` (None: the administrator, any tenant) holds it."""
        query = select(jobs).where(jobs.c.id == job_id)
        if tenant is not None:
            query = query.where(jobs.c.tenant == tenant)
        with self.engine.connect() as db:
            found = db.execute(query).first()
        return dict(found._mapping) if found is not None else None

    def page(self, table: Table, where, after: str | None, limit: int) -> tuple[list[dict], bool] | None:
        """Rows newest first, after the row with id `after` (None if `after` is not among them),
        and whether more follow."""
        query = select(table).where(where)
        with self.engine.connect() as db:
            if after is not None:
                seq = db.execute(select(table.c.seq).where(where, table.c.id == after)).scalar()
                if seq is None:
                    return None
                query = query.where(table.c.seq < seq)
            rows = [dict(r._mapping) for r in db.execute(query.order_by(table.c.seq.desc()).limit(limit + 1))]
        return rows[:limit], len(rows) > limit

    def jobs_page(self, tenant: str | None, after: str | None, limit: int):
        return self.page(jobs, jobs.c.tenant == tenant if tenant is not None else jobs.c.seq > 0, after, limit)

    def events_page(self, job_id: str, after: str | None, limit: int):
        return self.page(events, events.c.job_id == job_id, after, limit)

    def checkpoints_page(self, job_id: str, after: str | None, limit: int):
        return self.page(checkpoints, checkpoints.c.job_id == job_id, after, limit)

    def waiting_jobs(self, tenant: str) -> int:
        with self.engine.connect() as db:
            return db.execute(
                select(func.count()).where(jobs.c.tenant == tenant, jobs.c.status.in_(("validating_files", "queued")))
            ).scalar_one()

    def set_status(self, job_id: str, status: str, was: tuple[str, ...], **values) -> bool:
        """Move the job to `status` if it is in one of `was`; whether it moved."""
        with self.engine.begin() as db:
            query = update(jobs).where(jobs.c.id == job_id, jobs.c.status.in_(was))
            return db.execute(query.values(status=status, **values)).rowcount > 0

    def add_event(self, job_id: str, message: str, level: str = "info", kind: str = "message", data=None) -> None:
        with self.engine.begin() as db:
            db.execute(event_insert(job_id, message, level, kind, data))

    # fine-tuning jobs: what training processes do

    def claim(self, worker: str, limit: int, lease: float, model: str) -> list[dict]:
        """Up to `limit` jobs of base `model` for `worker`: queued ones, oldest first, and running
        ones whose process stopped renewing its heartbeat `lease` seconds ago."""
        if limit < 1:
            return []
        now = time.time()
        claimable = and_(
            jobs.c.model == model,
            or_(jobs.c.status == "queued", and_(jobs.c.status == "running", jobs.c.heartbeat < now - lease)),
        )
        chosen = select(jobs.c.seq).where(claimable).order_by(jobs.c.seq).limit(limit)
        chosen = chosen.with_for_update(skip_locked=True)
        token = f"{worker}/{secrets.token_hex(8)}"  # this claim's rows, whatever else `worker` holds
        with self.engine.begin() as db:
            db.execute(
                update(jobs)
                .where(jobs.c.seq.in_(chosen), claimable)
                .values(
                    status="running",
                    worker=token,
                    heartbeat=now,
                    started_at=func.coalesce(jobs.c.started_at, int(now)),
                    attempts=jobs.c.attempts + 1,
                )
            )
            claimed = [dict(r._mapping) for r in db.execute(select(jobs).where(jobs.c.worker == token))]
            if claimed:
                db.execute(update(jobs).where(jobs.c.worker == token).values(worker=worker))
        for job in claimed:
            job["worker"] = worker
        return claimed

    def renew(self, worker: str) -> set[str]:
        """The heartbeat of every job `worker` holds, renewed; their ids (a job cancelled, or
        claimed by another process after a lapse, is no longer among them)."""
        with self.engine.begin() as db:
            held = and_(jobs.c.worker == worker, jobs.c.status == "running")
            db.execute(update(jobs).where(held).values(heartbeat=time.time()))
            return set(db.execute(select(jobs.c.id).where(held)).scalars())

    def progress(self, worker: str, job_id: str, trained_tokens: int) -> bool:
        with self.engine.begin() as db:
            mine = and_(jobs.c.id == job_id, jobs.c.worker == worker, jobs.c.status == "running")
            return db.execute(update(jobs).where(mine).values(trained_tokens=trained_tokens)).rowcount > 0

    def add_checkpoint(self, job_id: str, step: int, metrics: dict) -> None:
        row = dict(id=new_id("ftckpt"), job_id=job_id, step=step, created_at=int(time.time()))
        with self.engine.begin() as db:
            db.execute(insert(checkpoints).values(**row, metrics=json.dumps(metrics)))

    def succeed(self, worker: str, job: dict, name: str, adapter: tuple[bytes, str], trained_tokens: int) -> bool:
        """The job succeeded: its model stored and named and the events said, in one transaction
        (or not at all, if `worker` no longer holds it)."""
        now = int(time.time())
        with self.engine.begin() as db:
            mine = and_(jobs.c.id == job["id"], jobs.c.worker == worker, jobs.c.status == "running")
            done = (
                update(jobs)
                .where(mine)
                .values(status="succeeded", finished_at=now, fine_tuned_model=name, trained_tokens=trained_tokens)
            )
            if db.execute(done).rowcount == 0:
                return False
            db.execute(
                insert(models).values(
                    name=name,
                    job_id=job["id"],
                    tenant=job["tenant"],
                    created_at=now,
                    tensors=adapter[0],
                    config=adapter[1],
                )
            )
            db.execute(event_insert(job["id"], f"New fine-tuned model created: {name}"))
            db.execute(event_insert(job["id"], "The job has successfully completed"))
        return True

    def fail(self, worker: str, job_id: str, code: str, message: str) -> bool:
        """A running job that `worker` holds failed: its error and its event, in one transaction
        (or nothing, if `worker` no longer holds it)."""
        error = json.dumps({"code": code, "message": message, "param": None})
        with self.engine.begin() as db:
            mine = and_(jobs.c.id == job_id, jobs.c.worker == worker, jobs.c.status == "running")
            query = update(jobs).where(mine).values(status="failed", finished_at=int(time.time()), error=error)
            if db.execute(query).rowcount == 0:
                return False
            db.execute(event_insert(job_id, f"Fine-tuning job failed: {message}", level="error"))
        return True

    def held_by(self, worker: str) -> list[str]:
        with self.engine.connect() as db:
            return list(
                db.execute(select(jobs.c.id).where(jobs.c.worker == worker, jobs.c.status == "running")).scalars()
            )

    # fine-tuned models: what servers register

    def models_after(self, seq: int) -> list[dict]:
        with self.engine.connect() as db:
            return [
                dict(r._mapping) for r in db.execute(select(models).where(models.c.seq > seq).order_by(models.c.seq))
            ]


def event_insert(job_id: str, message: str, level: str = "info", kind: str = "message", data=None):
    """The INSERT of one event of a job."""
    row = dict(id=new_id("ftevent"), job_id=job_id, created_at=int(time.time()), level=level, message=message)
    return insert(events).values(**row, type=kind, data=json.dumps(data) if data is not None else None)


def write_ahead_log(connection, _record) -> None:
    """SQLite in WAL mode: readers (requests) never wait for the writer (a training step's progress)."""
    cursor = connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.close()


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "(an unreadable URL)"


def stored_options(row) -> dict:
    """A job's `tiedlora train` options as stored, under today's names."""
    return renamed(json.loads(row["options"]))
