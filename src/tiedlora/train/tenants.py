"""Many tenants' adapters trained together: one frozen base model, one batch, each tenant's run
as if it trained alone.

A tenant's adapter lives on its own frame of the base: a copy of the model's module tree that
shares every weight tensor and leaf module with it (nothing of the weights is copied), carrying
the tenant's adapter as `tiedlora.apply` puts it. The tenant's run is then an ordinary run, with
the same checkpoints, validation, log, best adapter, results and run folder as
`tiedlora train --data` writes. Every forward runs on the base model itself: its adapted
projections become `Routed` modules, which compute W x once for every row of the batch and add
each tenant's update (from its frame) to its own rows, a contiguous slice of the batch; a
tenant's validation and test route every row through its adapter alone. So the base's layers
may be sharded (--fsdp), which no frame could run. Each tenant's rows' losses are divided by its
own answer tokens and its AdamW steps alone, so its gradient is the one its solo run computes.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import json_bytes, write_atomic
from ..config import TiedLoraError
from ..layout import replace_submodule
from ..loss import TokenLoss
from ..model import apply, has_adapter, root
from ..runs import RESULTS, read_json
from .checkpoints import Checkpoints, resume_state
from .config import TrainConfig
from .data import load_data
from .folder import ERROR, Log, fresh_folder
from .jobs_file import JobSpec, check_job, read_jobs
from .loop import Run, long_examples, record_step, test_and_record
from .processes import Processes, main_process
from .routing import Members, Route, Routed, Segment, frame_of
from .step import Diverged, Figures, Parts, Trainee, step_trainees

SUMMARY = "jobs.json"


@dataclass(frozen=True)
class StepReport:
    """A tenant's step, as whoever follows the joint run (the fine-tuning worker) reads it."""

    name: str
    step: int
    total_steps: int
    loss: float
    val_loss: float | None  # None where the step did not validate
    tokens: int  # answer tokens trained on so far
    checkpoint: bool  # this step wrote a checkpoint (`checkpoint/step-<step>`)


@dataclass(frozen=True)
class FinishReport:
    """A job's end: `results` (results.json's content) if it succeeded, `error` if it failed,
    neither if it was cancelled."""

    name: str
    status: str  # succeeded, failed or cancelled
    folder: Path
    results: dict | None
    error: str | None


class Tenant:
    """One job inside a joint run: its frame with its adapter, and its run (data, folder,
    optimizer, checkpoints, log and state), set up exactly as a solo run sets up its own. Its
    validation and test run on `base`, the loss of the shared base model, which the joint run
    routes to this tenant's adapter alone for them."""

    def __init__(
        self, name: str, cfg: TrainConfig, frame: nn.Module, base: TokenLoss, tokenizer, procs: Processes, resume: bool
    ):
        self.name, self.started = name, time.time()
        task = cfg.task_data()
        model = apply(frame_of(frame), cfg.adapter())
        data = load_data(task, tokenizer, cfg)
        folder = procs.on_main(lambda: fresh_folder(cfg, resume))
        self.finished = read_json(folder / RESULTS) if resume and (folder / RESULTS).is_file() else None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=cfg.peak_lr, weight_decay=cfg.weight_decay)
        self.checkpoints = Checkpoints(folder)
        self.state = resume_state(self.checkpoints, resume, model, self.optimizer, cfg, main=False)
        self.run = Run(cfg, model, tokenizer, task, data, procs, folder, quiet=True, scored_on=base.model)
        self.loss_fn = base
        self.log = Log(folder, self.state.step, procs.main, tensorboard=False)
        self.members: Members = {path: m for site in root(model).sites for path, m in site.members}
        self.long = long_examples(data, cfg) if data.long else None

    def record(self, figures: tuple) -> StepReport:
        """The step recorded (validated, logged, checkpointed when due), as its report says."""
        run, state = self.run, self.state
        row, written = record_step(run, self.loss_fn, self.optimizer, self.checkpoints, self.log, state, figures)
        val_loss = row["val_loss"] if row["val_loss"] != "" else None
        return StepReport(self.name, state.step, run.cfg.max_steps, figures[0], val_loss, state.tokens, written)

    @property
    def done(self) -> bool:
        return self.state.step >= self.run.cfg.max_steps or self.state.stopped is not None


class JointTraining:
    """Jobs trained together on one loaded base model. `add` a job at any time (from another
    thread too): it waits until fewer than `max_active` train, then joins the next step. A
    forward pass holds at most `max_rows` rows (default: the largest micro batch of the
    tenants, so activations take no more memory than the largest solo run's); more rows are
    split over several passes, which changes no gradient. A job
    whose options, data or loss go wrong fails alone: `error.json` in its folder, its line in
    `jobs.json` beside the run folders, and `on_finish`. `on_step` gets each tenant's every step
    (a `StepReport`), `on_finish` each end (a `FinishReport`). With `keep_ended=False` (a long-lived
    worker) an ended job leaves the trainer's memory once reported; else `run` returns it in the summary."""

    def __init__(
        self,
        base: tuple[nn.Module, Any],
        out: str | Path,
        *,
        shared: dict | None = None,
        max_active: int | None = None,
        max_rows: int | None = None,
        resume: bool = False,
        quiet: bool = False,
        on_step: Callable[[StepReport], None] | None = None,
        on_finish: Callable[[FinishReport], None] | None = None,
        keep_ended: bool = True,
    ):
        model, self.tokenizer = base
        if has_adapter(model):
            raise TiedLoraError("The base model carries an adapter: give joint training the model without one.")
        if max_active is not None and max_active < 1:
            raise TiedLoraError(f"--max_active {max_active} must be at least 1 (or unset: every job at once).")
        self.model, self.out = model, Path(out)
        self.shared = {k: v for k, v in (shared or {}).items() if k != "out"}
        if max_rows is not None and max_rows < 1:
            raise TiedLoraError(f"--max_rows {max_rows} must be at least 1 (or unset: the largest --micro_batch_size).")
        self.max_active, self.max_rows, self.resume, self.quiet = max_active, max_rows, resume, quiet
        self.on_step, self.on_finish, self.keep_ended = on_step, on_finish, keep_ended
        self.frame = frame_of(model)  # taken before any projection is routed
        self.route = Route()
        self.loss_fn = TokenLoss(model)
        self.routed: dict[str, Routed] = {}
        self.waiting: list[JobSpec] = []
        self.active: list[Tenant] = []
        self.cancelled: set[str] = set()
        self.status: dict[str, dict] = {}
        self.procs: Processes | None = None
        self.lock = threading.Lock()  # guards waiting, cancelled and status
        self.steps = 0  # joint steps taken (a test counts them)

    @property
    def busy(self) -> bool:
        """A job waits or trains: `run` has work."""
        with self.lock:
            return bool(self.waiting or self.active)

    @property
    def main(self) -> bool:
        """The process that writes folders and speaks (under torchrun: rank 0)."""
        return main_process() if self.procs is None else self.procs.main

    def add(self, job: JobSpec) -> None:
        with self.lock:
            if job.name in self.status and self.status[job.name]["status"] in ("waiting", "training"):
                raise TiedLoraError(f"job {job.name!r} is already waiting or training; names are unique.")
            self.cancelled.discard(job.name)
            self.waiting.append(job)
            self.status[job.name] = {"status": "waiting", "folder": str(self.out / job.name)}

    def cancel(self, name: str) -> None:
        """The job leaves before its next step (its checkpoints stay); no-op once it ended."""
        with self.lock:
            if self.status.get(name, {}).get("status") in ("waiting", "training"):
                self.cancelled.add(name)

    def refuse(self, key: str, message: str) -> None:
        """A line of the jobs file that names no usable job."""
        with self.lock:
            self.status[key] = {"status": "failed", "error": message}
        self.write_summary()

    def run(self) -> dict[str, dict]:
        """Train until no job waits or trains; the summary (also in `jobs.json`) by name."""
        from tqdm.auto import tqdm

        bar = tqdm(desc="tenants", unit="step", disable=self.quiet or not self.main, dynamic_ncols=True)
        try:
            while True:
                self.admit()
                if not self.active:
                    break
                t0 = time.time()
                figures = self.step(self.active)
                dt = time.time() - t0
                self.steps += 1
                for tenant in list(self.active):
                    outcome = figures[tenant.name]
                    if isinstance(outcome, Diverged):
                        self.finish(tenant, error=str(outcome))
                        continue
                    loss, n_inputs, n_answers = outcome
                    with self.alone(tenant):
                        report = tenant.record((loss, n_inputs, n_answers, dt))
                    if self.on_step:
                        self.on_step(report)
                    if tenant.done:
                        self.finish(tenant)
                bar.update(len(figures))
                bar.set_postfix(active=len(self.active), waiting=len(self.waiting), s_per_step=f"{dt:.2f}")
        finally:
            bar.close()
            for tenant in self.active:
                tenant.log.close()
            self.unroute()
        return self.status

    def admit(self) -> None:
        """Cancelled tenants leave; waiting jobs join while there is room."""
        for tenant in [t for t in self.active if t.name in self.cancelled]:
            self.finish(tenant, cancelled=True)
        while self.max_active is None or len(self.active) < self.max_active:
            with self.lock:
                if not self.waiting:
                    return
                job = self.waiting.pop(0)
                if job.name in self.cancelled:
                    self.cancelled.discard(job.name)
                    self.status[job.name].update(status="cancelled")
                    if not self.keep_ended:
                        del self.status[job.name]
                    continue
            try:
                check_job(job)
                cfg = TrainConfig(**{**self.shared, **job.options, "out": str(self.out / job.name)})
                if self.procs is None:
                    self.procs = Processes.start(cfg)
                    self.procs.place(self.model)
                tenant = Tenant(job.name, cfg, self.frame, self.loss_fn, self.tokenizer, self.procs, self.resume)
            except TiedLoraError as e:
                self.fail(job.name, str(e))
                continue
            except Exception as e:  # whatever a tenant's rows make the tokenizer raise: it fails alone
                self.fail(job.name, f"job {job.name!r}: its data could not be prepared ({type(e).__name__}: {e}).")
                continue
            if tenant.long and not self.quiet and self.main:
                print(f"{job.name}: {tenant.long}")
            if tenant.finished is not None:
                self.ended(tenant.name, "succeeded", tenant.run.folder, tenant.finished, None)
                continue
            for path in tenant.members:
                if path not in self.routed:
                    self.routed[path] = Routed(self.model.get_submodule(path), path, self.route)
                    replace_submodule(self.model, path, self.routed[path])
            self.active.append(tenant)
            with self.lock:
                self.status[job.name].update(status="training", steps=tenant.state.step)
            self.write_summary()

    def step(self, tenants: list[Tenant]) -> dict[str, Figures | Diverged]:
        """One optimizer step of every tenant (`step.step_trainees`), each row through its tenant's
        adapter, each tenant's loss over its own answer tokens."""
        procs = self.procs
        assert procs is not None
        trainees = [Trainee(t.name, t.run.cfg, t.run.data, t.state.step, t.optimizer, t.params) for t in tenants]
        members = {t.name: t.members for t in tenants}

        def through(parts: Parts):
            return self.route([Segment(members[t.name], span, seeds) for t, span, seeds in parts])

        return step_trainees(trainees, self.loss_fn, procs, through, self.max_rows)

    def finish(self, tenant: Tenant, error: str | None = None, cancelled: bool = False) -> None:
        """The tenant leaves the batch: scored and recorded if it trained to its end; its last
        good checkpoint kept if it failed or was cancelled."""
        self.active.remove(tenant)
        tenant.log.close()
        results = None
        procs = tenant.run.procs  # scored by the main process, or by all where each holds a shard of the layers
        if error is None and not cancelled and (procs.main or procs.fsdp):
            try:
                with self.alone(tenant):
                    results = test_and_record(tenant.run, tenant.state, tenant.started)
            except TiedLoraError as e:
                error = str(e)
        if error is not None and procs.main:
            write_atomic(tenant.run.folder / ERROR, json_bytes({"error": error}))
        status = "cancelled" if cancelled else "failed" if error is not None else "succeeded"
        self.ended(tenant.name, status, tenant.run.folder, results, error, steps=tenant.state.step)

    def alone(self, tenant: Tenant):
        """The base model routed to `tenant`'s adapter on every row, for its validation and test."""
        return self.route([Segment(tenant.members, slice(None))])

    def fail(self, name: str, error: str) -> None:
        """A job refused before it trained: its options or its data."""
        folder = self.out / name
        fresh = not folder.exists() or folder.is_dir() and not any(p.name != ERROR for p in folder.iterdir())
        if self.main and fresh:
            folder.mkdir(parents=True, exist_ok=True)
            write_atomic(folder / ERROR, json_bytes({"error": error}))
        if not self.quiet and self.main:
            print(f"tiedlora train: {error}")
        self.ended(name, "failed", folder, None, error)

    def ended(self, name: str, status: str, folder: Path, results: dict | None, error: str | None, **more) -> None:
        with self.lock:
            self.status[name] = {"status": status, "folder": str(folder), **more}
            if error is not None:
                self.status[name]["error"] = error
            if results is not None:
                self.status[name].update(steps=results["steps"], metrics=results["metrics"])
        self.write_summary()
        if self.on_finish:
            self.on_finish(FinishReport(name, status, folder, results, error))
        if not self.keep_ended:
            with self.lock:
                self.status.pop(name, None)
                self.cancelled.discard(name)

    def write_summary(self) -> None:
        if not self.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with self.lock:
            summary = json_bytes({"tenants": self.status})
        write_atomic(self.out / SUMMARY, summary)

    def unroute(self) -> None:
        """The base model's own projections back in place."""
        for path, routed in self.routed.items():
            replace_submodule(self.model, path, routed.base)
        self.routed.clear()


def train_jobs(
    jobs: list[JobSpec],
    base: tuple[nn.Module, Any],
    out: str | Path,
    *,
    shared: dict | None = None,
    refused: dict[str, str] | None = None,
    **options,
) -> dict[str, dict]:
    """Train `jobs` together on `base` = (model, tokenizer); run folders `out/<name>`. `refused`:
    jobs-file lines already refused, recorded with the rest. `options` are JointTraining's."""
    joint = JointTraining(base, out, shared=shared, **options)
    for key, message in (refused or {}).items():
        joint.refuse(key, message)
    for job in jobs:
        joint.add(job)
    return joint.run()


def train_jobs_file(path: str | Path, options: dict, **joint) -> dict[str, dict]:
    """`tiedlora train --jobs`: the base model loaded (and quantized) once, from the options
    every job shares; the other given options are each job's defaults."""
    from ..models import SMOLLM2, load_model
    from ..quantize import quantize

    jobs, refused = read_jobs(path)
    if not jobs and not refused:
        raise TiedLoraError(
            f'--jobs {path} holds no job: one JSON object per line, e.g. {{"name": "acme", "data": "acme.jsonl"}}.'
        )
    model, tokenizer = load_model(options.get("model", SMOLLM2))
    if options.get("quantize"):
        quantize(model, options["quantize"])
    return train_jobs(jobs, (model, tokenizer), options.get("out", "runs"), shared=options, refused=refused, **joint)
