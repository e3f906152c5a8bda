"""`tiedlora serve`: an OpenAI-compatible HTTP server for many adapters over one base model.

One worker thread owns the model (torch is never used by two threads at once): it takes every
queued request, up to `max_batch`, whatever their adapters, and decodes them together, each row
with its own adapter id, so a hundred adapters cost one base model and one batch. Batching is per
request: a batch runs until its last row ends; requests arriving meanwhile wait for the next one.
Tokens reach the request's asyncio queue as they are produced, for streaming.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

from .config import TiedLoraError
from .evaluate import pad_batch
from .multi import MultiAdapterModel
from .tasks import prompt_ids
from .train import best_adapter


@dataclass
class Job:
    """One request as the worker sees it; `push` is the only way results leave the worker."""

    ids: list[int]
    adapter: str | None  # None: the base model; resolved to an id when its batch starts, so an unload in between is caught
    max_tokens: int
    temperature: float
    top_p: float
    stop: list[str]
    seed: int | None
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue
    cancelled: bool = False  # the client went away: the worker drops the row
    closed: bool = False  # its last event is sent

    def push(self, *event) -> None:
        """("text", delta), then ("done", finish_reason, completion_tokens); or ("error", status, message)."""
        self.closed = event[0] != "text"
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancelled = True


class Row:
    """A job's decoding state: its tokens, its text so far and how much of it was sent."""

    def __init__(self, job: Job, generator: torch.Generator | None):
        self.job, self.generator = job, generator
        self.tokens: list[int] = []
        self.sent = 0
        self.finish: str | None = None


class Engine:
    """The model, its adapters and the worker thread that batches and decodes every request."""

    def __init__(self, multi: MultiAdapterModel, tokenizer, max_batch: int = 32, wait: float = 0.005):
        self.multi, self.tokenizer = multi.eval(), tokenizer
        self.max_batch, self.wait = max_batch, wait
        self.eos = tokenizer.eos_token_id
        self.pad = self.eos if tokenizer.pad_token_id is None else tokenizer.pad_token_id
        self.device = next(multi.parameters()).device
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()  # held by a batch, and by adapter loads: both change what the model computes
        self.batch_sizes: list[int] = []
        self.thread = threading.Thread(target=self._work, name="tiedlora-engine", daemon=True)
        self.thread.start()

    @property
    def adapters(self) -> list[str]:
        return [n for n in self.multi.names if n]

    def add(self, name: str, folder: Path) -> None:
        with self.lock:
            self.multi.add(name, folder)

    def remove(self, name: str) -> None:
        with self.lock:
            self.multi.remove(name)

    def submit(self, job: Job) -> None:
        self.queue.put(job)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()

    def _work(self) -> None:
        while (job := self.queue.get()) is not None:
            with self.lock:
                batch = self._collect(job)
                self.batch_sizes.append(len(batch))
                try:
                    rows = self._start(batch)
                    if rows:
                        self._decode(rows)
                except Exception as e:  # noqa: BLE001 - whatever broke, only this batch fails and the worker goes on
                    for job in batch:
                        if not job.closed:
                            job.push("error", 500, f"Generation failed in this batch ({type(e).__name__}: {e}); retry the request.")

    def _collect(self, first: Job) -> list[Job]:
        """`first` and whatever else is queued, or arrives within `wait`, up to max_batch."""
        batch = [first]
        deadline = time.monotonic() + self.wait
        while len(batch) < self.max_batch:
            try:
                job = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # close(): stop after this batch
                break
            batch.append(job)
        return batch

    def _start(self, batch: list[Job]) -> list[Row]:
        """Rows of the jobs whose adapter is still loaded; the others fail with 404 here."""
        rows = []
        for job in batch:
            if job.adapter is not None and job.adapter not in self.multi.names:
                job.push("error", 404, f"Adapter {job.adapter!r} was unloaded before this request ran; loaded: {self.adapters}.")
                continue
            generator = None
            if job.temperature > 0:
                generator = torch.Generator(self.device)
                if job.seed is None:
                    generator.seed()
                else:
                    generator.manual_seed(job.seed)
            rows.append(Row(job, generator))
        return rows

    @torch.no_grad()
    def _decode(self, rows: list[Row]) -> None:
        """Left-padded prefill with a KV cache, then one token per step for every row until all
        have ended; positions count from each row's first real token, so padding changes nothing."""
        ids = [0 if r.job.adapter is None else self.multi.id_of(r.job.adapter) for r in rows]
        input_ids, mask = pad_batch([r.job.ids for r in rows], self.pad, True, self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.multi(input_ids=input_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1, adapter_ids=ids)
        while True:
            tokens = self._pick(out.logits[:, -1].float(), rows)
            for row, token in zip(rows, tokens.tolist()):
                if row.finish is None:
                    self._step(row, token)
            if all(r.finish is not None for r in rows):
                return
            mask = torch.cat([mask, mask.new_ones(len(rows), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.multi(input_ids=tokens[:, None], attention_mask=mask, position_ids=positions,
                             past_key_values=out.past_key_values, use_cache=True, adapter_ids=ids)

    def _pick(self, logits: torch.Tensor, rows: list[Row]) -> torch.Tensor:
        """Greedy for temperature 0; else nucleus sampling with the row's own seeded generator."""
        tokens = logits.argmax(-1)
        for i, row in enumerate(rows):
            if row.generator is None or row.finish is not None:
                continue
            probs = (logits[i] / row.job.temperature).softmax(-1)
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < row.job.top_p  # the smallest set reaching top_p
            sorted_probs = sorted_probs * keep
            tokens[i] = order[torch.multinomial(sorted_probs, 1, generator=row.generator)]
        return tokens

    def _step(self, row: Row, token: int) -> None:
        """Adds the token to the row and sends the new text, holding back an unfinished character
        and any ending that could still grow into a stop string."""
        job = row.job
        if job.cancelled:
            row.finish = "cancelled"
            return
        if token == self.eos:
            row.finish = "stop"
        else:
            row.tokens.append(token)
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        hits = [text.find(s) for s in job.stop if s in text]
        if hits:
            text, row.finish = text[:min(hits)], "stop"
        elif row.finish is None and len(row.tokens) >= job.max_tokens:
            row.finish = "length"
        if row.finish is None:
            text = text.rstrip("\ufffd")
            held = max([n for s in job.stop for n in range(1, len(s)) if text.endswith(s[:n])], default=0)
            text = text[:len(text) - held]
        if len(text) > row.sent:
            job.push("text", text[row.sent:])
            row.sent = len(text)
        if row.finish is not None:
            job.push("done", row.finish, len(row.tokens))


def adapter_folder(root: Path, relative: str) -> Path:
    """The adapter folder at `relative` under `root` (a run folder gives its best/), resolved,
    links included, and refused unless it stays inside root."""
    base = root.resolve()
    if not relative or Path(relative).is_absolute():
        raise TiedLoraError(f"Adapter path {relative!r} must be relative to the adapters root {root}.")
    folder = (base / relative).resolve()
    if folder.is_relative_to(base):
        folder = best_adapter(folder).resolve()
    if not folder.is_relative_to(base):
        raise TiedLoraError(f"Adapter path {relative!r} leads outside the adapters root {root}; pass a folder inside it.")
    if not (folder / "adapter_config.json").is_file():
        raise TiedLoraError(f"Adapter path {relative!r}: {folder} is neither a run folder (run.json and best/) "
                            "nor an adapter folder (adapter_config.json).")
    return folder


def discover(root: Path) -> dict[str, Path]:
    """Every run folder and adapter folder under root, named by its path relative to root (root
    itself by its own name); the search does not descend into them: a run's checkpoint/ is not
    an adapter to serve."""
    found = {}
    for here, dirs, files in os.walk(root):
        dirs.sort()
        if "run.json" in files or "adapter_config.json" in files:
            relative = Path(here).relative_to(root).as_posix()
            try:
                found[root.resolve().name if relative == "." else relative] = adapter_folder(root, relative)
            except TiedLoraError as e:
                print(f"tiedlora serve: skipped {here}: {e}", file=sys.stderr)
            dirs.clear()
    return found


class Options(BaseModel):
    """What /v1/completions and /v1/chat/completions share; OpenAI's names and defaults."""

    model: str
    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = None


class CompletionBody(Options):
    prompt: str


class Message(BaseModel):
    role: str
    content: str


class ChatBody(Options):
    messages: list[Message]


class AdapterBody(BaseModel):
    name: str
    path: str


def error_body(status: int, message: str, param: str | None = None) -> dict:
    """OpenAI's error shape."""
    kind = {404: "not_found_error", 409: "conflict_error", 500: "server_error"}.get(status, "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class ApiError(Exception):
    """A request that cannot be served: its HTTP status, a message naming the input and the fix, the field."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def create_app(engine: Engine, tokenizer, model_name: str, adapters_root, max_prompt_tokens: int = 2048, max_tokens_limit: int = 1024):
    """The FastAPI app. `model_name` is the base model's name in requests; adapters are loaded by
    path relative to `adapters_root`, never outside it."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from jinja2 import TemplateError
    from starlette.exceptions import HTTPException

    root, started = Path(adapters_root), int(time.time())

    app = FastAPI(title="tiedlora serve")

    @app.exception_handler(ApiError)
    async def api_error(request: Request, e: ApiError):
        return JSONResponse(error_body(e.status, e.message, e.param), status_code=e.status)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError):
        errors = e.errors()
        if errors[0]["type"] == "json_invalid":
            return await api_error(request, ApiError(400, f"The request body is not valid JSON ({errors[0]['ctx']['error']}); send a JSON object."))
        where = [".".join(str(p) for p in err["loc"][1:]) or "body" for err in errors]
        problems = "; ".join(f"{w}: {err['msg']}" for w, err in zip(where, errors))
        return await api_error(request, ApiError(400, f"Invalid request: {problems}.", where[0]))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, e: HTTPException):
        return await api_error(request, ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}."))

    def job_of(body: Options, ids: list[int]) -> Job:
        if body.model != model_name and body.model not in engine.adapters:
            raise ApiError(404, f"Model {body.model!r} is neither the base model {model_name!r} nor a loaded adapter {engine.adapters}; "
                                "GET /v1/models lists them.", "model")
        if not ids:
            raise ApiError(400, "The prompt is empty; send some text.", "prompt")
        if len(ids) > max_prompt_tokens:
            raise ApiError(400, f"The prompt is {len(ids)} tokens, more than this server's limit of {max_prompt_tokens}; shorten it.", "prompt")
        if not 1 <= body.max_tokens <= max_tokens_limit:
            raise ApiError(400, f"max_tokens is {body.max_tokens}; it must be between 1 and {max_tokens_limit}.", "max_tokens")
        if not 0 <= body.temperature <= 2:
            raise ApiError(400, f"temperature is {body.temperature}; it must be between 0 (greedy) and 2.", "temperature")
        if body.seed is not None and not 0 <= body.seed < 2**63:
            raise ApiError(400, f"seed is {body.seed}; it must be between 0 and 2**63 - 1.", "seed")
        if not 0 < body.top_p <= 1:
            raise ApiError(400, f"top_p is {body.top_p}; it must be in (0, 1].", "top_p")
        stop = [body.stop] if isinstance(body.stop, str) else body.stop or []
        if len(stop) > 4 or not all(stop):
            raise ApiError(400, f"stop is {body.stop!r}; give at most 4 non-empty strings.", "stop")
        return Job(ids, None if body.model == model_name else body.model, body.max_tokens, body.temperature, body.top_p, stop,
                   body.seed, asyncio.get_running_loop(), asyncio.Queue())

    async def respond(job: Job, body: Options, chat: bool):
        """The completion as JSON, or as server-sent events; a worker error before the first token
        is still an error response."""
        name, created = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        kind = "chat.completion" if chat else "text_completion"

        def choice(text: str, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return {"index": 0, "delta" if delta else "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        def usage(completion: int) -> dict:
            return {"prompt_tokens": len(job.ids), "completion_tokens": completion, "total_tokens": len(job.ids) + completion}

        def chunk(text: str, finish: str | None = None, completion: int | None = None) -> str:
            data = {"id": name, "object": kind + (".chunk" if chat else ""), "created": created, "model": body.model,
                    "choices": [choice(text, finish, True)]}
            if completion is not None:
                data["usage"] = usage(completion)
            return f"data: {json.dumps(data)}\n\n"

        engine.submit(job)
        try:
            event = await job.events.get()
            if event[0] == "error":
                raise ApiError(event[1], event[2])
        except BaseException:
            job.cancelled = True
            raise

        async def stream(event):
            try:
                while event[0] == "text":
                    yield chunk(event[1])
                    event = await job.events.get()
                yield chunk("", event[1], event[2]) if event[0] == "done" else f"data: {json.dumps(error_body(event[1], event[2]))}\n\n"
                yield "data: [DONE]\n\n"
            finally:
                job.cancelled = True

        if body.stream:
            return StreamingResponse(stream(event), media_type="text/event-stream")
        text = ""
        try:
            while event[0] == "text":
                text += event[1]
                event = await job.events.get()
        finally:
            job.cancelled = True
        if event[0] == "error":
            raise ApiError(event[1], event[2])
        return {"id": name, "object": kind, "created": created, "model": body.model, "choices": [choice(text, event[1], False)],
                "usage": usage(event[2])}

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": n, "object": "model", "created": started, "owned_by": "tiedlora"}
                                           for n in [model_name, *engine.adapters]]}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody):
        return await respond(job_of(body, prompt_ids(tokenizer, body.prompt)), body, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatBody):
        if not body.messages:
            raise ApiError(400, "messages is empty; send at least one {role, content}.", "messages")
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(400, f"The base model's tokenizer has no chat template; use /v1/completions with model {model_name!r}.", "messages")
        try:
            text = tokenizer.apply_chat_template([m.model_dump() for m in body.messages], add_generation_prompt=True, tokenize=False)
        except TemplateError as e:
            raise ApiError(400, f"The chat template refused these messages ({e}); check their roles and order.", "messages") from None
        return await respond(job_of(body, tokenizer(text, add_special_tokens=False)["input_ids"]), body, chat=True)

    @app.post("/v1/adapters")
    def load_adapter(body: AdapterBody):
        if not body.name.strip():
            raise ApiError(400, "The adapter name is empty; name it.", "name")
        if body.name == model_name or body.name in engine.adapters:
            raise ApiError(409, f"The name {body.name!r} is taken (the base model or a loaded adapter); "
                                f"DELETE /v1/adapters/{body.name} first or pick another name.", "name")
        try:
            engine.add(body.name, adapter_folder(root, body.path))
        except TiedLoraError as e:
            raise ApiError(400, str(e), "path") from None
        return {"id": body.name, "object": "model", "created": int(time.time()), "owned_by": "tiedlora"}

    @app.delete("/v1/adapters/{name:path}")
    def unload_adapter(name: str):
        try:
            engine.remove(name)
        except TiedLoraError as e:
            raise ApiError(404, str(e), "name") from None
        return {"id": name, "object": "model", "deleted": True}

    return app


def build(model: str, adapters, max_batch: int = 32, max_prompt_tokens: int = 2048, max_tokens_limit: int = 1024):
    """(engine, app): the base model, every adapter found under `adapters`, the worker started."""
    from .models import load_model

    root = Path(adapters)
    if not root.is_dir():
        raise TiedLoraError(f"--adapters {adapters}: no such folder; pass the folder of run or adapter folders to serve.")
    if min(max_batch, max_prompt_tokens, max_tokens_limit) < 1:
        raise TiedLoraError("--max_batch, --max_prompt_tokens and --max_tokens_limit must be at least 1.")
    lm, tokenizer = load_model(model)
    engine = Engine(MultiAdapterModel(lm), tokenizer, max_batch)
    for name, folder in discover(root).items():
        try:
            engine.add(name, folder)
        except TiedLoraError as e:
            print(f"tiedlora serve: skipped {name}: {e}", file=sys.stderr)
    return engine, create_app(engine, tokenizer, model, root, max_prompt_tokens, max_tokens_limit)


def serve(model: str, adapters, host: str, port: int, max_batch: int, max_prompt_tokens: int, max_tokens_limit: int) -> None:
    import uvicorn

    engine, app = build(model, adapters, max_batch, max_prompt_tokens, max_tokens_limit)
    print(f"tiedlora serve: {model} with {len(engine.adapters)} adapters {engine.adapters} on http://{host}:{port}/v1", file=sys.stderr)
    uvicorn.run(app, host=host, port=port, log_level="warning")
