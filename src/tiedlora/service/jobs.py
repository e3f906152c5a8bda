"""OpenAI's fine-tuning API (`/v1/fine_tuning/jobs`): a tenant starts a job on one of its
uploaded files, follows it (status, events, checkpoints), cancels it; a training process beside
the server (`worker`) runs it, and when it succeeds its adapter serves as `fine_tuned_model`.

A job's hyperparameters become `tiedlora train` options here, once, and are stored with it, so
a job resumed by another process trains with exactly the options it started with.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from ..config import TiedLoraError
from ..serve.app import CallerBy, ServedBy
from ..serve.schemas import ApiError
from ..tasks.own import held_out
from ..train import TrainConfig
from ..train.auto import job_options
from ..train.config import DEFAULT_TARGETS
from .files import StoreBy, checked_rows, owner
from .store import ENDED, Store, new_id, stored_options

router = APIRouter()

SUFFIX = re.compile(r"[A-Za-z0-9_-]{1,64}")


class Hyperparameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_epochs: int | Literal["auto"] = "auto"
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")
    hyperparameters: Hyperparameters | None = None


class Method(BaseModel):
    model_config = ConfigDict(extra="forbid")
    type: str = "supervised"
    supervised: Supervised | None = None


class Adapter(BaseModel):
    """tiedlora's own choice, in the request's extra body: which point of the Tied-LoRA space."""

    model_config = ConfigDict(extra="forbid")
    config: str = "tl6"
    rank: int = 8
    targets: list[str] = Field(default_factory=lambda: list(DEFAULT_TARGETS))


class JobBody(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is a 400, as OpenAI answers, never ignored
    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = None
    seed: int | None = None
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    adapter: Adapter | None = None
    metadata: dict[str, str] | None = None
    integrations: list[Any] | None = None


def usable_file(db: Store, tenant: str, file_id: str, param: str, content: bool = False) -> dict:
    """The tenant's fine-tune file (with its content, if asked); another tenant's is, as a
    missing one, not found."""
    row = db.file(tenant, file_id, content)
    if row is None:
        raise ApiError(400, f"{param} {file_id!r}: no such file; upload it with POST /v1/files first.", param)
    if row["purpose"] != "fine-tune":
        raise ApiError(400, f"{param} {file_id!r} was uploaded for {row['purpose']!r}, not fine-tune.", param)
    return row


def hyperparameters_of(body: JobBody) -> Hyperparameters:
    if body.method is not None:
        if body.method.type != "supervised":
            raise ApiError(
                400,
                f"method.type {body.method.type!r} is not available here: this server fine-tunes with supervised "
                "training only.",
                "method.type",
            )
        if body.hyperparameters is not None and body.method.supervised is not None:
            raise ApiError(400, "Give hyperparameters once: in method.supervised or at the top, not both.", "method")
        if body.method.supervised is not None and body.method.supervised.hyperparameters is not None:
            return body.method.supervised.hyperparameters
    return body.hyperparameters or Hyperparameters()


def train_options(body: JobBody, train_rows: int, max_rank: int) -> tuple[dict, dict]:
    """(the hyperparameters as the job reports them, the job's `tiedlora train` options), each
    checked; `train_rows`: the rows it trains on (its validation's held out). `auto` takes the
    trainer's (`train.auto`): epochs and batch size by the rows, the learning rate tuned for the
    configuration and rank, which a multiplier scales."""
    given = hyperparameters_of(body)
    adapter = body.adapter or Adapter()
    if not 1 <= adapter.rank <= max_rank:
        raise ApiError(
            400, f"adapter.rank is {adapter.rank}; this server serves ranks 1 to {max_rank}.", "adapter.rank"
        )
    n_epochs = None if given.n_epochs == "auto" else given.n_epochs
    if n_epochs is not None and not 1 <= n_epochs <= 50:
        raise ApiError(400, f"n_epochs is {n_epochs}; it must be 1 to 50 (or auto).", "hyperparameters.n_epochs")
    batch = None if given.batch_size == "auto" else given.batch_size
    if batch is not None and not 1 <= batch <= 256:
        raise ApiError(400, f"batch_size is {batch}; it must be 1 to 256 (or auto).", "hyperparameters.batch_size")
    options: dict[str, Any] = job_options(train_rows, adapter.config, adapter.rank, n_epochs, batch)
    multiplier = given.learning_rate_multiplier
    multiplier = 1.0 if multiplier == "auto" else multiplier
    if not 0 < multiplier <= 10 or not math.isfinite(multiplier):
        raise ApiError(
            400,
            f"learning_rate_multiplier is {multiplier}; it must be above 0 and at most 10 (or auto).",
            "hyperparameters.learning_rate_multiplier",
        )
    options.update(lr=options["lr"] * multiplier, targets=adapter.targets, samples=0, seed=body.seed)
    try:
        TrainConfig(**options, data="unchecked.jsonl")  # every option checked now, not in the worker
    except TiedLoraError as e:
        message = str(e).replace("--config", "adapter.config").replace("--", "")
        raise ApiError(400, message, "adapter.targets" if "targets" in message else "adapter") from None
    shown = dict(n_epochs=options["epochs"], batch_size=options["batch_size"], learning_rate_multiplier=multiplier)
    return shown, options


def job_object(row: dict) -> dict:
    hyperparameters = json.loads(row["hyperparameters"])
    return {
        "object": "fine_tuning.job",
        "id": row["id"],
        "model": row["model"],
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
        "fine_tuned_model": row["fine_tuned_model"],
        "organization_id": row["tenant"] or "admin",
        "result_files": [],
        "status": row["status"],
        "validation_file": row["validation_file"],
        "training_file": row["training_file"],
        "hyperparameters": hyperparameters,
        "trained_tokens": row["trained_tokens"],
        "error": json.loads(row["error"]) if row["error"] else None,
        "user_provided_suffix": row["suffix"],
        "seed": row["seed"],
        "estimated_finish": None,
        "integrations": [],
        "metadata": None,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "adapter": adapter_shown(stored_options(row)),
    }


def adapter_shown(options: dict) -> dict:
    """The job's `adapter` as the API takes it: its configuration's preset, rank and targets."""
    return {"config": options["preset"], "rank": options["rank"], "targets": options.get("targets")}


@router.post("/v1/fine_tuning/jobs")
def create_job(body: JobBody, s: ServedBy, who: CallerBy, db: StoreBy):
    tenant = owner(who)
    if body.model != s.model_name:
        raise ApiError(
            400, f"Model {body.model!r} cannot be fine-tuned here; this server fine-tunes {s.model_name!r}.", "model"
        )
    if body.suffix is not None and not SUFFIX.fullmatch(body.suffix):
        raise ApiError(400, "suffix must be 1 to 64 letters, digits, '_' or '-'.", "suffix")
    if body.seed is not None and not 0 <= body.seed < 2**31:
        raise ApiError(400, f"seed is {body.seed}; it must be between 0 and 2**31 - 1.", "seed")
    # without a validation file its content is read: the rows held out for validation are counted
    training = usable_file(db, tenant, body.training_file, "training_file", content=body.validation_file is None)
    train_rows = training["rows"]
    if body.validation_file is not None:
        usable_file(db, tenant, body.validation_file, "validation_file")
    else:  # about one row in ten is held out for validation, by each row's hash: none, or all, cannot train
        held = sum(map(held_out, checked_rows(training["content"], body.training_file)))
        if held in (0, train_rows):
            raise ApiError(
                400,
                f"training_file {body.training_file!r}: {'none' if held == 0 else 'every one'} of its {train_rows} "
                "rows falls in the tenth held out for validation (chosen by each row's hash); upload more rows, "
                "or give a validation_file.",
                "validation_file",
            )
        train_rows -= held
    body.seed = secrets.randbelow(2**31) if body.seed is None else body.seed
    shown, options = train_options(body, train_rows, s.config.max_rank)
    limit = s.config.max_queued_jobs
    if db.waiting_jobs(tenant) >= limit:
        raise ApiError(429, f"You have {limit} jobs waiting, this server's limit per tenant; wait for one to start.")
    row: dict[str, Any] = dict(id=new_id("ftjob"), tenant=tenant, model=body.model, training_file=body.training_file)
    row.update(validation_file=body.validation_file, suffix=body.suffix, seed=body.seed, status="validating_files")
    row.update(hyperparameters=json.dumps(shown), options=json.dumps(options), created_at=int(time.time()))
    db.add_job(row)
    db.add_event(row["id"], "Created fine-tuning job")
    db.add_event(row["id"], f"Validating training file: {body.training_file}")
    # the rows were checked when they were uploaded, the options above: the job waits for a training process
    db.set_status(row["id"], "queued", ("validating_files",))
    db.add_event(row["id"], "Files validated, moving job to queued state")
    return job_object(db.job(tenant, row["id"]))  # type: ignore[arg-type]


def found(db: Store, who, job_id: str) -> dict:
    row = db.job(None if who.admin else owner(who), job_id)
    if row is None:
        raise ApiError(404, f"No such fine-tuning job: {job_id!r}.", "fine_tuning_job_id")
    return row


Limit = Annotated[int, Query(ge=1, le=100)]


def listed(page, after: str | None, what: str, shape) -> dict:
    if page is None:
        raise ApiError(400, f"after {after!r} names no {what} of this list.", "after")
    rows, more = page
    return {"object": "list", "data": [shape(r) for r in rows], "has_more": more}


@router.get("/v1/fine_tuning/jobs")
def list_jobs(who: CallerBy, db: StoreBy, after: str | None = None, limit: Limit = 20):
    return listed(db.jobs_page(None if who.admin else owner(who), after, limit), after, "job", job_object)


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, who: CallerBy, db: StoreBy):
    return job_object(found(db, who, job_id))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, who: CallerBy, db: StoreBy):
    """Cancelled at once; a running job's training process lets it go before its next step."""
    row = found(db, who, job_id)
    if not db.set_status(job_id, "cancelled", ("validating_files", "queued", "running"), finished_at=int(time.time())):
        status = (db.job(None, job_id) or row)["status"]
        if status in ENDED:
            raise ApiError(400, f"Job {job_id} has already {status}; only a job that has not ended can be cancelled.")
    db.add_event(job_id, "Job was cancelled")
    return job_object(found(db, who, job_id))


def event_object(row: dict) -> dict:
    return {
        "object": "fine_tuning.job.event",
        "id": row["id"],
        "created_at": row["created_at"],
        "level": row["level"],
        "message": row["message"],
        "data": json.loads(row["data"]) if row["data"] else {},
        "type": row["type"],
    }


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(job_id: str, who: CallerBy, db: StoreBy, after: str | None = None, limit: Limit = 20):
    found(db, who, job_id)
    return listed(db.events_page(job_id, after, limit), after, "event", event_object)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, who: CallerBy, db: StoreBy, after: str | None = None, limit: Limit = 10):
    job = found(db, who, job_id)

    def shape(row: dict) -> dict:
        return {
            "object": "fine_tuning.job.checkpoint",
            "id": row["id"],
            "created_at": row["created_at"],
            "fine_tuned_model_checkpoint": f"{model_name(job)}:ckpt-step-{row['step']}",
            "step_number": row["step"],
            "metrics": json.loads(row["metrics"]),
            "fine_tuning_job_id": job_id,
        }

    return listed(db.checkpoints_page(job_id, after, limit), after, "checkpoint", shape)


def model_name(job: dict) -> str:
    """OpenAI's name for a fine-tuned model, `ft:<base>:<tenant>:<suffix>:<job id>`; a tenant's
    key sees the names that start `ft:<base>:<tenant>:`."""
    return f"ft:{job['model']}:{job['tenant']}:{job['suffix'] or ''}:{job['id']}"  # the administrator's: tenant ""
