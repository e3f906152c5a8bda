"""The HTTP layer: a FastAPI app with OpenAI's /v1/models, /v1/completions and
/v1/chat/completions, /v1/adapters (and vLLM's /v1/load_lora_adapter) to load and unload
adapters at run time, and /metrics. Requests are checked here and become engine requests; every
refusal is OpenAI's error body naming the field. Prompts are tokenised on a thread of their
own, never on the event loop, and request bodies are capped, so no request stalls the others.
Handlers read the adapter registry only through its immutable snapshot (`Engine.view`), and send
every registration to the engine's worker, awaiting its answer: nothing here takes a lock or
waits for a decode step."""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from jinja2 import TemplateError
from starlette.exceptions import HTTPException

from ..adapter_file import read_adapter
from ..config import TiedLoraError
from ..runs import adapter_folder
from ..tokens import chat_ids
from . import engine
from .batch import Sampling
from .config import ServeConfig
from .engine import Done, Engine, Event, Failed
from .keys import ADMIN, Caller, Keys
from .registry import Full, Taken, check_name
from .schemas import (
    AdapterBody,
    ApiError,
    ChatBody,
    CompletionBody,
    LoraBody,
    Options,
    Reply,
    error_body,
    model_card,
    sse,
)

MAX_STOP_CHARS = 1000
MAX_CHOICES = 64  # rows one request may ask for: n times its prompts


@dataclass
class Served:
    """What the handlers share: the engine, the base model's name in requests, the adapters root
    (adapters load by path relative to it, never outside), its context length and the limits."""

    engine: Engine
    tokenizer: Any  # a transformers tokenizer
    model_name: str
    root: Path
    context: int | None = None  # the base model's max_position_embeddings
    config: ServeConfig = field(default_factory=ServeConfig)  # the limits: max_prompt_tokens, ...
    keys: Keys | None = None  # None: open to anyone who reaches the port
    refresh: Any = None  # the fine-tuning service's: registers, blocking, the models its jobs made since
    started: int = field(default_factory=lambda: int(time.time()))
    tokenizing: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(1, thread_name_prefix="tiedlora-tokenize")
    )

    def public(self, text: str) -> str:
        """`text` as a client may read it: the server's own folders (the base model's, the adapters root, the
        state) named by what they are, never by their path."""
        places = {self.config.model: self.model_name, str(self.root): "<adapters>"}
        if self.config.state is not None:
            places[self.config.state] = "<state>"
        paths: dict[str, str] = {}
        for where, label in places.items():
            if where and Path(where).exists():
                paths |= {str(Path(where).resolve()): label, where: label}
        for path in sorted(paths, key=len, reverse=True):
            text = text.replace(path, paths[path])
        return text

    async def off_loop(self, work, *args):
        """Run `work` on the tokenizing thread: long prompts never hold up the event loop."""
        return await asyncio.get_running_loop().run_in_executor(self.tokenizing, work, *args)

    async def known(self, name: str | None = None) -> None:
        """A model made by a fine-tuning job that just succeeded serves its first request: a
        name not registered (or, without one, a listing) has the service register what is new."""
        if self.refresh is not None and (
            name is None or name != self.model_name and name not in self.engine.view.folders
        ):
            await asyncio.get_running_loop().run_in_executor(None, self.refresh)


def served(request: Request) -> Served:
    return request.app.state.served


ServedBy = Annotated[Served, Depends(served)]  # how a handler receives the shared state


def caller(request: Request) -> Caller:
    return request.state.caller  # set by Authorize before any handler runs


CallerBy = Annotated[Caller, Depends(caller)]


def administrator(who: CallerBy) -> None:
    """Changing what is served, and the server's metrics, are the administrator's."""
    if not who.admin:
        raise ApiError(403, "This endpoint needs the administrator's key (--api_key); a tenant's key cannot use it.")


AdminOnly = [Depends(administrator)]
router = APIRouter()


def check_options(
    s: Served, who: Caller, body: Options, prompts: list[list[int]], max_tokens: int | None, scoring: bool = False
) -> Sampling:
    """The sampling options of a request, every option checked first, the prompts against the
    model's context; `scoring` (echo with logprobs) allows max_tokens 0, the prompt scored alone."""
    if (name := body.unsupported()) is not None:
        raise ApiError(
            400,
            f"{name} is not supported by this server (it would change the output and is not implemented); "
            "leave it out or at its neutral value.",
            name,
        )
    view = s.engine.view
    if body.model != s.model_name and (body.model not in view.folders or not who.sees(body.model, s.model_name)):
        why = view.refused.get(body.model) if who.sees(body.model, s.model_name) else None
        raise ApiError(
            404,
            f"Adapter {body.model!r} was refused: {why}"
            if why
            else f"Model {body.model!r} is neither the base model {s.model_name!r} nor a registered adapter; "
            "GET /v1/models lists them.",
            "model",
        )
    max_tokens = 16 if max_tokens is None else max_tokens
    limit = s.config.max_tokens_limit
    least = 0 if scoring else 1
    if not least <= max_tokens <= limit:
        why = "" if scoring else " (0, the prompt scored alone, with echo and logprobs)"
        raise ApiError(400, f"max_tokens is {max_tokens}; it must be between {least} and {limit}{why}.", "max_tokens")
    if not 1 <= body.n or body.n * len(prompts) > MAX_CHOICES:
        raise ApiError(400, f"n is {body.n}; n times the prompts ({len(prompts)}) must be 1 to {MAX_CHOICES}.", "n")
    for ids in prompts:
        if not ids:
            raise ApiError(400, "The prompt is empty; send some text.", "prompt")
        if len(ids) > s.config.max_prompt_tokens:
            raise ApiError(
                400,
                f"The prompt is {len(ids)} tokens, more than this server's limit of {s.config.max_prompt_tokens}; "
                "shorten it.",
                "prompt",
            )
        if s.context is not None and len(ids) + max_tokens > s.context:
            raise ApiError(
                400,
                f"The prompt ({len(ids)} tokens) and max_tokens ({max_tokens}) exceed the model's context of "
                f"{s.context} tokens; shorten the prompt or ask for fewer tokens.",
                "prompt",
            )
        if min(ids) < 0 or max(ids) >= len(s.tokenizer):
            raise ApiError(400, f"The prompt's token ids must be between 0 and {len(s.tokenizer) - 1}.", "prompt")
    temperature = 0.0 if body.temperature is None else body.temperature
    if not 0 <= temperature <= 2:
        raise ApiError(400, f"temperature is {temperature}; it must be between 0 (greedy) and 2.", "temperature")
    top_p = 1.0 if body.top_p is None else body.top_p
    if not 0 < top_p <= 1:
        raise ApiError(400, f"top_p is {top_p}; it must be in (0, 1].", "top_p")
    if body.seed is not None and not 0 <= body.seed < 2**63:
        raise ApiError(400, f"seed is {body.seed}; it must be between 0 and 2**63 - 1.", "seed")
    stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
    if len(stop) > 4 or not all(0 < len(s) <= MAX_STOP_CHARS for s in stop):
        raise ApiError(
            400, f"stop: give at most 4 strings of 1 to {MAX_STOP_CHARS} characters, not {str(body.stop)[:60]}.", "stop"
        )
    return Sampling(max_tokens, temperature, top_p, stop, body.seed)


def adapter_of(s: Served, body: Options) -> str | None:
    return None if body.model == s.model_name else body.model


class Answer:
    """The choices of one request as their events arrive, for the streamed reply and the whole one
    alike: each choice's text (its echoed prompt first), logprobs and finish reason, and the
    tokens generated."""

    def __init__(self, choices: int, echo: list[str]):
        self.prefix = dict(enumerate(echo))  # what goes before each choice's text: its prompt, with echo
        self.texts = [""] * choices
        self.logprobs: list[list] = [[] for _ in range(choices)]
        self.finishes: dict[int, str] = {}
        self.tokens = 0

    def add(self, event: Event) -> str:
        """Take one event; the text it adds to its choice. A failure is raised as its ApiError."""
        if isinstance(event, Failed):
            raise ApiError(event.status, event.message)
        text = self.prefix.pop(event.index, "") + event.delta
        self.texts[event.index] += text
        self.logprobs[event.index].extend(event.logprobs)
        if isinstance(event, Done):
            self.finishes[event.index], self.tokens = event.finish, self.tokens + event.tokens
        return text

    @property
    def complete(self) -> bool:
        return len(self.finishes) == len(self.texts)


async def respond(
    s: Served, request: Request, generation: engine.Request, body: Options, reply: Reply, echo: list[str]
):
    """The completion as JSON, or as server-sent events; a worker error before the first token
    is still an error response. Decoding stops as soon as the client goes away, streamed or not."""
    s.engine.submit(generation)
    answer = Answer(len(generation.rows), echo)
    try:
        event = await generation.events.get()
        if isinstance(event, Failed):
            raise ApiError(event.status, event.message)
    except BaseException:
        generation.cancel()
        raise

    async def stream(event: Event):
        try:
            while not isinstance(event, Failed):
                text = answer.add(event)
                finish = event.finish if isinstance(event, Done) else None
                yield reply.chunk([reply.choice(event.index, text, finish, event.logprobs, True)])
                if answer.complete:
                    break
                event = await generation.events.get()
            if isinstance(event, Failed):
                yield sse(error_body(event.status, s.public(event.message)))
            elif body.stream_options is not None and body.stream_options.include_usage:
                yield reply.chunk([], answer.tokens)
            yield "data: [DONE]\n\n"
        finally:
            generation.cancel()

    if body.stream:
        return StreamingResponse(stream(event), media_type="text/event-stream")
    watcher = asyncio.create_task(cancel_when_gone(request, generation))
    try:
        answer.add(event)
        while not answer.complete:
            answer.add(await generation.events.get())
    finally:
        watcher.cancel()
        generation.cancel()
    choices = [
        reply.choice(i, answer.texts[i], answer.finishes[i], answer.logprobs[i], False)
        for i in range(len(generation.rows))
    ]
    return reply.whole(choices, answer.tokens)


async def cancel_when_gone(request: Request, generation: engine.Request) -> None:
    """Wait for the client to disconnect (the body is read, so the next message says so)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    generation.cancel()


@router.get("/v1/models")
async def models(s: ServedBy, who: CallerBy):
    await s.known()
    cards = [model_card(s.model_name, s.started)]
    mine = [n for n in s.engine.adapters if who.sees(n, s.model_name)]
    return {"object": "list", "data": cards + [model_card(n, s.started, s.model_name) for n in mine]}


@router.get("/v1/models/{name:path}")
async def model(name: str, s: ServedBy, who: CallerBy):
    await s.known(name)
    if name == s.model_name:
        return model_card(name, s.started)
    if name in s.engine.view.folders and who.sees(name, s.model_name):
        return model_card(name, s.started, s.model_name)
    raise ApiError(404, f"The model {name!r} does not exist; GET /v1/models lists them.", "model")


def encode_prompts(s: Served, prompt) -> list[list[int]]:
    if isinstance(prompt, str):
        return [s.tokenizer(prompt)["input_ids"]]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [list(prompt)]
    if not prompt:
        raise ApiError(400, "The prompt is an empty list; send text or token ids.", "prompt")
    return [s.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p) for p in prompt]


@router.post("/v1/completions")
async def completions(body: CompletionBody, request: Request, s: ServedBy, who: CallerBy):
    if body.logprobs is not None and not 0 <= body.logprobs <= 20:
        raise ApiError(400, f"logprobs is {body.logprobs}; it must be between 0 and 20.", "logprobs")
    scoring = body.echo and body.logprobs is not None  # the prompt's logprobs too, as evaluation clients ask
    prompts = await s.off_loop(encode_prompts, s, body.prompt)
    await s.known(body.model)
    sampling = check_options(s, who, body, prompts, body.max_tokens, scoring)
    sampling.logprobs, sampling.prompt_logprobs = body.logprobs, scoring
    generation = engine.Request.of(body.model, adapter_of(s, body), prompts, sampling, body.n)
    echo = []
    if body.echo:
        texts = [s.tokenizer.decode(ids, skip_special_tokens=True) for ids in prompts]
        echo = [texts[i // body.n] for i in range(len(generation.rows))]
    reply = Reply(body.model, False, sum(map(len, prompts)), s.tokenizer, body.logprobs is not None)
    return await respond(s, request, generation, body, reply, echo)


def encode_chat(s: Served, body: ChatBody) -> list[int]:
    try:
        # OpenAI's developer messages are its newer models' system messages; templates know "system"
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    except ValueError as e:
        raise ApiError(400, f"messages: {e}.", "messages") from None
    try:
        return chat_ids(s.tokenizer, messages)
    except TemplateError as e:
        raise ApiError(
            400, f"The chat template refused these messages ({e}); check their roles and order.", "messages"
        ) from None


@router.post("/v1/chat/completions")
async def chat_completions(body: ChatBody, request: Request, s: ServedBy, who: CallerBy):
    if not body.messages:
        raise ApiError(400, "messages is empty; send at least one {role, content}.", "messages")
    if not getattr(s.tokenizer, "chat_template", None):
        raise ApiError(
            400,
            f"The base model's tokenizer has no chat template; use /v1/completions with model {s.model_name!r}.",
            "messages",
        )
    top = body.top_logprobs
    if top is not None and (not body.logprobs or not 0 <= top <= 20):
        raise ApiError(400, f"top_logprobs is {top}; it must be 0 to 20, with logprobs true.", "top_logprobs")
    ids = await s.off_loop(encode_chat, s, body)
    await s.known(body.model)
    wanted = body.max_tokens if body.max_completion_tokens is None else body.max_completion_tokens
    sampling = check_options(s, who, body, [ids], wanted)
    sampling.logprobs = (top or 0) if body.logprobs else None
    generation = engine.Request.of(body.model, adapter_of(s, body), [ids], sampling, body.n)
    return await respond(
        s, request, generation, body, Reply(body.model, True, len(ids), s.tokenizer, body.logprobs), []
    )


async def on_worker(s: Served, change):
    """Run `change()` on the engine's worker between two steps, awaiting it without blocking the loop."""
    return await asyncio.wrap_future(s.engine.change(change))


def taken(name: str) -> ApiError:
    return ApiError(
        409,
        f"The name {name!r} is taken (the base model or a registered adapter); "
        f"DELETE /v1/adapters/{name} first or pick another name.",
        "name",
    )


async def register(s: Served, name: str, path: str, pin: bool) -> None:
    """Check the adapter now (off the event loop) and have the worker register it, loaded; or refuse it."""
    try:
        check_name(name)
    except TiedLoraError as e:
        raise ApiError(400, str(e), "name") from None
    if name == s.model_name or name in s.engine.view.folders:
        raise taken(name)

    def read():
        folder = adapter_folder(s.root, path)
        adapter = read_adapter(folder)
        s.engine.multi.check(adapter)
        return folder, adapter

    try:
        folder, adapter = await s.off_loop(read)
        await on_worker(s, lambda: s.engine.registry.register(name, folder, adapter, pin))
    except Taken:  # registered meanwhile, by another request
        raise taken(name) from None
    except TiedLoraError as e:
        raise ApiError(400, str(e), "path") from None
    except Full:
        raise ApiError(
            503, "Every resident adapter is pinned or in use; retry, or serve with a larger --max_resident."
        ) from None


@router.post("/v1/adapters", dependencies=AdminOnly)
async def load_adapter(body: AdapterBody, s: ServedBy):
    await register(s, body.name, body.path, body.pin)
    return model_card(body.name, int(time.time()), s.model_name)


async def unregister(s: Served, name: str) -> None:
    try:
        await on_worker(s, lambda: s.engine.registry.unregister(name))
    except TiedLoraError as e:
        raise ApiError(404, str(e), "name") from None


@router.delete("/v1/adapters/{name:path}", dependencies=AdminOnly)
async def unload_adapter(name: str, s: ServedBy):
    await unregister(s, name)
    return {"id": name, "object": "model", "deleted": True}


@router.post("/v1/load_lora_adapter", dependencies=AdminOnly)
async def load_lora_adapter(body: LoraBody, s: ServedBy):
    """vLLM's endpoint, so clients written for vLLM work; lora_path may be absolute inside the root."""
    if body.lora_path is None:
        raise ApiError(400, "lora_path is required: the adapter's folder under the adapters root.", "lora_path")
    await register(s, body.lora_name, body.lora_path, False)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", dependencies=AdminOnly)
async def unload_lora_adapter(body: LoraBody, s: ServedBy):
    await unregister(s, body.lora_name)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


@router.get("/health")
def health(s: ServedBy):
    """200 while the engine's worker runs; 503 while it is down (its supervisor restarts it)."""
    if not s.engine.healthy:
        raise ApiError(503, "The engine's worker is not running; it is being restarted.")
    return {"status": "ok"}


@router.get("/metrics", dependencies=AdminOnly)
def metrics(s: ServedBy):
    return Response(s.engine.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")


OPEN_PATHS = ("/health",)  # for load balancers: says nothing but whether the worker runs


class Authorize:
    """Every request's caller, from its key, before anything else runs (the body is not even
    read): a request without a known key is a 401 in OpenAI's shape, and names no key."""

    def __init__(self, app, served: Served):
        self.app, self.served = app, served

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        keys = self.served.keys
        who: Caller | None = ADMIN
        if keys is not None and scope["path"] not in OPEN_PATHS:
            sent = [v for k, v in scope["headers"] if k == b"authorization"]
            if len(sent) > 1:  # a proxy checking the first and this server the last would disagree on who asks
                body = error_body(400, "Send one Authorization header, not several.")
                return await JSONResponse(body, status_code=400)(scope, receive, send)
            who = keys.caller(sent[0].decode("latin-1") if sent else "")
        if who is None:
            body = error_body(401, "Missing or incorrect API key: send it as the header Authorization: Bearer KEY.")
            body["error"]["code"] = "invalid_api_key"
            return await JSONResponse(body, status_code=401)(scope, receive, send)
        scope.setdefault("state", {})["caller"] = who
        await self.app(scope, receive, send)


class TooLarge(HTTPException):
    """Raised while the body is read; FastAPI passes HTTP exceptions through to their handler."""


class BodyLimit:
    """Refuse request bodies over the server's max_request_bytes with a 413, by their
    Content-Length or, sent in chunks, as soon as they pass it, before they are parsed or held
    in memory."""

    def __init__(self, app, served: Served):
        self.app, self.served = app, served

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        config = self.served.config
        # an upload's body is the file and a few hundred bytes of multipart framing
        limit = config.max_file_bytes + 65536 if scope["path"] == "/v1/files" else config.max_request_bytes
        message = f"The request body is larger than this server's limit of {limit:,} bytes; send less."
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await JSONResponse(error_body(413, message), status_code=413)(scope, receive, send)
        seen = 0

        async def limited():
            nonlocal seen
            event = await receive()
            seen += len(event.get("body", b""))
            if seen > limit:
                raise TooLarge(413, message)
            return event

        await self.app(scope, limited, send)


async def api_error(request: Request, e: Exception):
    assert isinstance(e, ApiError)
    message = served(request).public(e.message)
    return JSONResponse(error_body(e.status, message, e.param), status_code=e.status)


async def invalid_request(request: Request, e: Exception):
    """pydantic's complaints, in OpenAI's error shape: the first field named as `param` (without
    the union member pydantic tried, as in prompt.str)."""
    assert isinstance(e, RequestValidationError)
    errors = e.errors()
    if errors[0]["type"] == "json_invalid":
        return await api_error(
            request,
            ApiError(400, f"The request body is not valid JSON ({errors[0]['ctx']['error']}); send a JSON object."),
        )
    kinds = {"str", "int", "list[str]", "list[int]", "list[list[int]]", "list[dict[str,any]]"}
    kinds.add("function-after[valid_unicode(), str]")
    where = [".".join(str(p) for p in err["loc"][1:] if str(p).lower() not in kinds) or "body" for err in errors]
    problems = "; ".join(f"{w}: {err['msg']}" for w, err in zip(where, errors))
    return await api_error(request, ApiError(400, f"Invalid request: {problems}.", where[0]))


async def http_error(request: Request, e: Exception):
    assert isinstance(e, HTTPException)
    return await api_error(request, ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}."))


def create_app(served: Served) -> FastAPI:
    app = FastAPI(title="tiedlora serve")
    app.state.served = served
    app.include_router(router)
    app.add_middleware(BodyLimit, served=served)
    app.add_middleware(Authorize, served=served)  # added last, so it runs first
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(RequestValidationError, invalid_request)
    app.add_exception_handler(HTTPException, http_error)
    return app
