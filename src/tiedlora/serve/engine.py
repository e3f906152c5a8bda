"""The serving engine: one worker thread owns the model (torch is never used by two threads at
once) and decodes every queued request, whatever its adapter, in shared batches.

It takes every queued request, up to `max_batch`, and decodes them together, each row with its
own adapter id, so a hundred adapters cost one base model and one batch. Batching is per
request: a batch runs until its last row ends; requests arriving meanwhile wait for the next
one. Text reaches each request's asyncio queue as it is produced, for streaming.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..decoding import Sampling, Sequence, decode
from .multi import MultiAdapterModel


@dataclass
class Job:
    """One request as the worker sees it; `push` is the only way results leave the worker.
    Events: ("text", delta), then ("done", finish_reason, completion_tokens); or ("error",
    status, message)."""

    seq: Sequence
    adapter: (
        str | None
    )  # None: the base model; resolved to an id when its batch starts, so an unload in between is caught
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    closed: bool = False  # its last event is sent

    @classmethod
    def of(cls, ids: list[int], sampling: Sampling, adapter: str | None) -> Job:
        """A job for the running event loop, whose handler awaits its events."""
        return cls(Sequence(ids, sampling), adapter, asyncio.get_running_loop())

    def cancel(self) -> None:
        """The client went away: the worker drops the row at its next step."""
        self.seq.cancelled = True

    def push(self, *event) -> None:
        self.closed = event[0] != "text"
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            self.cancel()


class Engine:
    """The model, its adapters and the worker thread that batches and decodes every request."""

    def __init__(self, multi: MultiAdapterModel, tokenizer, max_batch: int = 32, wait: float = 0.005):
        self.multi, self.tokenizer = multi.eval(), tokenizer
        self.max_batch, self.wait = max_batch, wait
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.lock = threading.Lock()  # held by a batch, and by adapter loads: both change what the model computes
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
                try:
                    self._run(batch)
                except Exception as e:  # noqa: BLE001 - whatever broke, only this batch fails and the worker goes on
                    for j in batch:
                        if not j.closed:
                            j.push(
                                "error",
                                500,
                                f"Generation failed in this batch ({type(e).__name__}: {e}); retry the request.",
                            )

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

    def _run(self, batch: list[Job]) -> None:
        """Decode the jobs whose adapter is still loaded; the others fail with 404 here."""
        jobs = []
        for job in batch:
            if job.adapter is not None and job.adapter not in self.multi.names:
                job.push(
                    "error",
                    404,
                    f"Adapter {job.adapter!r} was unloaded before this request ran; loaded: {self.adapters}.",
                )
            else:
                jobs.append(job)
        if not jobs:
            return
        owner = {id(j.seq): j for j in jobs}

        def emit(seq: Sequence, text: str) -> None:
            job = owner[id(seq)]
            if text:
                job.push("text", text)
            if seq.finish is not None:
                job.push("done", seq.finish, len(seq.tokens))

        ids = [0 if j.adapter is None else self.multi.id_of(j.adapter) for j in jobs]
        decode(self.multi, self.tokenizer, [j.seq for j in jobs], emit, adapter_ids=ids)
