"""The server's training processes (`worker`): started with the app, each restarted when it
dies, stopped with the app. A process that dies while its server lives (an out-of-memory, a
crash) fails the jobs it held, with why, and serving goes on; one killed with its server leaves
them `running`, and the next process to start (here or on another server sharing the store)
takes them up again once their lease has lapsed."""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from ..serve.config import ServeConfig
from .store import STORE_ENV, Store

RESTART_AFTER_S = (1.0, 60.0)  # the wait before a restart: doubled after each quick death, up to the second


class TrainingProcesses:
    def __init__(self, config: ServeConfig, store: Store, state: Path, model_name: str):
        self.config, self.store, self.state, self.model_name = config, store, state, model_name
        self.processes: dict[int, subprocess.Popen] = {}
        self.closing = threading.Event()
        self.threads: list[threading.Thread] = []

    def start(self) -> None:
        for i in range(self.config.training_processes):
            thread = threading.Thread(target=self.keep, args=(i,), daemon=True, name=f"tiedlora-training-{i}")
            thread.start()
            self.threads.append(thread)

    def command(self, worker: str) -> list[str]:
        c = self.config
        return [
            sys.executable,
            "-m",
            "tiedlora.service.worker",
            *("--state", str(self.state), "--model", c.model, "--name", self.model_name, "--worker", worker),
            *("--parent", str(os.getpid()), "--max_running", str(c.max_running_jobs)),
            *("--lease", str(c.job_lease_s), "--precision", c.train_precision),
            *(("--quantize", c.quantize) if c.quantize else ()),  # jobs train on the base as it is served
        ]

    def keep(self, i: int) -> None:
        wait = RESTART_AFTER_S[0]
        log_path = self.state / f"training-{i}.log"
        while not self.closing.is_set():
            worker = f"{socket.gethostname()}:{os.getpid()}:{i}:{secrets.token_hex(4)}"
            started = time.time()
            with open(log_path, "ab") as log:
                env = os.environ | {STORE_ENV: self.store.url}
                process = subprocess.Popen(self.command(worker), stdout=log, stderr=subprocess.STDOUT, env=env)
                self.processes[i] = process
                code = process.wait()
            if self.closing.is_set():
                return
            why = "killed: out of memory?" if code == -signal.SIGKILL else f"exit code {code}"
            message = f"The training process stopped ({why}); the server goes on."
            print(f"tiedlora serve: {message} Its log: {log_path}.", file=sys.stderr, flush=True)
            for job_id in self.store.held_by(worker):  # the log's path is the server's, not the tenant's
                self.store.fail(worker, job_id, "training_process_died", message)
            wait = (
                RESTART_AFTER_S[0] if time.time() - started > RESTART_AFTER_S[1] else min(2 * wait, RESTART_AFTER_S[1])
            )
            self.closing.wait(wait)

    def close(self) -> None:
        """Stop every process; their running jobs stay `running` and are taken up again, from
        their last checkpoint, when a process starts again and their lease has lapsed."""
        self.closing.set()
        for process in self.processes.values():
            process.terminate()
        for process in self.processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for thread in self.threads:
            thread.join(10)
