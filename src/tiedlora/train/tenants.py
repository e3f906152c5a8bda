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

import contextlib
import copy
import itertools
import json
import os
import threading
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import discard, json_bytes, write_atomic
from ..config import TiedLoraError
from ..layer import AdaptedLinear
from ..layout import replace_submodule
from ..loss import TokenLoss, answer_tokens, collate, pack_rows, packed_batch
from ..model import apply, has_adapter, root
from ..runs import JOB_NAME, RESULTS, is_run, read_json
from .checkpoints import Checkpoints, resume_state
from .config import TrainConfig
from .data import load_data, micro_batches, step_batches
from .folder import Log, prepare_folder
from .loop import Diverged, Run, diverged, long_examples, lr_at, record_step, test_and_record
from .processes import Processes

# Options of the base model and of the processes, the same for every tenant: given once, on the
# command line (or to JointTraining), never per job.
SHARED = ("model", "quantize", "precision", "fsdp", "out")
SUMMARY = "jobs.json"
ERROR = "error.json"

Members = dict[str, AdaptedLinear]  # a tenant's adapted projections by their path in the model


@dataclass
class Job:
    """One tenant: a run folder name and its `tiedlora train --data` options."""

    name: str
    options: dict[str, Any]


def read_jobs(path: str | Path) -> tuple[list[Job], dict[str, str]]:
    """The jobs of a JSON-lines file, and the lines refused (by name, or `line N` where the
    name itself is unusable) with why; relative `data` and `validation` paths are read from
    the file's folder."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TiedLoraError(f"--jobs {path}: cannot read it ({e}); give a JSON-lines file of jobs.") from None
    jobs: list[Job] = []
    refused: dict[str, str] = {}
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as e:
            refused[f"line {n}"] = f"{path} line {n} is not JSON ({e.msg})."
            continue
        if not isinstance(job, dict) or not isinstance(job.get("name"), str) or not JOB_NAME.fullmatch(job["name"]):
            refused[f"line {n}"] = (
                f"{path} line {n}: each job needs a \"name\", the folder its run is written to: letters, digits, '.', "
                "'_' or '-' (at most 64, not starting with '.', '_' or '-'), or <tenant>/<name> of two such (its "
                "folder <out>/<tenant>/<name>, served to that tenant's keys alone)."
            )
            continue
        name, options = job.pop("name"), job
        if name in refused or any(j.name == name for j in jobs):
            refused[f"line {n}"] = f"{path} line {n}: the name {name!r} is taken by an earlier line; names are unique."
            continue
        nested = next((j.name for j in jobs if name.startswith(f"{j.name}/") or j.name.startswith(f"{name}/")), None)
        if nested is not None:
            refused[f"line {n}"] = (
                f"{path} line {n}: the name {name!r} and {nested!r} (an earlier line) would put one run folder inside "
                "the other; name a tenant's jobs <tenant>/<name> only."
            )
            continue
        for key in ("data", "validation"):
            if isinstance(options.get(key), str) and not Path(options[key]).is_absolute():
                local = path.parent / options[key]
                options[key] = str(local) if local.exists() or key == "validation" else options[key]
        jobs.append(Job(name, options))
    return jobs, refused


def check_options(job: Job) -> None:
    """A job's own options: those of a solo --data run, except what every tenant shares."""
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(job.options) - known)
    if unknown:
        raise TiedLoraError(f"job {job.name!r}: unknown option {unknown[0]!r}; a job takes tiedlora train's options.")
    shared = sorted(set(job.options) & set(SHARED))
    if shared:
        raise TiedLoraError(
            f"job {job.name!r} sets {shared[0]!r}, which every tenant shares: give it once, on the command line."
        )
    if not isinstance(job.options.get("data"), str):
        raise TiedLoraError(f'job {job.name!r} needs "data": the path of its .jsonl, .csv or .parquet rows.')


def fresh_folder(cfg: TrainConfig, resume: bool) -> Path:
    """The tenant's run folder, as a solo run prepares its own; an earlier refusal's error.json goes.
    A `<tenant>/<name>` job's tenant folder must not be a run itself (nothing would find the runs in it)."""
    folder = Path(cfg.out)
    if is_run(folder.parent):
        raise TiedLoraError(
            f"{folder.parent} holds a run of its own: a job named {folder.parent.name}/{folder.name} cannot put its "
            "run folder inside it; name it otherwise."
        )
    if folder.is_dir() and [p.name for p in folder.iterdir()] == [ERROR]:
        discard(folder / ERROR)  # an earlier attempt refused before its run began
    folder = prepare_folder(cfg, resume)
    discard(folder / ERROR)
    return folder


def frame_of(model: nn.Module) -> nn.Module:
    """A copy of `model`'s module tree sharing its parameters, buffers and leaf modules (the
    projections, norms and embeddings themselves): a tenant's adapter goes on a frame (it replaces
    projections inside their parents, which are the frame's own), where it is saved, loaded and
    counted as a solo run's, and the frame's forward is the base's with that adapter alone.
    Sharing the leaves keeps a frame to about a fifth of the module objects, the most of a
    tenant's memory (0.82 MB of module objects per SmolLM2 frame copied whole)."""
    shared: dict[int, Any] = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    shared |= {id(m): m for m in model.modules() if next(m.children(), None) is None}
    return copy.deepcopy(model, memo=shared)


class Route:
    """Which rows of the batch in flight go through which tenant's adapter."""

    def __init__(self):
        self.segments: list[tuple[Members, slice]] = []

    @contextlib.contextmanager
    def __call__(self, segments: list[tuple[Members, slice]]):
        self.segments = segments
        try:
            yield
        finally:
            self.segments = []


class Routed(nn.Module):
    """A base projection shared by the tenants: W x once for the whole batch, then each tenant's
    (alpha/r) diag(v) B diag(u) A x on its own rows, from its frame's adapter (as
    `AdaptedLinear` computes it: one addmm onto W x)."""

    def __init__(self, base: nn.Module, path: str, route: Route):
        super().__init__()
        self.base, self.path = base, path
        self._route = (route,)  # shared by every routed projection, not a submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.base(x)
        segments = self._route[0].segments
        if not segments:
            return z
        parts = []
        for members, rows in segments:
            member = members.get(self.path)
            zs = z[rows]
            if member is None:  # this tenant leaves this projection alone
                parts.append(zs)
                continue
            adapter, xs = member.adapter, x[rows]
            # dropout in the base's mode (training steps, not validation): the frames are not its submodules
            xs = xs if adapter.dropout is None else F.dropout(xs, adapter.dropout.p, self.training)
            h = F.linear(xs, adapter.down_weight().to(x.dtype))
            up = adapter.up_weight(member.rows).to(x.dtype).t()
            parts.append(torch.addmm(zs.reshape(-1, zs.shape[-1]), h.reshape(-1, h.shape[-1]), up).view(zs.shape))
        return parts[0] if len(parts) == 1 else torch.cat(parts)  # one: a tenant's validation or test


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
        self.log = Log(folder, self.state["step"], procs.main, tensorboard=False)
        self.members: Members = {path: m for site in root(model).sites for path, m in site.members}
        self.long = long_examples(data, cfg) if data.long else None

    def record(self, figures: tuple) -> float | None:
        """The step recorded (validated, logged, checkpointed when due); its validation loss, if it validated."""
        row = record_step(self.run, self.loss_fn, self.optimizer, self.checkpoints, self.log, self.state, figures)
        return row["val_loss"] if row["val_loss"] != "" else None

    @property
    def done(self) -> bool:
        return self.state["step"] >= self.run.cfg.max_steps or self.state["stopped"] is not None


class JointTraining:
    """Jobs trained together on one loaded base model. `add` a job at any time (from another
    thread too): it waits until fewer than `max_active` train, then joins the next step. A
    forward pass holds at most `max_rows` rows (default: the largest micro batch of the
    tenants, so activations take no more memory than the largest solo run's); more rows are
    split over several passes, which changes no gradient. A job
    whose options, data or loss go wrong fails alone: `error.json` in its folder, its line in
    `jobs.json` beside the run folders, and `on_finish`. `on_step(name, step, loss, tokens,
    val_loss)` follows each tenant's every step (val_loss None where it did not validate);
    `on_finish(name, folder, results, error)` each end (results and error both None: cancelled)."""

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
        on_step: Callable[[str, int, float, int, float | None], None] | None = None,
        on_finish: Callable[[str, Path, dict | None, str | None], None] | None = None,
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
        self.on_step, self.on_finish = on_step, on_finish
        self.frame = frame_of(model)  # taken before any projection is routed
        self.route = Route()
        self.loss_fn = TokenLoss(model)
        self.routed: dict[str, Routed] = {}
        self.waiting: list[Job] = []
        self.active: list[Tenant] = []
        self.cancelled: set[str] = set()
        self.status: dict[str, dict] = {}
        self.procs: Processes | None = None
        self.lock = threading.Lock()  # guards waiting, cancelled and status
        self.steps = 0  # joint steps taken (a test counts them)

    @property
    def main(self) -> bool:
        """The process that writes folders and speaks (under torchrun: rank 0; before the first
        job starts the processes, every one, none having written anything yet)."""
        return self.procs is None or self.procs.main

    def add(self, job: Job) -> None:
        with self.lock:
            if job.name in self.status and self.status[job.name]["status"] in ("waiting", "training"):
                raise TiedLoraError(f"job {job.name!r} is already waiting or training; names are unique.")
            self.cancelled.discard(job.name)
            self.waiting.append(job)
            self.status[job.name] = {"status": "waiting", "folder": str(self.out / job.name)}

    def cancel(self, name: str) -> None:
        """The job leaves before its next step (its checkpoints stay); no-op once it ended."""
        with self.lock:
            self.cancelled.add(name)

    def refuse(self, key: str, message: str) -> None:
        """A line of the jobs file that names no usable job."""
        with self.lock:
            self.status[key] = {"status": "failed", "error": message}
        self.write_summary()

    def run(self) -> dict[str, dict]:
        """Train until no job waits or trains; the summary (also in `jobs.json`) by name."""
        from tqdm.auto import tqdm

        bar = tqdm(
            desc="tenants", unit="step", disable=self.quiet or os.environ.get("RANK", "0") != "0", dynamic_ncols=True
        )
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
                        val_loss = tenant.record((loss, n_inputs, n_answers, dt))
                    if self.on_step:
                        self.on_step(tenant.name, tenant.state["step"], loss, n_answers, val_loss)
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
                    self.status[job.name].update(status="cancelled")
                    continue
            try:
                check_options(job)
                cfg = TrainConfig(**{**self.shared, **job.options, "out": str(self.out / job.name)})
                if self.procs is None:
                    self.procs = Processes.start(cfg)
                    self.procs.place(self.model)
                tenant = Tenant(job.name, cfg, self.frame, self.loss_fn, self.tokenizer, self.procs, self.resume)
            except TiedLoraError as e:
                self.fail(job.name, str(e))
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
                self.status[job.name].update(status="training", steps=tenant.state["step"])
            self.write_summary()

    def step(self, tenants: list[Tenant]) -> dict[str, tuple[float, int, int] | Diverged]:
        """One optimizer step of every tenant: each contributes its global batch of this step,
        cut into its micro batches (length-sorted, as alone); micro batch j of the joint step is
        every tenant's micro batch j, in passes of at most `max_rows` rows, each row through its
        tenant's adapter, each tenant's loss over its own answer tokens."""
        procs = self.procs
        assert procs is not None
        plans = []
        for t in tenants:
            cfg, step, train = t.run.cfg, t.state["step"], t.run.data.train
            for group in t.optimizer.param_groups:
                group["lr"] = lr_at(step, cfg)
            indices = step_batches(len(train), cfg, step)
            chunks = micro_batches(indices, train, cfg, procs.world, procs.rank)  # this process's share
            n_inputs = sum(len(train[i]["input_ids"]) for i in indices)
            plans.append((t, chunks, answer_tokens([train[i] for i in indices]), n_inputs))
        totals = {t.name: torch.zeros((), device=procs.device) for t in tenants}
        # dropout masks: a function of who trains at which step, so a resumed run draws the same ones
        key = json.dumps([procs.rank] + [(t.name, t.run.cfg.seed, t.state["step"]) for t in tenants]).encode()
        self.loss_fn.train()
        limit = self.max_rows or max(t.run.cfg.micro_batch_size for t in tenants)
        for j in range(max(len(chunks) for _, chunks, _, _ in plans)):
            rows = [(t, n_answers, i) for t, chunks, n_answers, _ in plans if j < len(chunks) for i in chunks[j]]
            for c, start in enumerate(range(0, len(rows), limit)):
                torch.manual_seed(zlib.crc32(key + f"/{j}/{c}".encode()))  # distinct for every pass
                self.forward_backward(rows[start : start + limit], totals)
        procs.sum_gradients([p for t in tenants for p in t.params])
        if procs.world > 1:
            summed = torch.stack([totals[t.name] for t in tenants])
            torch.distributed.all_reduce(summed)
            totals = dict(zip((t.name for t in tenants), summed))
        figures: dict[str, tuple[float, int, int] | Diverged] = {}
        for t, _, n_answers, n_inputs in plans:
            total = totals[t.name]
            bad = diverged(t.run.cfg, t.state["step"], total, t.params)
            if bad is not None:
                figures[t.name] = bad
            else:
                t.optimizer.step()
                figures[t.name] = (total.item(), n_inputs, n_answers)
            t.optimizer.zero_grad(set_to_none=True)
        return figures

    def forward_backward(self, rows: list[tuple[Tenant, int, int]], totals: dict[str, torch.Tensor]) -> None:
        """One forward and backward pass over `rows` (tenant, its answer tokens this step, example
        index), each tenant's rows contiguous; each tenant's loss divided by its own answer tokens.
        A pass holding a tenant that trains with --packing is packed throughout: that tenant's
        examples end to end in rows of its --max_length, as alone, the others' one to a row."""
        procs = self.procs
        assert procs is not None
        owners: list[tuple[Tenant, int, list[dict]]] = []  # each tenant's examples in this pass
        for t, n_answers, i in rows:
            if not owners or owners[-1][0] is not t:
                owners.append((t, n_answers, []))
            owners[-1][2].append(t.run.data.train[i])
        pad = rows[0][0].run.data.pad
        if any(t.run.cfg.packing for t, _, _ in owners):
            laid = [
                pack_rows(ex, t.run.cfg.max_length) if t.run.cfg.packing else [[e] for e in ex] for t, _, ex in owners
            ]
            batch = packed_batch([row for tenant_rows in laid for row in tenant_rows], pad, procs.device)
            counts = [len(tenant_rows) for tenant_rows in laid]
        else:
            batch = collate([e for _, _, ex in owners for e in ex], pad, procs.device)
            counts = [len(ex) for _, _, ex in owners]
        ends = list(itertools.accumulate(counts))
        spans = [slice(end - n, end) for end, n in zip(ends, counts)]
        segments = [(t.members, span) for (t, _, _), span in zip(owners, spans)]
        with self.route(segments), torch.autocast(procs.device.type, dtype=torch.bfloat16, enabled=procs.bf16):
            per_row = self.loss_fn(**batch, per_row=True)
            losses = [per_row[span].sum() / n_answers for (_, n_answers, _), span in zip(owners, spans)]
        torch.stack(losses).sum().backward()
        for (t, _, _), loss in zip(owners, losses):
            totals[t.name] += loss.detach()

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
        self.ended(tenant.name, status, tenant.run.folder, results, error, steps=tenant.state["step"])

    def alone(self, tenant: Tenant):
        """The base model routed to `tenant`'s adapter on every row, for its validation and test."""
        return self.route([(tenant.members, slice(None))])

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
            self.on_finish(name, folder, results, error)

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
    jobs: list[Job],
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
