"""A training process of the fine-tuning service (`python -m tiedlora.service.worker`, started by
`tiedlora serve --state` beside itself): it loads the base model once, claims queued jobs from
the store and trains them together with the multi-tenant trainer (`train.tenants.JointTraining`),
writing each job's progress, events, checkpoints and, when it succeeds, its adapter back.

It runs apart from the server so that an out-of-memory or a crash here never takes serving down.
A thread renews the heartbeat of the jobs it holds, lets go of the ones cancelled (or claimed by
another process) before their next step, and claims more while there is room. Run folders stay
under `<state>/runs/<job id>`, so a job claimed again after its process died resumes from its
last checkpoint (the trainer's exact resume).
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from pathlib import Path

from ..adapter_file import CONFIG, TENSORS
from ..atomic import discard, write_atomic
from ..config import TiedLoraError
from ..runs import BEST
from ..train.jobs_file import JobSpec
from ..train.tenants import FinishReport, JointTraining, StepReport
from .jobs import model_name
from .store import STORE_ENV, Store, stored_options


class Worker:
    """Claims jobs of one base model and trains them, at most `max_running` at once."""

    def __init__(
        self,
        store: Store,
        state: Path,
        base,
        model: str,
        worker: str,
        *,
        model_path: str | None = None,
        max_running: int = 8,
        lease: float = 30.0,
        poll: float = 0.5,
        precision: str = "auto",
        quantize: str | None = None,
        event_every: float = 1.0,
    ):
        self.store, self.state, self.model, self.id = store, Path(state), model, worker
        self.max_running, self.lease, self.poll, self.event_every = max_running, lease, poll, event_every
        self.joint = JointTraining(
            base,
            self.state / "runs",
            # run.json names the base trained on
            shared={"precision": precision, "model": model_path or model, "quantize": quantize},
            max_active=max_running,
            resume=True,  # a job's folder is its own: empty for a new job, its checkpoints for one taken up again
            quiet=True,
            on_step=self.stepped,
            on_finish=self.finished,
            keep_ended=False,
        )
        self.held: dict[str, dict] = {}  # the jobs this process trains, by id
        self.last_event: dict[str, float] = {}
        self.lock = threading.Lock()  # guards held

    def serve(self, stop: threading.Event) -> None:
        """Train what is claimed until `stop` is set."""
        threading.Thread(target=self.keep, args=(stop,), daemon=True, name="tiedlora-jobs").start()
        while not stop.is_set():
            if self.joint.busy:
                self.joint.run()
            else:
                stop.wait(self.poll)

    def keep(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception as e:  # the database away for a moment: try again at the next tick
                print(f"tiedlora worker: the store did not answer ({type(e).__name__}: {e})", file=sys.stderr)
            stop.wait(self.poll)

    def tick(self) -> None:
        held = self.store.renew(self.id)
        with self.lock:
            lost = [job_id for job_id in self.held if job_id not in held]
        for job_id in lost:  # cancelled, or (after a lapse) taken by another process: it leaves before its next step
            self.joint.cancel(job_id)
        for job in self.store.claim(self.id, self.max_running - len(held), self.lease, self.model):
            try:
                self.start(job)
            except (OSError, TiedLoraError) as e:  # its files cannot be written here: it fails alone
                self.failed(job, "training_failed", f"The job's files could not be prepared: {e}")

    def start(self, job: dict) -> None:
        folder = self.state / "data" / job["id"]
        folder.mkdir(parents=True, exist_ok=True)
        options = stored_options(job)
        for key, file_id in (("data", job["training_file"]), ("validation", job["validation_file"])):
            if file_id is None:
                continue
            row = self.store.file(job["tenant"], file_id, content=True)
            if row is None:
                self.failed(job, "invalid_file", f"The file {file_id} was deleted before the job could train on it.")
                return
            write_atomic(folder / f"{key}.jsonl", row["content"])
            options[key] = str(folder / f"{key}.jsonl")
        with self.lock:
            if job["id"] in self.held:  # this process's own job, claimed again after a lapse: it trains on
                return
            self.held[job["id"]] = job
        if job["attempts"] == 1:
            self.store.add_event(job["id"], "Fine-tuning job started")
        self.joint.add(JobSpec(job["id"], options))

    def stepped(self, report: StepReport) -> None:
        job_id, step, loss, val_loss, total = report.name, report.step, report.loss, report.val_loss, report.total_steps
        job = self.held.get(job_id)
        if job is None:
            return
        if job_id not in self.last_event and job["attempts"] > 1:
            self.store.add_event(
                job_id,
                f"Resumed by another training process from its checkpoint at step {step - 1}",
                data={"step": step - 1},
            )
        now = time.time()
        if val_loss is not None or step == total or now - self.last_event.get(job_id, 0.0) >= self.event_every:
            self.last_event[job_id] = now
            data = {"step": step, "train_loss": loss, "total_steps": total}
            message = f"Step {step}/{total}: training loss={loss:.4f}"
            if val_loss is not None:
                data["valid_loss"] = val_loss
                message += f", validation loss={val_loss:.4f}"
            self.store.add_event(job_id, message, kind="metrics", data=data)
        if not self.store.progress(self.id, job_id, report.tokens):
            self.joint.cancel(job_id)
            return
        if report.checkpoint:
            metrics = {"step": step, "train_loss": loss} | ({"valid_loss": val_loss} if val_loss is not None else {})
            self.store.add_checkpoint(job_id, step, metrics)
            self.store.add_event(job_id, f"Checkpoint created at step {step}")

    def finished(self, report: FinishReport) -> None:
        """The trainer let the job go: its model stored if it succeeded, its error if it failed
        (cancelled: the API has recorded it already)."""
        job = self.let_go(report.name)
        if job is None:
            return
        if report.results is not None:
            best = report.folder / BEST
            adapter = ((best / TENSORS).read_bytes(), (best / CONFIG).read_text(encoding="utf-8"))
            self.store.succeed(self.id, job, model_name(job), adapter, report.results["train_tokens"])
        elif report.error is not None:
            self.store.fail(self.id, report.name, "training_failed", self.told(job, report.error))

    def failed(self, job: dict, code: str, message: str) -> None:
        """A claimed job that could not start here."""
        self.let_go(job["id"])
        self.store.fail(self.id, job["id"], code, self.told(job, message))

    def told(self, job: dict, message: str) -> str:
        """`message` as the job's tenant may read it: its data copies named by their file ids, its run
        folder and this process's state folder by what they are, never by their path on this machine."""
        data = self.state / "data" / job["id"]
        places = {str(data / "data.jsonl"): f"training_file {job['training_file']}"}
        if job["validation_file"] is not None:
            places[str(data / "validation.jsonl")] = f"validation_file {job['validation_file']}"
        places |= {str(self.state / "runs" / job["id"]): "the job's run folder", str(self.state): "<state>"}
        for path in sorted(places, key=len, reverse=True):
            message = message.replace(path, places[path]).replace(str(Path(path).resolve()), places[path])
        return message

    def let_go(self, job_id: str) -> dict | None:
        """The job leaves this process: its bookkeeping and its copy of the data go; the job, if it was held."""
        with self.lock:
            job = self.held.pop(job_id, None)
        self.last_event.pop(job_id, None)
        discard(self.state / "data" / job_id)
        return job


def exit_with(parent: int) -> None:
    """End this process when the server that started it is gone (killed too: nothing else tells)."""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, daemon=True, name="tiedlora-parent").start()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="A training process of tiedlora serve's fine-tuning service.")
    p.add_argument("--state", required=True, help="the folder for run folders and data")
    p.add_argument("--model", required=True, help="the base model to load")
    p.add_argument("--name", required=True, help="the base model's name in jobs")
    p.add_argument("--worker", required=True, help="this process's id in the store")
    p.add_argument("--parent", type=int, help="end when this process does")
    p.add_argument("--max_running", type=int, default=8)
    p.add_argument("--lease", type=float, default=30.0)
    p.add_argument("--precision", default="auto")
    p.add_argument("--quantize", choices=("8bit", "4bit"), help="the base's layers in 8 or 4 bits, as it is served")
    args = p.parse_args(argv)
    if args.parent is not None:
        exit_with(args.parent)
    from ..models import load_model
    from ..quantize import quantize

    store = Store(os.environ[STORE_ENV])
    model, tokenizer = load_model(args.model)
    if args.quantize:
        quantize(model, args.quantize)
    worker = Worker(
        store,
        Path(args.state),
        (model, tokenizer),
        args.name,
        args.worker,
        model_path=args.model,
        max_running=args.max_running,
        lease=args.lease,
        precision=args.precision,
        quantize=args.quantize,
    )
    print(f"tiedlora worker {args.worker}: training jobs of {args.name}", file=sys.stderr, flush=True)
    worker.serve(threading.Event())


if __name__ == "__main__":
    main()
