"""The HTTP layer: a FastAPI app with OpenAI's /v1/models, /v1/completions and
/v1/chat/completions, plus /v1/adapters to load and unload adapters at run time. Requests are
checked here and become engine jobs; every refusal is OpenAI's error body naming the field."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from ..config import TiedLoraError
from ..decoding import Sampling, chat_ids
from ..runs import adapter_folder
from .engine import Engine, Job
from .schemas import AdapterBody, ApiError, ChatBody, CompletionBody, Options, Reply, error_body, model_card, sse


@dataclass
class Served:
    """What the handlers share: the engine, the base model's name in requests, the adapters root
    (adapters load by path relative to it, never outside) and the request limits."""

    engine: Engine
    tokenizer: Any  # a transformers tokenizer
    model_name: str
    root: Path
    max_prompt_tokens: int = 2048
    max_tokens_limit: int = 1024
    started: int = field(default_factory=lambda: int(time.time()))


def served(request: Request) -> Served:
    return request.app.state.served


ServedBy = Annotated[Served, Depends(served)]  # how a handler receives the shared state
router = APIRouter()


def job_of(s: Served, body: Options, ids: list[int]) -> Job:
    """The engine job for a request, every option checked first."""
    if body.model != s.model_name and body.model not in s.engine.adapters:
        raise ApiError(
            404,
            f"Model {body.model!r} is neither the base model {s.model_name!r} nor a loaded adapter "
            f"{s.engine.adapters}; GET /v1/models lists them.",
            "model",
        )
    if not ids:
        raise ApiError(400, "The prompt is empty; send some text.", "prompt")
    if len(ids) > s.max_prompt_tokens:
        raise ApiError(
            400,
            f"The prompt is {len(ids)} tokens, more than this server's limit of {s.max_prompt_tokens}; shorten it.",
            "prompt",
        )
    if not 1 <= body.max_tokens <= s.max_tokens_limit:
        raise ApiError(
            400, f"max_tokens is {body.max_tokens}; it must be between 1 and {s.max_tokens_limit}.", "max_tokens"
        )
    if not 0 <= body.temperature <= 2:
        raise ApiError(400, f"temperature is {body.temperature}; it must be between 0 (greedy) and 2.", "temperature")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise ApiError(400, f"seed is {body.seed}; it must be between 0 and 2**63 - 1.", "seed")
    if not 0 < body.top_p <= 1:
        raise ApiError(400, f"top_p is {body.top_p}; it must be in (0, 1].", "top_p")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stop) > 4 or not all(stop):
        raise ApiError(400, f"stop is {body.stop!r}; give at most 4 non-empty strings.", "stop")
    sampling = Sampling(body.max_tokens, body.temperature, body.top_p, stop, body.seed)
    return Job.of(ids, sampling, None if body.model == s.model_name else body.model)


async def respond(s: Served, job: Job, body: Options, chat: bool):
    """The completion as JSON, or as server-sent events; a worker error before the first token
    is still an error response."""
    reply = Reply(body.model, chat, len(job.seq.prompt))
    s.engine.submit(job)
    try:
        event = await job.events.get()
        if event[0] == "error":
            raise ApiError(event[1], event[2])
    except BaseException:
        job.cancel()
        raise

    async def stream(event):
        try:
            while event[0] == "text":
                yield reply.chunk(event[1])
                event = await job.events.get()
            yield reply.chunk("", event[1], event[2]) if event[0] == "done" else sse(error_body(event[1], event[2]))
            yield "data: [DONE]\n\n"
        finally:
            job.cancel()

    if body.stream:
        return StreamingResponse(stream(event), media_type="text/event-stream")
    text = ""
    try:
        while event[0] == "text":
            text += event[1]
            event = await job.events.get()
    finally:
        job.cancel()
    if event[0] == "error":
        raise ApiError(event[1], event[2])
    return reply.whole(text, event[1], event[2])


@router.get("/v1/models")
def models(s: ServedBy):
    return {"object": "list", "data": [model_card(n, s.started) for n in [s.model_name, *s.engine.adapters]]}


@router.post("/v1/completions")
async def completions(body: CompletionBody, s: ServedBy):
    return await respond(s, job_of(s, body, s.tokenizer(body.prompt)["input_ids"]), body, chat=False)


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, s: ServedBy):
    if not body.messages:
        raise ApiError(400, "messages is empty; send at least one {role, content}.", "messages")
    if not getattr(s.tokenizer, "chat_template", None):
        raise ApiError(
            400,
            f"The base model's tokenizer has no chat template; use /v1/completions with model {s.model_name!r}.",
            "messages",
        )
    try:
        ids = chat_ids(s.tokenizer, [m.model_dump() for m in body.messages])
    except TemplateError as e:
        raise ApiError(
            400, f"The chat template refused these messages ({e}); check their roles and order.", "messages"
        ) from None
    return await respond(s, job_of(s, body, ids), body, chat=True)


@router.post("/v1/adapters")
def load_adapter(body: AdapterBody, s: ServedBy):
    if not body.name.strip():
        raise ApiError(400, "The adapter name is empty; name it.", "name")
    if body.name == s.model_name or body.name in s.engine.adapters:
        raise ApiError(
            409,
            f"The name {body.name!r} is taken (the base model or a loaded adapter); "
            f"DELETE /v1/adapters/{body.name} first or pick another name.",
            "name",
        )
    try:
        s.engine.add(body.name, adapter_folder(s.root, body.path))
    except TiedLoraError as e:
        raise ApiError(400, str(e), "path") from None
    return model_card(body.name, int(time.time()))


@router.delete("/v1/adapters/{name:path}")
def unload_adapter(name: str, s: ServedBy):
    try:
        s.engine.remove(name)
    except TiedLoraError as e:
        raise ApiError(404, str(e), "name") from None
    return {"id": name, "object": "model", "deleted": True}


async def api_error(request: Request, e: Exception):
    assert isinstance(e, ApiError)
    return JSONResponse(error_body(e.status, e.message, e.param), status_code=e.status)


async def invalid_request(request: Request, e: Exception):
    """pydantic's complaints, in OpenAI's error shape: the first field named as `param`."""
    assert isinstance(e, RequestValidationError)
    errors = e.errors()
    if errors[0]["type"] == "json_invalid":
        return await api_error(
            request,
            ApiError(400, f"The request body is not valid JSON ({errors[0]['ctx']['error']}); send a JSON object."),
        )
    where = [".".join(str(p) for p in err["loc"][1:]) or "body" for err in errors]
    problems = "; ".join(f"{w}: {err['msg']}" for w, err in zip(where, errors))
    return await api_error(request, ApiError(400, f"Invalid request: {problems}.", where[0]))


async def http_error(request: Request, e: Exception):
    assert isinstance(e, HTTPException)
    return await api_error(request, ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}."))


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="tiedlora serve")
    app.state.served = served
    app.include_router(router)
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    return app
