"""The serving engine: one worker thread owns the model (torch is never used by two threads at
once) and runs the continuous batch (`batch.Batch`) for every request, whatever its adapter.

At every step the worker admits waiting rows up to `max_batch` (loading their adapters through
the registry), reads a bounded share of new prompts, and decodes one token for every running
row, each with its own adapter id, so a hundred adapters cost one base model and one batch. A
short request that arrives while a long one runs starts at the next step and may finish first.
Text reaches each request's asyncio queue as it is produced, for streaming, as typed events
(`Text`, `Done`, `Failed`). A fault of one row (its sampling, its scores, its adapter's file)
fails that request alone.

Nothing one request brings can stop the worker: an adapter that fails to load fails the rows
that asked for it (4xx when its folder is at fault, 5xx for anything else), a step that raises
fails the rows it was running and the next step starts afresh. Should the worker thread end all
the same, a supervisor fails what it held, starts a new one, and counts the restart; `healthy`
(and `/health`) is false while none runs.

The worker is the only thread that changes the model or the registry: requests and adapter
registrations alike reach it through its inbox, and a registration's caller awaits a future
the worker resolves between two steps, so no other thread, the event loop least of all, ever
waits for a step to end. Other threads read `Engine.view`, the registry's immutable snapshot.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, cast

from ..config import TiedLoraError
from ..multi import MultiAdapterModel
from .batch import Batch, Logprobs, Sampling, Sequence
from .config import ServeConfig
from .metrics import Metrics
from .registry import Full, Registry, View


class Row(Sequence):
    """One choice of one request: the request, its place in the response and its adapter."""

    def __init__(self, request: Request, index: int, prompt: list[int], sampling: Sampling):
        super().__init__(prompt, sampling)
        self.request, self.index = request, index
        self.adapter_id = 0  # the model's id for request.adapter, set when the row is admitted
        self.admitted = False
        self.sent_logprobs = 0
        self.counted = 0  # tokens already timed, for the latency metrics
        self.last_token: float | None = None


@dataclass(frozen=True)
class Text:
    """New text of choice `index`, and the logprobs of the tokens new since its last event."""

    index: int
    delta: str
    logprobs: Logprobs


@dataclass(frozen=True)
class Done(Text):
    """The last text of choice `index`: why it finished and how many tokens it generated."""

    finish: str
    tokens: int


@dataclass(frozen=True)
class Failed:
    """The request failed: its HTTP status and OpenAI's error message. Always its last event."""

    status: int
    message: str


Event = Text | Done | Failed


@dataclass
class Change:
    """A change the worker makes between two steps (an adapter registered or removed): `apply()`
    runs on the worker, its result or exception resolves `future`."""

    apply: Callable[[], Any]
    future: Future = field(default_factory=Future)


@dataclass
class Request:
    """One request as the worker sees it; `push` is the only way results leave the worker.
    Events: `Text` for any choice, then one `Done` per choice; or one `Failed`."""

    model: str  # the name requested: the base model's or an adapter's
    adapter: str | None  # None: the base model
    loop: asyncio.AbstractEventLoop
    rows: list[Row] = field(default_factory=list)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.perf_counter)
    closed: bool = False  # its last event is sent
    finished: int = 0

    @classmethod
    def of(cls, model: str, adapter: str | None, prompts: list[list[int]], sampling: Sampling, n: int = 1) -> Request:
        """A request for the running event loop, whose handler awaits its events: `n` choices per
        prompt, in OpenAI's order (all of the first prompt's, then the next's); a seeded request's
        choices take seeds seed, seed + 1, ..., so they differ and repeat."""
        request = cls(model, adapter, asyncio.get_running_loop())
        for p, ids in enumerate(prompts):
            for i in range(n):
                seed = None if sampling.seed is None else (sampling.seed + i) % 2**63
                request.rows.append(Row(request, p * n + i, ids, replace(sampling, seed=seed)))
        return request

    def cancel(self) -> None:
        """The client went away: the worker drops its rows at their next step."""
        for row in self.rows:
            row.cancelled = True

    def push(self, event: Event) -> None:
        if self.closed:
            return
        self.closed = isinstance(event, Failed) or self.finished == len(self.rows)
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()

    def fail(self, status: int, message: str) -> None:
        self.push(Failed(status, message))
        self.cancel()


class Engine:
    """The model, its adapter registry and the worker thread that runs the batch."""

    def __init__(
        self, multi: MultiAdapterModel, tokenizer, config: ServeConfig | None = None, metrics: Metrics | None = None
    ):
        self.config = config = config or ServeConfig()
        self.multi, self.tokenizer = multi.eval(), tokenizer
        self.max_batch, self.prefill_tokens = config.max_batch, config.prefill_tokens
        self.metrics = metrics or Metrics()
        self.registry = Registry(multi, config.max_resident, self.metrics)
        self.inbox: queue.SimpleQueue[Request | Change | None] = queue.SimpleQueue()
        self.waiting: deque[Row] = deque()
        self.batch = Batch(multi, tokenizer, self.emit, self.adapter_ids, chunk=config.prefill_tokens)
        self.lock = threading.Lock()  # held by the worker through each step and change (a test may hold it to pause it)
        self.closed = False
        self.restarts = 0
        self.in_hand: list[Request | Change | None] = []
        self.may_restart = threading.Event()  # cleared by a test to hold the supervisor
        self.may_restart.set()
        self.thread = self.start_worker()
        self.supervisor = threading.Thread(target=self.supervise, name="tiedlora-supervisor", daemon=True)
        self.supervisor.start()

    def start_worker(self) -> threading.Thread:
        thread = threading.Thread(target=self.work, name="tiedlora-engine", daemon=True)
        thread.start()
        return thread

    def supervise(self) -> None:
        """Restart the worker whenever it ends before close(): the rows it held fail (500), their
        state being unknown; the requests still in the inbox are served by the new worker."""
        while True:
            self.thread.join()
            if self.closed:
                return
            self.may_restart.wait()
            with self.lock:
                self.fail_batch("the server's worker stopped and was restarted")
                self.refuse(self.in_hand, "The server's worker restarted; retry.")
            self.restarts += 1
            self.thread = self.start_worker()

    @property
    def healthy(self) -> bool:
        """The worker is running (false while the supervisor restarts it, and after close())."""
        return self.thread.is_alive()

    @property
    def view(self) -> View:
        """The registry as it was after its latest change: read-only, safe to read from any thread."""
        return self.registry.view

    @property
    def adapters(self) -> list[str]:
        return self.view.names

    def change(self, apply: Callable[[], Any]) -> Future:
        """Have the worker run `apply()` between two steps; the future holds its result or its
        exception. An event loop awaits it with `asyncio.wrap_future`, never blocking."""
        change = Change(apply)
        self.send(change)
        return change.future

    def add_all(self, folders: Mapping[str, Path], pin: list[str]) -> dict[str, str]:
        """Register many adapters in one change; why each refused one was refused."""
        return self.change(lambda: self.registry.register_all(folders, pin)).result()

    def submit(self, request: Request) -> None:
        self.send(request)

    def send(self, item: Request | Change) -> None:
        """Into the worker's inbox; once it has stopped, answered at once (a 503, or an error)."""
        self.inbox.put(item)
        if self.closed and not self.thread.is_alive():
            self.shut(self.drain())

    def close(self) -> None:
        self.closed = True
        self.may_restart.set()
        self.inbox.put(None)
        self.thread.join()
        self.supervisor.join()
        self.shut(self.drain())  # anything sent while the worker was stopping

    def drain(self) -> list[Request | Change | None]:
        arrived: list[Request | Change | None] = []
        try:
            while True:
                arrived.append(self.inbox.get_nowait())
        except queue.Empty:
            return arrived

    @staticmethod
    def adapter_ids(rows: list) -> dict:
        return {"adapter_ids": [row.adapter_id for row in rows]}

    def work(self) -> None:
        while True:
            idle = not self.waiting and not len(self.batch)
            arrived = [self.inbox.get()] if idle else []
            arrived += self.drain()
            self.in_hand = arrived  # what a restart must answer if this worker ends before applying it
            if None in arrived:
                self.shut(arrived)
                return
            for request in arrived:
                if isinstance(request, Request):
                    self.waiting.extend(request.rows)
            with self.lock:
                for change in arrived:
                    if isinstance(change, Change):
                        self.apply(change)
                self.admit()
                try:
                    self.batch.prefill(self.prefill_tokens)
                    self.batch.step()
                except Exception as e:  # noqa: BLE001 - a fault of the step, not of one row: its rows fail, not the worker
                    self.fail_batch(f"{type(e).__name__}: {str(e)[:200]}")
            self.metrics.running.set(len(self.batch))
            self.metrics.waiting.set(len(self.waiting))

    @staticmethod
    def apply(change: Change) -> None:
        """Make one change (on the worker) and resolve its future."""
        if not change.future.set_running_or_notify_cancel():
            return
        try:
            change.future.set_result(change.apply())
        except Exception as e:  # noqa: BLE001 - the caller gets it, the worker goes on
            change.future.set_exception(e)

    def fail_batch(self, why: str) -> None:
        """Fail every row in the batch (500) and start an empty one: their caches may be half made."""
        rows = [*self.batch.pending, *self.batch.rows]
        self.batch = Batch(self.multi, self.tokenizer, self.emit, self.adapter_ids, chunk=self.prefill_tokens)
        for row in rows:
            row.fail(why)
            self.emit(row, "")

    def shut(self, arrived: list[Request | Change | None]) -> None:
        """close(): every request and change still queued or running gets an answer, so no
        handler waits for ever."""
        rows = [*self.waiting, *cast(list[Row], [*self.batch.pending, *self.batch.rows])]
        rows += [row for request in arrived if isinstance(request, Request) for row in request.rows]
        self.waiting.clear()
        for row in rows:
            row.request.fail(503, "The server is shutting down; retry the request.")
        self.refuse(arrived, "The server is shutting down.")

    @staticmethod
    def refuse(arrived: list[Request | Change | None], why: str) -> None:
        """Resolve every change among `arrived` not yet applied with a TiedLoraError saying `why`."""
        for change in arrived:
            if isinstance(change, Change) and change.future.set_running_or_notify_cancel():
                change.future.set_exception(TiedLoraError(why))

    def admit(self) -> None:
        """Waiting rows join the batch, first come first, while there is room; a row whose adapter
        has no room yet (every resident one busy or pinned) lets the ones behind it pass."""
        for row in list(self.waiting):
            if len(self.batch) >= self.max_batch:
                break
            if not row.cancelled:
                try:
                    row.adapter_id = 0 if row.request.adapter is None else self.registry.acquire(row.request.adapter)
                except Full:  # every resident adapter is in use (pins leave one place): a running row frees one
                    continue
                except TiedLoraError as e:  # its folder: missing, refused by the reader, or dropped for that
                    row.request.fail(404, str(e))
                    self.waiting.remove(row)
                    continue
                except Exception as e:  # noqa: BLE001 - a fault of ours while loading it: this request alone fails
                    row.request.fail(
                        500, f"Loading adapter {row.request.adapter!r} failed ({type(e).__name__}: {str(e)[:200]})."
                    )
                    self.waiting.remove(row)
                    continue
                row.admitted = True
                self.metrics.prompt_tokens.labels(row.request.model).inc(len(row.prompt))
                self.batch.add(row)
            self.waiting.remove(row)

    def emit(self, seq: Sequence, text: str) -> None:
        row = cast(Row, seq)
        request, now = row.request, time.perf_counter()
        new = len(row.tokens) - row.counted
        if new:
            if row.last_token is None:
                self.metrics.time_to_first_token.observe(now - request.arrived)
            else:
                for _ in range(new):
                    self.metrics.inter_token_latency.observe((now - row.last_token) / new)
            row.last_token, row.counted = now, len(row.tokens)
        logprobs = row.logprobs[row.sent_logprobs :]
        row.sent_logprobs = len(row.logprobs)
        if row.finish is None:
            request.push(Text(row.index, text, logprobs))
            return
        if row.admitted and request.adapter is not None:
            self.registry.release(request.adapter)
        self.metrics.generation_tokens.labels(request.model).inc(len(row.tokens))
        request.finished += 1
        if row.finish == "error":
            request.fail(500, f"Generation failed for this request: {row.error}.")
        else:
            request.push(Done(row.index, text, logprobs, row.finish, len(row.tokens)))
        if request.finished == len(request.rows):
            self.metrics.requests.labels(request.model, row.finish).inc()
